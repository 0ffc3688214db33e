//! Checkpoints: the pipeline's state, the log offset it covers, and the lake epoch, in one file
//! written atomically.
//!
//! Exactly-once across a crash works like this: checkpoint `E` is written only after every lake
//! file of epoch `E` is committed and the sessions store is up to date; it records the log
//! offset up to which the pipeline had processed when its state was snapshotted. On start, the
//! newest checkpoint that verifies is restored, lake files of later epochs are deleted, and the
//! log is replayed from the checkpoint's offset: the outputs of that replay are exactly the ones
//! deleted or never written. The sessions store takes the replayed events idempotently.
//!
//! File format (`{epoch:010}.ckpt`): magic `SFCKPT02`, CRC-32 of everything after it, epoch
//! (u64 LE), log offset (u64 LE), snapshot length (u64 LE), snapshot bytes, then the active
//! model as JSON ([`CheckpointModel`]). Version 1 (`SFCKPT01`, written before models could be
//! swapped) ends after the snapshot and is still read. A torn or corrupt file fails the CRC and
//! the previous checkpoint is used instead.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SFCKPT02";
const MAGIC_V1: &[u8; 8] = b"SFCKPT01";
const HEADER: usize = 8 + 4 + 8 + 8 + 8;

/// One checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Lake epoch this checkpoint completes.
    pub(crate) epoch: u64,
    /// Log offset the pipeline state covers: replay starts here.
    pub(crate) log_offset: u64,
    /// Encoded `PipelineSnapshot`.
    pub(crate) snapshot: Vec<u8>,
    /// The model the snapshot's recurrent state belongs to; `None` in version 1 files.
    pub(crate) model: Option<CheckpointModel>,
}

/// The active model as of a checkpoint: a restart runs this one (DESIGN "Model contract": a
/// crash never silently reverts a swap), unless the configured location changed since.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CheckpointModel {
    /// Where the active model came from; `None` for the bundled demo model.
    pub(crate) location: Option<String>,
    /// `model.path` when the process that wrote this started: if the configuration names
    /// another location now, the operator chose a new model and the configuration wins.
    pub(crate) configured: Option<String>,
    pub(crate) version: String,
    /// Hex SHA-256 of the ONNX file and sidecar, to find exactly them in the model cache.
    pub(crate) sha256: Option<String>,
}

/// The checkpoint directory.
pub(crate) struct CheckpointStore {
    dir: PathBuf,
}

/// What loading found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) checkpoint: Option<Checkpoint>,
    /// Newer checkpoint files that failed verification (skipped).
    pub(crate) corrupt: Vec<PathBuf>,
}

impl CheckpointStore {
    pub(crate) fn open(dir: PathBuf) -> io::Result<CheckpointStore> {
        fs::create_dir_all(&dir)?;
        Ok(CheckpointStore { dir })
    }

    /// Writes `c` atomically: temp file, fsync, rename, fsync of the directory.
    pub(crate) fn write(&self, c: &Checkpoint) -> io::Result<()> {
        let mut body = Vec::with_capacity(HEADER + c.snapshot.len());
        body.extend_from_slice(&c.epoch.to_le_bytes());
        body.extend_from_slice(&c.log_offset.to_le_bytes());
        body.extend_from_slice(&(c.snapshot.len() as u64).to_le_bytes());
        body.extend_from_slice(&c.snapshot);
        if let Some(model) = &c.model {
            body.extend_from_slice(&serde_json::to_vec(model).map_err(io::Error::other)?);
        }
        let tmp = self.dir.join(format!(".{:010}.ckpt.tmp", c.epoch));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&crc32fast::hash(&body).to_le_bytes())?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.path(c.epoch))?;
        File::open(&self.dir)?.sync_all()
    }

    /// The newest checkpoint that verifies, with the newer ones that did not.
    pub(crate) fn load_latest(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        for (_, path) in self.list()?.into_iter().rev() {
            match fs::read(&path).ok().and_then(|bytes| decode(&bytes)) {
                Some(c) => {
                    loaded.checkpoint = Some(c);
                    break;
                }
                None => loaded.corrupt.push(path),
            }
        }
        Ok(loaded)
    }

    /// Deletes all but the newest `keep` checkpoints and leftover temp files. Returns the
    /// oldest checkpoint kept (`None` if it cannot be read): recovery may fall back to it if
    /// the newer ones turn out corrupt, so the log must be retained from its offset and lake
    /// files of later epochs must stay deletable.
    pub(crate) fn prune(&self, keep: usize) -> io::Result<Option<Oldest>> {
        let list = self.list()?;
        let cut = list.len().saturating_sub(keep.max(1));
        for (_, path) in &list[..cut] {
            fs::remove_file(path)?;
        }
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".ckpt.tmp"))
            {
                let _ = fs::remove_file(&path);
            }
        }
        let oldest = list[cut..]
            .first()
            .and_then(|(_, p)| fs::read(p).ok())
            .and_then(|b| decode(&b));
        Ok(oldest.map(|c| Oldest {
            epoch: c.epoch,
            log_offset: c.log_offset,
        }))
    }

    fn path(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("{epoch:010}.ckpt"))
    }

    /// Checkpoint files sorted by epoch, oldest first.
    fn list(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(epoch) = name
                .strip_suffix(".ckpt")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((epoch, path));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn decode(bytes: &[u8]) -> Option<Checkpoint> {
    if bytes.len() < HEADER || (&bytes[..8] != MAGIC && &bytes[..8] != MAGIC_V1) {
        return None;
    }
    let v1 = &bytes[..8] == MAGIC_V1;
    let crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    let body = &bytes[12..];
    if crc32fast::hash(body) != crc {
        return None;
    }
    let u64_at = |i: usize| {
        body.get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (epoch, log_offset, len) = (u64_at(0)?, u64_at(8)?, u64_at(16)?);
    let end = 24usize.checked_add(usize::try_from(len).ok()?)?;
    let snapshot = body.get(24..end)?;
    let rest = &body[end..];
    let model = match (v1, rest.is_empty()) {
        (true, true) => None,
        (true, false) => return None,
        (false, true) => None,
        (false, false) => Some(serde_json::from_slice(rest).ok()?),
    };
    Some(Checkpoint {
        epoch,
        log_offset,
        snapshot: snapshot.to_vec(),
        model,
    })
}

/// The oldest checkpoint kept by [`CheckpointStore::prune`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oldest {
    pub(crate) epoch: u64,
    pub(crate) log_offset: u64,
}

/// Path of the checkpoint directory under a data dir.
pub(crate) fn dir_in(data_dir: &Path) -> PathBuf {
    data_dir.join("checkpoints")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    fn ckpt(epoch: u64) -> Checkpoint {
        Checkpoint {
            epoch,
            log_offset: epoch * 100,
            snapshot: vec![epoch as u8; 1000],
            model: Some(CheckpointModel {
                location: Some(format!("s3://models/m{epoch}.onnx")),
                configured: None,
                version: format!("v{epoch}"),
                sha256: Some("ab".repeat(32)),
            }),
        }
    }

    #[test]
    fn newest_checkpoint_is_loaded_and_pruning_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_path_buf()).unwrap();
        for e in 1..=4 {
            store.write(&ckpt(e)).unwrap();
        }
        assert_eq!(store.load_latest().unwrap().checkpoint, Some(ckpt(4)));
        assert_eq!(
            store.prune(2).unwrap(),
            Some(Oldest {
                epoch: 3,
                log_offset: 300
            })
        );
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_path_buf()).unwrap();
        store.write(&ckpt(1)).unwrap();
        store.write(&ckpt(2)).unwrap();
        let newest = store.path(2);
        let mut bytes = fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&newest, &bytes).unwrap();
        let loaded = store.load_latest().unwrap();
        assert_eq!(loaded.checkpoint, Some(ckpt(1)));
        assert_eq!(loaded.corrupt, vec![newest]);
    }

    #[test]
    fn torn_checkpoint_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_path_buf()).unwrap();
        store.write(&ckpt(1)).unwrap();
        let bytes = fs::read(store.path(1)).unwrap();
        fs::write(store.path(2), &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(store.load_latest().unwrap().checkpoint, Some(ckpt(1)));
    }

    #[test]
    fn version_1_checkpoints_are_read_without_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_path_buf()).unwrap();
        let snapshot = vec![7u8; 100];
        let mut body = Vec::new();
        for v in [5u64, 500, snapshot.len() as u64] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&snapshot);
        let mut file = MAGIC_V1.to_vec();
        file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend_from_slice(&body);
        fs::write(store.path(5), &file).unwrap();
        let expected = Checkpoint {
            epoch: 5,
            log_offset: 500,
            snapshot,
            model: None,
        };
        assert_eq!(store.load_latest().unwrap().checkpoint, Some(expected));
    }
}
