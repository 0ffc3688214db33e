//! Stage 1: dedupe, gaps and device restarts, from sample indices and device timestamps.
//!
//! The tracker remembers, per sensor, the next sample index it expects, the device time of the
//! last accepted sample and the gaps it reported that no packet has filled since. Each packet is
//! classified against that:
//!
//! - indices at or past the expected one are new; a jump forward is a gap;
//! - indices already processed are a redelivery (MQTT QoS 1 is at-least-once) and are dropped,
//!   the part of a packet that overlaps being trimmed so a partly new packet keeps its new samples;
//! - indices inside a reported gap arrive out of order (a device or gateway that uploads its
//!   backlog after live data, a resend after a reconnect): they were never processed, so they are
//!   kept and the gap shrinks. Dropping them as redeliveries would lose acknowledged samples;
//! - indices going backwards while the device time moves on past everything seen is a device
//!   restart: the sensor's index space starts over (and the caller starts a new session).
//!
//! A sensor keeps at most [`MAX_OPEN_GAPS`] gaps open, the newest; samples that arrive for an
//! older one, or for a gap of the index space before a restart, count as duplicates.
//!
//! Late samples that are kept go through the rest of the pipeline in arrival order: windows
//! take them while within the allowed lateness (the `late` table gets the others), the session
//! counts them, and the model sees them after the newer samples it already processed. The gap
//! stays reported (it was missing when detected); `reordered_samples` counts what filled it.

use std::collections::VecDeque;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Gaps a sensor keeps open for late packets to fill; beyond this the oldest is given up.
/// 64 gaps are 1 KiB per sensor at most. One gap covers any run of missing packets, so only a
/// sensor with 64 separate unfilled losses reaches the bound.
pub const MAX_OPEN_GAPS: usize = 64;

/// Index jumps a sensor remembers so that their redeliveries are recognised; beyond this the
/// oldest is forgotten (24 bytes each).
pub const MAX_JUMPS: usize = 64;

/// Slack of the device-time check on a forward index jump, in µs: clocks jitter and drift.
const JUMP_TIME_SLACK_US: i128 = 2_000_000;

/// What to do with a packet, decided by [`SequenceTracker::classify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep samples `skip..n` of the packet. `skip > 0` when the packet starts with samples
    /// that were already processed (counted as duplicates). `gap` is set when samples were
    /// missing before this packet: `(from_index, to_index_exclusive)`.
    Accept {
        skip: usize,
        gap: Option<(u32, u32)>,
    },
    /// A packet that arrived after later ones: keep the samples at these positions of the
    /// packet (ascending, disjoint), `filled` of which were in reported gaps and the rest past
    /// everything seen. Samples outside them were already processed.
    Reordered {
        keep: Vec<Range<usize>>,
        filled: usize,
    },
    /// Every sample of the packet was already processed.
    Duplicate,
    /// The device restarted: accept the whole packet as the start of a new index space.
    Restart,
    /// The sample index jumped forward further than the device time moved: keep the whole
    /// packet, but leave the sensor's position where it was, so the genuine stream that
    /// follows is neither a gap nor a duplicate (see [`SequenceTracker::classify`]).
    Jump,
}

/// A packet accepted as a [`Verdict::Jump`]: its index range and device time, to recognise its
/// redelivery (same first index, same time) and a stream that really moved there (the next
/// packet continues it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jump {
    pub from: u64,
    pub to: u64,
    pub timestamp_us: i64,
}

/// Per-sensor position in the sample index space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceTracker {
    /// Next sample index expected (one past the highest accepted), `None` before the first packet.
    next_index: Option<u64>,
    /// Device time of the last accepted sample, µs.
    last_timestamp_us: i64,
    /// Reported gaps not filled yet, `[from, to)` in index order, at most [`MAX_OPEN_GAPS`].
    open_gaps: VecDeque<(u64, u64)>,
    /// Recent index jumps, oldest first, at most [`MAX_JUMPS`].
    jumps: VecDeque<Jump>,
}

impl SequenceTracker {
    /// A tracker in the state a version 2 snapshot recorded, which had no jumps.
    pub(crate) fn from_v2(
        next_index: Option<u64>,
        last_timestamp_us: i64,
        open_gaps: VecDeque<(u64, u64)>,
    ) -> Self {
        Self {
            next_index,
            last_timestamp_us,
            open_gaps,
            jumps: VecDeque::new(),
        }
    }

    /// Classifies a packet of `n` samples starting at index `base` and device time
    /// `timestamp_us`, and advances the tracker past whatever it accepts.
    ///
    /// A forward jump of the index is a gap only when the device time moved on at least about
    /// as far (losing packets loses their time too). A device whose counter jumps while its
    /// clock does not (a confused device) would otherwise move the sensor's position far ahead,
    /// and its genuine packets, now behind, would be dropped as duplicates once the gaps they
    /// fall into are given up: acknowledged samples lost. Such a packet is a [`Verdict::Jump`]
    /// instead: kept, remembered so its redelivery is a duplicate, and the position stays. If
    /// the next packet continues the jump, the stream really moved: the gap is reported then.
    ///
    /// `n == 0` packets are accepted as no-ops. Never panics, whatever the numbers.
    pub fn classify(&mut self, base: u32, n: usize, timestamp_us: i64, period_us: i64) -> Verdict {
        let base64 = u64::from(base);
        let end = base64 + n as u64;
        let span = i64::try_from(n.saturating_sub(1))
            .unwrap_or(i64::MAX)
            .saturating_mul(period_us);
        let last_ts = timestamp_us.saturating_add(span);
        let Some(next) = self.next_index else {
            self.accept(end, last_ts, n);
            return Verdict::Accept { skip: 0, gap: None };
        };
        if n > 0
            && self
                .jumps
                .iter()
                .any(|j| j.from == base64 && j.timestamp_us == timestamp_us && end <= j.to)
        {
            return Verdict::Duplicate;
        }
        if base64 >= next {
            if base64 > next && n > 0 {
                let continued = self.jumps.iter().position(|j| j.to == base64);
                if let Some(jump) = continued.and_then(|i| self.jumps.remove(i)) {
                    // The stream continues a jump: it really moved there. Report the gap
                    // before the jump now.
                    let gap = (jump.from > next).then(|| {
                        self.open_gap(next, jump.from);
                        (next as u32, jump.from as u32)
                    });
                    self.accept(end, last_ts, n);
                    return Verdict::Accept { skip: 0, gap };
                }
                if !self.time_moved_as_far(next, base64, timestamp_us, period_us) {
                    if self.jumps.len() == MAX_JUMPS {
                        self.jumps.pop_front();
                    }
                    self.jumps.push_back(Jump {
                        from: base64,
                        to: end,
                        timestamp_us,
                    });
                    return Verdict::Jump;
                }
            }
            let gap = (base64 > next).then_some((next as u32, base));
            if base64 > next {
                self.open_gap(next, base64);
            }
            self.accept(end, last_ts, n);
            return Verdict::Accept { skip: 0, gap };
        }
        // Indices go backwards. A redelivered or late packet carries device times already seen
        // (or fills a reported gap); a restarted device carries times after everything seen.
        let mut keep = self.fill(base64, end.min(next));
        if keep.is_empty() {
            if timestamp_us > self.last_timestamp_us {
                self.next_index = Some(end);
                self.last_timestamp_us = last_ts;
                self.open_gaps.clear();
                return Verdict::Restart;
            }
            if end <= next {
                return Verdict::Duplicate;
            }
            let skip = (next - base64) as usize;
            self.accept(end, last_ts, n);
            return Verdict::Accept { skip, gap: None };
        }
        let filled_samples = keep.iter().map(ExactSizeIterator::len).sum();
        if end > next {
            keep.push((next - base64) as usize..n);
            self.accept(end, last_ts, n);
        }
        Verdict::Reordered {
            keep,
            filled: filled_samples,
        }
    }

    /// Whether the device time of a packet starting at `base`, past the expected `next`, moved
    /// on from the last accepted sample at least as far as the index did (less some slack).
    fn time_moved_as_far(&self, next: u64, base: u64, timestamp_us: i64, period_us: i64) -> bool {
        let steps = i128::from(base - next + 1);
        let expected = i128::from(self.last_timestamp_us) + steps * i128::from(period_us);
        let slack = JUMP_TIME_SLACK_US.max(steps * i128::from(period_us) / 10);
        i128::from(timestamp_us) >= expected - slack
    }

    fn accept(&mut self, end: u64, last_ts: i64, n: usize) {
        if n > 0 {
            self.next_index = Some(end);
            self.last_timestamp_us = self.last_timestamp_us.max(last_ts);
        }
    }

    /// Remembers a reported gap, giving up the oldest beyond [`MAX_OPEN_GAPS`].
    fn open_gap(&mut self, from: u64, to: u64) {
        if self.open_gaps.len() == MAX_OPEN_GAPS {
            self.open_gaps.pop_front();
        }
        self.open_gaps.push_back((from, to));
    }

    /// Removes `[from, to)` from the open gaps and returns what it covered as positions in the
    /// packet starting at index `from`, ascending.
    fn fill(&mut self, from: u64, to: u64) -> Vec<Range<usize>> {
        let mut filled = Vec::new();
        if from >= to || !self.open_gaps.iter().any(|&(a, b)| a < to && from < b) {
            return filled;
        }
        let mut left = VecDeque::with_capacity(self.open_gaps.len() + 1);
        for &(a, b) in &self.open_gaps {
            let (lo, hi) = (a.max(from), b.min(to));
            if lo >= hi {
                left.push_back((a, b));
                continue;
            }
            filled.push((lo - from) as usize..(hi - from) as usize);
            if a < lo {
                left.push_back((a, lo));
            }
            if hi < b {
                left.push_back((hi, b));
            }
        }
        // A fill in the middle of a gap splits it in two; the bound still holds afterwards.
        while left.len() > MAX_OPEN_GAPS {
            left.pop_front();
        }
        self.open_gaps = left;
        filled
    }

    /// The next sample index expected, if any packet was seen.
    pub fn next_index(&self) -> Option<u64> {
        self.next_index
    }

    /// Reported gaps no packet has filled yet, `[from, to)`, oldest index first.
    pub fn open_gaps(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.open_gaps.iter().copied()
    }

    /// Index jumps remembered, oldest first.
    pub fn jumps(&self) -> impl Iterator<Item = Jump> + '_ {
        self.jumps.iter().copied()
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // `keep` lists ranges; one is the common case
mod tests {
    use super::*;

    const P: i64 = 5_000;

    #[test]
    fn consecutive_packets_are_accepted_without_gaps() {
        let mut t = SequenceTracker::default();
        assert_eq!(
            t.classify(100, 64, 1_000_000, P),
            Verdict::Accept { skip: 0, gap: None }
        );
        assert_eq!(
            t.classify(164, 64, 1_000_000 + 64 * P, P),
            Verdict::Accept { skip: 0, gap: None }
        );
        assert_eq!(t.next_index(), Some(228));
    }

    #[test]
    fn exact_redelivery_is_a_duplicate() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 1_000_000, P);
        t.classify(64, 64, 1_000_000 + 64 * P, P);
        assert_eq!(t.classify(0, 64, 1_000_000, P), Verdict::Duplicate);
        assert_eq!(
            t.classify(64, 64, 1_000_000 + 64 * P, P),
            Verdict::Duplicate
        );
    }

    #[test]
    fn jump_forward_is_a_gap_with_exclusive_end() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        let v = t.classify(192, 64, 192 * P, P);
        assert_eq!(
            v,
            Verdict::Accept {
                skip: 0,
                gap: Some((64, 192))
            }
        );
    }

    #[test]
    fn partly_overlapping_packet_keeps_only_new_samples() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        assert_eq!(
            t.classify(32, 64, 32 * P, P),
            Verdict::Accept {
                skip: 32,
                gap: None
            }
        );
        assert_eq!(t.next_index(), Some(96));
    }

    #[test]
    fn index_back_with_time_forward_is_a_restart() {
        let mut t = SequenceTracker::default();
        t.classify(5_000, 64, 10_000_000, P);
        assert_eq!(t.classify(0, 64, 20_000_000, P), Verdict::Restart);
        assert_eq!(t.next_index(), Some(64));
        assert_eq!(
            t.classify(64, 64, 20_000_000 + 64 * P, P),
            Verdict::Accept { skip: 0, gap: None }
        );
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
    fn a_late_packet_fills_its_gap_and_is_a_duplicate_after_that() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        assert_eq!(
            t.classify(128, 64, 128 * P, P),
            Verdict::Accept {
                skip: 0,
                gap: Some((64, 128))
            }
        );
        // The packet in between arrives last: never processed, so it is kept.
        assert_eq!(
            t.classify(64, 64, 64 * P, P),
            Verdict::Reordered {
                keep: vec![0..64],
                filled: 64
            }
        );
        assert_eq!(t.open_gaps().count(), 0);
        assert_eq!(t.next_index(), Some(192));
        // Its redelivery, and the others', are duplicates again.
        assert_eq!(t.classify(64, 64, 64 * P, P), Verdict::Duplicate);
        assert_eq!(t.classify(128, 64, 128 * P, P), Verdict::Duplicate);
    }

    #[test]
    fn a_fill_in_the_middle_of_a_gap_splits_it() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        t.classify(256, 64, 256 * P, P);
        assert_eq!(
            t.classify(128, 64, 128 * P, P),
            Verdict::Reordered {
                keep: vec![0..64],
                filled: 64
            }
        );
        assert_eq!(
            t.open_gaps().collect::<Vec<_>>(),
            vec![(64, 128), (192, 256)]
        );
        // A packet straddling processed samples keeps only what is still missing.
        assert_eq!(
            t.classify(96, 64, 96 * P, P),
            Verdict::Reordered {
                keep: vec![0..32],
                filled: 32
            }
        );
        assert_eq!(
            t.open_gaps().collect::<Vec<_>>(),
            vec![(64, 96), (192, 256)]
        );
    }

    #[test]
    fn a_packet_over_a_gap_and_past_the_end_keeps_both_parts() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 0, P);
        t.classify(96, 32, 96 * P, P);
        // 64..96 missing, 96..128 processed, 128..160 new.
        let v = t.classify(64, 96, 64 * P, P);
        assert_eq!(
            v,
            Verdict::Reordered {
                keep: vec![0..32, 64..96],
                filled: 32
            }
        );
        assert_eq!(t.next_index(), Some(160));
        assert_eq!(t.open_gaps().count(), 0);
    }

    #[test]
    fn a_restart_forgets_the_gaps_of_the_old_index_space() {
        let mut t = SequenceTracker::default();
        t.classify(0, 64, 10_000_000, P);
        t.classify(128, 64, 10_000_000 + 128 * P, P);
        assert_eq!(t.classify(0, 64, 20_000_000, P), Verdict::Restart);
        assert_eq!(t.open_gaps().count(), 0);
        t.classify(64, 192, 20_000_000 + 64 * P, P);
        // The old index space's missing packet: not a gap of the new one.
        assert_eq!(
            t.classify(64, 64, 10_000_000 + 64 * P, P),
            Verdict::Duplicate
        );
    }

    #[test]
    fn only_the_newest_gaps_stay_open() {
        let mut t = SequenceTracker::default();
        t.classify(0, 1, 0, P);
        // Every other sample lost: MAX_OPEN_GAPS + 1 gaps of one sample each.
        for k in 1..=MAX_OPEN_GAPS as u32 + 1 {
            let v = t.classify(2 * k, 1, i64::from(2 * k) * P, P);
            assert_eq!(
                v,
                Verdict::Accept {
                    skip: 0,
                    gap: Some((2 * k - 1, 2 * k))
                }
            );
        }
        assert_eq!(t.open_gaps().count(), MAX_OPEN_GAPS);
        // The first gap was given up; the second is still open.
        assert_eq!(t.classify(1, 1, P, P), Verdict::Duplicate);
        assert_eq!(
            t.classify(3, 1, 3 * P, P),
            Verdict::Reordered {
                keep: vec![0..1],
                filled: 1
            }
        );
    }

    #[test]
    fn index_space_beyond_u32_does_not_overflow() {
        let mut t = SequenceTracker::default();
        assert_eq!(
            t.classify(u32::MAX - 10, 64, 0, P),
            Verdict::Accept { skip: 0, gap: None }
        );
        assert_eq!(t.next_index(), Some(u64::from(u32::MAX) - 10 + 64));
    }
}
