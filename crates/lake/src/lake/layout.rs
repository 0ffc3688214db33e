//! Where lake files live and what their names mean: Hive-style `date=` partitions of each table,
//! checkpoint epochs in file names, and the listing of a partition's committed files.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;

use super::{DAY_US, LakeError, UNIX_EPOCH_DAYS_FROM_CE, io_at};
use crate::schema::Table;

/// The dates of `table`'s partitions under `root`, oldest first (none if the table directory
/// does not exist). Directories not named `date=YYYY-MM-DD` are ignored.
pub fn partition_dates(root: &Path, table: Table) -> Result<Vec<NaiveDate>, LakeError> {
    let table_dir = root.join(table.name());
    let entries = match fs::read_dir(&table_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(&table_dir)(e)),
    };
    let mut dates = Vec::new();
    for entry in entries {
        let name = entry.map_err(io_at(&table_dir))?.file_name();
        let date = name
            .to_str()
            .and_then(|n| n.strip_prefix("date="))
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
        dates.extend(date);
    }
    dates.sort_unstable();
    Ok(dates)
}

/// Directory of `table`'s partition for `date` under `root`.
pub fn partition_dir(root: &Path, table: Table, date: NaiveDate) -> PathBuf {
    root.join(table.name())
        .join(format!("date={}", date.format("%Y-%m-%d")))
}

/// Days since 1970-01-01 (UTC) of an event time in µs.
pub(super) fn day_of(timestamp_us: i64) -> i32 {
    // |i64::MAX / DAY_US| < 2^27, so the quotient always fits.
    timestamp_us.div_euclid(DAY_US) as i32
}

pub(super) fn date_of_day(day: i32) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(day.checked_add(UNIX_EPOCH_DAYS_FROM_CE)?)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LakeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// The `writer_id` of files written during checkpoint epoch `epoch`: `e{epoch:010}`.
///
/// Exactly-once lake output works by epochs: every file committed between checkpoint `E - 1`
/// and checkpoint `E` carries epoch `E` in its name, and checkpoint `E` is written only after
/// all of them are committed. Recovery from checkpoint `K` deletes the files of epochs above
/// `K` ([`remove_files_after_epoch`]) before replaying the log from `K`'s offsets, so a row is
/// never both in a surviving file and replayed.
pub fn epoch_writer_id(epoch: u64) -> String {
    format!("e{epoch:010}")
}

/// The epoch in a data file name written with [`epoch_writer_id`], if any.
pub(super) fn file_epoch(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".parquet")?;
    let (_, id) = stem.rsplit_once('-')?;
    let digits = id.strip_prefix('e')?;
    (digits.len() == 10).then(|| digits.parse().ok()).flatten()
}

/// The `writer_id` of files written for stream partition `partition` during that partition's
/// checkpoint epoch `epoch`: `p{partition:05}e{epoch:010}`.
///
/// In distributed mode each processor writes the lake for the Kafka partitions it owns, each
/// partition with checkpoints (and so epochs) of its own that move with the partition: the new
/// owner deletes that partition's files of epochs after its checkpoint
/// ([`LakeLocation::remove_stream_files_after`](super::LakeLocation)) and replays the
/// partition from the checkpoint's offset, the same rule as [`epoch_writer_id`] per partition.
pub fn partition_epoch_writer_id(partition: u32, epoch: u64) -> String {
    format!("p{partition:05}e{epoch:010}")
}

/// The stream partition and epoch in a data file name written with
/// [`partition_epoch_writer_id`], if any.
pub(super) fn file_partition_epoch(name: &str) -> Option<(u32, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (_, id) = stem.rsplit_once('-')?;
    let (partition, epoch) = id.strip_prefix('p')?.split_once('e')?;
    if partition.len() != 5 || epoch.len() != 10 {
        return None;
    }
    Some((partition.parse().ok()?, epoch.parse().ok()?))
}

/// Deletes every committed data file whose epoch is greater than `epoch`: the output of a
/// checkpoint that never completed, which the log replay will write again. Returns how many.
pub fn remove_files_after_epoch(root: &Path, epoch: u64) -> Result<usize, LakeError> {
    remove_files_where(root, &|name| file_epoch(name).is_some_and(|e| e > epoch))
}

/// Deletes every committed data file whose name `doomed` selects. Returns how many.
pub(super) fn remove_files_where(
    root: &Path,
    doomed: &dyn Fn(&str) -> bool,
) -> Result<usize, LakeError> {
    let mut removed = 0;
    for table in Table::ALL {
        let table_dir = root.join(table.name());
        let partitions = match fs::read_dir(&table_dir) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(&table_dir)(e)),
        };
        for partition in partitions {
            let dir = partition.map_err(io_at(&table_dir))?.path();
            if !dir.is_dir() {
                continue;
            }
            for (name, _) in committed_files(&dir)? {
                if doomed(&name) {
                    let path = dir.join(&name);
                    fs::remove_file(&path).map_err(io_at(&path))?;
                    removed += 1;
                }
            }
            if removed > 0 {
                sync_dir(&dir)?;
            }
        }
    }
    Ok(removed)
}

pub(super) fn file_name_string(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Committed data files of a partition directory, sorted by name (= creation order), with sizes.
pub(super) fn committed_files(dir: &Path) -> Result<Vec<(String, u64)>, LakeError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            let len = entry.metadata().map_err(io_at(&entry.path()))?.len();
            files.push((name, len));
        }
    }
    files.sort();
    Ok(files)
}
