//! Per-sensor counters kept by the pipeline, read by the API (`/sensors`, `/metrics`).

use std::collections::BTreeMap;

use sensorflow_protocol::framing::BadReason;
use serde::{Deserialize, Serialize};

/// What the pipeline counted for one sensor since it was first seen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SensorCounters {
    /// Messages (MQTT publishes) read from the log.
    pub messages: u64,
    pub packets_decoded: u64,
    pub samples_decoded: u64,
    /// Samples dropped because they were already processed (redelivery).
    pub duplicates: u64,
    pub gaps: u64,
    pub missing_samples: u64,
    pub late: u64,
    pub restarts: u64,
    pub sessions_started: u64,
    /// Bad input by reason (bad CRC, garbage, invalid JSON, ...).
    pub bad: BTreeMap<BadReason, u64>,
    /// Ingest time of the first and last message, µs since the epoch.
    pub first_seen_us: Option<i64>,
    pub last_seen_us: Option<i64>,
    /// Samples that arrived after later ones and filled a reported gap (kept, not duplicates).
    pub reordered_samples: u64,
    /// Packets whose sample index jumped ahead of the device time (kept; see
    /// [`Verdict::Jump`](crate::dedupe::Verdict::Jump)).
    pub index_jumps: u64,
    /// Samples sent to the `quarantine` table instead of being processed (implausible event
    /// time); the packets are also counted in `bad` by reason.
    pub quarantined_samples: u64,
}

impl SensorCounters {
    /// Total bad input events over all reasons.
    pub fn bad_total(&self) -> u64 {
        self.bad.values().sum()
    }

    pub(crate) fn count_bad(&mut self, reason: BadReason) {
        *self.bad.entry(reason).or_default() += 1;
    }

    pub(crate) fn seen(&mut self, ingest_us: i64) {
        self.messages += 1;
        self.first_seen_us.get_or_insert(ingest_us);
        self.last_seen_us = Some(self.last_seen_us.map_or(ingest_us, |t| t.max(ingest_us)));
    }
}
