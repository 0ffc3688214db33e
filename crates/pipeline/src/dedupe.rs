//! Stage 1: dedupe, gaps and device restarts, from sample indices and device timestamps.
//!
//! The tracker remembers, per sensor, the next sample index it expects and the device time of
//! the last accepted sample. Each packet is classified against that:
//!
//! - indices at or past the expected one are new; a jump forward is a gap;
//! - indices already seen are a redelivery (MQTT QoS 1 is at-least-once) and are dropped, the
//!   part of a packet that overlaps being trimmed so a partly new packet keeps its new samples;
//! - indices going backwards while the device time moves on past everything seen is a device
//!   restart: the sensor's index space starts over (and the caller starts a new session).

use serde::{Deserialize, Serialize};

/// What to do with a packet, decided by [`SequenceTracker::classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep samples `skip..n` of the packet. `skip > 0` when the packet starts with samples
    /// that were already processed (counted as duplicates). `gap` is set when samples were
    /// missing before this packet: `(from_index, to_index_exclusive)`.
    Accept { skip: usize, gap: Option<(u32, u32)> },
    /// Every sample of the packet was already processed.
    Duplicate,
    /// The device restarted: accept the whole packet as the start of a new index space.
    Restart,
}

/// Per-sensor position in the sample index space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceTracker {
    /// Next sample index expected (one past the highest accepted), `None` before the first packet.
    next_index: Option<u64>,
    /// Device time of the last accepted sample, µs.
    last_timestamp_us: i64,
}

impl SequenceTracker {
    /// Classifies a packet of `n` samples starting at index `base` and device time
    /// `timestamp_us`, and advances the tracker past whatever it accepts.
    ///
    /// `n == 0` packets are accepted as no-ops.
    pub fn classify(&mut self, base: u32, n: usize, timestamp_us: i64, period_us: i64) -> Verdict {
        let base64 = u64::from(base);
        let end = base64 + n as u64;
        let last_ts = timestamp_us + (n.saturating_sub(1) as i64) * period_us;
        let Some(next) = self.next_index else {
            self.accept(end, last_ts, n);
            return Verdict::Accept { skip: 0, gap: None };
        };
        if base64 >= next {
            let gap = (base64 > next).then_some((next as u32, base));
            self.accept(end, last_ts, n);
            return Verdict::Accept { skip: 0, gap };
        }
        // Indices go backwards. A redelivered packet carries device times already seen; a
        // restarted device carries times after everything seen.
        if timestamp_us > self.last_timestamp_us {
            self.next_index = Some(end);
            self.last_timestamp_us = last_ts;
            return Verdict::Restart;
        }
        if end <= next {
            return Verdict::Duplicate;
        }
        let skip = (next - base64) as usize;
        self.accept(end, last_ts, n);
        Verdict::Accept { skip, gap: None }
    }

    fn accept(&mut self, end: u64, last_ts: i64, n: usize) {
        if n > 0 {
            self.next_index = Some(end);
            self.last_timestamp_us = self.last_timestamp_us.max(last_ts);
        }
    }

    /// The next sample index expected, if any packet was seen.
    pub fn next_index(&self) -> Option<u64> {
        self.next_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: i64 = 5_000;

    #[test]
    fn consecutive_packets_are_accepted_without_gaps() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.classify(100, 64, 1_000_000, P), Verdict::Accept { skip: 0, gap: None });
        assert_eq!(t.classify(164, 64, 1_000_000 + 64 * P, P), Verdict::Accept { skip: 0, gap: None });
        assert_eq!(t.next_index(), Some(228));
    }

    #[test]
    fn exact_redelivery_is_a_duplicate() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 1_000_000, P);
        t.classify(64, 64, 1_000_000 + 64 * P, P);
        assert_eq!(t.classify(0, 64, 1_000_000, P), Verdict::Duplicate);
        assert_eq!(t.classify(64, 64, 1_000_000 + 64 * P, P), Verdict::Duplicate);
    }

    #[test]
    fn jump_forward_is_a_gap_with_exclusive_end() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        let v = t.classify(192, 64, 192 * P, P);
        assert_eq!(v, Verdict::Accept { skip: 0, gap: Some((64, 192)) });
    }

    #[test]
    fn partly_overlapping_packet_keeps_only_new_samples() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        assert_eq!(t.classify(32, 64, 32 * P, P), Verdict::Accept { skip: 32, gap: None });
        assert_eq!(t.next_index(), Some(96));
    }

    #[test]
    fn index_back_with_time_forward_is_a_restart() {
        let mut t = SequenceTracker::default();
        t.classify(5_000, 64, 10_000_000, P);
        assert_eq!(t.classify(0, 64, 20_000_000, P), Verdict::Restart);
        assert_eq!(t.next_index(), Some(64));
        assert_eq!(t.classify(64, 64, 20_000_000 + 64 * P, P), Verdict::Accept { skip: 0, gap: None });
    }

    #[test]
    fn index_back_with_time_not_forward_is_a_duplicate_not_a_restart() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 1_000_000, P);
        t.classify(64, 64, 1_000_000 + 64 * P, P);
        // Redelivery of the first packet, whose time is before the last seen sample.
        assert_eq!(t.classify(0, 64, 1_000_000, P), Verdict::Duplicate);
    }

    #[test]
    fn index_space_beyond_u32_does_not_overflow() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.classify(u32::MAX - 10, 64, 0, P), Verdict::Accept { skip: 0, gap: None });
        assert_eq!(t.next_index(), Some(u64::from(u32::MAX) - 10 + 64));
    }
}
