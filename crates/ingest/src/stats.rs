//! Lock-free counters of the ingest listener and their point-in-time snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, shared by all worker threads. Read them via [`IngestStats::snapshot`].
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Set when `stop()` begins draining; publishes arriving after it are refused.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    pub(crate) connections_current: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) received_qos: [AtomicU64; 3],
    pub(crate) received_bytes: AtomicU64,
    pub(crate) stored: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) rejected_by_sink: AtomicU64,
    pub(crate) unknown_topic: AtomicU64,
    pub(crate) oversize: AtomicU64,
    pub(crate) dropped_on_shutdown: AtomicU64,
    pub(crate) packets_too_large: AtomicU64,
    pub(crate) client_id_too_long: AtomicU64,
    pub(crate) sessions_evicted: AtomicU64,
    pub(crate) sensor_ids_refused: AtomicU64,
    pub(crate) connections_refused_per_ip: AtomicU64,
    pub(crate) publishes_throttled: AtomicU64,
    pub(crate) sensor_ids: AtomicU64,
    /// Indexed like [`crate::auth::AuthFailure::ALL`].
    pub(crate) auth_failures: [AtomicU64; 4],
    /// ACL refusals per user (at most [`MAX_USERS_TRACKED`] users).
    acl_denied_by_user: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Users whose ACL refusals are counted individually; beyond it only the total counts.
pub const MAX_USERS_TRACKED: usize = 1000;

/// Counter values at one instant. All counters are totals since start except
/// `connections_current`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestStatsSnapshot {
    /// Open MQTT sessions (CONNACK sent, not yet closed).
    pub connections_current: u64,
    /// Sessions accepted since start.
    pub connections_total: u64,
    /// CONNECTs refused (connection limit reached, shutting down, invalid client id).
    pub connections_refused: u64,
    /// PUBLISH packets received, indexed by QoS (0, 1, 2).
    pub received_by_qos: [u64; 3],
    /// Payload bytes received (including messages not stored).
    pub received_bytes: u64,
    /// Records the sink confirmed as stored.
    pub stored: u64,
    /// QoS 1/2 publishes answered with a success PUBACK/PUBREC (includes unknown-topic and
    /// oversize messages on MQTT 3.1.1, which has no negative acknowledgement).
    pub acked: u64,
    /// MQTT 5 QoS 1/2 publishes answered with an error reason code.
    pub nacked: u64,
    /// Appends the sink failed (`SinkError`), whatever the QoS.
    pub rejected_by_sink: u64,
    /// Publishes on a topic matching neither pattern.
    pub unknown_topic: u64,
    /// Publishes larger than `max_message_bytes`.
    pub oversize: u64,
    /// Publishes that arrived after `stop()` began and were not stored (QoS 1/2 ones are not
    /// acknowledged, so the client re-sends them after reconnecting).
    pub dropped_on_shutdown: u64,
    /// Connections closed because a packet declared a remaining length above
    /// `IngestConfig::max_packet_bytes` (refused from its fixed header, nothing buffered).
    pub packets_too_large: u64,
    /// CONNECTs refused because the client id was longer than `max_client_id_bytes` (also
    /// counted in `connections_refused`).
    pub client_id_too_long: u64,
    /// Persistent sessions forgotten because `max_persistent_sessions` was reached.
    pub sessions_evicted: u64,
    /// Refused CONNECTs and publishes by reason, indexed like
    /// [`crate::auth::AuthFailure::ALL`] (`sensorflow_auth_failures_total{reason}`).
    pub auth_failures: [u64; 4],
    /// CONNECTs refused because `max_connections_per_ip` sessions of that address were open
    /// (also counted in `connections_refused`).
    pub connections_refused_per_ip: u64,
    /// Messages refused because their sensor id was new and `max_sensor_ids` ids are known.
    pub sensor_ids_refused: u64,
    /// Publishes delayed by the per-connection rate limit (`max_publishes_per_sec`).
    pub publishes_throttled: u64,
    /// Distinct sensor ids currently known to ingest.
    pub sensor_ids: u64,
}

impl IngestStats {
    /// True once `IngestServer::stop` has begun draining (new publishes are refused from then on).
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reads every counter (each individually atomic; the set is not a transaction).
    pub fn snapshot(&self) -> IngestStatsSnapshot {
        IngestStatsSnapshot {
            connections_current: self.connections_current.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            received_by_qos: [
                self.received_qos[0].load(Relaxed),
                self.received_qos[1].load(Relaxed),
                self.received_qos[2].load(Relaxed),
            ],
            received_bytes: self.received_bytes.load(Relaxed),
            stored: self.stored.load(Relaxed),
            acked: self.acked.load(Relaxed),
            nacked: self.nacked.load(Relaxed),
            rejected_by_sink: self.rejected_by_sink.load(Relaxed),
            unknown_topic: self.unknown_topic.load(Relaxed),
            oversize: self.oversize.load(Relaxed),
            dropped_on_shutdown: self.dropped_on_shutdown.load(Relaxed),
            packets_too_large: self.packets_too_large.load(Relaxed),
            client_id_too_long: self.client_id_too_long.load(Relaxed),
            sessions_evicted: self.sessions_evicted.load(Relaxed),
            auth_failures: std::array::from_fn(|i| self.auth_failures[i].load(Relaxed)),
            sensor_ids_refused: self.sensor_ids_refused.load(Relaxed),
            connections_refused_per_ip: self.connections_refused_per_ip.load(Relaxed),
            publishes_throttled: self.publishes_throttled.load(Relaxed),
            sensor_ids: self.sensor_ids.load(Relaxed),
        }
    }

    /// Publishes refused by the ACL per user (the first [`MAX_USERS_TRACKED`] users refused).
    pub fn acl_denied_by_user(&self) -> Vec<(String, u64)> {
        self.acl_denied_by_user
            .lock()
            .iter()
            .map(|(u, n)| (u.clone(), *n))
            .collect()
    }

    pub(crate) fn auth_failure(&self, failure: crate::auth::AuthFailure) {
        bump(&self.auth_failures[failure as usize]);
    }

    pub(crate) fn acl_denied_for(&self, user: &str) {
        let mut map = self.acl_denied_by_user.lock();
        if let Some(n) = map.get_mut(user) {
            *n += 1;
        } else if map.len() < MAX_USERS_TRACKED {
            map.insert(user.to_owned(), 1);
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}
