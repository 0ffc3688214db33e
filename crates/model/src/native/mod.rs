//! The native engine ([`Engine::Native`](crate::Engine::Native)): the contract's stacked-LSTM
//! graph recognised at load and run by a fused, hand-written kernel instead of a general ONNX
//! interpreter.
//!
//! # Why hand-written
//!
//! At high sensor counts inference is the platform's largest cost, and the demo model is
//! small: two forward LSTM layers of `H = 32` and a 2-column linear head, about 25 kFLOP per
//! timestep-sample, which one Zen 4 core (32 fp32 FLOP/cycle) could do in ~0.2 us. ONNX
//! Runtime takes ~0.6-0.9 us and tract ~2 us. Both run the graph op by op: per timestep and
//! layer a small GEMM (`[B, 32] x [32, 128]` for `R h_{t-1}`, after one GEMM for `W x` over
//! all timesteps) that writes the `[B, 4H]` gate block to memory, activation and cell-update
//! passes that read it back, then the head as separate whole-sequence ops (Transpose, MatMul,
//! Add, Gather, Sigmoid) plus the Squeeze/Transpose/Concat/Slice glue, each with its own
//! dispatch, packing and buffers. At `H = 32` that overhead is a large share of the time.
//!
//! The kernel here fuses the whole model per timestep. For a block of batch rows it keeps the
//! gate pre-activations `W x_t + R h_{t-1} + b` in vector registers (`[W | R]` pre-transposed
//! into contiguous chunks of gate rows: each weight vector is loaded once per block and feeds
//! one FMA per row, which runs at the FMA units' peak), then applies a fast vectorised
//! `exp` and the cell update (`sigmoid(a) tanh(b)` as one fraction, three divisions per
//! element), steps every layer and the head, and reads features from and writes predictions
//! and state to the caller's [`SequenceMut`]s directly (no gather/scatter, transposes or
//! padding rows). On the demo model at batch 64, T = 64, one thread on this Zen 4 host it
//! took ~0.37-0.40 us per timestep-sample against ~0.56-0.62 us for ONNX Runtime 1.32 with
//! one intra-op thread, measured back to back (1.5-1.7x; ~4-6x tract), and ~1.6x ONNX
//! Runtime at batch 1 (`examples/bench_engines.rs`, 2026-11-27, on a shared 2-core machine).
//!
//! # Exactness
//!
//! - Batch invariance: every row's arithmetic is the same sequence of IEEE operations whatever
//!   block or call it lands in (each gate sum runs over inputs in index order; blocks of fewer
//!   rows run the same code with a smaller row count), so a sequence's result is bit-identical
//!   alone or in a batch.
//! - Against tract the results differ by float rounding only (summation order, `Wb + Rb`
//!   pre-added, polynomial `exp`): outputs and `h` by < 2e-6 and `c` by < 1e-5 relative over
//!   512 carried timesteps in the tests. Loading refuses a model on which the engine and tract
//!   differ by more than [`PROBE_TOLERANCE`] on random inputs and state, so a mis-recognised
//!   graph fails at load instead of giving wrong answers.
//!
//! # Kernel variants
//!
//! The same generic Rust is compiled three times and LLVM auto-vectorises its fixed-size inner
//! loops: with `avx512f` (16-lane FMA, accumulators for 4 rows x 64 gate rows = 16 of the 32
//! vector registers), with `avx2,fma` (8-lane, 4 rows x 16 gate rows = 8 of 16 registers; 3 x
//! 32 spilled and ran at half speed), and portable (no FMA, 2 rows x 16; any architecture).
//! The variant is chosen once at load.

use crate::model::SequenceMut;
use crate::{Model, ModelError};

/// Largest difference, on any output or final state, between the native engine and tract on
/// the load-time probe before the model is refused.
pub(crate) const PROBE_TOLERANCE: f32 = 1e-4;

/// ONNX `TensorProto.DataType` codes the extraction reads.
const ONNX_FLOAT: i32 = 1;
const ONNX_INT64: i32 = 7;

/// A model's graph in the form the kernel runs, with the kernel variant chosen for this CPU.
pub(crate) struct NativeEngine {
    /// Bottom layer first.
    layers: Vec<Layer>,
    head: Head,
    hidden: usize,
    n_features: usize,
    /// Whether sequences carry `h`/`c` (`[layers, hidden]` each); otherwise every call starts
    /// from zero state.
    stateful: bool,
    isa: Isa,
}

/// One LSTM layer with its weights laid out for the kernel.
struct Layer {
    /// Inputs per timestep: `F` for the bottom layer, `H` above.
    inputs: usize,
    /// `[W | R]` transposed and cut into chunks of `isa.lanes()` gate rows: element
    /// `(chunk, k, j)` is the weight from input `k` of `[x_t | h_{t-1}]` to gate row
    /// `chunk * lanes + j` (ONNX order i, o, f, c), zero for rows past `4H`.
    weights: Vec<f32>,
    /// `Wb + Rb`, zero-padded to whole chunks.
    bias: Vec<f32>,
}

/// The linear head on the top layer's `h_t`: velocity and the movement logit.
struct Head {
    velocity: Vec<f32>,
    movement: Vec<f32>,
    velocity_bias: f32,
    movement_bias: f32,
}

/// Kernel variant: instruction set, accumulator block shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Gate rows per weight chunk; must match the `CH` the variant's kernel is compiled with.
    fn lanes(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 64,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 16,
            Isa::Portable => 16,
        }
    }
}

mod extract;
mod kernel;

/// Runs `native` and `reference` (the same graph on tract) on random inputs and random initial
/// state for batch 1 and 3 and T 1 and 7, and refuses the model if any output or final state
/// differs by more than [`PROBE_TOLERANCE`].
pub(crate) fn cross_check(native: &Model, reference: &Model) -> Result<(), ModelError> {
    let mut noise = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        (noise >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let (f, s) = (native.n_features(), native.state_len());
    // Two runs: (B 1, T 1) + (B 3, T 7), then (B 3, T 1) + (B 1, T 7).
    for lengths in [[1, 7, 7, 7], [7, 1, 1, 1]] {
        let mut bufs: Vec<[Vec<f32>; 5]> = lengths
            .iter()
            .map(|&t| {
                let features = (0..t * f).map(|_| 2.0 * next()).collect();
                let h = (0..s).map(|_| 0.8 * next()).collect();
                let c = (0..s).map(|_| 2.0 * next()).collect();
                [features, h, c, vec![f32::NAN; t], vec![f32::NAN; t]]
            })
            .collect();
        let mut expected = bufs.clone();
        for (model, bufs) in [(native, &mut bufs), (reference, &mut expected)] {
            let mut seqs = sequence_views(bufs);
            model.run(&mut seqs)?;
        }
        for (got, want) in bufs.iter().zip(&expected) {
            for (name, got, want) in [
                ("h_n", &got[1], &want[1]),
                ("c_n", &got[2], &want[2]),
                ("velocity_pred", &got[3], &want[3]),
                ("movement_prob", &got[4], &want[4]),
            ] {
                let max_diff = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| {
                        // A NaN on either side must not compare away as "no difference".
                        let d = (a - b).abs();
                        if d.is_nan() { f32::INFINITY } else { d }
                    })
                    .fold(0.0, f32::max);
                if max_diff > PROBE_TOLERANCE {
                    return Err(ModelError::NativeMismatch {
                        output: name,
                        max_diff,
                    });
                }
            }
        }
    }
    Ok(())
}

/// `SequenceMut` views of owned `[features, h, c, velocity, movement_prob]` buffers (the
/// load-time cross-check and the tests build their sequences this way).
fn sequence_views(bufs: &mut [[Vec<f32>; 5]]) -> Vec<SequenceMut<'_>> {
    bufs.iter_mut()
        .map(|[features, h, c, velocity, movement_prob]| SequenceMut {
            features,
            h,
            c,
            velocity,
            movement_prob,
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use tract_onnx::pb::TensorProto;

    use super::extract::Graph;
    use super::kernel::{cell_update, exp, gate_exponentials, sigmoid};
    use super::*;
    use crate::batch::Call;
    use tract_onnx::prelude::Framework;

    #[test]
    fn the_load_time_probe_refuses_results_that_differ_from_tract() {
        // The native engine runs the demo; the "reference" is the demo with a shifted velocity
        // bias, standing in for a graph whose meaning the extraction got wrong.
        let native = Model::demo_with(&crate::Engine::Native).unwrap();
        let onnx: &[u8] = include_bytes!("../../../../models/demo_lstm.onnx");
        let sidecar: &[u8] = include_bytes!("../../../../models/demo_lstm.json");
        let mut proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &onnx[..])
            .unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let bias = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "head.b")
            .unwrap();
        let (dims, mut values) = Graph::new(&[], std::slice::from_ref(bias))
            .const_f32("head.b")
            .unwrap();
        assert_eq!(dims, [2]);
        values[0] += 1e-3;
        *bias = TensorProto {
            name: "head.b".into(),
            dims: vec![2],
            data_type: ONNX_FLOAT,
            float_data: values,
            ..Default::default()
        };
        let shifted = Model::from_bytes(&prost::Message::encode_to_vec(&proto), sidecar).unwrap();
        let err = cross_check(&native, &shifted).unwrap_err();
        assert!(
            matches!(err, ModelError::NativeMismatch { output: "velocity_pred", max_diff }
                if (max_diff - 1e-3).abs() < 1e-5),
            "{err}"
        );
        cross_check(&native, &Model::demo().unwrap()).unwrap();
    }

    /// Every kernel variant this CPU can run, not only the one `Isa::detect` picks, agrees
    /// with tract: the portable and AVX2 paths are otherwise untested on an AVX-512 machine.
    #[test]
    fn every_kernel_variant_this_cpu_runs_equals_tract() {
        let mut variants = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                variants.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Avx512 {
                variants.push(Isa::Avx512);
            }
        }
        let onnx: &[u8] = include_bytes!("../../../../models/demo_lstm.onnx");
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &onnx[..])
            .unwrap();
        let tract = Model::demo().unwrap();
        let state = tract.sidecar().state;
        let (f, s) = (tract.n_features(), tract.state_len());
        // 11 sequences: full blocks of every variant's size plus remainders.
        let (n, t) = (11, 40);
        let mut noise = 0x1234_5678_9abc_def1_u64;
        let mut next = || {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            (noise >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let inputs: Vec<[Vec<f32>; 3]> = (0..n)
            .map(|_| {
                [
                    (0..t * f).map(|_| 2.0 * next()).collect(),
                    (0..s).map(|_| 0.5 * next()).collect(),
                    (0..s).map(|_| next()).collect(),
                ]
            })
            .collect();
        let run = |engine: Option<&NativeEngine>| {
            let mut bufs: Vec<[Vec<f32>; 5]> = inputs
                .iter()
                .map(|[x, h, c]| {
                    [
                        x.clone(),
                        h.clone(),
                        c.clone(),
                        vec![f32::NAN; t],
                        vec![f32::NAN; t],
                    ]
                })
                .collect();
            let mut seqs = sequence_views(&mut bufs);
            match engine {
                Some(engine) => engine.run_call(
                    &Call {
                        steps: t,
                        batch: n,
                        members: (0..n).collect(),
                    },
                    &mut seqs,
                ),
                None => tract.run(&mut seqs).unwrap(),
            }
            bufs
        };
        let expected = run(None);
        for isa in variants {
            let engine = NativeEngine::from_proto_for(&proto, f, state, isa).unwrap();
            for (got, want) in run(Some(&engine)).iter().zip(&expected) {
                for (got, want) in got[1..].iter().zip(&want[1..]) {
                    for (a, b) in got.iter().zip(want) {
                        // Relative above 1 for the cell state, which grows past 1.
                        let diff = (a - b).abs() / b.abs().max(1.0);
                        assert!(diff <= 1e-5, "{isa:?}: {a} vs tract {b}");
                    }
                }
            }
        }
    }

    /// Worst errors against f64 of `exp` (relative), `sigmoid`, and the cell's `c` (relative
    /// to `max(1, |c|)`) and `h`, over pre-activations in [-40, 40] and states in [-16, 16].
    fn worst_errors<const FMA: bool>() -> [f64; 4] {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut worst = [0.0_f64; 4];
        let mut noise = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            (noise >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for i in -400_000..=400_000 {
            let x = i as f32 * 1e-4;
            let e = f64::from(x).exp();
            worst[0] = worst[0].max((f64::from(exp::<FMA>(x)) - e).abs() / e);
            worst[1] = worst[1].max((f64::from(sigmoid::<FMA>(x)) - sig(f64::from(x))).abs());
        }
        const H: usize = 37; // two whole vectors and a scalar tail
        for round in 0..2000 {
            // Mostly moderate pre-activations, every 10th round saturating ones.
            let scale = if round % 10 == 0 { 40.0 } else { 4.0 };
            let pre: Vec<f32> = (0..4 * H).map(|_| scale * next()).collect();
            let c0: Vec<f32> = (0..H).map(|_| 16.0 * next()).collect();
            let mut z = pre.clone();
            let (mut c, mut h) = (c0.clone(), vec![0.0; H]);
            gate_exponentials::<FMA>(&mut z);
            cell_update::<FMA>(&z, &mut c, &mut h);
            for j in 0..H {
                let p = |gate: usize| f64::from(pre[gate * H + j]);
                let cell = sig(p(2)) * f64::from(c0[j]) + sig(p(0)) * p(3).tanh();
                let hidden = sig(p(1)) * cell.tanh();
                worst[2] = worst[2].max((f64::from(c[j]) - cell).abs() / cell.abs().max(1.0));
                worst[3] = worst[3].max((f64::from(h[j]) - hidden).abs());
            }
        }
        worst
    }

    #[test]
    fn fast_exp_sigmoid_and_the_cell_are_accurate_to_better_than_1e_6() {
        for (variant, [exp_rel, sigmoid_abs, c_rel, h_abs]) in [
            ("fma", worst_errors::<true>()),
            ("no fma", worst_errors::<false>()),
        ] {
            assert!(exp_rel < 3e-7, "{variant}: exp relative error {exp_rel}");
            assert!(sigmoid_abs < 2e-7, "{variant}: sigmoid error {sigmoid_abs}");
            assert!(c_rel < 5e-7, "{variant}: cell state error {c_rel}");
            assert!(h_abs < 5e-7, "{variant}: hidden state error {h_abs}");
            assert!(c_rel > 0.0 && h_abs > 0.0, "{variant}: the comparison ran");
        }
        assert!(sigmoid::<true>(-1000.0) < 1e-37 && sigmoid::<true>(1000.0) == 1.0);
    }
}
