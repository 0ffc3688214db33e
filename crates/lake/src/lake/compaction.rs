//! Compaction: merging a partition's small files into one, crash-safely (see "Compaction" in
//! the parent module's docs for the order of steps), and rolling interrupted compactions forward.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use super::layout::{
    committed_files, epoch_writer_id, file_epoch, file_name_string, partition_dir, sync_dir,
};
use super::{FinishedFile, LakeError, LakeStats, LakeWriter, io_at};
use crate::schema::Table;

/// What one [`LakeWriter::compact`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Small files merged (0 when there was nothing to do).
    pub input_files: usize,
    /// Their total size.
    pub input_bytes: u64,
    /// Rows in the merged file.
    pub rows: u64,
    /// The merged file, if one was written.
    pub output: Option<PathBuf>,
    /// Its size.
    pub output_bytes: u64,
    /// Small files left out because their epoch is after `through_epoch`: the partition has
    /// more to merge once those epochs are checkpointed.
    pub pending_files: usize,
}

/// Compaction merges files smaller than `target_file_bytes / SMALL_FILE_FRACTION`.
const SMALL_FILE_FRACTION: u64 = 4;

impl LakeWriter {
    /// Merges the small committed files of `table`'s partition `date` (under a quarter of
    /// `target_file_bytes`) into one file (oldest first, up to about `target_file_bytes`; call
    /// again to continue). Larger files are left as they are: rewriting them would cost as
    /// much as writing them did and gain little, and it bounds one call's work. Meant for
    /// closed partitions (dates no longer written), but safe on any: files still open are not
    /// visible and are left alone. See the module docs for the order of steps and what readers
    /// see.
    ///
    /// With epoch-named files ([`epoch_writer_id`]), pass the last *checkpointed* epoch as
    /// `through_epoch`: files of later epochs are left alone, and the merged file is named for
    /// the newest epoch among its inputs. Recovery from that checkpoint then neither deletes
    /// the merged file (which would lose the rows of its older inputs, already deleted) nor
    /// keeps a row that the log replay writes again. Files without an epoch in their name are
    /// always eligible. `None` ignores epochs (a lake without checkpoints).
    pub fn compact(
        &mut self,
        table: Table,
        date: NaiveDate,
        through_epoch: Option<u64>,
    ) -> Result<CompactionReport, LakeError> {
        let result = self.compact_inner(table, date, through_epoch);
        if result.is_err() {
            self.ctx.stats.errors += 1;
        }
        result
    }

    fn compact_inner(
        &mut self,
        table: Table,
        date: NaiveDate,
        through_epoch: Option<u64>,
    ) -> Result<CompactionReport, LakeError> {
        let ctx = &mut self.ctx;
        let dir = partition_dir(&ctx.config.root, table, date);
        if dir.is_dir() {
            roll_forward_compactions(&dir, &mut ctx.stats)?;
        }
        let target = ctx.config.target_file_bytes;
        let small = target / SMALL_FILE_FRACTION;
        let mut inputs = Vec::new();
        let mut input_bytes = 0u64;
        let mut newest_epoch = None;
        let mut pending_files = 0;
        for (name, len) in committed_files(&dir)? {
            let epoch = file_epoch(&name);
            if len >= small {
                continue;
            }
            if epoch.zip(through_epoch).is_some_and(|(e, max)| e > max) {
                pending_files += 1;
                continue;
            }
            if inputs.len() >= 2 && input_bytes + len > target {
                break;
            }
            input_bytes += len;
            newest_epoch = newest_epoch.max(epoch);
            inputs.push(name);
        }
        if inputs.len() < 2 {
            return Ok(CompactionReport {
                pending_files,
                ..CompactionReport::default()
            });
        }

        // 1. The merged file, hidden.
        let writer_id = newest_epoch.map(epoch_writer_id);
        let mut out = ctx.new_file(table, &dir, writer_id.as_deref())?;
        let schema = table.schema();
        let mut rows = 0u64;
        let copied = (|| {
            for name in &inputs {
                let path = dir.join(name);
                let file = File::open(&path).map_err(io_at(&path))?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
                if builder.schema().fields() != schema.fields() {
                    return Err(LakeError::SchemaMismatch { table, path });
                }
                for batch in builder.with_batch_size(ctx.batch_rows).build()? {
                    let batch = batch?;
                    rows += batch.num_rows() as u64;
                    out.writer.write(&batch)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = copied {
            out.abort();
            return Err(e);
        }
        let FinishedFile {
            tmp_path,
            final_path,
            bytes: output_bytes,
            ..
        } = out.finish()?;

        // 2. The journal that lets `open` finish the job after a crash.
        let journal = CompactionJournal {
            output: file_name_string(&final_path),
            tmp: file_name_string(&tmp_path),
            inputs: inputs.clone(),
        };
        let journal_path = dir.join(format!(".compact-{}.json", journal.output));
        if let Err(e) = write_synced(&journal_path, &journal) {
            let _ = fs::remove_file(&tmp_path);
            let _ = fs::remove_file(&journal_path);
            return Err(e);
        }
        sync_dir(&dir)?;

        // 3.-5. Once the journal is durable the compaction only moves forward.
        finish_compaction(&dir, &journal)?;
        fs::remove_file(&journal_path).map_err(io_at(&journal_path))?;

        ctx.stats.compactions += 1;
        tracing::info!(
            %table, %date, inputs = inputs.len(), rows, output = %final_path.display(),
            "lake partition compacted"
        );
        Ok(CompactionReport {
            input_files: inputs.len(),
            input_bytes,
            rows,
            output: Some(final_path),
            output_bytes,
            pending_files,
        })
    }
}

/// What an in-flight compaction is replacing with what (`.compact-{output}.json`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CompactionJournal {
    /// Final name of the merged file.
    output: String,
    /// Hidden name it is written under.
    tmp: String,
    /// Files it replaces.
    inputs: Vec<String>,
}

impl CompactionJournal {
    /// True when every name is a plain file name (a corrupt journal must not reach elsewhere).
    pub(super) fn names_are_local(&self) -> bool {
        std::iter::once(&self.output)
            .chain(std::iter::once(&self.tmp))
            .chain(&self.inputs)
            .all(|n| !n.is_empty() && Path::new(n).file_name() == Some(n.as_ref()))
    }
}

fn write_synced(path: &Path, journal: &CompactionJournal) -> Result<(), LakeError> {
    let bytes = serde_json::to_vec(journal).map_err(|e| io_at(path)(io::Error::other(e)))?;
    let mut f = File::create(path).map_err(io_at(path))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_at(path))
}

/// Steps 3 and 4 of a compaction: delete the inputs, then reveal the output. Idempotent.
fn finish_compaction(dir: &Path, journal: &CompactionJournal) -> Result<(), LakeError> {
    for name in &journal.inputs {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
    }
    sync_dir(dir)?;
    let tmp = dir.join(&journal.tmp);
    if tmp.exists() {
        let out = dir.join(&journal.output);
        fs::rename(&tmp, &out).map_err(io_at(&out))?;
        sync_dir(dir)?;
    }
    Ok(())
}

fn dir_names(dir: &Path) -> Result<Vec<String>, LakeError> {
    fs::read_dir(dir)
        .map_err(io_at(dir))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_at(dir))
}

/// Finishes the compactions of partition `dir` whose journals are left: after a crash (from
/// [`LakeWriter::open`]), or after a compaction that failed past its journal (from the next
/// [`LakeWriter::compact`] of the partition, so its rows do not stay hidden until a restart).
fn roll_forward_compactions(dir: &Path, stats: &mut LakeStats) -> Result<(), LakeError> {
    for name in dir_names(dir)?
        .iter()
        .filter(|n| n.starts_with(".compact-") && n.ends_with(".json"))
    {
        let path = dir.join(name);
        let journal = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CompactionJournal>(&b).ok())
            .filter(CompactionJournal::names_are_local);
        match journal {
            // The output exists (hidden or already renamed): the journal was durable before
            // any input was deleted, so finishing is safe.
            Some(j) if dir.join(&j.tmp).exists() || dir.join(&j.output).exists() => {
                finish_compaction(dir, &j)?;
                stats.compactions_recovered += 1;
            }
            // Torn journal (crash while writing it: no input was deleted yet) or no output:
            // keep the inputs.
            _ => {
                tracing::warn!(journal = %path.display(), "discarding unusable compaction journal")
            }
        }
        fs::remove_file(&path).map_err(io_at(&path))?;
    }
    Ok(())
}

/// Rolls interrupted compactions forward and deletes leftover temp files in every partition of
/// one table directory.
pub(super) fn recover_table_dir(table_dir: &Path, stats: &mut LakeStats) -> Result<(), LakeError> {
    for entry in fs::read_dir(table_dir).map_err(io_at(table_dir))? {
        let entry = entry.map_err(io_at(table_dir))?;
        let is_partition = entry.file_name().to_string_lossy().starts_with("date=")
            && entry.file_type().map_err(io_at(&entry.path()))?.is_dir();
        if !is_partition {
            continue;
        }
        let dir = entry.path();
        // Journals first: they may name a `.tmp` that must be renamed, not deleted.
        roll_forward_compactions(&dir, stats)?;
        let names = dir_names(&dir)?;
        for name in &names {
            if name.starts_with(".part-") && name.ends_with(".parquet.tmp") {
                let path = dir.join(name);
                match fs::remove_file(&path) {
                    Ok(()) => stats.tmp_files_removed += 1,
                    // Renamed by a journal above.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&path)(e)),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_names_must_stay_in_the_partition() {
        let j = CompactionJournal {
            output: "part-1.parquet".into(),
            tmp: ".part-1.parquet.tmp".into(),
            inputs: vec!["../../etc/passwd".into()],
        };
        assert!(!j.names_are_local());
    }
}
