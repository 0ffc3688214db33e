//! Abuse limits of the ingest listener: a cap on distinct sensor ids and a per-connection
//! publish rate.
//!
//! - [`SensorIds`]: every sensor id ingest stored a message for is remembered with when it was
//!   last heard. At `max_sensor_ids`, a message for a new id is refused (MQTT 5: PUBACK 0x97
//!   quota exceeded; 3.1.1: acknowledged and discarded, like an oversize message, so the client
//!   does not re-send it forever) while known ids keep working. Ids silent for
//!   `sensor_id_idle` are forgotten when room is needed, so a burst of junk ids cannot lock new
//!   devices out for longer than that. Memory is bounded by the cap.
//! - [`PublishRate`]: a token bucket per connection (`max_publishes_per_sec`, one second of
//!   burst). A publish beyond it is not refused but delayed until its token is due: the
//!   connection's in-flight window fills and the server stops reading it, so a flooding client
//!   is slowed down through TCP flow control, as under overload, and nothing is lost.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

/// Open MQTT connections per source address, capped. The map holds only addresses with an
/// open connection, so it is bounded by `max_connections`.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    open: Mutex<HashMap<std::net::IpAddr, usize>>,
}

impl PerIp {
    /// Takes a slot for `ip` unless `max` are taken.
    pub(crate) fn acquire(&self, ip: std::net::IpAddr, max: usize) -> bool {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_default();
        if *n >= max {
            if *n == 0 {
                open.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    pub(crate) fn release(&self, ip: std::net::IpAddr) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// Distinct sensor ids seen, capped.
#[derive(Debug)]
pub(crate) struct SensorIds {
    max: usize,
    idle: Duration,
    epoch: Instant,
    /// Sensor id → seconds since `epoch` when last heard.
    ids: RwLock<HashMap<Box<str>, AtomicU64>>,
    /// When idle ids were last swept (seconds since `epoch`), so a full table is not scanned
    /// for every refused message.
    last_sweep: Mutex<u64>,
}

/// What [`SensorIds::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SensorIdAdmission {
    /// Seen before.
    Known,
    /// Remembered now; `known` ids are remembered in all.
    New { known: usize },
    /// New, and the cap is reached.
    Refused,
}

/// How often a full table is swept for idle ids at most.
const SWEEP_INTERVAL_SECS: u64 = 10;

impl SensorIds {
    pub(crate) fn new(max: usize, idle: Duration) -> Self {
        Self {
            max,
            idle,
            epoch: Instant::now(),
            ids: RwLock::default(),
            last_sweep: Mutex::new(0),
        }
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Whether a message for `id` may be stored; remembers `id` when it is admitted.
    pub(crate) fn admit(&self, id: &str) -> SensorIdAdmission {
        let now = self.now_secs();
        if let Some(seen) = self.ids.read().get(id) {
            seen.store(now, Ordering::Relaxed);
            return SensorIdAdmission::Known;
        }
        let mut ids = self.ids.write();
        if ids.len() >= self.max {
            let mut last_sweep = self.last_sweep.lock();
            if now.saturating_sub(*last_sweep) < SWEEP_INTERVAL_SECS && *last_sweep != 0 {
                return SensorIdAdmission::Refused;
            }
            *last_sweep = now.max(1);
            let idle = self.idle.as_secs();
            ids.retain(|_, seen| now.saturating_sub(seen.load(Ordering::Relaxed)) < idle);
            if ids.len() >= self.max {
                return SensorIdAdmission::Refused;
            }
        }
        if ids.contains_key(id) {
            // Another thread added it between the two locks.
            return SensorIdAdmission::Known;
        }
        ids.insert(id.into(), AtomicU64::new(now));
        SensorIdAdmission::New { known: ids.len() }
    }

    /// Ids currently remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.read().len()
    }
}

/// A connection's token bucket. Single-threaded, like the connection.
#[derive(Debug)]
pub(crate) struct PublishRate {
    /// Publishes per second; 0: unlimited.
    rate: f64,
    tokens: Cell<f64>,
    last: Cell<Instant>,
}

impl PublishRate {
    pub(crate) fn new(per_sec: u32) -> Self {
        let rate = f64::from(per_sec);
        Self {
            rate,
            tokens: Cell::new(rate),
            last: Cell::new(Instant::now()),
        }
    }

    /// Takes a token for a publish arriving at `now`; returns how long it must wait for it.
    pub(crate) fn take(&self, now: Instant) -> Option<Duration> {
        if self.rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.last.get()).as_secs_f64();
        self.last.set(now);
        let tokens = (self.tokens.get() + elapsed * self.rate).min(self.rate) - 1.0;
        self.tokens.set(tokens);
        (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_keep_working_at_the_cap_and_new_ones_are_refused() {
        let ids = SensorIds::new(2, Duration::from_secs(3600));
        use SensorIdAdmission::*;
        assert_eq!(ids.admit("a"), New { known: 1 });
        assert_eq!(ids.admit("b"), New { known: 2 });
        assert_eq!(ids.admit("c"), Refused);
        assert_eq!(ids.admit("a"), Known);
        assert_eq!(ids.admit("b"), Known);
        assert_eq!(ids.admit("d"), Refused);
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn idle_ids_make_room_for_new_ones() {
        let ids = SensorIds::new(1, Duration::ZERO);
        assert_eq!(ids.admit("a"), SensorIdAdmission::New { known: 1 });
        // With an idle limit of zero every id is idle at once.
        assert_eq!(ids.admit("b"), SensorIdAdmission::New { known: 1 });
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn the_bucket_allows_one_second_of_burst_then_spaces_publishes() {
        let rate = PublishRate::new(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(rate.take(t0), None);
        }
        let wait = rate.take(t0).unwrap_or_default();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        let wait = rate.take(t0).unwrap_or_default();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-9, "{wait:?}");
        // A second later the debt is paid and 8 tokens are back.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..8 {
            assert_eq!(rate.take(t1), None);
        }
        assert!(rate.take(t1).is_some());
        assert_eq!(PublishRate::new(0).take(t0), None);
    }
}
