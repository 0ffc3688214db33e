//! The sessions store: an embedded SQLite database (WAL mode) holding every session, active or
//! ended, with its latest aggregate. The pipeline's sink is its only writer
//! ([`SessionsStore::apply`]); the HTTP API reads it through [`SessionsReader`]s, which use their
//! own read-only connections and therefore never block the writer (WAL readers see the last
//! committed transaction).
//!
//! Updates are idempotent and monotonic, so replaying events after a restart (at-least-once
//! delivery) leaves the same state: counts and `last_seen_us` only grow, an aggregate only
//! replaces an older one, and an ended session stays ended, except one ended by
//! [`SessionEndReason::Shutdown`], which a later `Started` reopens (the pipeline resumes
//! sessions interrupted by a clean shutdown).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params, params_from_iter};
use sensorflow_pipeline::{SessionAggregate, SessionEndReason, SessionEvent, SessionRecord};
use serde::Serialize;

/// How long a connection waits for a lock held by another one (checkpoints, the writer).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    session_id        TEXT PRIMARY KEY NOT NULL,
    sensor_id         TEXT NOT NULL,
    start_us          INTEGER NOT NULL,
    end_us            INTEGER,
    last_seen_us      INTEGER NOT NULL,
    sample_count      INTEGER NOT NULL,
    end_reason        TEXT,
    agg_emitted_at_us INTEGER,
    max_velocity      REAL,
    distance_m        REAL,
    mean_velocity     REAL,
    moving_time_s     REAL,
    duration_s        REAL,
    agg_sample_count  INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_by_sensor ON sessions (sensor_id);
CREATE INDEX IF NOT EXISTS sessions_by_start ON sessions (start_us);
PRAGMA user_version = 1;
";

const UPSERT_STARTED: &str = "
INSERT INTO sessions (session_id, sensor_id, start_us, end_us, last_seen_us, sample_count, end_reason)
VALUES (?1, ?2, ?3, NULL, ?4, ?5, NULL)
ON CONFLICT (session_id) DO UPDATE SET
    last_seen_us = MAX(last_seen_us, excluded.last_seen_us),
    sample_count = MAX(sample_count, excluded.sample_count),
    end_us       = CASE WHEN end_reason = 'shutdown' THEN NULL ELSE end_us END,
    end_reason   = CASE WHEN end_reason = 'shutdown' THEN NULL ELSE end_reason END";

const UPSERT_ENDED: &str = "
INSERT INTO sessions (session_id, sensor_id, start_us, end_us, last_seen_us, sample_count, end_reason)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
ON CONFLICT (session_id) DO UPDATE SET
    end_us       = excluded.end_us,
    end_reason   = excluded.end_reason,
    last_seen_us = MAX(last_seen_us, excluded.last_seen_us),
    sample_count = MAX(sample_count, excluded.sample_count)";

const UPDATE_AGGREGATE: &str = "
UPDATE sessions SET
    agg_emitted_at_us = ?2, max_velocity = ?3, distance_m = ?4, mean_velocity = ?5,
    moving_time_s = ?6, duration_s = ?7, agg_sample_count = ?8,
    sample_count = MAX(sample_count, ?8)
WHERE session_id = ?1 AND (agg_emitted_at_us IS NULL OR agg_emitted_at_us <= ?2)";

const SELECT_VIEW: &str = "
SELECT session_id, sensor_id, start_us, end_us, last_seen_us, sample_count, end_reason,
       agg_emitted_at_us, max_velocity, distance_m, mean_velocity, moving_time_s, duration_s,
       agg_sample_count
FROM sessions";

/// Failure of the sessions store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sessions store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The directory of the database could not be created.
    #[error("sessions store directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// SQLite refused to switch the database to WAL mode (e.g. on a network filesystem).
    #[error("sessions store {path} is in journal mode {mode:?}; WAL is required")]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The mode SQLite kept.
        mode: String,
    },
}

/// The writer side of the sessions store. One per database file; owned by the sink thread.
pub struct SessionsStore {
    conn: Connection,
    path: PathBuf,
}

impl SessionsStore {
    /// Opens (creating if needed, with its directory) the database at `path`, switches it to WAL
    /// mode and creates the schema.
    ///
    /// `synchronous = NORMAL`: a transaction is durable once the WAL is checkpointed; a power loss
    /// may lose the last transactions but never corrupts the database, and the pipeline replays
    /// events since its last checkpoint anyway.
    pub fn open(path: &Path) -> Result<SessionsStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(SessionsStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Applies session lifecycle events, then aggregates, in one transaction (all or nothing).
    ///
    /// `Started` inserts the session (or, replayed, only grows its counters; it reopens a session
    /// ended by a shutdown). `Ended` inserts or updates it with its end time and reason (an
    /// `Ended` without `end_us` uses `last_seen_us`). An aggregate replaces the session's stored
    /// one unless that is newer, and raises `sample_count`; an aggregate of an unknown session is
    /// ignored.
    pub fn apply(
        &mut self,
        events: &[SessionEvent],
        aggregates: &[SessionAggregate],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut started = tx.prepare_cached(UPSERT_STARTED)?;
            let mut ended = tx.prepare_cached(UPSERT_ENDED)?;
            let mut aggregate = tx.prepare_cached(UPDATE_AGGREGATE)?;
            for event in events {
                match event {
                    SessionEvent::Started { session: s } => {
                        started.execute(params![
                            &*s.session_id,
                            &*s.sensor_id,
                            s.start_us,
                            s.last_seen_us,
                            count_to_sql(s.sample_count),
                        ])?;
                    }
                    SessionEvent::Ended { session: s, reason } => {
                        ended.execute(params![
                            &*s.session_id,
                            &*s.sensor_id,
                            s.start_us,
                            s.end_us.unwrap_or(s.last_seen_us),
                            s.last_seen_us,
                            count_to_sql(s.sample_count),
                            reason_str(*reason),
                        ])?;
                    }
                }
            }
            for a in aggregates {
                let changed = aggregate.execute(params![
                    &*a.session_id,
                    a.emitted_at_us,
                    a.max_velocity,
                    a.distance_m,
                    a.mean_velocity,
                    a.moving_time_s,
                    a.duration_s,
                    count_to_sql(a.sample_count),
                ])?;
                if changed == 0 {
                    tracing::trace!(session_id = %a.session_id, "aggregate of unknown session or older than stored one ignored");
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A new reader on its own read-only connection, for another thread.
    pub fn reader(&self) -> Result<SessionsReader, StoreError> {
        SessionsReader::open(&self.path)
    }
}

/// SQLite integers are i64; counts never come near 2^63, saturate rather than fail.
fn count_to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `end_reason` column value: the serde name of the reason.
fn reason_str(reason: SessionEndReason) -> &'static str {
    match reason {
        SessionEndReason::Gap => "gap",
        SessionEndReason::Idle => "idle",
        SessionEndReason::DeviceRestart => "device_restart",
        SessionEndReason::Shutdown => "shutdown",
        SessionEndReason::Evicted => "evicted",
    }
}

/// Filter and page of [`SessionsReader::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionQuery {
    /// Only sessions of this sensor.
    pub sensor_id: Option<String>,
    /// `Some(true)`: only active sessions; `Some(false)`: only ended ones.
    pub active: Option<bool>,
    /// Only sessions overlapping `[from_us, to_us)`: ended sessions span `[start_us, end_us]`,
    /// active ones `[start_us, ∞)`.
    pub from_us: Option<i64>,
    /// See `from_us`.
    pub to_us: Option<i64>,
    /// At most this many sessions (0 returns none).
    pub limit: usize,
    /// Skip this many sessions of the ordered result first.
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

/// A session as the API shows it (`GET /sessions`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionView {
    /// `{sensor_id}_{first_timestamp_us}`.
    pub session_id: String,
    /// The sensor the session belongs to.
    pub sensor_id: String,
    /// Event time of the first sample (µs since the epoch).
    pub start_us: i64,
    /// `None` while active.
    pub end_us: Option<i64>,
    /// Event time of the latest sample seen.
    pub last_seen_us: i64,
    /// Samples in the session so far.
    pub sample_count: u64,
    /// `gap`, `idle`, `device_restart` or `shutdown`; `None` while active.
    pub end_reason: Option<String>,
    /// `end_us` is `None`.
    pub active: bool,
    /// The latest aggregate, if one was emitted.
    pub aggregate: Option<AggregateView>,
}

/// The latest aggregate of a session (fields as in `session_aggregates`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AggregateView {
    /// When the aggregate was emitted.
    pub emitted_at_us: i64,
    /// Highest velocity (m/s).
    pub max_velocity: f64,
    /// Σ |v|·dt (m).
    pub distance_m: f64,
    /// Mean velocity (m/s).
    pub mean_velocity: f64,
    /// Time with movement_prob ≥ threshold (s).
    pub moving_time_s: f64,
    /// Session duration when emitted (s).
    pub duration_s: f64,
    /// Samples covered by the aggregate.
    pub sample_count: u64,
}

impl SessionView {
    /// The session as a pipeline record (e.g. to resume it after a restart).
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            session_id: self.session_id.as_str().into(),
            sensor_id: self.sensor_id.as_str().into(),
            start_us: self.start_us,
            end_us: self.end_us,
            last_seen_us: self.last_seen_us,
            sample_count: self.sample_count,
        }
    }

    fn from_row(row: &Row<'_>) -> rusqlite::Result<SessionView> {
        let end_us: Option<i64> = row.get(3)?;
        let count = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(i)?.max(0) as u64) };
        let aggregate = match row.get::<_, Option<i64>>(7)? {
            Some(emitted_at_us) => Some(AggregateView {
                emitted_at_us,
                max_velocity: row.get(8)?,
                distance_m: row.get(9)?,
                mean_velocity: row.get(10)?,
                moving_time_s: row.get(11)?,
                duration_s: row.get(12)?,
                sample_count: count(13)?,
            }),
            None => None,
        };
        Ok(SessionView {
            session_id: row.get(0)?,
            sensor_id: row.get(1)?,
            start_us: row.get(2)?,
            end_us,
            last_seen_us: row.get(4)?,
            sample_count: count(5)?,
            end_reason: row.get(6)?,
            active: end_us.is_none(),
            aggregate,
        })
    }
}

/// Read-only access to the sessions store, `Send + Sync`: share it in an `Arc` and call it from
/// `spawn_blocking`. Calls are serialised on one connection; open several readers for parallel
/// queries.
pub struct SessionsReader {
    conn: Mutex<Connection>,
}

impl SessionsReader {
    /// Opens a read-only connection to an existing store at `path`.
    pub fn open(path: &Path) -> Result<SessionsReader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(SessionsReader {
            conn: Mutex::new(conn),
        })
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock cannot leave a read-only connection inconsistent.
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(f(&conn)?)
    }

    /// Sessions matching `q`, newest `start_us` first (ties by `session_id`).
    pub fn list(&self, q: &SessionQuery) -> Result<Vec<SessionView>, StoreError> {
        // Only the filters present go into the SQL, so SQLite can use the indexes; each shape is
        // prepared once and cached.
        let mut sql = String::from(SELECT_VIEW);
        let mut conditions: Vec<&str> = Vec::with_capacity(4);
        let mut args: Vec<Value> = Vec::with_capacity(6);
        if let Some(sensor) = &q.sensor_id {
            conditions.push("sensor_id = ?");
            args.push(Value::Text(sensor.clone()));
        }
        match q.active {
            Some(true) => conditions.push("end_us IS NULL"),
            Some(false) => conditions.push("end_us IS NOT NULL"),
            None => {}
        }
        if let Some(from) = q.from_us {
            conditions.push("(end_us IS NULL OR end_us >= ?)");
            args.push(Value::Integer(from));
        }
        if let Some(to) = q.to_us {
            conditions.push("start_us < ?");
            args.push(Value::Integer(to));
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY start_us DESC, session_id ASC LIMIT ? OFFSET ?");
        args.push(Value::Integer(count_to_sql(q.limit as u64)));
        args.push(Value::Integer(count_to_sql(q.offset as u64)));
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), SessionView::from_row)?;
            rows.collect()
        })
    }

    /// The session `session_id`, if stored.
    pub fn get(&self, session_id: &str) -> Result<Option<SessionView>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&format!("{SELECT_VIEW} WHERE session_id = ?1"))?;
            stmt.query_row([session_id], SessionView::from_row)
                .optional()
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reader_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SessionsReader>();
    }

    #[test]
    fn end_reasons_match_their_serde_names() {
        for r in [
            SessionEndReason::Gap,
            SessionEndReason::Idle,
            SessionEndReason::DeviceRestart,
            SessionEndReason::Evicted,
            SessionEndReason::Shutdown,
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", reason_str(r)));
        }
    }
}
