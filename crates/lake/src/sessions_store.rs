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
use sensorflow_records::{
    SessionAggregate, SessionEndReason, SessionEvent, SessionQuery, SessionView, SessionsQuery,
    StoreError,
};

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
        let conn = Connection::open(path).map_err(StoreError::backend)?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(StoreError::backend)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(StoreError::backend)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(StoreError::backend)?;
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
        self.apply_in_transaction(events, aggregates)
            .map_err(StoreError::backend)
    }

    fn apply_in_transaction(
        &mut self,
        events: &[SessionEvent],
        aggregates: &[SessionAggregate],
    ) -> rusqlite::Result<()> {
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
                            reason.as_str(),
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
        tx.commit()
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

/// Reads one row of [`SELECT_VIEW`].
fn view_from_row(row: &Row<'_>) -> rusqlite::Result<SessionView> {
    let session_id: String = row.get(0)?;
    let sensor_id: String = row.get(1)?;
    let end_us: Option<i64> = row.get(3)?;
    let count = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(i)?.max(0) as u64) };
    let end_reason = match row.get_ref(6)?.as_str_or_null()? {
        Some(name) => Some(name.parse::<SessionEndReason>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
        })?),
        None => None,
    };
    let aggregate = match row.get::<_, Option<i64>>(7)? {
        Some(emitted_at_us) => Some(SessionAggregate {
            session_id: session_id.as_str().into(),
            sensor_id: sensor_id.as_str().into(),
            emitted_at_us,
            max_velocity: row.get(8)?,
            distance_m: row.get(9)?,
            mean_velocity: row.get(10)?,
            moving_time_s: row.get(11)?,
            sample_count: count(13)?,
            duration_s: row.get(12)?,
        }),
        None => None,
    };
    Ok(SessionView {
        session_id,
        sensor_id,
        start_us: row.get(2)?,
        end_us,
        last_seen_us: row.get(4)?,
        sample_count: count(5)?,
        end_reason,
        active: end_us.is_none(),
        aggregate,
    })
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
        )
        .map_err(StoreError::backend)?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(StoreError::backend)?;
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
        f(&conn).map_err(StoreError::backend)
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
            let rows = stmt.query_map(params_from_iter(args), view_from_row)?;
            rows.collect()
        })
    }

    /// The session `session_id`, if stored.
    pub fn get(&self, session_id: &str) -> Result<Option<SessionView>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&format!("{SELECT_VIEW} WHERE session_id = ?1"))?;
            stmt.query_row([session_id], view_from_row).optional()
        })
    }
}

/// The API reads the store through this trait, with no adapter in between.
impl SessionsQuery for SessionsReader {
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionView>, StoreError> {
        SessionsReader::list(self, q)
    }

    fn get(&self, session_id: &str) -> Result<Option<SessionView>, StoreError> {
        SessionsReader::get(self, session_id)
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
}
