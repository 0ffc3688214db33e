//! Crash recovery and I/O failures: torn tails, corruption, and injected write/sync errors.

#![allow(clippy::unwrap_used)] // tests unwrap freely

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sensorflow_log::{
    CorruptReason, Durability, FaultInjector, FaultSwitch, IoOp, Log, LogConfig, LogError,
    WriteFault,
};

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("record number {i:04}"))
}

fn config(dir: &Path) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.durability = Durability::Fsync;
    c
}

fn segment(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Writes `n` records to a fresh log in `dir` and closes it.
fn populate(cfg: &LogConfig, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..n {
        assert_eq!(rt.block_on(log.append(payload(i))).unwrap(), i);
    }
    log.close().unwrap();
}

fn read_all(log: &Log, from: u64) -> Result<Vec<(u64, Bytes)>, LogError> {
    let mut reader = log.reader_untracked(from)?;
    let mut out = Vec::new();
    while reader.read_batch(&mut out, 64, Duration::ZERO)? > 0 {}
    Ok(out)
}

fn assert_records(log: &Log, n: u64) {
    let records = read_all(log, 0).unwrap();
    assert_eq!(records.len() as u64, n);
    for (i, (offset, p)) in records.into_iter().enumerate() {
        assert_eq!((offset, p), (i as u64, payload(i as u64)));
    }
}

#[test]
fn partial_record_at_the_tail_is_truncated_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    populate(&cfg, 10);
    let path = segment(dir.path(), 0);
    let good_len = file_len(&path);
    // A frame header promising 100 bytes followed by only 10: a write cut short by a crash.
    let mut torn = Vec::new();
    torn.extend_from_slice(&100u32.to_le_bytes());
    torn.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    torn.extend_from_slice(&[0xAB; 10]);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&torn)
        .unwrap();

    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated_bytes, torn.len() as u64);
    assert_eq!(report.next_offset, 10);
    assert_eq!(file_len(&path), good_len);
    assert_records(&log, 10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(log.append(payload(10))).unwrap(), 10);
    assert_records(&log, 11);
}

#[test]
fn garbage_shorter_than_a_frame_header_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    populate(&cfg, 3);
    let path = segment(dir.path(), 0);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"xyz")
        .unwrap();
    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!((report.truncated_bytes, report.next_offset), (3, 3));
    assert_records(&log, 3);
}

#[test]
fn last_record_with_a_bad_checksum_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    populate(&cfg, 10);
    let path = segment(dir.path(), 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();

    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.truncated_bytes, 8 + payload(9).len() as u64);
    assert_eq!(report.next_offset, 9);
    assert_records(&log, 9);
}

#[test]
fn torn_header_of_a_new_last_segment_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    populate(&cfg, 4);
    // A crash right after creating the next segment, before its header was complete.
    std::fs::write(segment(dir.path(), 4), b"SFLOG").unwrap();
    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(
        (report.truncated_bytes, report.next_offset, report.segments),
        (5, 4, 2)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(log.append(payload(4))).unwrap(), 4);
    assert_records(&log, 5);
}

#[test]
fn a_file_of_another_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        segment(dir.path(), 0),
        b"this is not a sensorflow log segment",
    )
    .unwrap();
    match Log::open(config(dir.path())) {
        Err(LogError::Corrupt { reason, .. }) => assert_eq!(reason, CorruptReason::BadMagic),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn corruption_inside_a_sealed_segment_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 200;
    populate(&cfg, 20);
    let first = segment(dir.path(), 0);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[24 + 8 + 3] ^= 0x01; // inside the first record's payload
    std::fs::write(&first, &bytes).unwrap();

    // Opening checks only headers of sealed segments by default; the reader finds the damage.
    let (log, report) = Log::open(cfg.clone()).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    match read_all(&log, 0) {
        Err(LogError::Corrupt {
            path,
            position,
            reason,
        }) => {
            assert_eq!(path, first);
            assert_eq!(position, 24);
            assert_eq!(reason, CorruptReason::RecordChecksum);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    log.close().unwrap();
    drop(log);

    cfg.verify_on_open = true;
    assert!(matches!(
        Log::open(cfg),
        Err(LogError::Corrupt {
            reason: CorruptReason::RecordChecksum,
            ..
        })
    ));
}

#[tokio::test]
async fn failed_write_leaves_no_partial_record_and_the_log_recovers_when_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultSwitch::new());
    let (log, _) = Log::open_with_faults(config(dir.path()), faults.clone()).unwrap();
    for i in 0..3 {
        log.append(payload(i)).await.unwrap();
    }
    let path = segment(dir.path(), 0);
    let good_len = file_len(&path);

    // The disk fills up 5 bytes into the write.
    faults.fail_writes(ErrorKind::StorageFull, 5);
    for _ in 0..2 {
        match log.append(payload(99)).await {
            Err(LogError::Io { op, kind, .. }) => {
                assert_eq!((op, kind), (IoOp::Write, ErrorKind::StorageFull));
            }
            other => panic!("expected an Io error, got {other:?}"),
        }
    }
    assert_eq!(
        file_len(&path),
        good_len,
        "a partial record was left in the file"
    );
    assert_eq!(log.end_offset(), 3);
    let stats = log.stats();
    assert_eq!(stats.write_errors, 2);
    assert!(stats.last_error.unwrap().contains("write"));

    faults.clear();
    assert_eq!(
        log.append(payload(3)).await.unwrap(),
        3,
        "offsets of failed appends are reused"
    );
    assert_eq!(
        log.stats().last_error,
        None,
        "a successful write clears the error"
    );
    assert_eq!(log.stats().write_errors, 2);
    assert_records(&log, 4);
    log.close().unwrap();
    drop(log);
    let (log, report) = Log::open(config(dir.path())).unwrap();
    assert_eq!((report.truncated_bytes, report.next_offset), (0, 4));
    assert_records(&log, 4);
}

/// A [`FaultSwitch`] that counts the write attempts it was asked about.
#[derive(Default)]
struct CountingFaults {
    switch: FaultSwitch,
    writes: AtomicUsize,
}

impl FaultInjector for CountingFaults {
    fn on_write(&self, len: usize) -> Option<WriteFault> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.switch.on_write(len)
    }

    fn on_sync(&self) -> Option<ErrorKind> {
        self.switch.on_sync()
    }
}

/// Polls `done` until it holds; panics with `what` after 10 s.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn an_idle_log_clears_its_error_once_writing_works_again() {
    // A readiness probe reads `last_error`. If only an append could clear it, a platform
    // taken out of its load balancer for the error would never get that append.
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(CountingFaults::default());
    let (log, _) = Log::open_with_faults(config(dir.path()), faults.clone()).unwrap();
    log.append(payload(0)).await.unwrap();
    faults.switch.fail_writes(ErrorKind::StorageFull, 5);
    assert!(log.append(payload(1)).await.is_err());
    let attempts = faults.writes.load(Ordering::SeqCst);

    // While the disk stays full, the idle writer's probes fail and the error stays.
    wait_for("the writer probed again", || {
        faults.writes.load(Ordering::SeqCst) > attempts
    });
    assert!(
        log.stats().last_error.is_some(),
        "a failed probe cleared the error"
    );
    assert_eq!(log.stats().write_errors, 1, "a probe is not an append");

    // Space is freed; no append comes, and the error clears anyway.
    faults.switch.clear();
    wait_for("the error cleared", || log.stats().last_error.is_none());
    assert!(
        !dir.path().join("write-probe.tmp").exists(),
        "the probe file was left behind"
    );
    assert_eq!(log.append(payload(1)).await.unwrap(), 1);
    assert_records(&log, 2);
}

#[tokio::test]
async fn failed_sync_fails_the_append_and_hides_the_record_from_readers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultSwitch::new());
    let (log, _) = Log::open_with_faults(config(dir.path()), faults.clone()).unwrap();
    log.append(payload(0)).await.unwrap();
    let good_len = file_len(&segment(dir.path(), 0));

    faults.fail_syncs(ErrorKind::Other);
    assert!(matches!(
        log.append(payload(1)).await,
        Err(LogError::Io { op: IoOp::Sync, .. })
    ));
    assert_eq!(log.end_offset(), 1);
    assert_eq!(file_len(&segment(dir.path(), 0)), good_len);
    assert_records(&log, 1);

    faults.clear();
    assert_eq!(log.append(payload(1)).await.unwrap(), 1);
    assert_records(&log, 2);
}

#[tokio::test]
async fn failed_write_after_a_roll_removes_the_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultSwitch::new());
    let mut cfg = config(dir.path());
    // Room for exactly two records per segment.
    cfg.segment_bytes = 24 + 2 * (8 + payload(0).len() as u64);
    let (log, _) = Log::open_with_faults(cfg, faults.clone()).unwrap();
    log.append(payload(0)).await.unwrap();
    log.append(payload(1)).await.unwrap();

    faults.fail_writes(ErrorKind::PermissionDenied, 3);
    assert!(matches!(
        log.append(payload(2)).await,
        Err(LogError::Io {
            kind: ErrorKind::PermissionDenied,
            ..
        })
    ));
    assert!(
        !segment(dir.path(), 2).exists(),
        "the rolled-back segment is still there"
    );
    assert_eq!(log.stats().segments, 1);

    faults.clear();
    assert_eq!(log.append(payload(2)).await.unwrap(), 2);
    assert!(segment(dir.path(), 2).exists());
    assert_records(&log, 3);
}

#[tokio::test]
async fn batch_durability_sync_failure_fails_every_unsynced_append() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultSwitch::new());
    let mut cfg = config(dir.path());
    cfg.durability = Durability::Batch {
        interval: Duration::from_millis(20),
    };
    let (log, _) = Log::open_with_faults(cfg, faults.clone()).unwrap();
    log.append(payload(0)).await.unwrap();

    faults.fail_syncs(ErrorKind::Other);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(payload(i)).await })
        })
        .collect();
    for h in handles {
        assert!(matches!(
            h.await.unwrap(),
            Err(LogError::Io { op: IoOp::Sync, .. })
        ));
    }
    assert_eq!(log.end_offset(), 1);
    faults.clear();
    assert_eq!(log.append(payload(1)).await.unwrap(), 1);
    assert_records(&log, 2);
}

/// A sync failure that, once armed, holds the writer inside `fdatasync` until released, so
/// a test can look at the log while a record is written but not yet synced.
#[derive(Default)]
struct HeldSyncFailure {
    state: std::sync::Mutex<(bool, bool)>, // (armed, released)
    cv: std::sync::Condvar,
}

impl HeldSyncFailure {
    fn arm(&self) {
        self.state.lock().unwrap().0 = true;
    }

    fn release(&self) {
        let mut st = self.state.lock().unwrap();
        *st = (false, true);
        self.cv.notify_all();
    }
}

impl sensorflow_log::FaultInjector for HeldSyncFailure {
    fn on_write(&self, _len: usize) -> Option<sensorflow_log::WriteFault> {
        None
    }

    fn on_sync(&self) -> Option<ErrorKind> {
        let mut st = self.state.lock().unwrap();
        if !st.0 {
            return None;
        }
        while !st.1 {
            st = self.cv.wait(st).unwrap();
        }
        Some(ErrorKind::Other)
    }
}

/// Regression: a reader's read-ahead buffer once could hold bytes written but not yet synced
/// (Batch durability); after the sync failed and the offsets were rewritten, the reader
/// returned the failed record instead of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_never_returns_bytes_of_a_record_that_was_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(HeldSyncFailure::default());
    let mut cfg = config(dir.path());
    cfg.durability = Durability::Batch {
        interval: Duration::from_millis(300),
    };
    let (log, _) = Log::open_with_faults(cfg, faults.clone()).unwrap();
    log.append(payload(0)).await.unwrap();
    let path = segment(dir.path(), 0);
    let published_len = file_len(&path);

    faults.arm();
    let appender = log.clone();
    let failed = tokio::spawn(async move {
        appender
            .append(Bytes::from_static(b"never acknowledged"))
            .await
    });
    // Wait until the doomed record is in the file (written, its sync held).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while file_len(&path) == published_len {
        assert!(std::time::Instant::now() < deadline, "record never written");
        tokio::task::yield_now().await;
    }
    let mut reader = log.reader(0).unwrap();
    let mut out = Vec::new();
    assert_eq!(reader.read_batch(&mut out, 10, Duration::ZERO).unwrap(), 1);
    faults.release();
    assert!(failed.await.unwrap().is_err());

    assert_eq!(log.append(payload(1)).await.unwrap(), 1);
    out.clear();
    assert_eq!(
        reader
            .read_batch(&mut out, 10, Duration::from_secs(5))
            .unwrap(),
        1
    );
    assert_eq!(out, vec![(1, payload(1))]);
}

/// Write and sync failures at random moments (a disk filling up and being freed), with segment
/// rolls and retention deleting old segments in between: every acknowledged record stays
/// readable from every offset still in the log, before and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_write_and_sync_failures_with_rolls_and_retention_lose_no_acknowledged_record() {
    for seed in 1..=12u64 {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(FaultSwitch::new());
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 24 + 5 * (8 + payload(0).len() as u64);
        cfg.durability = Durability::Batch {
            interval: Duration::from_millis(1),
        };
        let (log, _) = Log::open_with_faults(cfg.clone(), faults.clone()).unwrap();
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut acked = std::collections::BTreeMap::new();
        let mut label = 0u64;
        for _ in 0..200 {
            match next() % 6 {
                0 => faults.fail_writes(ErrorKind::StorageFull, (next() % 40) as usize),
                1 => faults.fail_syncs(ErrorKind::StorageFull),
                _ => faults.clear(),
            }
            let appends: Vec<_> = (0..1 + next() % 7)
                .map(|_| {
                    label += 1;
                    let (log, p) = (log.clone(), payload(label));
                    tokio::spawn(async move { (log.append(p.clone()).await, p) })
                })
                .collect();
            for a in appends {
                if let (Ok(offset), p) = a.await.unwrap() {
                    assert!(
                        acked.insert(offset, p).is_none(),
                        "seed {seed}: offset {offset} acknowledged twice"
                    );
                }
            }
            if next() % 4 == 0 {
                let end = log.end_offset();
                log.delete_before(next() % (end + 1)).unwrap();
            }
            let (start, end) = (log.start_offset(), log.end_offset());
            let from = start + next() % (end - start + 1);
            let read = read_all(&log, from).unwrap_or_else(|e| {
                panic!("seed {seed}: reading from {from} in {start}..{end}: {e}")
            });
            let expected: Vec<_> = acked.range(from..).map(|(o, p)| (*o, p.clone())).collect();
            assert_eq!(read, expected, "seed {seed}: records from {from}");
        }
        faults.clear();
        log.close().unwrap();
        drop(log);
        let (log, _) = Log::open(cfg).unwrap();
        let start = log.start_offset();
        let expected: Vec<_> = acked.range(start..).map(|(o, p)| (*o, p.clone())).collect();
        assert_eq!(
            read_all(&log, start).unwrap(),
            expected,
            "seed {seed}: after reopen"
        );
    }
}
