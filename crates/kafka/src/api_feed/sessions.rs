//! [`SessionTable`]: the sessions of `new-session-topic` with the latest aggregate of each from
//! `sensor-data-aggregated`, in memory, served through the sessions store's read contract
//! ([`SessionsQuery`]) so the API reads it exactly as it reads the embedded SQLite store.
//!
//! Updates follow the store's rules (`sensorflow_lake::SessionsStore::apply`), so the table is
//! the same whatever order the two topics are read in and however often a record is read again:
//! counts and `last_seen_us` only grow, an aggregate replaces only an older one and raises
//! `sample_count`, an ended session stays ended (a `Started` reopens only one ended by
//! `shutdown`). One difference: the two topics are read independently, so an aggregate may
//! arrive before its session's first event; it waits in a bounded side table until the session
//! appears, where the store would drop it.

use parking_lot::RwLock;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use sensorflow_records::{
    SessionAggregate, SessionEndReason, SessionEvent, SessionQuery, SessionView, SessionsQuery,
    StoreError,
};

/// Aggregates of sessions not seen yet that the table keeps (the oldest-emitted goes first).
const MAX_PENDING_AGGREGATES: usize = 10_000;

/// Every session read from the topics, with its end reason and latest aggregate.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<String, SessionView>,
    /// Listing order: newest `start_us` first, ties by `session_id`.
    order: BTreeSet<(Reverse<i64>, String)>,
    /// Aggregates whose session has no event yet, by session id.
    pending: HashMap<String, SessionAggregate>,
    /// Most sessions kept; beyond it the ended session with the oldest start is forgotten.
    max_sessions: usize,
    /// Sessions forgotten to stay within `max_sessions`.
    evicted: u64,
}

impl SessionTable {
    /// An empty table holding at most `max_sessions` sessions (at least 1).
    pub fn new(max_sessions: usize) -> SessionTable {
        SessionTable {
            max_sessions: max_sessions.max(1),
            ..SessionTable::default()
        }
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Ended sessions forgotten so far to stay within the table's bound.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Applies a session event of `new-session-topic`.
    pub fn apply_event(&mut self, event: &SessionEvent) {
        let s = event.session();
        let id: &str = &s.session_id;
        if !self.sessions.contains_key(id) {
            self.order.insert((Reverse(s.start_us), id.to_owned()));
            self.sessions.insert(
                id.to_owned(),
                SessionView {
                    session_id: id.to_owned(),
                    sensor_id: s.sensor_id.to_string(),
                    start_us: s.start_us,
                    end_us: None,
                    last_seen_us: s.last_seen_us,
                    sample_count: s.sample_count,
                    end_reason: None,
                    active: true,
                    aggregate: None,
                },
            );
        }
        let Some(view) = self.sessions.get_mut(id) else {
            return;
        };
        view.last_seen_us = view.last_seen_us.max(s.last_seen_us);
        view.sample_count = view.sample_count.max(s.sample_count);
        match event {
            SessionEvent::Started { .. } => {
                if view.end_reason == Some(SessionEndReason::Shutdown) {
                    view.end_us = None;
                    view.end_reason = None;
                }
            }
            SessionEvent::Ended { reason, .. } => {
                view.end_us = Some(s.end_us.unwrap_or(s.last_seen_us));
                view.end_reason = Some(*reason);
            }
        }
        view.active = view.end_us.is_none();
        if let Some(aggregate) = self.pending.remove(id) {
            self.apply_aggregate(aggregate);
        }
        self.evict();
    }

    /// Applies an aggregate of `sensor-data-aggregated`: it replaces the session's aggregate
    /// unless that one was emitted later. An aggregate of a session without events yet waits
    /// for its session.
    pub fn apply_aggregate(&mut self, aggregate: SessionAggregate) {
        let Some(view) = self.sessions.get_mut(&*aggregate.session_id) else {
            let newer = self
                .pending
                .get(&*aggregate.session_id)
                .is_none_or(|p| p.emitted_at_us <= aggregate.emitted_at_us);
            if newer {
                if self.pending.len() >= MAX_PENDING_AGGREGATES
                    && !self.pending.contains_key(&*aggregate.session_id)
                    && let Some(oldest) = self
                        .pending
                        .values()
                        .min_by_key(|a| a.emitted_at_us)
                        .map(|a| a.session_id.to_string())
                {
                    self.pending.remove(&oldest);
                }
                self.pending
                    .insert(aggregate.session_id.to_string(), aggregate);
            }
            return;
        };
        if view
            .aggregate
            .as_ref()
            .is_none_or(|stored| stored.emitted_at_us <= aggregate.emitted_at_us)
        {
            view.sample_count = view.sample_count.max(aggregate.sample_count);
            view.aggregate = Some(aggregate);
        }
    }

    /// Sessions matching `q`, newest `start_us` first (ties by `session_id`), as the store lists
    /// them.
    pub fn list(&self, q: &SessionQuery) -> Vec<SessionView> {
        self.order
            .iter()
            .filter_map(|(_, id)| self.sessions.get(id))
            .filter(|v| matches(v, q))
            .skip(q.offset)
            .take(q.limit)
            .cloned()
            .collect()
    }

    /// One session.
    pub fn get(&self, session_id: &str) -> Option<SessionView> {
        self.sessions.get(session_id).cloned()
    }

    /// Forgets the ended sessions that started first while the table is over its bound. Active
    /// sessions are never forgotten.
    fn evict(&mut self) {
        while self.sessions.len() > self.max_sessions {
            let Some(key) = self
                .order
                .iter()
                .rev()
                .find(|(_, id)| self.sessions.get(id).is_some_and(|v| !v.active))
                .cloned()
            else {
                return;
            };
            self.order.remove(&key);
            self.sessions.remove(&key.1);
            self.evicted += 1;
        }
    }
}

/// Whether `v` passes every filter of `q` (the store's `WHERE`).
fn matches(v: &SessionView, q: &SessionQuery) -> bool {
    q.sensor_id.as_ref().is_none_or(|s| *s == v.sensor_id)
        && q.active.is_none_or(|a| a == v.active)
        && q.from_us
            .is_none_or(|from| v.end_us.is_none_or(|end| end >= from))
        && q.to_us.is_none_or(|to| v.start_us < to)
}

/// A [`SessionTable`] shared between the reader that updates it and the API that queries it.
#[derive(Debug, Default)]
pub struct SharedSessions {
    table: RwLock<SessionTable>,
}

impl SharedSessions {
    /// Shares `table`.
    pub fn new(table: SessionTable) -> SharedSessions {
        SharedSessions {
            table: RwLock::new(table),
        }
    }

    /// Runs `f` on the table with write access.
    pub fn update<T>(&self, f: impl FnOnce(&mut SessionTable) -> T) -> T {
        f(&mut self.table.write())
    }

    /// Runs `f` on the table with read access.
    pub fn read<T>(&self, f: impl FnOnce(&SessionTable) -> T) -> T {
        f(&self.table.read())
    }
}

impl SessionsQuery for SharedSessions {
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionView>, StoreError> {
        Ok(self.read(|t| t.list(q)))
    }

    fn get(&self, session_id: &str) -> Result<Option<SessionView>, StoreError> {
        Ok(self.read(|t| t.get(session_id)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;
    use sensorflow_records::SessionRecord;

    fn record(sensor: &str, start_us: i64, last_seen_us: i64, count: u64) -> SessionRecord {
        SessionRecord {
            session_id: format!("{sensor}_{start_us}").into(),
            sensor_id: sensor.into(),
            start_us,
            end_us: None,
            last_seen_us,
            sample_count: count,
        }
    }

    fn started(sensor: &str, start_us: i64) -> SessionEvent {
        SessionEvent::Started {
            session: record(sensor, start_us, start_us, 0),
        }
    }

    fn ended(sensor: &str, start_us: i64, end_us: i64, reason: SessionEndReason) -> SessionEvent {
        let mut session = record(sensor, start_us, end_us, 100);
        session.end_us = Some(end_us);
        SessionEvent::Ended { session, reason }
    }

    fn aggregate(session_id: &str, emitted_at_us: i64, count: u64) -> SessionAggregate {
        SessionAggregate {
            session_id: session_id.into(),
            sensor_id: session_id.rsplit_once('_').unwrap().0.into(),
            emitted_at_us,
            max_velocity: 1.5,
            distance_m: emitted_at_us as f64,
            mean_velocity: 0.5,
            moving_time_s: 1.0,
            sample_count: count,
            duration_s: 2.0,
        }
    }

    fn all() -> SessionQuery {
        SessionQuery {
            active: None,
            ..SessionQuery::default()
        }
    }

    fn ids(views: &[SessionView]) -> Vec<&str> {
        views.iter().map(|v| v.session_id.as_str()).collect()
    }

    #[test]
    fn an_ended_session_keeps_its_end_reason_and_last_aggregate() {
        let mut t = SessionTable::new(100);
        t.apply_event(&started("a", 10));
        t.apply_aggregate(aggregate("a_10", 20, 50));
        t.apply_aggregate(aggregate("a_10", 30, 90));
        t.apply_event(&ended("a", 10, 40, SessionEndReason::Idle));
        let v = t.get("a_10").unwrap();
        assert!(!v.active);
        assert_eq!(v.end_us, Some(40));
        assert_eq!(v.end_reason, Some(SessionEndReason::Idle));
        assert_eq!(v.aggregate.unwrap().emitted_at_us, 30);
        assert_eq!(v.sample_count, 100);
    }

    #[test]
    fn an_older_aggregate_read_late_does_not_replace_a_newer_one() {
        let mut t = SessionTable::new(100);
        t.apply_event(&started("a", 10));
        t.apply_aggregate(aggregate("a_10", 30, 90));
        t.apply_aggregate(aggregate("a_10", 20, 50));
        let v = t.get("a_10").unwrap();
        assert_eq!(v.aggregate.unwrap().emitted_at_us, 30);
        assert_eq!(v.sample_count, 90);
    }

    #[test]
    fn an_aggregate_read_before_its_session_waits_for_it() {
        let mut t = SessionTable::new(100);
        t.apply_aggregate(aggregate("a_10", 20, 50));
        t.apply_aggregate(aggregate("a_10", 15, 40));
        assert!(t.get("a_10").is_none(), "no session without its event");
        assert!(t.list(&all()).is_empty());
        t.apply_event(&ended("a", 10, 40, SessionEndReason::Gap));
        let v = t.get("a_10").unwrap();
        assert_eq!(v.aggregate.unwrap().emitted_at_us, 20);
        assert_eq!(v.end_reason, Some(SessionEndReason::Gap));
    }

    #[test]
    fn reading_every_record_twice_in_any_order_gives_the_same_table() {
        let events = [
            started("a", 10),
            ended("a", 10, 40, SessionEndReason::DeviceRestart),
            started("a", 50),
            started("b", 20),
        ];
        let aggregates = [aggregate("a_10", 30, 80), aggregate("a_50", 60, 5)];
        let mut once = SessionTable::new(100);
        for e in &events {
            once.apply_event(e);
        }
        for a in &aggregates {
            once.apply_aggregate(a.clone());
        }
        let mut twice = SessionTable::new(100);
        for a in aggregates.iter().chain(&aggregates) {
            twice.apply_aggregate(a.clone());
        }
        for e in events.iter().chain(&events) {
            twice.apply_event(e);
        }
        assert_eq!(once.list(&all()), twice.list(&all()));
        assert_eq!(twice.len(), 3);
    }

    #[test]
    fn a_started_event_reopens_only_a_session_ended_by_shutdown() {
        let mut t = SessionTable::new(100);
        t.apply_event(&ended("a", 10, 40, SessionEndReason::Shutdown));
        t.apply_event(&ended("b", 10, 40, SessionEndReason::Gap));
        t.apply_event(&started("a", 10));
        t.apply_event(&started("b", 10));
        assert!(t.get("a_10").unwrap().active);
        assert_eq!(t.get("a_10").unwrap().end_reason, None);
        assert!(!t.get("b_10").unwrap().active);
    }

    #[test]
    fn list_filters_and_pages_newest_first_like_the_store() {
        let mut t = SessionTable::new(100);
        t.apply_event(&ended("a", 10, 40, SessionEndReason::Gap));
        t.apply_event(&started("a", 50));
        t.apply_event(&started("b", 50));
        t.apply_event(&ended("b", 5, 8, SessionEndReason::Idle));
        assert_eq!(ids(&t.list(&all())), ["a_50", "b_50", "a_10", "b_5"]);
        let active = SessionQuery {
            active: Some(true),
            ..all()
        };
        assert_eq!(ids(&t.list(&active)), ["a_50", "b_50"]);
        let ended_only = SessionQuery {
            active: Some(false),
            ..all()
        };
        assert_eq!(ids(&t.list(&ended_only)), ["a_10", "b_5"]);
        let of_a = SessionQuery {
            sensor_id: Some("a".into()),
            ..all()
        };
        assert_eq!(ids(&t.list(&of_a)), ["a_50", "a_10"]);
        let range = SessionQuery {
            from_us: Some(9),
            to_us: Some(50),
            ..all()
        };
        assert_eq!(ids(&t.list(&range)), ["a_10"]);
        let page = SessionQuery {
            offset: 1,
            limit: 2,
            ..all()
        };
        assert_eq!(ids(&t.list(&page)), ["b_50", "a_10"]);
    }

    #[test]
    fn beyond_its_bound_the_table_forgets_the_oldest_ended_sessions_never_active_ones() {
        let mut t = SessionTable::new(2);
        t.apply_event(&started("old", 1));
        t.apply_event(&ended("a", 10, 20, SessionEndReason::Gap));
        t.apply_event(&ended("b", 30, 40, SessionEndReason::Gap));
        assert_eq!(ids(&t.list(&all())), ["b_30", "old_1"]);
        assert_eq!(t.evicted(), 1);
        t.apply_event(&started("c", 50));
        assert_eq!(ids(&t.list(&all())), ["c_50", "old_1"]);
        t.apply_event(&started("d", 60));
        assert_eq!(t.len(), 3, "active sessions are kept over the bound");
    }

    #[test]
    fn shared_sessions_answer_the_store_contract() {
        let shared = SharedSessions::new(SessionTable::new(10));
        shared.update(|t| t.apply_event(&started("a", 10)));
        let q: &dyn SessionsQuery = &shared;
        assert_eq!(q.list(&SessionQuery::default()).unwrap().len(), 1);
        assert!(q.get("a_10").unwrap().is_some());
        assert!(q.get("nope").unwrap().is_none());
    }
}
