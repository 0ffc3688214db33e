//! Appending and reading back: roundtrips across segment rolls, tailing, retention, close.

#![allow(clippy::unwrap_used)] // tests unwrap freely

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sensorflow_log::{Durability, Log, LogConfig, LogError, Retention};

fn payload(i: u64, len: usize) -> Bytes {
    (0..len)
        .map(|j| (i as usize * 31 + j) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn config(dir: &std::path::Path) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.durability = Durability::None;
    c
}

/// Reads everything currently published from `from`.
fn read_all(log: &Log, from: u64) -> Vec<(u64, Bytes)> {
    let mut reader = log.reader_untracked(from).unwrap();
    let mut out = Vec::new();
    while reader.read_batch(&mut out, 7, Duration::ZERO).unwrap() > 0 {}
    out
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn records_roundtrip_across_segment_rolls_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 1024;
    let (log, report) = Log::open(cfg.clone()).unwrap();
    assert_eq!(report.next_offset, 0);
    for i in 0..100u64 {
        assert_eq!(
            log.append(payload(i, (i as usize * 7) % 300))
                .await
                .unwrap(),
            i
        );
    }
    assert_eq!(log.end_offset(), 100);
    let stats = log.stats();
    assert!(
        stats.segments > 5,
        "expected several segments, got {}",
        stats.segments
    );
    assert_eq!(stats.appended_records, 100);

    let records = read_all(&log, 0);
    assert_eq!(records.len(), 100);
    for (i, (offset, p)) in records.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(*p, payload(i as u64, (i * 7) % 300));
    }
    // Starting in the middle of a segment skips to the right record.
    assert_eq!(read_all(&log, 57)[0], (57, payload(57, (57 * 7) % 300)));
    log.close().unwrap();
    drop(log);

    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!(report.next_offset, 100);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(log.append(Bytes::from_static(b"after")).await.unwrap(), 100);
    let records = read_all(&log, 95);
    assert_eq!(records.len(), 6);
    assert_eq!(records[5], (100, Bytes::from_static(b"after")));
}

#[tokio::test]
async fn every_durability_mode_completes_appends_in_order() {
    for durability in [
        Durability::None,
        Durability::Fsync,
        Durability::DEFAULT_BATCH,
        Durability::Batch {
            interval: Duration::ZERO,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.durability = durability;
        let (log, _) = Log::open(cfg).unwrap();
        let handles: Vec<_> = (0..50u64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(payload(i, 100)).await })
            })
            .collect();
        let mut offsets = Vec::new();
        for h in handles {
            offsets.push(h.await.unwrap().unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..50).collect::<Vec<_>>(), "{durability:?}");
        assert_eq!(read_all(&log, 0).len(), 50, "{durability:?}");
        if durability != Durability::None {
            assert!(log.stats().fsyncs >= 1, "{durability:?} never synced");
        }
    }
}

/// Batch durability does not make a lone appender wait: an append that is alone (the previous
/// sync covered one record) is synced and completed as soon as it is written.
#[tokio::test]
async fn batch_durability_syncs_an_idle_writer_at_once_instead_of_waiting_out_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.durability = Durability::Batch {
        interval: Duration::from_secs(3600),
    };
    let (log, _) = Log::open(cfg).unwrap();
    for i in 0..3u64 {
        let done = tokio::time::timeout(Duration::from_secs(60), log.append(payload(i, 100)))
            .await
            .expect("append waited for the batch interval");
        assert_eq!(done.unwrap(), i);
    }
    assert!(log.stats().fsyncs >= 1);
}

/// While several appenders overlap, Batch durability waits out the interval to group them:
/// at most one sync per interval, however fast the appenders come back with the next record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_durability_groups_overlapping_appenders_into_one_sync_per_interval() {
    const INTERVAL: Duration = Duration::from_millis(20);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.durability = Durability::Batch { interval: INTERVAL };
    let (log, _) = Log::open(cfg).unwrap();
    let started = std::time::Instant::now();
    let appenders: Vec<_> = (0..8u64)
        .map(|a| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    log.append(payload(a * 100 + i, 100)).await.unwrap();
                }
            })
        })
        .collect();
    for a in appenders {
        a.await.unwrap();
    }
    let elapsed = started.elapsed();
    let fsyncs = log.stats().fsyncs;
    let bound = (elapsed.as_millis() / INTERVAL.as_millis()) as u64 + 2;
    assert!(
        fsyncs <= bound,
        "{fsyncs} syncs in {elapsed:?}: more than one per {INTERVAL:?}"
    );
    assert_eq!(log.end_offset(), 80);
}

#[test]
fn reader_blocks_until_an_append_is_published() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let mut reader = log.reader(0).unwrap();

    let (started_tx, started_rx) = mpsc::channel();
    let (result_tx, result_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut out = Vec::new();
        started_tx.send(()).unwrap();
        let n = reader
            .read_batch(&mut out, 10, Duration::from_secs(30))
            .unwrap();
        result_tx.send((n, out)).unwrap();
    });
    started_rx.recv().unwrap();
    // Nothing is published, so the reader must still be waiting.
    assert!(result_rx.recv_timeout(Duration::from_millis(50)).is_err());

    rt.block_on(log.append(Bytes::from_static(b"wake up")))
        .unwrap();
    let (n, out) = result_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(n, 1);
    assert_eq!(out, vec![(0, Bytes::from_static(b"wake up"))]);
    waiter.join().unwrap();
}

#[test]
fn read_batch_times_out_with_zero_and_reports_closed_after_the_last_record() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let mut reader = log.reader(0).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        reader
            .read_batch(&mut out, 10, Duration::from_millis(1))
            .unwrap(),
        0
    );

    rt.block_on(log.append(Bytes::from_static(b"last")))
        .unwrap();
    log.close().unwrap();
    assert!(matches!(
        rt.block_on(log.append(Bytes::new())),
        Err(LogError::Closed)
    ));
    assert_eq!(
        reader
            .read_batch(&mut out, 10, Duration::from_secs(5))
            .unwrap(),
        1
    );
    assert!(matches!(
        reader.read_batch(&mut out, 10, Duration::from_secs(5)),
        Err(LogError::Closed)
    ));
    // close is idempotent.
    log.close().unwrap();
}

#[tokio::test]
async fn oversized_records_are_rejected_and_empty_ones_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_record_bytes = 10;
    let (log, _) = Log::open(cfg).unwrap();
    assert!(matches!(
        log.append(Bytes::from(vec![0; 11])).await,
        Err(LogError::RecordTooLarge { len: 11, max: 10 })
    ));
    assert_eq!(log.append(Bytes::new()).await.unwrap(), 0);
    assert_eq!(log.append(Bytes::from(vec![1; 10])).await.unwrap(), 1);
    assert_eq!(read_all(&log, 0)[0], (0, Bytes::new()));
}

#[tokio::test]
async fn delete_before_removes_only_whole_segments_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Header (24) + 10 records of 8 + 100 bytes per segment.
    cfg.segment_bytes = 24 + 10 * 108;
    let (log, _) = Log::open(cfg.clone()).unwrap();
    for i in 0..35u64 {
        log.append(payload(i, 100)).await.unwrap();
    }
    assert_eq!(
        segment_files(dir.path()),
        [0, 10, 20, 30].map(|b| format!("{b:020}.log"))
    );

    // Offset 15 lies inside segment 10: only segment 0 is wholly below it.
    assert_eq!(log.delete_before(15).unwrap(), 1);
    assert_eq!(log.start_offset(), 10);
    assert_eq!(
        segment_files(dir.path()),
        [10, 20, 30].map(|b| format!("{b:020}.log"))
    );
    assert!(matches!(
        log.reader(5),
        Err(LogError::OffsetOutOfRange {
            requested: 5,
            start: 10,
            end: 35
        })
    ));
    assert_eq!(read_all(&log, 10).len(), 25);

    // Far beyond the end: the active segment always stays.
    assert_eq!(log.delete_before(u64::MAX).unwrap(), 2);
    assert_eq!(segment_files(dir.path()), [format!("{:020}.log", 30)]);
    assert_eq!(log.delete_before(u64::MAX).unwrap(), 0);
    log.close().unwrap();
    drop(log);

    let (log, report) = Log::open(cfg).unwrap();
    assert_eq!((report.start_offset, report.next_offset), (30, 35));
    assert_eq!(log.append(payload(35, 1)).await.unwrap(), 35);
}

#[tokio::test]
async fn trim_keeps_segments_needed_for_recovery_and_young_or_within_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Header (24) + 10 records of 8 + 100 bytes per segment: 1,104 bytes each.
    cfg.segment_bytes = 24 + 10 * 108;
    let (log, _) = Log::open(cfg).unwrap();
    for i in 0..55u64 {
        log.append(payload(i, 100)).await.unwrap();
    }
    let names = |bases: &[u64]| {
        bases
            .iter()
            .map(|b| format!("{b:020}.log"))
            .collect::<Vec<_>>()
    };
    assert_eq!(segment_files(dir.path()), names(&[0, 10, 20, 30, 40, 50]));
    let generous = Retention {
        max_age: Duration::from_secs(3600),
        max_bytes: u64::MAX,
    };

    // Everything is young and within budget: nothing goes, even below the recovery point.
    assert_eq!(log.trim(55, &generous).unwrap(), 0);

    // Segments 0 and 10 last written two hours ago are past the age limit.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for base in [0u64, 10] {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.path().join(format!("{base:020}.log")))
            .unwrap();
        f.set_modified(two_hours_ago).unwrap();
    }
    // ... but recovery needs offset 5 onwards, so segment 0 is all that may go.
    assert_eq!(log.trim(5, &generous).unwrap(), 0);
    assert_eq!(log.trim(10, &generous).unwrap(), 1);
    assert_eq!(log.trim(55, &generous).unwrap(), 1);
    assert_eq!(segment_files(dir.path()), names(&[20, 30, 40, 50]));

    // A byte budget the newest three segments already fill (two full, the active one holding
    // 5 records) drops the oldest young one, and only that.
    let budget = Retention {
        max_age: Duration::from_secs(3600),
        max_bytes: 2 * 1104 + 24 + 5 * 108,
    };
    assert_eq!(log.trim(55, &budget).unwrap(), 1);
    assert_eq!(segment_files(dir.path()), names(&[30, 40, 50]));

    // No retention: everything below the recovery point goes; the active segment stays.
    assert_eq!(log.trim(45, &Retention::NONE).unwrap(), 1);
    assert_eq!(segment_files(dir.path()), names(&[40, 50]));
    assert_eq!(log.trim(u64::MAX, &Retention::NONE).unwrap(), 1);
    assert_eq!(segment_files(dir.path()), names(&[50]));
    assert_eq!(read_all(&log, 50).len(), 5);
}

#[test]
fn second_open_of_the_same_directory_is_refused_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    assert!(matches!(
        Log::open(config(dir.path())),
        Err(LogError::Locked { .. })
    ));
    log.close().unwrap();
    Log::open(config(dir.path())).unwrap();
}

#[test]
fn dropping_the_last_handle_flushes_queued_appends() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(config(dir.path())).unwrap();
        rt.block_on(log.append(Bytes::from_static(b"kept")))
            .unwrap();
    }
    let (log, report) = Log::open(config(dir.path())).unwrap();
    assert_eq!(report.next_offset, 1);
    assert_eq!(read_all(&log, 0), vec![(0, Bytes::from_static(b"kept"))]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_payloads_and_segment_sizes_roundtrip_through_reopen(
        sizes in proptest::collection::vec(0usize..600, 1..80),
        segment_bytes in 40u64..4000,
        split in 0usize..80,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = segment_bytes;
        let expected: Vec<Bytes> = sizes.iter().enumerate().map(|(i, &n)| payload(i as u64, n)).collect();
        let split = split.min(expected.len());

        let (log, _) = Log::open(cfg.clone()).unwrap();
        for (i, p) in expected[..split].iter().enumerate() {
            prop_assert_eq!(rt.block_on(log.append(p.clone())).unwrap(), i as u64);
        }
        log.close().unwrap();
        drop(log);
        let (log, report) = Log::open(cfg).unwrap();
        prop_assert_eq!(report.next_offset, split as u64);
        prop_assert_eq!(report.truncated_bytes, 0);
        for (i, p) in expected[split..].iter().enumerate() {
            prop_assert_eq!(rt.block_on(log.append(p.clone())).unwrap(), (split + i) as u64);
        }
        let got = read_all(&log, 0);
        prop_assert_eq!(got.len(), expected.len());
        for (i, (offset, p)) in got.into_iter().enumerate() {
            prop_assert_eq!(offset, i as u64);
            prop_assert_eq!(&p, &expected[i]);
        }
    }
}

#[tokio::test]
async fn records_admitted_in_sequence_are_appended_in_that_order_even_if_completions_are_awaited_out_of_order()
 {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = sensorflow_log::Log::open(sensorflow_log::LogConfig::new(dir.path())).unwrap();
    let mut pendings = Vec::new();
    for i in 0..100u32 {
        pendings.push(
            log.admit(bytes::Bytes::from(i.to_le_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    // Await the completions backwards: the offsets still follow admission order.
    let mut offsets = Vec::new();
    while let Some(p) = pendings.pop() {
        offsets.push(p.await.unwrap());
    }
    offsets.reverse();
    assert_eq!(offsets, (0..100).collect::<Vec<u64>>());
    let mut reader = log.reader(0).unwrap();
    let mut out = Vec::new();
    while out.len() < 100 {
        reader
            .read_batch(&mut out, 100, std::time::Duration::from_secs(5))
            .unwrap();
    }
    let values: Vec<u32> = out
        .iter()
        .map(|(_, b)| u32::from_le_bytes(b[..4].try_into().unwrap()))
        .collect();
    assert_eq!(values, (0..100).collect::<Vec<u32>>());
    log.close().unwrap();
}

#[tokio::test]
async fn scan_reads_a_live_log_without_its_lock_and_stops_at_a_partial_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 24 + 10 * 108;
    let (log, _) = Log::open(cfg).unwrap();
    for i in 0..35u64 {
        log.append(payload(i, 100)).await.unwrap();
    }
    let scanned: Vec<(u64, Bytes)> = sensorflow_log::scan(dir.path())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(scanned, read_all(&log, 0));
    assert_eq!(scanned.len(), 35);

    // A record being written at the end of the active segment is not returned yet.
    let active = dir.path().join(format!("{:020}.log", 30));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&active)
        .unwrap();
    std::io::Write::write_all(&mut f, &[100, 0, 0, 0, 1, 2, 3]).unwrap();
    assert_eq!(sensorflow_log::scan(dir.path()).unwrap().count(), 35);

    // Damage inside a sealed segment is reported, not skipped.
    let sealed = dir.path().join(format!("{:020}.log", 10));
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[24 + 3 * 108 + 20] ^= 0xFF;
    std::fs::write(&sealed, &bytes).unwrap();
    let results: Vec<_> = sensorflow_log::scan(dir.path()).unwrap().collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 13);
    assert!(matches!(
        results.last(),
        Some(Err(LogError::Corrupt { .. }))
    ));
}
