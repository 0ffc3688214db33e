//! Minimal MQTT session state per client id.
//!
//! ntex-mqtt keeps no state between connections, and an ingest endpoint has no subscriptions
//! or outgoing queues to persist. What a client can observe is `session_present` in CONNACK
//! and the takeover of an older connection using the same client id, so that is what this
//! registry keeps: for each client id, whether a persistent session exists, when it expires,
//! and how to close the connection currently attached to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Lifetime of a session after its connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// Clean session / MQTT 5 expiry 0: dropped when the connection closes.
    OnClose,
    /// Kept this long after the connection closed.
    After(Duration),
}

#[derive(Debug)]
struct Entry {
    expiry: Expiry,
    /// Serial of the attached connection, `None` while no client is connected.
    attached: Option<u64>,
    /// Notified to make the attached connection close (session takeover).
    kick: Arc<Notify>,
    detached_at: Option<Instant>,
}

/// What [`SessionRegistry::attach`] tells the connect handler.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Value for CONNACK `session_present`.
    pub(crate) session_present: bool,
    /// Notified when a newer connection takes this session over.
    pub(crate) kick: Arc<Notify>,
    /// Persistent sessions of other clients forgotten to stay within `max_persistent`.
    pub(crate) evicted: u64,
}

/// Client id -> session, shared by all worker threads.
///
/// Bounded two ways: a session whose client was gone longer than `max_idle` is forgotten even
/// when it asked to persist forever (MQTT 3.1.1 has no expiry), and at most `max_persistent`
/// persistent sessions exist (a new one evicts the one detached longest ago). Attached
/// sessions are bounded by `max_connections`.
#[derive(Debug)]
pub(crate) struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Entry>>,
    max_persistent: usize,
    max_idle: Duration,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        Self::new(100_000, Duration::from_secs(7 * 24 * 3600))
    }
}

impl SessionRegistry {
    pub(crate) fn new(max_persistent: usize, max_idle: Duration) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            max_persistent,
            max_idle,
        }
    }

    /// Makes room for one more persistent session: drops expired ones, then, while at the cap,
    /// the detached session that was left longest ago. Returns how many were evicted (not
    /// counting expired ones). O(n) but only runs at the cap.
    fn make_room(&self, sessions: &mut HashMap<Arc<str>, Entry>, now: Instant) -> u64 {
        let persistent = |e: &Entry| e.expiry != Expiry::OnClose;
        if sessions.values().filter(|e| persistent(e)).count() < self.max_persistent {
            return 0;
        }
        sessions.retain(|_, e| e.attached.is_some() || !expired(e, now, self.max_idle));
        let mut evicted = 0;
        while sessions.values().filter(|e| persistent(e)).count() >= self.max_persistent {
            let oldest = sessions
                .iter()
                .filter_map(|(id, e)| e.detached_at.map(|at| (at, id.clone())))
                .min_by_key(|(at, _)| *at);
            // Every persistent session is attached: those are bounded by max_connections.
            let Some((_, id)) = oldest else { break };
            sessions.remove(&id);
            evicted += 1;
        }
        evicted
    }

    /// Attaches connection `serial` to the session of `client_id`, taking it over from any
    /// connection still attached. `clean` discards existing state (clean session / clean start).
    pub(crate) fn attach(
        &self,
        client_id: &Arc<str>,
        serial: u64,
        clean: bool,
        expiry: Expiry,
    ) -> Attached {
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        let previous = sessions.remove(client_id);
        let session_present = match &previous {
            Some(old) => {
                if let Some(_serial) = old.attached {
                    // [MQTT-3.1.4-2]: the server disconnects the existing client.
                    old.kick.notify_one();
                }
                !clean && old.expiry != Expiry::OnClose && !expired(old, now, self.max_idle)
            }
            None => false,
        };
        let evicted = if expiry == Expiry::OnClose {
            0
        } else {
            self.make_room(&mut sessions, now)
        };
        let kick = Arc::new(Notify::new());
        sessions.insert(
            client_id.clone(),
            Entry {
                expiry,
                attached: Some(serial),
                kick: kick.clone(),
                detached_at: None,
            },
        );
        Attached {
            session_present,
            kick,
            evicted,
        }
    }

    /// Detaches connection `serial` (which closed). Its session is kept or dropped according
    /// to its expiry; a session already taken over by a newer connection is left alone.
    pub(crate) fn detach(&self, client_id: &Arc<str>, serial: u64) {
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        if let Some(entry) = sessions.get_mut(client_id)
            && entry.attached == Some(serial)
        {
            if entry.expiry == Expiry::OnClose {
                sessions.remove(client_id);
            } else {
                entry.attached = None;
                entry.detached_at = Some(now);
            }
        }
        // Amortised cleanup so that clients that never come back do not accumulate.
        if sessions.len() > 1024 && serial.is_multiple_of(256) {
            sessions.retain(|_, e| e.attached.is_some() || !expired(e, now, self.max_idle));
        }
    }

    /// Number of known sessions (attached or persisted).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sessions.lock().len()
    }
}

fn expired(entry: &Entry, now: Instant, max_idle: Duration) -> bool {
    let Some(detached_at) = entry.detached_at else {
        return false;
    };
    let idle = now.saturating_duration_since(detached_at);
    match entry.expiry {
        Expiry::OnClose => true,
        Expiry::After(d) => idle >= d.min(max_idle),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn persistent_session_is_present_on_reconnect_and_clean_one_is_not() {
        let reg = SessionRegistry::default();
        let keep = Expiry::After(Duration::from_secs(60));
        assert!(!reg.attach(&id("a"), 1, false, keep).session_present);
        reg.detach(&id("a"), 1);
        assert!(reg.attach(&id("a"), 2, false, keep).session_present);
        reg.detach(&id("a"), 2);
        // clean start discards the stored session
        assert!(
            !reg.attach(&id("a"), 3, true, Expiry::OnClose)
                .session_present
        );
        reg.detach(&id("a"), 3);
        assert_eq!(reg.len(), 0);
        assert!(!reg.attach(&id("a"), 4, false, keep).session_present);
    }

    #[test]
    fn takeover_kicks_the_attached_connection_and_ignores_its_late_detach() {
        let reg = SessionRegistry::default();
        let keep = Expiry::After(Duration::from_secs(60));
        let first = reg.attach(&id("a"), 1, false, keep);
        let second = reg.attach(&id("a"), 2, false, keep);
        assert!(second.session_present);
        // the first connection's kick has a stored permit
        let kicked = first.kick.notified();
        futures::pin_mut!(kicked);
        assert!(futures::FutureExt::now_or_never(kicked.as_mut()).is_some());
        reg.detach(&id("a"), 1);
        assert_eq!(reg.len(), 1);
        reg.detach(&id("a"), 2);
        assert!(reg.attach(&id("a"), 3, false, keep).session_present);
    }

    #[test]
    fn at_the_cap_the_session_detached_longest_ago_is_evicted() {
        let reg = SessionRegistry::new(2, Duration::from_secs(3600));
        let keep = Expiry::After(Duration::from_secs(3600));
        reg.attach(&id("a"), 1, false, keep);
        reg.detach(&id("a"), 1);
        reg.attach(&id("b"), 2, false, keep);
        reg.detach(&id("b"), 2);
        assert_eq!(reg.attach(&id("c"), 3, false, keep).evicted, 1);
        assert_eq!(reg.len(), 2);
        // "a" left first and was forgotten; "b" survived.
        assert!(reg.attach(&id("b"), 4, false, keep).session_present);
        assert!(!reg.attach(&id("a"), 5, false, keep).session_present);
    }

    #[test]
    fn max_idle_bounds_a_session_that_asked_to_live_forever() {
        let reg = SessionRegistry::new(10, Duration::ZERO);
        reg.attach(&id("a"), 1, false, Expiry::After(Duration::MAX));
        reg.detach(&id("a"), 1);
        assert!(
            !reg.attach(&id("a"), 2, false, Expiry::After(Duration::MAX))
                .session_present
        );
    }

    #[test]
    fn expired_session_is_not_present() {
        let reg = SessionRegistry::default();
        reg.attach(&id("a"), 1, false, Expiry::After(Duration::ZERO));
        reg.detach(&id("a"), 1);
        assert!(
            !reg.attach(&id("a"), 2, false, Expiry::OnClose)
                .session_present
        );
    }
}
