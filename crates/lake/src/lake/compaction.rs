//! Compaction: merging a partition's small files into one, crash-safely (see "Compaction" in
//! the parent module's docs for the order of steps), and rolling interrupted compactions forward.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use object_store::path::Path as ObjectPath;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use super::layout::{
    committed_files, epoch_writer_id, file_epoch, file_name_string, partition_dir, sync_dir,
};
use super::store::ObjectLake;
use super::{FinishedFile, LakeError, LakeStats, LakeWriter, OpenFile, io_at};
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
        if let Some(objects) = self.ctx.config.root.objects().cloned() {
            return self.compact_objects(&objects, table, date, through_epoch);
        }
        let ctx = &mut self.ctx;
        let dir = partition_dir(ctx.config.root.local_root(), table, date);
        if dir.is_dir() {
            roll_forward_compactions(&dir, &mut ctx.stats)?;
        }
        let Selection {
            inputs,
            input_bytes,
            newest_epoch,
            pending_files,
        } = select_inputs(
            committed_files(&dir)?,
            ctx.config.target_file_bytes,
            through_epoch,
        );
        if inputs.len() < 2 {
            return Ok(CompactionReport {
                pending_files,
                ..CompactionReport::default()
            });
        }

        // 1. The merged file, hidden.
        let (
            FinishedFile {
                tmp_path,
                final_path,
                bytes: output_bytes,
                ..
            },
            rows,
        ) = merge_inputs(ctx, table, &dir, newest_epoch, &inputs, |name| {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io_at(&path))?;
            Ok((file, path))
        })?;

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

/// The files one compaction merges, chosen from a partition's committed files.
struct Selection {
    inputs: Vec<String>,
    input_bytes: u64,
    newest_epoch: Option<u64>,
    pending_files: usize,
}

/// Picks the small files (oldest first, up to about `target` bytes) among `files` (sorted by
/// name, with sizes), leaving out those of epochs after `through_epoch`.
fn select_inputs(files: Vec<(String, u64)>, target: u64, through_epoch: Option<u64>) -> Selection {
    let small = target / SMALL_FILE_FRACTION;
    let mut sel = Selection {
        inputs: Vec::new(),
        input_bytes: 0,
        newest_epoch: None,
        pending_files: 0,
    };
    for (name, len) in files {
        let epoch = file_epoch(&name);
        if len >= small {
            continue;
        }
        if epoch.zip(through_epoch).is_some_and(|(e, max)| e > max) {
            sel.pending_files += 1;
            continue;
        }
        if sel.inputs.len() >= 2 && sel.input_bytes + len > target {
            break;
        }
        sel.input_bytes += len;
        sel.newest_epoch = sel.newest_epoch.max(epoch);
        sel.inputs.push(name);
    }
    sel
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

impl LakeWriter {
    /// [`LakeWriter::compact`] on an object store: the same steps in the same order, with a
    /// server-side copy in place of the rename and the journal stored beside the files:
    ///
    /// 1. encode the merged file in the staging directory and upload it as the hidden object
    ///    `.part-….parquet.tmp` of the partition (readers skip names starting with a dot);
    /// 2. PUT the journal `.compact-{output}.json` in the partition;
    /// 3. delete the inputs (from here until 4, readers miss those rows);
    /// 4. copy the hidden object to its final name, delete the hidden one;
    /// 5. delete the journal.
    ///
    /// Readers never see a row twice: the output becomes visible only once every input is gone.
    /// The journal lives in the store rather than in the data dir because after step 3 the only
    /// copy of the inputs' rows is the hidden object in the store: whatever finishes the job (the
    /// next `open` or `compact` of the prefix, maybe on another machine with a fresh data dir)
    /// must find both there. A journal whose PUT failed but landed anyway names a hidden object
    /// that step 1's clean-up deleted and an output that does not exist: it is discarded and the
    /// inputs kept, as for a torn journal on disk.
    fn compact_objects(
        &mut self,
        objects: &ObjectLake,
        table: Table,
        date: NaiveDate,
        through_epoch: Option<u64>,
    ) -> Result<CompactionReport, LakeError> {
        let ctx = &mut self.ctx;
        let partition = objects.partition_key(table, date);
        roll_forward_object_compactions(objects, &partition, &mut ctx.stats)?;
        let Selection {
            inputs,
            input_bytes,
            newest_epoch,
            pending_files,
        } = select_inputs(
            objects.committed_files(table, date)?,
            ctx.config.target_file_bytes,
            through_epoch,
        );
        if inputs.len() < 2 {
            return Ok(CompactionReport {
                pending_files,
                ..CompactionReport::default()
            });
        }

        // 1. The merged file, staged, then uploaded under a hidden name.
        let staging = partition_dir(objects.staging_dir(), table, date);
        fs::create_dir_all(&staging).map_err(io_at(&staging))?;
        let (
            FinishedFile {
                tmp_path,
                final_path,
                bytes: output_bytes,
                ..
            },
            rows,
        ) = merge_inputs(ctx, table, &staging, newest_epoch, &inputs, |name| {
            let key = partition.clone().join(name);
            let bytes = objects.get(&key)?.ok_or_else(|| LakeError::Store {
                url: objects.url().into(),
                key: key.to_string(),
                source: object_store::Error::NotFound {
                    path: key.to_string(),
                    source: "a compaction input vanished (another writer on the prefix?)".into(),
                },
            })?;
            Ok((bytes, PathBuf::from(key.as_ref())))
        })?;
        let journal = CompactionJournal {
            output: file_name_string(&final_path),
            tmp: file_name_string(&tmp_path),
            inputs: inputs.clone(),
        };
        let tmp_key = partition.clone().join(journal.tmp.as_str());
        let uploaded = objects.upload(&tmp_path, &tmp_key);
        let _ = fs::remove_file(&tmp_path);
        uploaded?;

        // 2. The journal that lets `open` finish the job after a crash.
        let journal_key = partition
            .clone()
            .join(format!(".compact-{}.json", journal.output).as_str());
        let put = serde_json::to_vec(&journal)
            .map_err(|e| io_at(Path::new(journal_key.as_ref()))(io::Error::other(e)))
            .and_then(|bytes| objects.put(&journal_key, bytes.into()));
        if let Err(e) = put {
            let _ = objects.delete(&tmp_key);
            return Err(e);
        }

        // 3.-5. Once the journal is stored the compaction only moves forward.
        finish_object_compaction(objects, &partition, &journal)?;
        objects.delete(&journal_key)?;

        let output = partition.clone().join(journal.output.as_str());
        ctx.stats.compactions += 1;
        tracing::info!(
            %table, %date, inputs = inputs.len(), rows, output = %output,
            "lake partition compacted"
        );
        Ok(CompactionReport {
            input_files: inputs.len(),
            input_bytes,
            rows,
            output: Some(PathBuf::from(output.as_ref())),
            output_bytes,
            pending_files,
        })
    }
}

/// Steps 3 and 4 of an object-store compaction: delete the inputs, then reveal the output by a
/// copy of the hidden object. Idempotent.
fn finish_object_compaction(
    objects: &ObjectLake,
    partition: &ObjectPath,
    journal: &CompactionJournal,
) -> Result<(), LakeError> {
    for name in &journal.inputs {
        objects.delete(&partition.clone().join(name.as_str()))?;
    }
    let tmp = partition.clone().join(journal.tmp.as_str());
    if objects.exists(&tmp)? {
        objects.copy(&tmp, &partition.clone().join(journal.output.as_str()))?;
        objects.delete(&tmp)?;
    }
    Ok(())
}

/// Whether `key` lies directly in `partition`; its file name then.
fn name_in<'a>(key: &'a ObjectPath, partition: &ObjectPath) -> Option<&'a str> {
    (key.parts().count() == partition.parts().count() + 1 && key.prefix_matches(partition))
        .then(|| key.filename())
        .flatten()
}

/// Finishes the compactions of an object-store partition whose journals are left (see
/// [`roll_forward_compactions`]); returns the hidden names the journals referred to.
fn roll_forward_object_compactions(
    objects: &ObjectLake,
    partition: &ObjectPath,
    stats: &mut LakeStats,
) -> Result<Vec<String>, LakeError> {
    let mut handled = Vec::new();
    for meta in objects.list(partition)? {
        let Some(name) = name_in(&meta.location, partition) else {
            continue;
        };
        if !(name.starts_with(".compact-") && name.ends_with(".json")) {
            continue;
        }
        let journal = objects
            .get(&meta.location)?
            .and_then(|b| serde_json::from_slice::<CompactionJournal>(&b).ok())
            .filter(CompactionJournal::names_are_local);
        match journal {
            Some(j)
                if objects.exists(&partition.clone().join(j.tmp.as_str()))?
                    || objects.exists(&partition.clone().join(j.output.as_str()))? =>
            {
                finish_object_compaction(objects, partition, &j)?;
                stats.compactions_recovered += 1;
                handled.push(j.tmp);
            }
            _ => {
                tracing::warn!(url = objects.url(), journal = %meta.location, "discarding unusable compaction journal")
            }
        }
        objects.delete(&meta.location)?;
    }
    Ok(handled)
}

/// What [`recover_table_dir`] does for the partitions of an object-store lake: rolls
/// interrupted compactions forward and deletes hidden objects they left (one listing per table;
/// partitions are relisted only when they hold a journal).
pub(super) fn recover_objects(
    objects: &ObjectLake,
    stats: &mut LakeStats,
) -> Result<(), LakeError> {
    for table in Table::ALL {
        let table_key = objects.key([table.name()]);
        let listing = objects.list(&table_key)?;
        let mut partitions = std::collections::BTreeSet::new();
        for meta in &listing {
            let parts: Vec<_> = meta.location.parts().collect();
            let [.., partition, name] = parts.as_slice() else {
                continue;
            };
            if parts.len() == table_key.parts().count() + 2
                && partition.as_ref().starts_with("date=")
                && name.as_ref().starts_with(".compact-")
            {
                partitions.insert(table_key.clone().join(partition.clone()));
            }
        }
        let mut handled = Vec::new();
        for partition in &partitions {
            for tmp in roll_forward_object_compactions(objects, partition, stats)? {
                handled.push(partition.clone().join(tmp.as_str()));
            }
        }
        for meta in &listing {
            let parts: Vec<_> = meta.location.parts().collect();
            let [.., partition, name] = parts.as_slice() else {
                continue;
            };
            let leftover = parts.len() == table_key.parts().count() + 2
                && partition.as_ref().starts_with("date=")
                && name.as_ref().starts_with(".part-")
                && name.as_ref().ends_with(".parquet.tmp");
            if leftover && !handled.contains(&meta.location) {
                objects.delete(&meta.location)?;
                stats.tmp_files_removed += 1;
            }
        }
    }
    Ok(())
}

/// Step 1 of both compactions: a new hidden file in `dir`, named for `newest_epoch` (see
/// [`epoch_writer_id`]), holding every row of `inputs` in order, finished. `open` gives an
/// input's contents (a file or the bytes of an object) and the name its errors carry. On an
/// error the new file is removed. Returns the finished file and the rows merged.
fn merge_inputs<R: parquet::file::reader::ChunkReader + 'static>(
    ctx: &mut super::Ctx,
    table: Table,
    dir: &Path,
    newest_epoch: Option<u64>,
    inputs: &[String],
    mut open: impl FnMut(&str) -> Result<(R, PathBuf), LakeError>,
) -> Result<(FinishedFile, u64), LakeError> {
    let writer_id = newest_epoch.map(epoch_writer_id);
    let mut out = ctx.new_file(table, dir, writer_id.as_deref())?;
    let batch_rows = ctx.batch_rows;
    let mut rows = 0u64;
    let copied = inputs.iter().try_for_each(|name| {
        let (input, path) = open(name)?;
        rows += append_rows(&mut out, input, table, batch_rows, || path)?;
        Ok(())
    });
    if let Err(e) = copied {
        out.abort();
        return Err(e);
    }
    Ok((out.finish()?, rows))
}

/// Appends every row of one compaction input (`input`, a file or the bytes of an object) to
/// `out`, after checking that its schema is the table's; `name` names it in the error. Returns
/// the rows copied.
fn append_rows<R: parquet::file::reader::ChunkReader + 'static>(
    out: &mut OpenFile,
    input: R,
    table: Table,
    batch_rows: usize,
    name: impl FnOnce() -> PathBuf,
) -> Result<u64, LakeError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(input)?;
    if builder.schema().fields() != table.schema().fields() {
        return Err(LakeError::SchemaMismatch {
            table,
            path: name(),
        });
    }
    let mut rows = 0;
    for batch in builder.with_batch_size(batch_rows).build()? {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        out.writer.write(&batch)?;
    }
    Ok(rows)
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
