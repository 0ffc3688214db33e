//! Sessions store: upserts from lifecycle events and aggregates, replay safety, query filters,
//! and reads from another thread.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use sensorflow_lake::SessionsStore;
use sensorflow_records::{
    SessionAggregate, SessionEndReason, SessionEvent, SessionQuery, SessionRecord,
};

fn record(
    sensor: &str,
    start_us: i64,
    end_us: Option<i64>,
    last_seen_us: i64,
    count: u64,
) -> SessionRecord {
    SessionRecord {
        session_id: format!("{sensor}_{start_us}").into(),
        sensor_id: sensor.into(),
        start_us,
        end_us,
        last_seen_us,
        sample_count: count,
    }
}

fn started(sensor: &str, start_us: i64) -> SessionEvent {
    SessionEvent::Started {
        session: record(sensor, start_us, None, start_us, 1),
    }
}

fn ended(
    sensor: &str,
    start_us: i64,
    end_us: i64,
    count: u64,
    reason: SessionEndReason,
) -> SessionEvent {
    SessionEvent::Ended {
        session: record(sensor, start_us, Some(end_us), end_us, count),
        reason,
    }
}

fn aggregate(
    sensor: &str,
    start_us: i64,
    emitted_at_us: i64,
    distance_m: f64,
    count: u64,
) -> SessionAggregate {
    SessionAggregate {
        session_id: format!("{sensor}_{start_us}").into(),
        sensor_id: sensor.into(),
        emitted_at_us,
        max_velocity: 3.0,
        distance_m,
        mean_velocity: 1.5,
        moving_time_s: 4.0,
        sample_count: count,
        duration_s: 5.0,
    }
}

fn open() -> (tempfile::TempDir, SessionsStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionsStore::open(&dir.path().join("state").join("sessions.db")).unwrap();
    (dir, store)
}

fn all() -> SessionQuery {
    SessionQuery::default()
}

#[test]
fn started_session_is_active_then_ended_in_place() {
    let (_dir, mut store) = open();
    let reader = store.reader().unwrap();
    store.apply(&[started("a", 1000)], &[]).unwrap();

    let s = reader.get("a_1000").unwrap().unwrap();
    assert!(s.active);
    assert_eq!((s.start_us, s.end_us, s.sample_count), (1000, None, 1));
    assert_eq!(s.end_reason, None);
    assert_eq!(s.aggregate, None);

    store
        .apply(&[ended("a", 1000, 9000, 50, SessionEndReason::Gap)], &[])
        .unwrap();
    let s = reader.get("a_1000").unwrap().unwrap();
    assert!(!s.active);
    assert_eq!(
        (s.end_us, s.last_seen_us, s.sample_count),
        (Some(9000), 9000, 50)
    );
    assert_eq!(s.end_reason, Some(SessionEndReason::Gap));
    assert_eq!(reader.list(&all()).unwrap().len(), 1);
    assert_eq!(reader.get("missing").unwrap(), None);
}

#[test]
fn latest_aggregate_wins_and_older_or_orphan_aggregates_are_ignored() {
    let (_dir, mut store) = open();
    let reader = store.reader().unwrap();
    store
        .apply(
            &[started("a", 0)],
            &[
                aggregate("a", 0, 2_000, 1.0, 400),
                aggregate("zzz", 0, 2_000, 9.0, 1),
            ],
        )
        .unwrap();
    store
        .apply(&[], &[aggregate("a", 0, 4_000, 2.0, 800)])
        .unwrap();
    // Replay of the older one.
    store
        .apply(&[], &[aggregate("a", 0, 2_000, 1.0, 400)])
        .unwrap();

    let s = reader.get("a_0").unwrap().unwrap();
    let agg = s.aggregate.unwrap();
    assert_eq!(
        (agg.emitted_at_us, agg.distance_m, agg.sample_count),
        (4_000, 2.0, 800)
    );
    assert_eq!(
        s.sample_count, 800,
        "aggregates raise the live sample count"
    );
    assert_eq!(reader.get("zzz_0").unwrap(), None);
    // The JSON shape the API serves.
    let json = serde_json::to_value(reader.get("a_0").unwrap().unwrap()).unwrap();
    assert_eq!(json["aggregate"]["distance_m"], 2.0);
    assert_eq!(json["active"], true);
    assert_eq!(json["end_us"], serde_json::Value::Null);
}

#[test]
fn replayed_events_do_not_reopen_or_shrink_a_session() {
    let (_dir, mut store) = open();
    let reader = store.reader().unwrap();
    let events = [
        started("a", 0),
        ended("a", 0, 5_000, 100, SessionEndReason::Idle),
    ];
    store.apply(&events, &[]).unwrap();
    // At-least-once delivery after a restart replays both.
    store.apply(&events[..1], &[]).unwrap();
    store.apply(&events, &[]).unwrap();

    let s = reader.get("a_0").unwrap().unwrap();
    assert!(!s.active);
    assert_eq!((s.end_us, s.sample_count), (Some(5_000), 100));
    assert_eq!(s.end_reason, Some(SessionEndReason::Idle));
}

#[test]
fn session_ended_by_shutdown_is_reopened_by_a_later_start() {
    let (_dir, mut store) = open();
    let reader = store.reader().unwrap();
    store
        .apply(
            &[
                started("a", 0),
                ended("a", 0, 5_000, 100, SessionEndReason::Shutdown),
            ],
            &[],
        )
        .unwrap();
    assert!(!reader.get("a_0").unwrap().unwrap().active);

    store
        .apply(
            &[SessionEvent::Started {
                session: record("a", 0, None, 6_000, 101),
            }],
            &[],
        )
        .unwrap();
    let s = reader.get("a_0").unwrap().unwrap();
    assert!(s.active);
    assert_eq!(
        (s.end_us, s.end_reason, s.last_seen_us, s.sample_count),
        (None, None, 6_000, 101)
    );
}

#[test]
fn an_ended_event_without_a_start_creates_the_session() {
    let (_dir, mut store) = open();
    store
        .apply(
            &[ended("b", 10, 20, 3, SessionEndReason::DeviceRestart)],
            &[],
        )
        .unwrap();
    let s = store.reader().unwrap().get("b_10").unwrap().unwrap();
    assert_eq!((s.start_us, s.end_us), (10, Some(20)));
    assert_eq!(s.end_reason, Some(SessionEndReason::DeviceRestart));
}

#[test]
fn queries_filter_by_sensor_state_and_overlapping_time_range() {
    let (_dir, mut store) = open();
    let reader = store.reader().unwrap();
    // a_0: [0, 100] ended; a_200: [200, 300] ended; a_400: active from 400; b_50: [50, 250] ended.
    store
        .apply(
            &[
                started("a", 0),
                ended("a", 0, 100, 10, SessionEndReason::Gap),
                started("a", 200),
                ended("a", 200, 300, 10, SessionEndReason::Gap),
                started("a", 400),
                started("b", 50),
                ended("b", 50, 250, 10, SessionEndReason::Idle),
            ],
            &[],
        )
        .unwrap();
    let ids = |q: SessionQuery| -> Vec<String> {
        reader
            .list(&q)
            .unwrap()
            .into_iter()
            .map(|s| s.session_id)
            .collect()
    };

    assert_eq!(
        ids(all()),
        ["a_400", "a_200", "b_50", "a_0"],
        "newest start first"
    );
    assert_eq!(
        ids(SessionQuery {
            sensor_id: Some("b".into()),
            ..all()
        }),
        ["b_50"]
    );
    assert_eq!(
        ids(SessionQuery {
            active: Some(true),
            ..all()
        }),
        ["a_400"]
    );
    assert_eq!(
        ids(SessionQuery {
            active: Some(false),
            sensor_id: Some("a".into()),
            ..all()
        }),
        ["a_200", "a_0"]
    );
    // [100, 200): a_0 ends at 100 (inclusive end), a_200 starts at 200 (exclusive bound).
    assert_eq!(
        ids(SessionQuery {
            from_us: Some(100),
            to_us: Some(200),
            ..all()
        }),
        ["b_50", "a_0"]
    );
    assert_eq!(
        ids(SessionQuery {
            from_us: Some(101),
            to_us: Some(200),
            ..all()
        }),
        ["b_50"]
    );
    // Active sessions extend to the future.
    assert_eq!(
        ids(SessionQuery {
            from_us: Some(10_000),
            ..all()
        }),
        ["a_400"]
    );
    assert_eq!(
        ids(SessionQuery {
            to_us: Some(50),
            ..all()
        }),
        ["a_0"]
    );
    // Paging.
    assert_eq!(ids(SessionQuery { limit: 2, ..all() }), ["a_400", "a_200"]);
    assert_eq!(
        ids(SessionQuery {
            limit: 2,
            offset: 2,
            ..all()
        }),
        ["b_50", "a_0"]
    );
    assert!(ids(SessionQuery { limit: 0, ..all() }).is_empty());
}

#[test]
fn reader_on_another_thread_sees_committed_transactions() {
    let (dir, mut store) = open();
    let reader = std::sync::Arc::new(store.reader().unwrap());
    store.apply(&[started("a", 0)], &[]).unwrap();
    let r = reader.clone();
    let seen = std::thread::spawn(move || r.list(&SessionQuery::default()).unwrap().len())
        .join()
        .unwrap();
    assert_eq!(seen, 1);

    // Reopening the store keeps the data (WAL is checkpointed or replayed).
    drop(store);
    drop(reader);
    let store = SessionsStore::open(&dir.path().join("state").join("sessions.db")).unwrap();
    assert!(store.reader().unwrap().get("a_0").unwrap().is_some());
}
