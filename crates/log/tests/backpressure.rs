//! Backpressure: a consumer that does not commit holds appends back; committing releases them.

#![allow(clippy::unwrap_used)] // tests unwrap freely

use std::time::Duration;

use bytes::Bytes;
use sensorflow_log::{Admission, Durability, Log, LogConfig};

/// 192-byte payloads: 200 bytes framed, so 5 records fill a 1000-byte bound exactly.
fn record() -> Bytes {
    Bytes::from(vec![7u8; 192])
}

fn config(dir: &std::path::Path) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.durability = Durability::None;
    c.max_unconsumed_bytes = 1000;
    c
}

#[tokio::test]
async fn append_waits_for_a_slow_consumer_and_resumes_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let mut reader = log.reader(0).unwrap();
    for i in 0..5 {
        assert_eq!(log.append(record()).await.unwrap(), i);
    }
    assert_eq!(log.stats().unconsumed_bytes, 1000);

    let appender = log.clone();
    let mut pending = tokio::spawn(async move { appender.append(record()).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut pending)
            .await
            .is_err(),
        "append completed although the consumer is 1000 bytes behind"
    );

    // Committing beyond what the reader returned releases nothing.
    reader.commit(3);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut pending)
            .await
            .is_err()
    );

    let mut out = Vec::new();
    assert_eq!(reader.read_batch(&mut out, 2, Duration::ZERO).unwrap(), 2);
    reader.commit(2);
    let offset = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("append still pending after commit")
        .unwrap()
        .unwrap();
    assert_eq!(offset, 5);
    assert_eq!(log.stats().unconsumed_bytes, 800);
}

#[tokio::test]
async fn commit_through_a_consumer_handle_from_another_task_releases_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let mut reader = log.reader(0).unwrap();
    let consumer = reader.consumer().unwrap();
    for _ in 0..5 {
        log.append(record()).await.unwrap();
    }
    let appender = log.clone();
    let mut pending = tokio::spawn(async move { appender.append(record()).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut pending)
            .await
            .is_err()
    );

    let mut out = Vec::new();
    assert_eq!(reader.read_batch(&mut out, 10, Duration::ZERO).unwrap(), 5);
    tokio::spawn(async move { consumer.commit(5) })
        .await
        .unwrap();
    let offset = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(offset, 5);
}

#[tokio::test]
async fn dropping_the_only_consumer_releases_waiting_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let reader = log.reader(0).unwrap();
    for _ in 0..5 {
        log.append(record()).await.unwrap();
    }
    let appender = log.clone();
    let mut pending = tokio::spawn(async move { appender.append(record()).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut pending)
            .await
            .is_err()
    );
    drop(reader);
    let offset = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(offset, 5);
}

#[tokio::test]
async fn untracked_readers_never_hold_appends_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let _observer = log.reader_untracked(0).unwrap();
    for i in 0..20 {
        let offset = tokio::time::timeout(Duration::from_secs(10), log.append(record()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(offset, i);
    }
    assert_eq!(log.stats().unconsumed_bytes, 0);
}

#[tokio::test]
async fn close_fails_appends_waiting_for_room() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let _reader = log.reader(0).unwrap();
    for _ in 0..5 {
        log.append(record()).await.unwrap();
    }
    let appender = log.clone();
    let mut pending = tokio::spawn(async move { appender.append(record()).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut pending)
            .await
            .is_err()
    );
    log.close().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(result, Err(sensorflow_log::LogError::Closed)));
}

#[tokio::test]
async fn try_admit_hands_the_payload_back_while_the_log_is_full_and_admits_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(config(dir.path())).unwrap();
    let mut reader = log.reader(0).unwrap();
    for i in 0..5 {
        let Admission::Admitted(pending) = log.try_admit(record()).unwrap() else {
            panic!("record {i} refused below the bound");
        };
        assert_eq!(pending.await.unwrap(), i);
    }

    let marked = Bytes::from(vec![9u8; 192]);
    let back = match log.try_admit(marked.clone()).unwrap() {
        Admission::Full(back) => back,
        Admission::Admitted(_) => panic!("admitted although the consumer is 1000 bytes behind"),
    };
    assert_eq!(back, marked, "the refused payload comes back untouched");
    assert_eq!(log.end_offset(), 5);

    let mut out = Vec::new();
    assert_eq!(reader.read_batch(&mut out, 1, Duration::ZERO).unwrap(), 1);
    reader.commit(1);
    let Admission::Admitted(pending) = log.try_admit(back).unwrap() else {
        panic!("refused after the consumer made room");
    };
    assert_eq!(pending.await.unwrap(), 5);
}
