//! Lake writer behaviour seen from the filesystem and a Parquet reader: partitions, atomic
//! files, rolling, compaction and recovery.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int16Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorflow_lake::{
    Compression, LakeConfig, LakeError, LakeWriter, Table, partition_dates, partition_dir,
    remove_files_after_epoch,
};
use sensorflow_records::{
    GapRecord, LateRecord, SampleChunk, SampleRow, SessionAggregate, SessionRecord, WindowRecord,
};

/// 2024-03-10T00:00:00Z in µs.
const MIDNIGHT_US: i64 = 1_710_028_800_000_000;
const DAY1: (i32, u32, u32) = (2024, 3, 9);
const DAY2: (i32, u32, u32) = (2024, 3, 10);

fn date((y, m, d): (i32, u32, u32)) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn config(root: &Path) -> LakeConfig {
    LakeConfig {
        writer_id: "test".into(),
        ..LakeConfig::new(root)
    }
}

/// `n` samples of `sensor` at 200 Hz from `start_us`, every column distinct per row.
fn chunk(sensor: &str, base_index: u32, start_us: i64, n: usize) -> SampleChunk {
    let session = format!("{sensor}_{start_us}");
    let mut c = SampleChunk::with_capacity(sensor.into(), session.into(), n);
    c.model_version = format!("model-of-{sensor}").into();
    for i in 0..n {
        let idx = base_index + i as u32;
        let x = idx as f32;
        c.sample_index.push(idx);
        c.timestamp_us.push(start_us + i as i64 * 5000);
        c.acc_x.push(x + 0.1);
        c.acc_y.push(x + 0.2);
        c.acc_z.push(x + 0.3);
        c.gyro_x.push(-x);
        c.gyro_y.push(x * 2.0);
        c.gyro_z.push(x * 3.0);
        c.mag_x.push(x / 7.0);
        c.mag_y.push(x / 11.0);
        c.mag_z.push(x / 13.0);
        c.temp_raw.push((idx % 30_000) as i16 - 100);
        c.accl_mag.push(x.sqrt());
        c.gyro_mag.push(x.ln_1p());
        c.velocity_pred.push(x * 0.01);
        c.velocity_raw.push(x * -0.02);
        c.movement_prob.push((idx % 100) as f32 / 100.0);
        c.ingest_us.push(start_us + 1_000_000 + i as i64);
    }
    c
}

/// `n` consecutive 64-sample packets of sensor `s` from midnight on.
fn consecutive_packets(n: u32) -> Vec<SampleChunk> {
    (0..n)
        .map(|i| chunk("s", i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64))
        .collect()
}

/// Every visible data file under `root/table`, sorted.
fn data_files(root: &Path, table: Table) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&root.join(table.name()), &mut |p| {
        let name = p.file_name().unwrap().to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            out.push(p.to_path_buf());
        }
    });
    out.sort();
    out
}

/// Every hidden or temporary file under `root`.
fn hidden_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(root, &mut |p| {
        if p.file_name().unwrap().to_string_lossy().starts_with('.') {
            out.push(p.to_path_buf());
        }
    });
    out
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

fn read_file(path: &Path) -> Vec<RecordBatch> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap()).unwrap();
    builder.build().unwrap().map(|b| b.unwrap()).collect()
}

fn read_files(paths: &[PathBuf]) -> Vec<RecordBatch> {
    paths.iter().flat_map(|p| read_file(p)).collect()
}

fn sample_rows(batches: &[RecordBatch]) -> Vec<SampleRow> {
    let mut rows = Vec::new();
    for b in batches {
        assert_eq!(b.schema(), Table::Samples.schema());
        let s = |i: usize| b.column(i).as_string::<i32>();
        let f = |i: usize| b.column(i).as_primitive::<Float32Type>();
        for r in 0..b.num_rows() {
            rows.push(SampleRow {
                sensor_id: s(0).value(r).into(),
                session_id: s(1).value(r).into(),
                sample_index: b.column(2).as_primitive::<UInt32Type>().value(r),
                timestamp_us: b.column(3).as_primitive::<Int64Type>().value(r),
                acc_x: f(4).value(r),
                acc_y: f(5).value(r),
                acc_z: f(6).value(r),
                gyro_x: f(7).value(r),
                gyro_y: f(8).value(r),
                gyro_z: f(9).value(r),
                mag_x: f(10).value(r),
                mag_y: f(11).value(r),
                mag_z: f(12).value(r),
                temp_raw: b.column(13).as_primitive::<Int16Type>().value(r),
                accl_mag: f(14).value(r),
                gyro_mag: f(15).value(r),
                velocity_pred: f(16).value(r),
                velocity_raw: f(17).value(r),
                movement_prob: f(18).value(r),
                model_version: s(19).value(r).into(),
                ingest_us: b.column(20).as_primitive::<Int64Type>().value(r),
            });
        }
    }
    rows
}

fn sorted(mut rows: Vec<SampleRow>) -> Vec<SampleRow> {
    rows.sort_by(|a, b| (&a.sensor_id, a.sample_index).cmp(&(&b.sensor_id, b.sample_index)));
    rows
}

fn expected_rows(chunks: &[SampleChunk], keep: impl Fn(i64) -> bool) -> Vec<SampleRow> {
    let rows = chunks
        .iter()
        .flat_map(|c| (0..c.len()).map(move |i| c.row(i)))
        .filter(|r| keep(r.timestamp_us))
        .collect();
    sorted(rows)
}

#[test]
fn samples_across_midnight_land_in_two_partitions_with_every_column_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    // Two sensors; the second chunk of each straddles midnight, so it is split.
    let chunks = vec![
        chunk("imu-a", 0, MIDNIGHT_US - 640_000, 64),
        chunk("imu-b", 1000, MIDNIGHT_US - 900_000, 64),
        chunk("imu-a", 64, MIDNIGHT_US - 320_000, 64),
        chunk("imu-b", 1064, MIDNIGHT_US - 100_000, 64),
        chunk("imu-a", 128, MIDNIGHT_US, 64),
    ];
    lake.write_samples(&chunks).unwrap();
    assert_eq!(lake.flush().unwrap(), 2);

    let d1 = partition_dir(dir.path(), Table::Samples, date(DAY1));
    let d2 = partition_dir(dir.path(), Table::Samples, date(DAY2));
    assert!(d1.ends_with("samples/date=2024-03-09"));
    let files = data_files(dir.path(), Table::Samples);
    assert_eq!(files.len(), 2);
    let (f1, f2): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| f.starts_with(&d1));
    assert_eq!(f2.len(), 1);
    assert!(f2[0].starts_with(&d2));

    let day1 = sorted(sample_rows(&read_files(&f1)));
    let day2 = sorted(sample_rows(&read_files(&f2)));
    assert_eq!(day1, expected_rows(&chunks, |t| t < MIDNIGHT_US));
    assert_eq!(day2, expected_rows(&chunks, |t| t >= MIDNIGHT_US));
    assert_eq!(day1.len() + day2.len(), 5 * 64);

    let stats = lake.stats();
    assert_eq!(stats.table(Table::Samples).rows_written, 320);
    assert_eq!(stats.table(Table::Samples).rows_committed, 320);
    assert_eq!(stats.table(Table::Samples).files_committed, 2);
    assert_eq!(stats.open_files, 0);
    assert!(hidden_files(dir.path()).is_empty());
}

#[test]
fn samples_are_written_with_split_floats_delta_integers_and_dictionary_ids() {
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    lake.write_samples(&[chunk("imu-a", 0, MIDNIGHT_US, 64)])
        .unwrap();
    lake.flush().unwrap();
    let files = data_files(dir.path(), Table::Samples);
    let reader = SerializedFileReader::new(fs::File::open(&files[0]).unwrap()).unwrap();
    let group = reader.metadata().row_group(0);
    let encodings = |name: &str| {
        let column = (0..group.num_columns())
            .map(|i| group.column(i))
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"));
        column.encodings().collect::<Vec<_>>()
    };
    for float in ["acc_x", "gyro_mag", "velocity_pred", "velocity_raw"] {
        assert!(
            encodings(float).contains(&Encoding::BYTE_STREAM_SPLIT),
            "{float}: {:?}",
            encodings(float)
        );
    }
    for int in ["sample_index", "timestamp_us", "temp_raw", "ingest_us"] {
        assert!(
            encodings(int).contains(&Encoding::DELTA_BINARY_PACKED),
            "{int}: {:?}",
            encodings(int)
        );
    }
    assert!(encodings("sensor_id").contains(&Encoding::RLE_DICTIONARY));
    // And the values read back intact through the Arrow reader.
    assert_eq!(
        sorted(sample_rows(&read_files(&files))),
        expected_rows(&[chunk("imu-a", 0, MIDNIGHT_US, 64)], |_| true)
    );
}

#[test]
fn every_codec_is_recorded_in_the_footer_and_reads_back() {
    use parquet::basic::Compression as Codec;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    assert_eq!(LakeConfig::new("x").compression, Compression::Lz4);
    for (compression, codec) in [
        (Compression::Lz4, Codec::LZ4_RAW),
        (Compression::Snappy, Codec::SNAPPY),
        (
            Compression::Zstd { level: 1 },
            Codec::ZSTD(parquet::basic::ZstdLevel::try_new(1).unwrap()),
        ),
        (Compression::Uncompressed, Codec::UNCOMPRESSED),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = LakeWriter::open(LakeConfig {
            compression,
            ..config(dir.path())
        })
        .unwrap();
        let chunks = consecutive_packets(8);
        lake.write_samples(&chunks).unwrap();
        lake.flush().unwrap();
        let files = data_files(dir.path(), Table::Samples);
        let reader = SerializedFileReader::new(fs::File::open(&files[0]).unwrap()).unwrap();
        let group = reader.metadata().row_group(0);
        for i in 0..group.num_columns() {
            // The footer records the codec by kind; zstd's level is not stored.
            assert_eq!(
                std::mem::discriminant(&group.column(i).compression()),
                std::mem::discriminant(&codec),
                "{compression:?}, column {}",
                group.column(i).column_path()
            );
        }
        assert_eq!(
            sorted(sample_rows(&read_files(&files))),
            expected_rows(&chunks, |_| true),
            "{compression:?}"
        );
    }
}

#[test]
fn file_stays_hidden_until_committed_and_no_tmp_remains_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        row_group_rows: 64, // encode after every chunk, so the .tmp file exists on disk
        ..config(dir.path())
    };
    let mut lake = LakeWriter::open(cfg).unwrap();
    lake.write_samples(&[
        chunk("s", 0, MIDNIGHT_US, 64),
        chunk("s", 64, MIDNIGHT_US + 320_000, 64),
    ])
    .unwrap();
    assert!(data_files(dir.path(), Table::Samples).is_empty());
    let hidden = hidden_files(dir.path());
    assert_eq!(hidden.len(), 1);
    assert!(hidden[0].to_string_lossy().ends_with(".parquet.tmp"));
    assert_eq!(lake.stats().open_files, 1);

    lake.flush().unwrap();
    assert!(hidden_files(dir.path()).is_empty());
    let files = data_files(dir.path(), Table::Samples);
    assert_eq!(files.len(), 1);
    let batches = read_files(&files);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 128);
    // Two row groups of 64 rows.
    let meta = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&files[0]).unwrap())
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta.num_row_groups(), 2);
    // A second flush has nothing to commit.
    assert_eq!(lake.flush().unwrap(), 0);
}

#[test]
fn files_roll_by_age_with_injected_instants() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        max_file_age: Duration::from_secs(10),
        ..config(dir.path())
    };
    let mut lake = LakeWriter::open(cfg).unwrap();
    let before_write = Instant::now();
    lake.write_samples(&[chunk("s", 0, MIDNIGHT_US, 64)])
        .unwrap();
    lake.write_gaps(&[GapRecord {
        sensor_id: "s".into(),
        from_index: 64,
        to_index: 70,
        missing: 6,
        detected_at_us: MIDNIGHT_US,
    }])
    .unwrap();

    // Not yet due: the files were opened after `before_write`, so at `before_write + 9s` they
    // are younger than 10 s.
    assert_eq!(
        lake.roll_due(before_write + Duration::from_secs(9))
            .unwrap(),
        0
    );
    assert!(data_files(dir.path(), Table::Samples).is_empty());
    assert_eq!(lake.stats().open_files, 2);

    let later = Instant::now() + Duration::from_secs(10);
    assert_eq!(lake.roll_due(later).unwrap(), 2);
    assert_eq!(data_files(dir.path(), Table::Samples).len(), 1);
    assert_eq!(data_files(dir.path(), Table::Gaps).len(), 1);
    assert_eq!(lake.stats().open_files, 0);

    // New rows start a new file with a fresh age.
    lake.write_samples(&[chunk("s", 64, MIDNIGHT_US + 320_000, 64)])
        .unwrap();
    assert_eq!(lake.roll_due(later).unwrap(), 0);
    assert_eq!(lake.roll_due(later + Duration::from_secs(11)).unwrap(), 1);
    assert_eq!(data_files(dir.path(), Table::Samples).len(), 2);
}

#[test]
fn files_roll_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        target_file_bytes: 64 * 1024,
        row_group_rows: 1024,
        compression: Compression::Snappy,
        ..config(dir.path())
    };
    let mut lake = LakeWriter::open(cfg).unwrap();
    let chunks = consecutive_packets(400);
    lake.write_samples(&chunks).unwrap();
    let rolled_while_writing = data_files(dir.path(), Table::Samples).len();
    assert!(
        rolled_while_writing >= 2,
        "only {rolled_while_writing} files rolled"
    );
    lake.flush().unwrap();

    let files = data_files(dir.path(), Table::Samples);
    for f in &files {
        // A file is cut at the first batch boundary past the target, so it overshoots by at most
        // one encoded batch.
        assert!(
            fs::metadata(f).unwrap().len() < 3 * 64 * 1024,
            "{f:?} too large"
        );
    }
    let rows = sorted(sample_rows(&read_files(&files)));
    assert_eq!(rows, expected_rows(&chunks, |_| true));
    assert_eq!(
        lake.stats().table(Table::Samples).files_committed,
        files.len() as u64
    );
}

#[test]
fn a_file_is_synced_in_steps_while_written_and_reads_back_intact() {
    let run = |sync_every_bytes: u64| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LakeConfig {
            sync_every_bytes,
            row_group_rows: 1024,
            compression: Compression::Uncompressed,
            ..config(dir.path())
        };
        let mut lake = LakeWriter::open(cfg).unwrap();
        let chunks = consecutive_packets(200);
        lake.write_samples(&chunks).unwrap();
        assert_eq!(lake.flush().unwrap(), 1);
        let files = data_files(dir.path(), Table::Samples);
        assert_eq!(
            sorted(sample_rows(&read_files(&files))),
            expected_rows(&chunks, |_| true)
        );
        (
            fs::metadata(&files[0]).unwrap().len(),
            lake.stats().early_syncs,
        )
    };
    // 12,800 uncompressed rows: about 0.7 MB in one file.
    let (bytes, syncs) = run(64 * 1024);
    assert!(
        bytes > 512 * 1024,
        "file of {bytes} bytes is too small to test"
    );
    // At most one per 64 KiB; fewer when a step's sync is requested while the previous one
    // is still running in the background (the next covers both). The commit waits for the
    // sync in flight, so the first one always counts.
    let most = bytes / (64 * 1024);
    assert!(
        syncs >= 1 && syncs <= most,
        "{syncs} syncs for {bytes} bytes"
    );
    assert_eq!(run(0).1, 0, "0 means no sync before the commit");
}

#[test]
fn file_names_are_unique_and_sort_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    for i in 0..5u32 {
        lake.write_samples(&[chunk("s", i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64)])
            .unwrap();
        lake.flush().unwrap();
    }
    let files = data_files(dir.path(), Table::Samples);
    assert_eq!(files.len(), 5);
    // Sorted by name == sorted by content order.
    let first_index: Vec<u32> = files
        .iter()
        .map(|f| {
            read_file(f)[0]
                .column(2)
                .as_primitive::<UInt32Type>()
                .value(0)
        })
        .collect();
    assert_eq!(first_index, vec![0, 64, 128, 192, 256]);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("part-") && name.ends_with("-000001-test.parquet"),
        "{name}"
    );
}

#[test]
fn compaction_keeps_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let mut chunks = Vec::new();
    for i in 0..6u32 {
        let c = chunk(
            if i % 2 == 0 { "a" } else { "b" },
            i * 64,
            MIDNIGHT_US + i64::from(i) * 320_000,
            64,
        );
        lake.write_samples(std::slice::from_ref(&c)).unwrap();
        lake.flush().unwrap();
        chunks.push(c);
    }
    // A file of another partition is left alone.
    let other = chunk("a", 9000, MIDNIGHT_US - 1_000_000, 10);
    lake.write_samples(std::slice::from_ref(&other)).unwrap();
    lake.flush().unwrap();
    assert_eq!(data_files(dir.path(), Table::Samples).len(), 7);

    let report = lake.compact(Table::Samples, date(DAY2), None).unwrap();
    assert_eq!(report.input_files, 6);
    assert_eq!(report.rows, 6 * 64);
    let out = report.output.clone().unwrap();
    assert!(out.exists());

    let day2_files: Vec<_> = data_files(dir.path(), Table::Samples)
        .into_iter()
        .filter(|f| f.starts_with(partition_dir(dir.path(), Table::Samples, date(DAY2))))
        .collect();
    assert_eq!(day2_files, vec![out]);
    let rows = sorted(sample_rows(&read_files(&day2_files)));
    assert_eq!(rows, expected_rows(&chunks, |_| true));
    assert_eq!(data_files(dir.path(), Table::Samples).len(), 2);
    assert!(hidden_files(dir.path()).is_empty());

    // Nothing left to merge.
    assert_eq!(
        lake.compact(Table::Samples, date(DAY2), None)
            .unwrap()
            .input_files,
        0
    );
    assert_eq!(
        lake.compact(Table::Samples, date(DAY1), None)
            .unwrap()
            .input_files,
        0
    );
    assert_eq!(lake.stats().compactions, 1);
}

#[test]
fn compaction_leaves_unfinished_epochs_alone_and_survives_recovery() {
    // Checkpoint epochs 1 and 2 are complete, epoch 3 is not: its file must stay out of the
    // merge, and the merged file must survive recovery from checkpoint 2, which deletes the
    // files of later epochs (the log replay writes their rows again).
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let mut chunks = Vec::new();
    for (i, epoch) in [1u64, 1, 2, 2, 3].into_iter().enumerate() {
        lake.set_epoch(epoch);
        let i = i as u32;
        let c = chunk("a", i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64);
        lake.write_samples(std::slice::from_ref(&c)).unwrap();
        lake.flush().unwrap();
        chunks.push(c);
    }
    lake.set_epoch(3);
    assert_eq!(
        partition_dates(dir.path(), Table::Samples).unwrap(),
        vec![date(DAY2)]
    );

    let report = lake.compact(Table::Samples, date(DAY2), Some(2)).unwrap();
    assert_eq!(
        (report.input_files, report.rows, report.pending_files),
        (4, 4 * 64, 1)
    );
    let out = report.output.unwrap();
    assert!(
        out.to_string_lossy().ends_with("-e0000000002.parquet"),
        "the merged file is named for its newest input's epoch: {}",
        out.display()
    );
    assert_eq!(data_files(dir.path(), Table::Samples).len(), 2);

    // A crash now recovers from checkpoint 2: epoch 3's file goes, the merged one stays.
    drop(lake);
    assert_eq!(remove_files_after_epoch(dir.path(), 2).unwrap(), 1);
    let rows = sorted(sample_rows(&read_files(&data_files(
        dir.path(),
        Table::Samples,
    ))));
    assert_eq!(rows, expected_rows(&chunks[..4], |_| true));
}

#[test]
fn leftover_tmp_files_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let part = partition_dir(dir.path(), Table::Samples, date(DAY1));
    fs::create_dir_all(&part).unwrap();
    fs::write(
        part.join(".part-0000000000001-000001-old.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    fs::write(
        part.join(".part-0000000000002-000002-old.parquet.tmp"),
        b"partial",
    )
    .unwrap();
    let windows = partition_dir(dir.path(), Table::Windows, date(DAY2));
    fs::create_dir_all(&windows).unwrap();
    fs::write(
        windows.join(".part-0000000000003-000001-old.parquet.tmp"),
        b"",
    )
    .unwrap();
    fs::write(windows.join("notes.txt"), b"not ours").unwrap();

    let lake = LakeWriter::open(config(dir.path())).unwrap();
    assert_eq!(lake.stats().tmp_files_removed, 3);
    assert!(hidden_files(dir.path()).is_empty());
    assert!(windows.join("notes.txt").exists());
    for t in Table::ALL {
        assert!(dir.path().join(t.name()).is_dir());
    }
}

/// Leaves `root` as a compaction interrupted in step 3 leaves it: merged output hidden (a copy
/// of the first file stands in for it), journal durable, one input deleted, the first not yet;
/// plus a torn journal of another compaction, which must not delete its inputs. Returns the
/// chunks written and the second file's name.
fn interrupted_compaction(root: &Path, lake: &mut LakeWriter) -> ([SampleChunk; 2], String) {
    let chunks = [
        chunk("a", 0, MIDNIGHT_US, 64),
        chunk("a", 64, MIDNIGHT_US + 320_000, 64),
    ];
    for c in &chunks {
        lake.write_samples(std::slice::from_ref(c)).unwrap();
        lake.flush().unwrap();
    }
    let part = partition_dir(root, Table::Samples, date(DAY2));
    let files = data_files(root, Table::Samples);
    let [first, second] = files.as_slice() else {
        panic!("{files:?}")
    };
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    fs::copy(first, part.join(".part-9999999999999-000001-x.parquet.tmp")).unwrap();
    let journal = serde_json::json!({
        "output": "part-9999999999999-000001-x.parquet",
        "tmp": ".part-9999999999999-000001-x.parquet.tmp",
        "inputs": [name(first), "part-gone.parquet"],
    });
    fs::write(
        part.join(".compact-part-9999999999999-000001-x.parquet.json"),
        journal.to_string(),
    )
    .unwrap();
    fs::write(
        part.join(".compact-part-8.parquet.json"),
        format!("{{\"inputs\":[\"{}\"", name(second)),
    )
    .unwrap();
    (chunks, name(second))
}

#[test]
fn interrupted_compaction_is_rolled_forward_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (chunks, second) = {
        let mut lake = LakeWriter::open(config(dir.path())).unwrap();
        interrupted_compaction(dir.path(), &mut lake)
    };

    let lake = LakeWriter::open(config(dir.path())).unwrap();
    assert_eq!(lake.stats().compactions_recovered, 1);
    assert!(hidden_files(dir.path()).is_empty());
    let names: BTreeSet<_> = data_files(dir.path(), Table::Samples)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([second, "part-9999999999999-000001-x.parquet".to_string()])
    );
    let rows = sorted(sample_rows(&read_files(&data_files(
        dir.path(),
        Table::Samples,
    ))));
    assert_eq!(rows, expected_rows(&chunks, |_| true));
}

#[test]
fn a_compaction_left_half_done_is_finished_by_the_next_one_without_a_restart() {
    // A compaction that failed after its journal (deleting an input or the final rename) hid
    // its rows until the lake was reopened; the next compaction of the partition finishes it.
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let (chunks, _) = interrupted_compaction(dir.path(), &mut lake);

    let report = lake.compact(Table::Samples, date(DAY2), None).unwrap();
    assert_eq!(lake.stats().compactions_recovered, 1);
    // The recovered output and the second input are both small: merged on.
    assert_eq!(report.input_files, 2);
    assert!(hidden_files(dir.path()).is_empty());
    let rows = sorted(sample_rows(&read_files(&data_files(
        dir.path(),
        Table::Samples,
    ))));
    assert_eq!(rows, expected_rows(&chunks, |_| true));
}

#[test]
fn ragged_chunk_is_rejected_without_writing_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let mut bad = chunk("s", 0, MIDNIGHT_US, 8);
    bad.gyro_y.pop();
    let err = lake.write_samples(&[bad]).unwrap_err();
    assert!(matches!(err, LakeError::RaggedChunk { ref sensor_id } if &**sensor_id == "s"));
    assert_eq!(lake.stats().table(Table::Samples).rows_written, 0);
    assert_eq!(lake.stats().errors, 1);
    assert_eq!(lake.flush().unwrap(), 0);
}

#[test]
fn record_tables_round_trip_with_their_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let sensor: Arc<str> = "imu-7".into();
    let session: Arc<str> = format!("imu-7_{MIDNIGHT_US}").into();
    lake.write_windows(&[WindowRecord {
        sensor_id: sensor.clone(),
        window_start_us: MIDNIGHT_US - 1_000_000,
        window_end_us: MIDNIGHT_US,
        count: 200,
        accl_mag_mean: 1.0,
        accl_mag_std: 0.1,
        accl_mag_min: 0.5,
        accl_mag_max: 1.5,
        gyro_mag_mean: 2.0,
        gyro_mag_std: 0.2,
        gyro_mag_min: 1.0,
        gyro_mag_max: 3.0,
    }])
    .unwrap();
    lake.write_sessions(&[
        SessionRecord {
            session_id: session.clone(),
            sensor_id: sensor.clone(),
            start_us: MIDNIGHT_US,
            end_us: Some(MIDNIGHT_US + 60_000_000),
            last_seen_us: MIDNIGHT_US + 60_000_000,
            sample_count: 12_000,
        },
        SessionRecord {
            session_id: "imu-7_1".into(),
            sensor_id: sensor.clone(),
            start_us: MIDNIGHT_US + 5,
            end_us: None,
            last_seen_us: MIDNIGHT_US + 5,
            sample_count: 1,
        },
    ])
    .unwrap();
    lake.write_aggregates(&[SessionAggregate {
        session_id: session.clone(),
        sensor_id: sensor.clone(),
        emitted_at_us: MIDNIGHT_US + 2_000_000,
        max_velocity: 3.5,
        distance_m: 4.25,
        mean_velocity: 2.0,
        moving_time_s: 1.5,
        sample_count: 400,
        duration_s: 2.0,
    }])
    .unwrap();
    lake.write_late(&[LateRecord {
        sensor_id: sensor.clone(),
        sample_index: 77,
        timestamp_us: MIDNIGHT_US - 10_000_000,
        watermark_us: MIDNIGHT_US - 2_000_000,
        detected_at_us: MIDNIGHT_US + 1,
    }])
    .unwrap();
    assert_eq!(lake.flush().unwrap(), 4);

    let one = |t: Table, d| {
        let files = data_files(dir.path(), t);
        assert_eq!(files.len(), 1, "{t}");
        assert!(
            files[0].starts_with(partition_dir(dir.path(), t, date(d))),
            "{t}"
        );
        let batches = read_files(&files);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].schema(), t.schema());
        batches.into_iter().next().unwrap()
    };

    let w = one(Table::Windows, DAY1);
    assert_eq!(w.column(0).as_string::<i32>().value(0), "imu-7");
    assert_eq!(w.column(3).as_primitive::<UInt64Type>().value(0), 200);
    assert_eq!(w.column(11).as_primitive::<Float64Type>().value(0), 3.0);

    let s = one(Table::Sessions, DAY2);
    assert_eq!(s.num_rows(), 2);
    let end = s.column(3).as_primitive::<Int64Type>();
    assert_eq!(end.value(0), MIDNIGHT_US + 60_000_000);
    assert!(end.is_null(1));
    assert_eq!(s.column(5).as_primitive::<UInt64Type>().value(0), 12_000);

    let a = one(Table::SessionAggregates, DAY2);
    assert_eq!(a.column(0).as_string::<i32>().value(0), &*session);
    assert_eq!(a.column(4).as_primitive::<Float64Type>().value(0), 4.25);
    assert_eq!(a.column(7).as_primitive::<UInt64Type>().value(0), 400);

    let l = one(Table::Late, DAY2);
    assert_eq!(l.column(1).as_primitive::<UInt32Type>().value(0), 77);
    assert_eq!(
        l.column(3).as_primitive::<Int64Type>().value(0),
        MIDNIGHT_US - 2_000_000
    );

    let names: Vec<_> = Table::Late
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "sensor_id",
            "sample_index",
            "timestamp_us",
            "watermark_us",
            "detected_at_us"
        ]
    );
}

#[test]
fn files_of_epochs_after_a_checkpoint_are_removed_and_earlier_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake =
        sensorflow_lake::LakeWriter::open(sensorflow_lake::LakeConfig::new(dir.path())).unwrap();
    let day = 1_700_000_000_000_000i64;
    let gap = |i: u32| sensorflow_records::GapRecord {
        sensor_id: "s".into(),
        from_index: i,
        to_index: i + 1,
        missing: 1,
        detected_at_us: day,
    };
    for epoch in 1..=3u64 {
        lake.set_epoch(epoch);
        lake.write_gaps(&[gap(epoch as u32)]).unwrap();
        lake.flush().unwrap();
    }
    let count = |root: &std::path::Path| -> usize {
        std::fs::read_dir(root.join("gaps"))
            .unwrap()
            .flat_map(|p| std::fs::read_dir(p.unwrap().path()).unwrap())
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".parquet")
            })
            .count()
    };
    assert_eq!(count(dir.path()), 3);
    assert_eq!(
        sensorflow_lake::remove_files_after_epoch(dir.path(), 1).unwrap(),
        2
    );
    assert_eq!(count(dir.path()), 1);
    assert_eq!(
        sensorflow_lake::remove_files_after_epoch(dir.path(), 1).unwrap(),
        0
    );
}

#[test]
fn rows_spread_over_many_dates_keep_at_most_max_open_partitions_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(LakeConfig {
        max_open_partitions: 3,
        ..config(dir.path())
    })
    .unwrap();
    // One sample on each of 40 days: a backlog of odd dates.
    let day = 86_400_000_000i64;
    let chunks: Vec<SampleChunk> = (0..40)
        .map(|d| chunk("s", d as u32, MIDNIGHT_US + d * day, 1))
        .collect();
    for c in &chunks {
        lake.write_samples(std::slice::from_ref(c)).unwrap();
        assert!(lake.stats().open_files <= 3);
    }
    assert_eq!(lake.stats().partitions_evicted, 37);
    lake.flush().unwrap();
    assert_eq!(
        partition_dates(dir.path(), Table::Samples).unwrap().len(),
        40
    );
    let rows = sorted(sample_rows(&read_files(&data_files(
        dir.path(),
        Table::Samples,
    ))));
    assert_eq!(rows, sorted(expected_rows(&chunks, |_| true)));
}

#[test]
fn quarantined_records_keep_their_raw_values_and_land_on_their_receive_date() {
    use sensorflow_records::{QuarantineReason, QuarantineRecord};
    let dir = tempfile::tempdir().unwrap();
    let mut lake = LakeWriter::open(config(dir.path())).unwrap();
    let sample = QuarantineRecord {
        sensor_id: "x".into(),
        reason: QuarantineReason::TimestampOutOfRange,
        detail: "event time far in the future".into(),
        ingest_us: MIDNIGHT_US + 5,
        detected_at_us: MIDNIGHT_US + 6,
        sample_index: Some(7),
        timestamp_us: Some(u64::MAX),
        acc_x: Some(0.5),
        acc_y: Some(0.0),
        acc_z: Some(1.0),
        gyro_x: Some(0.1),
        gyro_y: Some(0.2),
        gyro_z: Some(0.3),
        mag_x: Some(0.0),
        mag_y: Some(0.0),
        mag_z: Some(0.0),
        temp_raw: Some(-3),
        payload: None,
    };
    let letter = QuarantineRecord {
        reason: QuarantineReason::StageFailed,
        detail: "a pipeline stage failed".into(),
        ingest_us: i64::MIN,
        sample_index: None,
        timestamp_us: None,
        acc_x: None,
        temp_raw: None,
        payload: Some(b"\x7c\x1e raw".to_vec()),
        ..sample.clone()
    };
    lake.write_quarantine(&[sample, letter]).unwrap();
    lake.flush().unwrap();
    // An unrepresentable receive time is clamped rather than failing the write.
    assert_eq!(
        partition_dates(dir.path(), Table::Quarantine).unwrap(),
        vec![date((1970, 1, 1)), date(DAY2)]
    );
    let batches = read_files(&data_files(dir.path(), Table::Quarantine));
    let mut rows = Vec::new();
    for b in &batches {
        assert_eq!(b.schema(), Table::Quarantine.schema());
        for i in 0..b.num_rows() {
            let reason = b
                .column_by_name("reason")
                .unwrap()
                .as_string::<i32>()
                .value(i)
                .to_owned();
            let ts = b
                .column_by_name("timestamp_us")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let payload = b.column_by_name("payload").unwrap().as_binary::<i32>();
            rows.push((
                reason,
                ts.is_valid(i).then(|| ts.value(i)),
                payload.is_valid(i).then(|| payload.value(i).to_vec()),
            ));
        }
    }
    rows.sort();
    assert_eq!(
        rows,
        vec![
            (
                "stage_failed".to_owned(),
                None,
                Some(b"\x7c\x1e raw".to_vec())
            ),
            ("timestamp_out_of_range".to_owned(), Some(u64::MAX), None),
        ]
    );
}
