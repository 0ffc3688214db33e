//! The lake on an object store (object_store's `InMemory`, the same client code as for S3):
//! files appear only whole and only when committed, recovery finds files of unfinished epochs
//! by listing, and compaction (journal in the store) never doubles a row.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use bytes::Bytes;
use chrono::NaiveDate;
use futures::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorflow_lake::{LakeConfig, LakeError, LakeLocation, LakeWriter, ObjectLake, Table};
use sensorflow_records::SampleChunk;

/// 2024-03-10T00:00:00Z in µs.
const MIDNIGHT_US: i64 = 1_710_028_800_000_000;

fn day2() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 3, 10).unwrap()
}

/// `n` samples of sensor `s` from `base` on, 200 Hz from `start_us`.
fn chunk(base: u32, start_us: i64, n: usize) -> SampleChunk {
    let mut c = SampleChunk::with_capacity("s".into(), "s_1".into(), n);
    for i in 0..n {
        let x = (base as usize + i) as f32;
        c.sample_index.push(base + i as u32);
        c.timestamp_us.push(start_us + i as i64 * 5000);
        for col in [
            &mut c.acc_x,
            &mut c.acc_y,
            &mut c.acc_z,
            &mut c.gyro_x,
            &mut c.gyro_y,
            &mut c.gyro_z,
            &mut c.mag_x,
            &mut c.mag_y,
            &mut c.mag_z,
            &mut c.accl_mag,
            &mut c.gyro_mag,
            &mut c.velocity_pred,
            &mut c.velocity_raw,
            &mut c.movement_prob,
        ] {
            col.push(x);
        }
        c.temp_raw.push(0);
        c.ingest_us.push(start_us);
    }
    c
}

struct Fixture {
    store: Arc<InMemory>,
    objects: ObjectLake,
    _staging: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let staging = tempfile::tempdir().unwrap();
    let store = Arc::new(InMemory::new());
    let objects = ObjectLake::new(
        store.clone(),
        "lakes/one",
        "memory://lakes/one",
        staging.path(),
    )
    .unwrap();
    Fixture {
        store,
        objects,
        _staging: staging,
    }
}

impl Fixture {
    fn config(&self) -> LakeConfig {
        LakeConfig {
            writer_id: "test".into(),
            ..LakeConfig::new(self.objects.clone())
        }
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Every key in the store, sorted.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .block_on(self.store.list(None).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        keys
    }

    /// Keys of committed data files of `samples`.
    fn data_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| k.starts_with("lakes/one/samples/date=") && k.contains("/part-"))
            .collect()
    }

    fn get(&self, key: &str) -> Bytes {
        self.block_on(async {
            self.store
                .get(&ObjectPath::from(key))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    }

    fn put(&self, key: &str, bytes: Bytes) {
        self.block_on(
            self.store
                .put(&ObjectPath::from(key), PutPayload::from(bytes)),
        )
        .unwrap();
    }

    fn delete(&self, key: &str) {
        self.block_on(self.store.delete(&ObjectPath::from(key)))
            .unwrap();
    }

    /// Sample indices in the committed files of `samples`, sorted.
    fn indices(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for key in self.data_keys() {
            let reader = ParquetRecordBatchReaderBuilder::try_new(self.get(&key))
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let col = batch.column_by_name("sample_index").unwrap();
                out.extend(col.as_primitive::<UInt32Type>().values().iter().copied());
            }
        }
        out.sort_unstable();
        out
    }

    fn staged_files(&self) -> usize {
        walk(self.objects.staging_dir())
    }
}

fn walk(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p) } else { 1 }
        })
        .sum()
}

#[test]
fn a_file_reaches_the_store_only_when_committed_and_whole() {
    let f = fixture();
    let mut lake = LakeWriter::open(f.config()).unwrap();
    assert_eq!(lake.partition_dates(Table::Samples).unwrap(), vec![]);
    lake.write_samples(&[chunk(0, MIDNIGHT_US, 64)]).unwrap();
    // Encoded into the staging dir, nothing in the store yet.
    assert_eq!(f.keys(), Vec::<String>::new());
    assert_eq!(lake.flush().unwrap(), 1);
    let keys = f.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with("lakes/one/samples/date=2024-03-10/part-")
            && keys[0].ends_with("-test.parquet"),
        "{keys:?}"
    );
    assert_eq!(f.indices(), (0..64).collect::<Vec<_>>());
    assert_eq!(
        f.staged_files(),
        0,
        "the staged copy is deleted after the upload"
    );
    let s = lake.stats();
    assert_eq!(s.table(Table::Samples).files_committed, 1);
    assert_eq!(lake.partition_dates(Table::Samples).unwrap(), vec![day2()]);
    // Known from then on without listing: a partition written later is added by the commit.
    lake.write_samples(&[chunk(64, MIDNIGHT_US - 86_400_000_000, 64)])
        .unwrap();
    lake.flush().unwrap();
    let both = vec![day2().pred_opt().unwrap(), day2()];
    assert_eq!(lake.partition_dates(Table::Samples).unwrap(), both);
    assert_eq!(
        LakeLocation::from(f.objects.clone())
            .partition_dates(Table::Samples)
            .unwrap(),
        both
    );
}

#[test]
fn large_files_go_up_in_parts_and_read_back_intact() {
    let f = fixture();
    let objects = f
        .objects
        .clone()
        .with_multipart_threshold(1)
        .with_part_bytes(7_000);
    let mut lake = LakeWriter::open(LakeConfig {
        writer_id: "test".into(),
        ..LakeConfig::new(objects)
    })
    .unwrap();
    lake.write_samples(&[chunk(0, MIDNIGHT_US, 5000)]).unwrap();
    lake.flush().unwrap();
    assert_eq!(f.indices(), (0..5000).collect::<Vec<_>>());
}

#[test]
fn leftover_staged_files_and_hidden_objects_are_removed_on_open() {
    let f = fixture();
    let staged = f
        .objects
        .staging_dir()
        .join("samples/date=2024-03-10/.part-1-000001-old.parquet.tmp");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::write(&staged, b"partial").unwrap();
    f.put(
        "lakes/one/samples/date=2024-03-10/.part-2-000001-old.parquet.tmp",
        Bytes::from_static(b"orphan of a compaction"),
    );
    let lake = LakeWriter::open(f.config()).unwrap();
    assert_eq!(lake.stats().tmp_files_removed, 2);
    assert_eq!(f.keys(), Vec::<String>::new());
    assert!(!staged.exists());
}

#[test]
fn recovery_lists_the_prefix_and_deletes_files_of_epochs_after_the_checkpoint() {
    let f = fixture();
    let mut lake = LakeWriter::open(f.config()).unwrap();
    for (i, epoch) in [1u64, 2, 3, 3].into_iter().enumerate() {
        lake.set_epoch(epoch);
        let i = i as u32;
        lake.write_samples(&[chunk(i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64)])
            .unwrap();
        lake.flush().unwrap();
    }
    drop(lake);
    // An object outside the lake's layout is not ours to delete.
    f.put(
        "lakes/one/samples/notes-e0000000009.parquet",
        Bytes::from_static(b"x"),
    );
    let location = LakeLocation::from(f.objects.clone());
    assert_eq!(location.remove_files_after_epoch(2).unwrap(), 2);
    assert_eq!(f.indices(), (0..128).collect::<Vec<_>>());
    assert!(
        f.keys()
            .contains(&"lakes/one/samples/notes-e0000000009.parquet".to_string())
    );
    assert_eq!(location.remove_files_after_epoch(2).unwrap(), 0);
}

#[test]
fn compaction_in_the_store_keeps_every_row_once_and_leaves_unfinished_epochs_alone() {
    let f = fixture();
    let mut lake = LakeWriter::open(f.config()).unwrap();
    for (i, epoch) in [1u64, 1, 2, 2, 3].into_iter().enumerate() {
        lake.set_epoch(epoch);
        let i = i as u32;
        lake.write_samples(&[chunk(i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64)])
            .unwrap();
        lake.flush().unwrap();
    }
    assert_eq!(f.data_keys().len(), 5);
    let report = lake.compact(Table::Samples, day2(), Some(2)).unwrap();
    assert_eq!(
        (report.input_files, report.rows, report.pending_files),
        (4, 4 * 64, 1)
    );
    let out = report.output.unwrap();
    assert!(
        out.to_string_lossy().ends_with("-e0000000002.parquet"),
        "{}",
        out.display()
    );
    assert_eq!(f.data_keys().len(), 2);
    assert_eq!(f.indices(), (0..5 * 64).collect::<Vec<_>>());
    // No hidden output or journal left.
    assert!(f.keys().iter().all(|k| !k.contains("/.")), "{:?}", f.keys());
    assert_eq!(lake.stats().compactions, 1);
    // Recovery from checkpoint 2 deletes epoch 3's file, never the merged one.
    drop(lake);
    assert_eq!(
        LakeLocation::from(f.objects.clone())
            .remove_files_after_epoch(2)
            .unwrap(),
        1
    );
    assert_eq!(f.indices(), (0..4 * 64).collect::<Vec<_>>());
}

/// A compaction interrupted in step 3: merged output uploaded hidden, journal stored, one input
/// deleted and the other not yet. Readers see fewer rows meanwhile, never the same row twice.
fn interrupted_compaction(f: &Fixture, lake: &mut LakeWriter) {
    for i in 0..2u32 {
        lake.write_samples(&[chunk(i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64)])
            .unwrap();
        lake.flush().unwrap();
    }
    // The merged file of both inputs, made by a local lake.
    let dir = tempfile::tempdir().unwrap();
    let mut local = LakeWriter::open(LakeConfig::new(dir.path())).unwrap();
    local
        .write_samples(&[
            chunk(0, MIDNIGHT_US, 64),
            chunk(64, MIDNIGHT_US + 320_000, 64),
        ])
        .unwrap();
    local.flush().unwrap();
    let merged_dir = dir.path().join("samples/date=2024-03-10");
    let merged = std::fs::read_dir(&merged_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let part = "lakes/one/samples/date=2024-03-10";
    f.put(
        &format!("{part}/.part-9999999999999-000001-x.parquet.tmp"),
        Bytes::from(std::fs::read(merged).unwrap()),
    );
    let inputs = f.data_keys();
    let names: Vec<&str> = inputs
        .iter()
        .map(|k| k.rsplit('/').next().unwrap())
        .collect();
    let journal = serde_json::json!({
        "output": "part-9999999999999-000001-x.parquet",
        "tmp": ".part-9999999999999-000001-x.parquet.tmp",
        "inputs": names,
    });
    f.put(
        &format!("{part}/.compact-part-9999999999999-000001-x.parquet.json"),
        Bytes::from(journal.to_string()),
    );
    f.delete(&inputs[0]);
    assert_eq!(f.indices(), (64..128).collect::<Vec<_>>());
}

#[test]
fn interrupted_compaction_in_the_store_is_rolled_forward_on_open() {
    let f = fixture();
    {
        let mut lake = LakeWriter::open(f.config()).unwrap();
        interrupted_compaction(&f, &mut lake);
    }
    let lake = LakeWriter::open(f.config()).unwrap();
    assert_eq!(lake.stats().compactions_recovered, 1);
    assert_eq!(
        f.keys(),
        vec!["lakes/one/samples/date=2024-03-10/part-9999999999999-000001-x.parquet".to_string()]
    );
    assert_eq!(f.indices(), (0..128).collect::<Vec<_>>());
}

#[test]
fn a_compaction_left_half_done_in_the_store_is_finished_by_the_next_one() {
    let f = fixture();
    let mut lake = LakeWriter::open(f.config()).unwrap();
    interrupted_compaction(&f, &mut lake);
    lake.compact(Table::Samples, day2(), None).unwrap();
    assert_eq!(lake.stats().compactions_recovered, 1);
    assert_eq!(f.data_keys().len(), 1);
    assert!(f.keys().iter().all(|k| !k.contains("/.")), "{:?}", f.keys());
    assert_eq!(f.indices(), (0..128).collect::<Vec<_>>());
}

#[test]
fn an_unreachable_store_is_a_storage_error_to_retry_not_a_data_error() {
    let staging = tempfile::tempdir().unwrap();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("b")
        .with_region("us-east-1")
        .with_access_key_id("k")
        .with_secret_access_key("s")
        .with_endpoint("http://127.0.0.1:9")
        .with_allow_http(true)
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            retry_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        })
        .build()
        .unwrap();
    let objects = ObjectLake::new(Arc::new(store), "p", "s3://b/p", staging.path()).unwrap();
    let err = match LakeWriter::open(LakeConfig::new(objects)) {
        Err(e) => e,
        Ok(_) => panic!("opened a lake on an unreachable store"),
    };
    assert!(matches!(err, LakeError::Store { .. }), "{err}");
    assert!(!err.is_data_error());
}

#[test]
fn lake_urls_pick_a_directory_or_s3() {
    let staging = tempfile::tempdir().unwrap();
    assert!(matches!(
        LakeLocation::parse("s3://bucket/some/prefix", staging.path()).unwrap(),
        LakeLocation::Objects(_)
    ));
    assert!(matches!(
        LakeLocation::parse("./data/lake", staging.path()).unwrap(),
        LakeLocation::Dir(_)
    ));
}

/// An `InMemory` store that checks after every change that the committed data files hold no
/// sample twice (what a reader listing at that moment would see), and that fails every request
/// from the `fail_from`-th change on: a process that crashed there, or lost the store.
#[derive(Debug, Default)]
struct Watched {
    inner: InMemory,
    changes: AtomicUsize,
    fail_from: AtomicUsize,
    violations: Mutex<Vec<String>>,
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watched")
    }
}

impl Watched {
    fn new() -> Arc<Watched> {
        Arc::new(Watched {
            fail_from: AtomicUsize::new(usize::MAX),
            ..Watched::default()
        })
    }

    fn down() -> object_store::Error {
        object_store::Error::Generic {
            store: "Watched",
            source: "the store is down (injected)".into(),
        }
    }

    /// Counts a change; fails once the store is down.
    fn change(&self) -> object_store::Result<()> {
        let n = self.changes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from.load(Ordering::SeqCst) {
            return Err(Watched::down());
        }
        Ok(())
    }

    fn is_down(&self) -> bool {
        self.changes.load(Ordering::SeqCst) > self.fail_from.load(Ordering::SeqCst)
    }

    /// What a reader sees now: every committed data file's sample indices, none twice.
    async fn check(&self) {
        let metas: Vec<_> = self.inner.list(None).try_collect().await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for m in metas {
            let key = m.location.to_string();
            let name = key.rsplit('/').next().unwrap_or_default();
            if !(key.contains("/samples/date=") && name.starts_with("part-")) {
                continue;
            }
            let bytes = self
                .inner
                .get(&m.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let batch = batch.unwrap();
                let col = batch.column_by_name("sample_index").unwrap();
                for &i in col.as_primitive::<UInt32Type>().values() {
                    let mut violations = self.violations.lock().unwrap();
                    if !seen.insert(i) && violations.len() < 5 {
                        violations.push(format!("sample {i} visible twice (in {key})"));
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Watched {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.change()?;
        let r = self.inner.put_opts(location, payload, opts).await;
        self.check().await;
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.change()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        if self.is_down() {
            return Err(Watched::down());
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
        // Deletes one at a time so that every one is checked; `self` is not 'static, so collect
        // first (the lake deletes one object per call).
        let this: &Watched = self;
        let results = futures::executor::block_on(async {
            let locations: Vec<_> = locations.collect().await;
            let mut out = Vec::new();
            for l in locations {
                let r = match l {
                    Ok(l) => match this.change() {
                        Ok(()) => {
                            let r = this.inner.delete(&l).await.map(|()| l);
                            this.check().await;
                            r
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                out.push(r);
            }
            out
        });
        futures::stream::iter(results).boxed()
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        if self.is_down() {
            return futures::stream::once(async { Err(Watched::down()) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<object_store::ListResult> {
        if self.is_down() {
            return Err(Watched::down());
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.change()?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.check().await;
        r
    }
}

#[test]
fn a_crash_at_any_step_of_a_compaction_never_shows_a_row_twice_nor_loses_one() {
    let mut crashed_at_steps = 0;
    for step in 0.. {
        let staging = tempfile::tempdir().unwrap();
        let store = Watched::new();
        let objects = ObjectLake::new(store.clone(), "l", "watched://l", staging.path()).unwrap();
        let config = LakeConfig {
            writer_id: "test".into(),
            ..LakeConfig::new(objects)
        };
        let mut lake = LakeWriter::open(config.clone()).unwrap();
        for i in 0..3u32 {
            lake.write_samples(&[chunk(i * 64, MIDNIGHT_US + i64::from(i) * 320_000, 64)])
                .unwrap();
            lake.flush().unwrap();
        }
        // The store goes down `step` changes into the compaction.
        let before = store.changes.load(Ordering::SeqCst);
        store.fail_from.store(before + step, Ordering::SeqCst);
        let result = lake.compact(Table::Samples, day2(), None);
        drop(lake);
        let changes = store.changes.load(Ordering::SeqCst) - before;
        // Back up; a new process opens the lake (rolling the compaction forward) and compacts.
        store.fail_from.store(usize::MAX, Ordering::SeqCst);
        let mut lake = LakeWriter::open(config).unwrap();
        lake.compact(Table::Samples, day2(), None).unwrap();
        drop(staging);
        let keys: Vec<String> = futures::executor::block_on(
            store
                .inner
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect(),
        )
        .unwrap();
        assert!(
            keys.iter().all(|k| !k.contains("/.")),
            "step {step}: hidden objects left: {keys:?}"
        );
        assert_eq!(keys.len(), 1, "step {step}: {keys:?}");
        store.check_all_present(0..192, step);
        let violations = store.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "step {step}: {violations:?}");
        if result.is_ok() {
            // The compaction made all its changes before the store went down: done.
            assert!(changes <= step, "step {step}");
            break;
        }
        crashed_at_steps += 1;
    }
    // Upload of the hidden output, journal, 3 deletes, copy, delete, journal delete.
    assert!(crashed_at_steps >= 8, "{crashed_at_steps}");
}

impl Watched {
    fn check_all_present(&self, expected: std::ops::Range<u32>, step: usize) {
        let mut got = Vec::new();
        let metas: Vec<_> =
            futures::executor::block_on(self.inner.list(None).try_collect::<Vec<_>>()).unwrap();
        for m in metas {
            let bytes = futures::executor::block_on(async {
                self.inner
                    .get(&m.location)
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            });
            for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let batch = batch.unwrap();
                let col = batch.column_by_name("sample_index").unwrap();
                got.extend(col.as_primitive::<UInt32Type>().values().iter().copied());
            }
        }
        got.sort_unstable();
        assert_eq!(got, expected.collect::<Vec<_>>(), "step {step}");
    }
}
