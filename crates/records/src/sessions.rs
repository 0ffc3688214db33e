//! The read contract of the sessions store: one query, one view and one error from the SQLite
//! store (`sensorflow-lake`) to the HTTP API (`sensorflow-api`), so nothing copies a session
//! field by field between them.

use std::path::PathBuf;

use serde::Serialize;

use crate::record::{SessionAggregate, SessionEndReason};

/// Filter and page of [`SessionsQuery::list`]. Every filter present must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionQuery {
    /// Only sessions of this sensor.
    pub sensor_id: Option<String>,
    /// `Some(true)`: only active sessions (`end_us` is null); `Some(false)`: only ended ones;
    /// `None`: both.
    pub active: Option<bool>,
    /// Only sessions still going at or after this time: `end_us` is null or `end_us >= from_us`.
    pub from_us: Option<i64>,
    /// Only sessions that started before this time: `start_us < to_us`.
    pub to_us: Option<i64>,
    /// At most this many sessions (0 returns none; the API keeps it in 1..=1000).
    pub limit: usize,
    /// Number of matching sessions skipped first (paging).
    pub offset: usize,
}

impl Default for SessionQuery {
    /// No filter, first 100.
    fn default() -> Self {
        Self {
            sensor_id: None,
            active: None,
            from_us: None,
            to_us: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// A session as the sessions store holds it and `GET /sessions` serves it: the `sessions` row,
/// why it ended and its latest aggregate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionView {
    /// `{sensor_id}_{first_timestamp_us}`.
    pub session_id: String,
    /// The sensor the session belongs to.
    pub sensor_id: String,
    /// Event time of the first sample (µs since the epoch).
    pub start_us: i64,
    /// Event time of the last sample once the session ended; `None` while active.
    pub end_us: Option<i64>,
    /// Event time of the latest sample seen (µs since the epoch).
    pub last_seen_us: i64,
    /// Samples in the session so far.
    pub sample_count: u64,
    /// Why the session ended; `None` while active.
    pub end_reason: Option<SessionEndReason>,
    /// True while the session is active (`end_us` is `None`).
    pub active: bool,
    /// The latest aggregate of the session, if one was emitted; an ended session keeps its last.
    pub aggregate: Option<SessionAggregate>,
}

impl SessionView {
    /// Keeps the newer of the stored aggregate and `live` (e.g. the live hub's latest, which can
    /// be ahead of the store by one sink commit).
    pub fn with_newer_aggregate(mut self, live: Option<&SessionAggregate>) -> Self {
        if let Some(live) = live
            && self
                .aggregate
                .as_ref()
                .is_none_or(|stored| stored.emitted_at_us < live.emitted_at_us)
        {
            self.aggregate = Some(live.clone());
        }
        self
    }
}

/// The sessions store, read side. Methods may block (SQLite); async callers run them on a
/// blocking pool.
pub trait SessionsQuery: Send + Sync {
    /// Sessions matching `q`, newest `start_us` first (ties by `session_id`), `q.offset`
    /// skipped, at most `q.limit`.
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionView>, StoreError>;
    /// One session, `Ok(None)` when the store does not know the id.
    fn get(&self, session_id: &str) -> Result<Option<SessionView>, StoreError>;
}

/// Failure of the sessions store (the API answers 503 `unavailable` with its message).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine reported an error (kept as the source; this crate does not depend on
    /// the engine).
    #[error("sessions store: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The directory of the database could not be created.
    #[error("sessions store directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The database refused to switch to WAL mode (e.g. on a network filesystem).
    #[error("sessions store {path} is in journal mode {mode:?}; WAL is required")]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The mode the database kept.
        mode: String,
    },
}

impl StoreError {
    /// Wraps an error of the database engine.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn aggregate(emitted_at_us: i64) -> SessionAggregate {
        SessionAggregate {
            session_id: "s_1".into(),
            sensor_id: "s".into(),
            emitted_at_us,
            max_velocity: 1.0,
            distance_m: 2.0,
            mean_velocity: 0.5,
            moving_time_s: 3.0,
            sample_count: 4,
            duration_s: 5.0,
        }
    }

    fn view(aggregate: Option<SessionAggregate>) -> SessionView {
        SessionView {
            session_id: "s_1".into(),
            sensor_id: "s".into(),
            start_us: 1,
            end_us: Some(2),
            last_seen_us: 2,
            sample_count: 4,
            end_reason: Some(SessionEndReason::Gap),
            active: false,
            aggregate,
        }
    }

    #[test]
    fn the_newer_of_stored_and_live_aggregate_wins() {
        let stored = view(Some(aggregate(10)));
        assert_eq!(
            stored.clone().with_newer_aggregate(None).aggregate,
            Some(aggregate(10))
        );
        assert_eq!(
            stored
                .clone()
                .with_newer_aggregate(Some(&aggregate(9)))
                .aggregate,
            Some(aggregate(10))
        );
        assert_eq!(
            stored.with_newer_aggregate(Some(&aggregate(11))).aggregate,
            Some(aggregate(11))
        );
        assert_eq!(
            view(None)
                .with_newer_aggregate(Some(&aggregate(1)))
                .aggregate,
            Some(aggregate(1))
        );
    }

    #[test]
    fn a_view_serialises_its_end_reason_by_its_serde_name() {
        let json = serde_json::to_value(view(None)).unwrap();
        assert_eq!(json["end_reason"], "gap");
        assert_eq!(json["aggregate"], serde_json::Value::Null);
    }
}
