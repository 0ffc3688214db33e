//! Pure planning of model calls: which sequences share a call, and how far each call's
//! batch dimension is padded.
//!
//! tract runs fastest with a plan optimised for one fixed input shape, and compiling a plan
//! costs milliseconds, so batch sizes are rounded up to a small set of buckets (powers of two
//! and 1.5x powers of two: padding wastes at most a third of a call) and plans are cached per
//! `(bucket, T)`. Sequences can only share a call when they have the same length `T`.

use std::collections::BTreeMap;

/// Largest batch one model call carries; more sequences of one length take several calls.
pub const MAX_BATCH: usize = 256;

/// Batch sizes plans are compiled for, ascending; the last is [`MAX_BATCH`].
const BUCKETS: [usize; 16] = [
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, MAX_BATCH,
];

/// One model call: the sequences it carries (indices into the caller's slice, in order) and
/// the padded batch size of its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    /// Timesteps of every member.
    pub(crate) steps: usize,
    /// Batch dimension of the call, `>= members.len()`; rows past the members are padding.
    pub(crate) batch: usize,
    /// Member sequences; member `j` occupies batch row `j`.
    pub(crate) members: Vec<usize>,
}

/// Smallest bucket holding `n` sequences (`n` must be in `1..=MAX_BATCH`).
pub(crate) fn bucket_for(n: usize) -> usize {
    BUCKETS
        .iter()
        .copied()
        .find(|&b| b >= n)
        .unwrap_or(MAX_BATCH)
}

/// Largest call on ONNX Runtime. With two single-threaded sessions in parallel, as the
/// pipeline's shards run them, the demo model ran at 2.68M timesteps/s at batch 64 against
/// 2.53M at 256 (`scripts/bench_inference.sh`, 2026-11-27); one session alone favoured one or
/// the other from run to run, so the margin is small.
pub const ORT_MAX_BATCH: usize = 64;

/// Groups sequences of lengths `steps[i]` into calls: one group per length, split into chunks
/// of at most `max_batch` (itself at most [`MAX_BATCH`]). Zero-length sequences need no call
/// and are left out.
pub(crate) fn plan_calls(steps: &[usize], max_batch: usize) -> Vec<Call> {
    let max_batch = max_batch.clamp(1, MAX_BATCH);
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &t) in steps.iter().enumerate() {
        if t > 0 {
            by_len.entry(t).or_default().push(i);
        }
    }
    let mut calls = Vec::new();
    for (t, members) in by_len {
        for chunk in members.chunks(max_batch) {
            calls.push(Call {
                steps: t,
                batch: bucket_for(chunk.len()),
                members: chunk.to_vec(),
            });
        }
    }
    calls
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_and_waste_at_most_a_third() {
        assert_eq!(bucket_for(1), 1);
        assert_eq!(bucket_for(5), 6);
        assert_eq!(bucket_for(65), 96);
        assert_eq!(bucket_for(MAX_BATCH), MAX_BATCH);
        for n in 1..=MAX_BATCH {
            let b = bucket_for(n);
            assert!(b >= n);
            assert!((b - n) * 3 <= b, "bucket {b} wastes too much for {n}");
        }
    }

    #[test]
    fn groups_by_length_and_splits_large_groups() {
        let mut steps = vec![64; 300];
        steps[7] = 32;
        steps[9] = 0;
        let calls = plan_calls(&steps, MAX_BATCH);
        assert_eq!(calls.len(), 3);
        assert_eq!(
            calls[0],
            Call {
                steps: 32,
                batch: 1,
                members: vec![7]
            }
        );
        assert_eq!(
            (calls[1].steps, calls[1].batch, calls[1].members.len()),
            (64, 256, 256)
        );
        assert_eq!(
            (calls[2].steps, calls[2].batch, calls[2].members.len()),
            (64, 48, 42)
        );
        let mut all: Vec<usize> = calls
            .iter()
            .flat_map(|c| c.members.iter().copied())
            .collect();
        all.sort_unstable();
        let expected: Vec<usize> = (0..300).filter(|&i| i != 9).collect();
        assert_eq!(
            all, expected,
            "every non-empty sequence in exactly one call"
        );
    }
}
