//! Helpers shared by the engine cross-check tests: deterministic input noise, owned sequence
//! buffers, and the comparison of one engine's results with tract's.

#![allow(dead_code)] // Each test binary uses its own subset.

use sensorflow_model::{Model, SequenceMut};

/// Deterministic xorshift noise in [-1, 1): varied inputs without a `rand` dependency.
pub(crate) struct Noise(pub(crate) u64);

impl Noise {
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub(crate) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Owned buffers behind one `SequenceMut`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Seq {
    pub(crate) features: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) c: Vec<f32>,
    pub(crate) velocity: Vec<f32>,
    pub(crate) movement: Vec<f32>,
}

impl Seq {
    pub(crate) fn random(model: &Model, noise: &mut Noise, t: usize) -> Seq {
        Seq {
            // Scaled features are roughly standard normal; states lie in (-1, 1) for h.
            features: noise.vec(t * model.n_features(), 2.0),
            h: noise.vec(model.state_len(), 0.5),
            c: noise.vec(model.state_len(), 1.0),
            velocity: vec![f32::NAN; t],
            movement: vec![f32::NAN; t],
        }
    }

    pub(crate) fn as_mut(&mut self) -> SequenceMut<'_> {
        SequenceMut {
            features: &self.features,
            h: &mut self.h,
            c: &mut self.c,
            velocity: &mut self.velocity,
            movement_prob: &mut self.movement,
        }
    }

    /// New features for the next call; predictions reset so unwritten ones show as NaN.
    pub(crate) fn next_packet(&mut self, noise: &mut Noise) {
        self.features = noise.vec(self.features.len(), 2.0);
        self.velocity.fill(f32::NAN);
        self.movement.fill(f32::NAN);
    }
}

pub(crate) fn run_all(model: &Model, seqs: &mut [Seq]) {
    let mut views: Vec<SequenceMut<'_>> = seqs.iter_mut().map(Seq::as_mut).collect();
    model.run(&mut views).unwrap();
}

/// Asserts that `engine`'s results `got` are within `tolerance` of tract's: absolute for the
/// outputs and `h`; for `c` relative to `max(1, |c|)` when `c_relative` (the cell state grows
/// to ~15 over long sequences, where a tight absolute bound is only a few ulp).
pub(crate) fn assert_close(
    engine: &str,
    got: &Seq,
    tract: &Seq,
    what: &str,
    tolerance: f32,
    c_relative: bool,
) {
    for (name, x, y) in [
        ("velocity", &got.velocity, &tract.velocity),
        ("movement_prob", &got.movement, &tract.movement),
        ("h", &got.h, &tract.h),
        ("c", &got.c, &tract.c),
    ] {
        assert_eq!(x.len(), y.len(), "{what}: {name} length");
        assert!(
            x.iter().all(|v| v.is_finite()),
            "{what}: {engine} left {name} unwritten"
        );
        let scale = |v: f32| {
            if name == "c" && c_relative {
                v.abs().max(1.0)
            } else {
                1.0
            }
        };
        let diff = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs() / scale(*b))
            .fold(0.0, f32::max);
        assert!(diff <= tolerance, "{what}: {name} differs by {diff}");
    }
}
