//! Segment files on disk: naming, listing, creating, and recovery when a log is opened.
//!
//! Recovery trusts sealed (non-last) segments after checking their headers (or fully, with
//! [`LogConfig::verify_on_open`]): the writer syncs a segment before rolling past it, so damage
//! there is corruption that needs an operator, reported as [`LogError::Corrupt`]. The last
//! segment is scanned record by record; anything after the last valid record is a torn tail
//! from a crash mid-write — never acknowledged, because appends complete only after their
//! bytes are written (and synced, per the durability) — and is truncated away.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::config::LogConfig;
use crate::error::{CorruptReason, IoOp, LogError, Result};
use crate::format::{self, SEGMENT_HEADER_LEN};

/// File-name suffix of segments.
const SUFFIX: &str = ".log";
/// Digits of the zero-padded base offset in a segment file name.
const NAME_DIGITS: usize = 20;

/// One segment as the log tracks it in memory.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    /// Offset of the segment's first record.
    pub(crate) base_offset: u64,
    /// Position of the segment's first byte in the log's "logical byte" coordinate: the sum of
    /// the sizes of all segments before it (since the oldest segment present at open). Readers
    /// and the writer express positions in it so backpressure can count unconsumed bytes.
    pub(crate) logical_start: u64,
    /// Path of the file.
    pub(crate) path: PathBuf,
}

/// `{dir}/{base_offset:020}.log`.
pub(crate) fn segment_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!(
        "{base_offset:0width$}{SUFFIX}",
        width = NAME_DIGITS
    ))
}

/// The base offset encoded in a segment file name, or `None` for any other file.
fn parse_segment_name(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_suffix(SUFFIX)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates (or truncates) the segment file for `base_offset` and writes its header.
/// With `sync`, the file and the directory entry are made durable before returning.
pub(crate) fn create_segment(dir: &Path, base_offset: u64, sync: bool) -> std::io::Result<File> {
    let path = segment_path(dir, base_offset);
    // Truncate rather than create_new: a file of this name can only be debris of our own
    // failed rollback, since new bases are always above every listed segment.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.write_all(&format::encode_segment_header(base_offset))?;
    if sync {
        file.sync_data()?;
        sync_dir(dir)?;
    }
    Ok(file)
}

/// Makes directory entries (created or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
    }
    Ok(())
}

/// Reads and validates the header of a segment file.
pub(crate) fn read_header(file: &mut File, path: &Path, base_offset: u64) -> Result<()> {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    match file.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(corrupt(path, 0, CorruptReason::TruncatedRecord));
        }
        Err(e) => return Err(LogError::io(IoOp::Read, path, &e)),
    }
    format::check_segment_header(&h, base_offset).map_err(|reason| corrupt(path, 0, reason))
}

pub(crate) fn corrupt(path: &Path, position: u64, reason: CorruptReason) -> LogError {
    LogError::Corrupt {
        path: path.to_path_buf(),
        position,
        reason,
    }
}

/// Base offsets of the segment files in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let open_err = |e: std::io::Error| LogError::io(IoOp::Open, dir, &e);
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(open_err)? {
        if let Some(base) = parse_segment_name(&entry.map_err(open_err)?.file_name()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// State of the directory after recovery, ready for the writer.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Segments in base-offset order; the last one is active.
    pub(crate) segments: Vec<SegmentMeta>,
    /// Offset the next record gets.
    pub(crate) next_offset: u64,
    /// Length of the active segment after any truncation.
    pub(crate) active_len: u64,
    /// Bytes cut from the tail of the last segment.
    pub(crate) truncated_bytes: u64,
}

/// Lists, validates and repairs the segments of `config.dir`, creating the first segment of an
/// empty log.
pub(crate) fn recover(config: &LogConfig) -> Result<Recovered> {
    let dir = &config.dir;
    let open_err = |path: &Path, e: std::io::Error| LogError::io(IoOp::Open, path, &e);
    let bases = list_segments(dir)?;

    let Some((&last_base, sealed)) = bases.split_last() else {
        create_segment(dir, 0, true).map_err(|e| LogError::io(IoOp::Roll, dir, &e))?;
        return Ok(Recovered {
            segments: vec![SegmentMeta {
                base_offset: 0,
                logical_start: 0,
                path: segment_path(dir, 0),
            }],
            next_offset: 0,
            active_len: SEGMENT_HEADER_LEN as u64,
            truncated_bytes: 0,
        });
    };

    let mut segments = Vec::with_capacity(bases.len());
    let mut logical = 0u64;
    for (i, &base) in sealed.iter().enumerate() {
        let path = segment_path(dir, base);
        let mut file = File::open(&path).map_err(|e| open_err(&path, e))?;
        let len = file.metadata().map_err(|e| open_err(&path, e))?.len();
        read_header(&mut file, &path, base)?;
        if config.verify_on_open {
            let scan = format::scan_records(&file, len).map_err(|e| open_err(&path, e))?;
            if let Some(reason) = scan.stop {
                return Err(corrupt(&path, scan.valid_len, reason));
            }
            let next_base = bases.get(i + 1).copied().unwrap_or(last_base);
            let expected = next_base - base;
            if scan.records != expected {
                return Err(corrupt(
                    &path,
                    len,
                    CorruptReason::RecordCount {
                        expected,
                        found: scan.records,
                    },
                ));
            }
        }
        segments.push(SegmentMeta {
            base_offset: base,
            logical_start: logical,
            path,
        });
        logical += len;
    }

    let path = segment_path(dir, last_base);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| open_err(&path, e))?;
    let len = file.metadata().map_err(|e| open_err(&path, e))?.len();
    let (records, active_len, truncated_bytes) = if len < SEGMENT_HEADER_LEN as u64 {
        // A crash between creating the segment and writing its header: rewrite the header.
        drop(file);
        create_segment(dir, last_base, true).map_err(|e| open_err(&path, e))?;
        tracing::warn!(path = %path.display(), bytes = len, "log segment header was torn; rewritten");
        (0, SEGMENT_HEADER_LEN as u64, len)
    } else {
        read_header(&mut file, &path, last_base)?;
        let scan = format::scan_records(&file, len).map_err(|e| open_err(&path, e))?;
        if let Some(reason) = scan.stop {
            file.set_len(scan.valid_len)
                .map_err(|e| open_err(&path, e))?;
            file.sync_all().map_err(|e| open_err(&path, e))?;
            tracing::warn!(
                path = %path.display(),
                position = scan.valid_len,
                bytes = len - scan.valid_len,
                %reason,
                "log tail was torn; truncated to the last valid record"
            );
        }
        (scan.records, scan.valid_len, len - scan.valid_len)
    };
    segments.push(SegmentMeta {
        base_offset: last_base,
        logical_start: logical,
        path,
    });
    Ok(Recovered {
        segments,
        next_offset: last_base + records,
        active_len,
        truncated_bytes,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_other_files_are_ignored() {
        let p = segment_path(Path::new("/x"), 1234);
        assert_eq!(p, Path::new("/x/00000000000000001234.log"));
        assert_eq!(parse_segment_name(p.file_name().unwrap()), Some(1234));
        assert_eq!(parse_segment_name(OsStr::new("1234.log")), None);
        assert_eq!(
            parse_segment_name(OsStr::new("0000000000000000123a.log")),
            None
        );
        assert_eq!(
            parse_segment_name(OsStr::new("00000000000000001234.tmp")),
            None
        );
        assert_eq!(parse_segment_name(OsStr::new("LOCK")), None);
    }
}
