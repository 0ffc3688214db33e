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

use std::collections::HashMap;

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

use crate::batch::Call;
use crate::model::{C_0, C_N, FEATURES, H_0, H_N, MOVEMENT, SequenceMut, VELOCITY};
use crate::{Model, ModelError, StateSpec};

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

impl NativeEngine {
    /// Recognises the contract graph in `proto` and extracts its weights.
    ///
    /// Accepts exactly: `sequence_features` transposed to time-major, a stack of forward ONNX
    /// `LSTM` ops (default activations, no peepholes, clip, `input_forget` or sequence
    /// lengths, layout 0) joined by `Squeeze(axis 1)`, each starting from zero (stateless) or
    /// from its own `Slice` of `h_0`/`c_0` (stateful, layer `l` from index `l`, final states
    /// concatenated in layer order into `h_n`/`c_n`), then transposed back, `MatMul` by a
    /// constant `[H, K]`, `Add` of a constant `[K]`, and `Gather` on the last axis for
    /// `velocity_pred` and (through `Sigmoid`) `movement_prob`. Anything else is
    /// [`ModelError::UnsupportedGraph`] naming what did not match.
    pub(crate) fn from_proto(
        proto: &ModelProto,
        n_features: usize,
        state: Option<StateSpec>,
    ) -> Result<NativeEngine, ModelError> {
        NativeEngine::from_proto_for(proto, n_features, state, Isa::detect())
    }

    /// [`NativeEngine::from_proto`] for a given kernel variant (which must run on this CPU).
    fn from_proto_for(
        proto: &ModelProto,
        n_features: usize,
        state: Option<StateSpec>,
        isa: Isa,
    ) -> Result<NativeEngine, ModelError> {
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| unsupported("the model has no graph"))?;
        let g = Graph::new(&graph.node, &graph.initializer);

        // The head, from the outputs back.
        let vel_gather = g.producer(VELOCITY)?;
        let (head_out, vel_col) = g.last_axis_gather(vel_gather)?;
        let sigmoid = g.producer(MOVEMENT)?;
        expect_op(sigmoid, "Sigmoid")?;
        let mov_gather = g.producer(input(sigmoid, 0)?)?;
        let (mov_src, mov_col) = g.last_axis_gather(mov_gather)?;
        if mov_src != head_out {
            return Err(unsupported(
                "velocity_pred and movement_prob gather from different tensors",
            ));
        }
        let add = g.producer(head_out)?;
        expect_op(add, "Add")?;
        let (matmul_out, bias_name) =
            match (g.consts.get(input(add, 1)?), g.consts.get(input(add, 0)?)) {
                (Some(_), _) => (input(add, 0)?, input(add, 1)?),
                (None, Some(_)) => (input(add, 1)?, input(add, 0)?),
                (None, None) => return Err(unsupported("the head's Add has no constant bias")),
            };
        let (bias_dims, head_bias) = g.const_f32(bias_name)?;
        let matmul = g.producer(matmul_out)?;
        expect_op(matmul, "MatMul")?;
        let (w_dims, head_w) = g.const_f32(input(matmul, 1)?)?;
        let [hidden, k] = w_dims[..] else {
            return Err(unsupported(format!(
                "head weight of shape {w_dims:?}, expected [H, K]"
            )));
        };
        if bias_dims != [k] || vel_col >= k || mov_col >= k {
            return Err(unsupported(format!(
                "head bias {bias_dims:?} and gathered columns {vel_col}, {mov_col} do not fit a \
                 head weight of shape {w_dims:?}"
            )));
        }
        let head = Head {
            velocity: (0..hidden).map(|r| head_w[r * k + vel_col]).collect(),
            movement: (0..hidden).map(|r| head_w[r * k + mov_col]).collect(),
            velocity_bias: head_bias[vel_col],
            movement_bias: head_bias[mov_col],
        };
        let to_batch_major = g.producer(input(matmul, 0)?)?;
        g.expect_time_batch_swap(to_batch_major)?;

        // The LSTM stack, from the top layer down to the transposed features.
        let mut lstms: Vec<&NodeProto> = Vec::new();
        let mut below = input(to_batch_major, 0)?;
        loop {
            let node = g.producer(below)?;
            match node.op_type.as_str() {
                "Squeeze" => {
                    let axes = match node.input.get(1).filter(|n| !n.is_empty()) {
                        Some(name) => g.const_i64(name)?,
                        None => attr_ints(node, "axes").unwrap_or_default(),
                    };
                    if axes != [1] {
                        return Err(unsupported(format!(
                            "Squeeze {:?} over axes {axes:?}, expected [1]",
                            node.name
                        )));
                    }
                    let (lstm, port) = g.producer_port(input(node, 0)?)?;
                    expect_op(lstm, "LSTM")?;
                    if port != 0 {
                        return Err(unsupported(format!(
                            "Squeeze {:?} reads LSTM output {port}, expected Y",
                            node.name
                        )));
                    }
                    lstms.push(lstm);
                    below = input(lstm, 0)?;
                }
                "Transpose" => {
                    g.expect_time_batch_swap(node)?;
                    if input(node, 0)? != FEATURES {
                        return Err(unsupported(format!(
                            "Transpose {:?} of {:?} where the LSTM stack should start from {FEATURES}",
                            node.name,
                            input(node, 0)?
                        )));
                    }
                    break;
                }
                other => {
                    return Err(unsupported(format!(
                        "{other} {:?} where an LSTM layer's output or the transposed features \
                         were expected",
                        node.name
                    )));
                }
            }
        }
        lstms.reverse();
        if lstms.is_empty() {
            return Err(unsupported(
                "no LSTM layer between the features and the head",
            ));
        }
        if let Some(spec) = state
            && (spec.layers != lstms.len() || spec.directions != 1 || spec.hidden != hidden)
        {
            return Err(unsupported(format!(
                "{} forward LSTM layers of hidden {hidden}, sidecar state {spec:?}",
                lstms.len()
            )));
        }

        let mut layers = Vec::with_capacity(lstms.len());
        for (l, lstm) in lstms.iter().enumerate() {
            let inputs = if l == 0 { n_features } else { hidden };
            layers.push(g.lstm_layer(lstm, l, inputs, hidden, state.is_some(), isa.lanes())?);
        }
        if state.is_some() {
            for (output, port) in [(H_N, 1), (C_N, 2)] {
                g.expect_layer_concat(output, &lstms, port)?;
            }
        }
        Ok(NativeEngine {
            layers,
            head,
            hidden,
            n_features,
            stateful: state.is_some(),
            isa,
        })
    }

    /// Runs one call's members straight on their sequences. Sequence buffers were checked by
    /// the caller; `call.batch` (a tract padding bucket) is ignored: there are no padding rows.
    // The workspace denies `unsafe`; calling a `#[target_feature]` function is the one unsafe
    // operation here, justified at each call by the CPU check `Isa::detect` made at load.
    #[allow(unsafe_code)]
    pub(crate) fn run_call(&self, call: &Call, seqs: &mut [SequenceMut<'_>]) {
        match self.isa {
            // SAFETY: `Isa::Avx512` is only chosen by `Isa::detect` after
            // `is_x86_feature_detected!` confirmed avx512f, avx2 and fma on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.run_avx512(call, seqs) },
            // SAFETY: `Isa::Avx2` is only chosen after avx2 and fma were detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.run_avx2(call, seqs) },
            Isa::Portable => self.run_blocks::<2, 16, false>(call, seqs),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn run_avx512(&self, call: &Call, seqs: &mut [SequenceMut<'_>]) {
        self.run_blocks::<4, 64, true>(call, seqs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(&self, call: &Call, seqs: &mut [SequenceMut<'_>]) {
        self.run_blocks::<4, 16, true>(call, seqs)
    }

    /// Runs the members in blocks of `NB` rows (the remainder one row at a time, which computes
    /// each row exactly as a full block does), with `CH` gate rows per accumulator chunk.
    #[inline(always)]
    fn run_blocks<const NB: usize, const CH: usize, const FMA: bool>(
        &self,
        call: &Call,
        seqs: &mut [SequenceMut<'_>],
    ) {
        let mut scratch = Scratch::new(self, NB);
        let mut blocks = call.members.chunks_exact(NB);
        for block in &mut blocks {
            self.run_block::<NB, CH, FMA>(block, call.steps, seqs, &mut scratch);
        }
        for row in blocks.remainder().chunks(1) {
            self.run_block::<1, CH, FMA>(row, call.steps, seqs, &mut scratch);
        }
    }

    /// Runs `steps` timesteps of the `NB` sequences `rows` (indices into `seqs`), every layer
    /// and the head per timestep, state kept in `scratch` between timesteps.
    #[inline(always)]
    fn run_block<const NB: usize, const CH: usize, const FMA: bool>(
        &self,
        rows: &[usize],
        steps: usize,
        seqs: &mut [SequenceMut<'_>],
        scratch: &mut Scratch,
    ) {
        let (h, f) = (self.hidden, self.n_features);
        let rows: [usize; NB] = std::array::from_fn(|r| rows[r]);
        for (r, &seq) in rows.iter().enumerate() {
            for l in 0..self.layers.len() {
                let (h_row, c_row) = (
                    &mut scratch.h[l][r * h..(r + 1) * h],
                    &mut scratch.c[l][r * h..(r + 1) * h],
                );
                if self.stateful {
                    h_row.copy_from_slice(&seqs[seq].h[l * h..(l + 1) * h]);
                    c_row.copy_from_slice(&seqs[seq].c[l * h..(l + 1) * h]);
                } else {
                    h_row.fill(0.0);
                    c_row.fill(0.0);
                }
            }
        }
        for t in 0..steps {
            for (l, layer) in self.layers.iter().enumerate() {
                let gates = layer.bias.len();
                let (below, this) = scratch.h.split_at_mut(l);
                {
                    let state: [&[f32]; NB] = std::array::from_fn(|r| &this[0][r * h..(r + 1) * h]);
                    // The bottom layer reads the features in place; the others the hidden
                    // state the layer below has just written.
                    let inputs: [&[f32]; NB] = match below.last() {
                        None => {
                            std::array::from_fn(|r| &seqs[rows[r]].features[t * f..(t + 1) * f])
                        }
                        Some(below) => std::array::from_fn(|r| &below[r * h..(r + 1) * h]),
                    };
                    gate_sums::<NB, CH, FMA>(layer, inputs, state, &mut scratch.z);
                }
                // The gates' exponentials for the whole block first: many short independent
                // loops keep the FP pipes busy where one long per-element chain would wait on
                // latencies.
                for z in scratch.z.chunks_exact_mut(gates).take(NB) {
                    gate_exponentials::<FMA>(&mut z[..4 * h]);
                }
                for r in 0..NB {
                    cell_update::<FMA>(
                        &scratch.z[r * gates..(r + 1) * gates],
                        &mut scratch.c[l][r * h..(r + 1) * h],
                        &mut this[0][r * h..(r + 1) * h],
                    );
                }
            }
            let top = scratch.h.last().map_or(&[][..], Vec::as_slice);
            for (r, &seq) in rows.iter().enumerate() {
                let h_top = &top[r * h..(r + 1) * h];
                let s = &mut seqs[seq];
                s.velocity[t] = dot(h_top, &self.head.velocity) + self.head.velocity_bias;
                s.movement_prob[t] =
                    sigmoid::<FMA>(dot(h_top, &self.head.movement) + self.head.movement_bias);
            }
        }
        if self.stateful {
            for (r, &seq) in rows.iter().enumerate() {
                for l in 0..self.layers.len() {
                    let s = &mut seqs[seq];
                    s.h[l * h..(l + 1) * h].copy_from_slice(&scratch.h[l][r * h..(r + 1) * h]);
                    s.c[l * h..(l + 1) * h].copy_from_slice(&scratch.c[l][r * h..(r + 1) * h]);
                }
            }
        }
    }
}

/// Per-call working memory for blocks of up to `NB` rows.
struct Scratch {
    /// Per layer, per row, the hidden state.
    h: Vec<Vec<f32>>,
    /// Per layer, per row, the cell state.
    c: Vec<Vec<f32>>,
    /// Per row, the `4H` (padded) gate pre-activations of the layer being stepped.
    z: Vec<f32>,
}

impl Scratch {
    fn new(engine: &NativeEngine, rows: usize) -> Scratch {
        let h = engine.hidden;
        let gates = engine.layers.first().map_or(0, |l| l.bias.len());
        Scratch {
            h: engine.layers.iter().map(|_| vec![0.0; rows * h]).collect(),
            c: engine.layers.iter().map(|_| vec![0.0; rows * h]).collect(),
            z: vec![0.0; rows * gates],
        }
    }
}

/// `z[r] = bias + W x_t + R h_{t-1}` for `NB` rows, from each row's `inputs` (`x_t`) and
/// `state` (`h_{t-1}`).
///
/// For each chunk of `CH` gate rows, the `NB x CH` accumulators stay in registers while the
/// inputs stream past; each accumulator sums its terms in input order (`x_t` then `h_{t-1}`),
/// which makes a row's result independent of `NB`.
#[inline(always)]
fn gate_sums<const NB: usize, const CH: usize, const FMA: bool>(
    layer: &Layer,
    inputs: [&[f32]; NB],
    state: [&[f32]; NB],
    z: &mut [f32],
) {
    let gates = layer.bias.len();
    let (n_in, n_state) = (layer.inputs, state[0].len());
    let (bias_chunks, _) = layer.bias.as_chunks::<CH>();
    for (chunk, (weights, bias)) in layer
        .weights
        .chunks_exact((n_in + n_state) * CH)
        .zip(bias_chunks)
        .enumerate()
    {
        let (weights, _) = weights.as_chunks::<CH>();
        let (w_in, w_state) = weights.split_at(n_in);
        let mut acc = [*bias; NB];
        accumulate::<NB, CH, FMA>(&mut acc, inputs, w_in);
        accumulate::<NB, CH, FMA>(&mut acc, state, w_state);
        for (r, acc) in acc.iter().enumerate() {
            z[r * gates + chunk * CH..r * gates + (chunk + 1) * CH].copy_from_slice(acc);
        }
    }
}

/// `acc[r] += vectors[r][k] * weights[k]` over `k` in order.
#[inline(always)]
fn accumulate<const NB: usize, const CH: usize, const FMA: bool>(
    acc: &mut [[f32; CH]; NB],
    vectors: [&[f32]; NB],
    weights: &[[f32; CH]],
) {
    let vectors = vectors.map(|v| &v[..weights.len()]);
    for (k, w) in weights.iter().enumerate() {
        for (acc, v) in acc.iter_mut().zip(vectors) {
            let x = v[k];
            for (a, &w) in acc.iter_mut().zip(w) {
                *a = madd::<FMA>(x, w, *a);
            }
        }
    }
}

/// Lanes of the fixed-size chunks the elementwise loops are cut into, so LLVM emits whole
/// vectors without bounds checks (16 = one AVX-512 register); tails run the same scalar code.
const V: usize = 16;

/// `x[j] = f(x[j])` for every element.
#[inline(always)]
fn map_in_place(x: &mut [f32], f: impl Fn(f32) -> f32) {
    let (vectors, tail) = x.as_chunks_mut::<V>();
    for v in vectors {
        for x in v.iter_mut() {
            *x = f(*x);
        }
    }
    for x in tail {
        *x = f(*x);
    }
}

/// Replaces one row's gate pre-activations (i, o, f, g blocks of `H`) by what
/// [`cell_update`] takes: `1 + e^-x` (the sigmoid's denominator) for i, o, f and `e^-2x` for g.
#[inline(always)]
fn gate_exponentials<const FMA: bool>(z: &mut [f32]) {
    let (sigmoid_gates, g) = z.split_at_mut(z.len() / 4 * 3);
    map_in_place(sigmoid_gates, sigmoid_denominator::<FMA>);
    map_in_place(g, tanh_exponential::<FMA>);
}

/// `1 + e^-x`, for `x >= -60` (below, sigmoid is < 1e-26 and taken as sigmoid(-60)): at most
/// ~1e26, so a product with a [`tanh_exponential`] cannot overflow.
#[inline(always)]
fn sigmoid_denominator<const FMA: bool>(x: f32) -> f32 {
    1.0 + exp_in_range::<FMA>(-x.clamp(-60.0, 87.0))
}

/// `e^-2x` for `tanh x = (1 - e^-2x) / (1 + e^-2x)`, with `x` clamped to [-10, 10], where
/// tanh already rounds to +-1 in f32: at most e^20.
#[inline(always)]
fn tanh_exponential<const FMA: bool>(x: f32) -> f32 {
    exp_in_range::<FMA>(-2.0 * x.clamp(-10.0, 10.0))
}

/// The LSTM cell on one row from the gates' exponentials `z` (`H` each of `1 + e^-i`,
/// `1 + e^-o`, `1 + e^-f` and `e^-2g`): `c = sigmoid(f) c + sigmoid(i) tanh(g)`,
/// `h = sigmoid(o) tanh(c)`.
///
/// Each product `sigmoid(a) tanh(b)` is one fraction, `(1 - e^-2b) / ((1 + e^-a)(1 + e^-2b))`:
/// three divisions per element instead of five, and the divider is the bottleneck of this
/// stage. The clamps of [`sigmoid_denominator`] and [`tanh_exponential`] keep the product of
/// denominators below ~1e35, so it never overflows.
#[inline(always)]
fn cell_update<const FMA: bool>(z: &[f32], c: &mut [f32], h: &mut [f32]) {
    #[inline(always)]
    fn one<const FMA: bool>(d_i: f32, d_o: f32, d_f: f32, e_g: f32, c: &mut f32, h: &mut f32) {
        let cell = *c / d_f + (1.0 - e_g) / (d_i * (1.0 + e_g));
        *c = cell;
        let e_c = tanh_exponential::<FMA>(cell);
        *h = (1.0 - e_c) / (d_o * (1.0 + e_c));
    }
    fn chunks(x: &[f32]) -> (&[[f32; V]], &[f32]) {
        x.as_chunks::<V>()
    }
    let n = h.len();
    let (d_i, rest) = z.split_at(n);
    let (d_o, rest) = rest.split_at(n);
    let (d_f, e_g) = rest.split_at(n);
    // Every operand cut into the same fixed-size chunks, so the loop body has no bounds
    // checks and LLVM emits whole vectors; the scalar tail computes the same values.
    let ((i_v, i_t), (o_v, o_t)) = (chunks(d_i), chunks(d_o));
    let ((f_v, f_t), (g_v, g_t)) = (chunks(d_f), chunks(&e_g[..n]));
    let (c_v, c_t) = c.as_chunks_mut::<V>();
    let (h_v, h_t) = h.as_chunks_mut::<V>();
    let vectors = i_v.iter().zip(o_v).zip(f_v.iter().zip(g_v));
    for (((i, o), (f, g)), (c, h)) in vectors.zip(c_v.iter_mut().zip(h_v)) {
        for j in 0..V {
            one::<FMA>(i[j], o[j], f[j], g[j], &mut c[j], &mut h[j]);
        }
    }
    let tails = i_t.iter().zip(o_t).zip(f_t.iter().zip(g_t));
    for (((i, o), (f, g)), (c, h)) in tails.zip(c_t.iter_mut().zip(h_t)) {
        one::<FMA>(*i, *o, *f, *g, c, h);
    }
}

/// `a . b` in a fixed order: 16 lane sums (lane `j` takes the elements `j mod 16`), then a
/// pairwise tree. A single running sum would be one long chain of dependent adds, which made
/// the head's two dot products cost a third of the kernel's time; this vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const V: usize = 16;
    let mut lanes = [0.0_f32; V];
    let (a_v, a_tail) = a.as_chunks::<V>();
    let (b_v, b_tail) = b.as_chunks::<V>();
    for (a, b) in a_v.iter().zip(b_v) {
        for j in 0..V {
            lanes[j] += a[j] * b[j];
        }
    }
    for (j, (a, b)) in a_tail.iter().zip(b_tail).enumerate() {
        lanes[j] += a * b;
    }
    let mut width = V;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
    }
    lanes[0]
}

/// `e^x` for any `x`, clamped to [-87, 88] first (no overflow, no subnormals).
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    exp_in_range::<FMA>(x.clamp(-87.0, 88.0))
}

/// `e^x` for `x` in [-87, 88] (callers clamp; outside, the result is garbage), relative error
/// < 3e-7.
///
/// `x = n ln2 + r` with `|r| <= ln2 / 2` (ln 2 split in two so `n * LN2_HI` is exact), the
/// degree-6 Taylor polynomial for `e^r` (truncation error `r^7 / 7! < 1.2e-7`), and `2^n`
/// built in the exponent bits. Branch-free and 11 floating-point operations with FMA, so the
/// loops over it vectorise and stay short.
#[inline(always)]
fn exp_in_range<const FMA: bool>(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let shifted = madd::<FMA>(x, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = madd::<FMA>(n, 2.121_944_4e-4, madd::<FMA>(n, -0.693_359_4, x));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd::<FMA>(p, r, c);
    }
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits((n_bits.wrapping_add(127) << 23) as u32)
}

#[inline(always)]
fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-x))
}

/// `a * b + c`: one fused, exactly rounded FMA on the FMA variants; a multiply then an add on
/// the portable one, where `mul_add` without hardware FMA would be a slow library call. Either
/// way every row computes it the same.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

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

fn unsupported(what: impl Into<String>) -> ModelError {
    ModelError::UnsupportedGraph(what.into())
}

fn expect_op(node: &NodeProto, op: &str) -> Result<(), ModelError> {
    if node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx") {
        Ok(())
    } else {
        Err(unsupported(format!(
            "{} {:?} where {op} was expected",
            node.op_type, node.name
        )))
    }
}

/// The name of `node`'s input `ix` (which must be present and non-empty).
fn input(node: &NodeProto, ix: usize) -> Result<&str, ModelError> {
    node.input
        .get(ix)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| unsupported(format!("{} {:?} lacks input {ix}", node.op_type, node.name)))
}

fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

/// The graph's nodes by output name and its constants by name.
struct Graph<'a> {
    producers: HashMap<&'a str, (&'a NodeProto, usize)>,
    consts: HashMap<&'a str, &'a TensorProto>,
}

impl<'a> Graph<'a> {
    fn new(nodes: &'a [NodeProto], initializers: &'a [TensorProto]) -> Graph<'a> {
        let mut producers = HashMap::new();
        let mut consts: HashMap<&str, &TensorProto> =
            initializers.iter().map(|t| (t.name.as_str(), t)).collect();
        for node in nodes {
            for (port, out) in node.output.iter().enumerate() {
                producers.insert(out.as_str(), (node, port));
            }
            if node.op_type == "Constant"
                && let (Some(out), Some(t)) = (
                    node.output.first(),
                    node.attribute
                        .iter()
                        .find(|a| a.name == "value")
                        .and_then(|a| a.t.as_ref()),
                )
            {
                consts.insert(out.as_str(), t);
            }
        }
        Graph { producers, consts }
    }

    fn producer_port(&self, name: &str) -> Result<(&'a NodeProto, usize), ModelError> {
        self.producers
            .get(name)
            .copied()
            .ok_or_else(|| unsupported(format!("no node produces {name:?}")))
    }

    fn producer(&self, name: &str) -> Result<&'a NodeProto, ModelError> {
        self.producer_port(name).map(|(node, _)| node)
    }

    fn tensor(&self, name: &str, data_type: i32) -> Result<&'a TensorProto, ModelError> {
        let t = self
            .consts
            .get(name)
            .copied()
            .ok_or_else(|| unsupported(format!("{name:?} is not a constant")))?;
        if t.data_type != data_type {
            return Err(unsupported(format!(
                "constant {name:?} has ONNX data type {}, expected {data_type}",
                t.data_type
            )));
        }
        if t.data_location == Some(1) || !t.external_data.is_empty() {
            return Err(unsupported(format!(
                "constant {name:?} is stored externally"
            )));
        }
        Ok(t)
    }

    fn dims(name: &str, t: &TensorProto) -> Result<(Vec<usize>, usize), ModelError> {
        let dims = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unsupported(format!("constant {name:?} has dims {:?}", t.dims)))?;
        let len = dims.iter().product();
        Ok((dims, len))
    }

    /// A float constant's dims and values (row-major).
    fn const_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self.tensor(name, ONNX_FLOAT)?;
        let (dims, len) = Graph::dims(name, t)?;
        let values: Vec<f32> = if t.raw_data.is_empty() {
            t.float_data.clone()
        } else {
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        if values.len() != len {
            return Err(unsupported(format!(
                "constant {name:?} holds {} values for dims {dims:?}",
                values.len()
            )));
        }
        Ok((dims, values))
    }

    /// An int64 constant's values (any shape, flattened).
    fn const_i64(&self, name: &str) -> Result<Vec<i64>, ModelError> {
        let t = self.tensor(name, ONNX_INT64)?;
        let (_, len) = Graph::dims(name, t)?;
        let values: Vec<i64> = if t.raw_data.is_empty() {
            t.int64_data.clone()
        } else {
            t.raw_data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect()
        };
        if values.len() != len {
            return Err(unsupported(format!(
                "constant {name:?} holds {} values for {len} elements",
                values.len()
            )));
        }
        Ok(values)
    }

    /// `Gather(data, scalar index, axis = 2 or -1)` on the head's `[batch, T, K]` output:
    /// the data's name and the column.
    fn last_axis_gather(&self, node: &'a NodeProto) -> Result<(&'a str, usize), ModelError> {
        expect_op(node, "Gather")?;
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let index_name = input(node, 1)?;
        let index = self.tensor(index_name, ONNX_INT64)?;
        let column = match (
            axis,
            index.dims.is_empty(),
            &self.const_i64(index_name)?[..],
        ) {
            (2 | -1, true, &[c]) => usize::try_from(c).ok(),
            _ => None,
        }
        .ok_or_else(|| {
            unsupported(format!(
                "Gather {:?} is not a scalar, non-negative index on the last axis",
                node.name
            ))
        })?;
        Ok((input(node, 0)?, column))
    }

    /// `node` must be `Transpose(perm = [1, 0, 2])`, swapping batch and time.
    fn expect_time_batch_swap(&self, node: &NodeProto) -> Result<(), ModelError> {
        expect_op(node, "Transpose")?;
        if attr_ints(node, "perm").as_deref() != Some(&[1, 0, 2]) {
            return Err(unsupported(format!(
                "Transpose {:?} with perm {:?}, expected [1, 0, 2]",
                node.name,
                attr_ints(node, "perm")
            )));
        }
        Ok(())
    }

    /// Checks the LSTM node of layer `l` and extracts its weights laid out for `lanes`.
    fn lstm_layer(
        &self,
        node: &NodeProto,
        l: usize,
        inputs: usize,
        hidden: usize,
        stateful: bool,
        lanes: usize,
    ) -> Result<Layer, ModelError> {
        let what = |msg: String| unsupported(format!("LSTM {:?} (layer {l}): {msg}", node.name));
        for a in &node.attribute {
            let ok = match a.name.as_str() {
                "hidden_size" => usize::try_from(a.i) == Ok(hidden),
                "direction" => a.s == b"forward",
                "layout" | "input_forget" => a.i == 0,
                "activations" => a.strings == [&b"Sigmoid"[..], b"Tanh", b"Tanh"],
                _ => false,
            };
            if !ok {
                return Err(what(format!(
                    "attribute {:?} unsupported or not the default (hidden {hidden}, forward, \
                     layout 0, no clip, no input_forget, Sigmoid/Tanh/Tanh)",
                    a.name
                )));
            }
        }
        let optional = |ix: usize| node.input.get(ix).filter(|n| !n.is_empty());
        if optional(4).is_some() || optional(7).is_some() {
            return Err(what(
                "sequence_lens and peepholes (P) are not supported".into(),
            ));
        }
        let gates = 4 * hidden;
        let (w_dims, w) = self.const_f32(input(node, 1)?)?;
        let (r_dims, r) = self.const_f32(input(node, 2)?)?;
        if w_dims != [1, gates, inputs] || r_dims != [1, gates, hidden] {
            return Err(what(format!(
                "W {w_dims:?} and R {r_dims:?}, expected [1, {gates}, {inputs}] and \
                 [1, {gates}, {hidden}]"
            )));
        }
        let b = match optional(3) {
            Some(name) => {
                let (dims, b) = self.const_f32(name)?;
                if dims != [1, 2 * gates] {
                    return Err(what(format!("B {dims:?}, expected [1, {}]", 2 * gates)));
                }
                b
            }
            None => vec![0.0; 2 * gates],
        };
        match (stateful, optional(5), optional(6)) {
            (false, None, None) => {}
            (true, Some(h0), Some(c0)) => {
                self.expect_state_slice(h0, H_0, l)?;
                self.expect_state_slice(c0, C_0, l)?;
            }
            _ => {
                return Err(what(if stateful {
                    "a stateful model must start each layer from its slice of h_0 and c_0".into()
                } else {
                    "a stateless model must start each layer from zero state".into()
                }));
            }
        }

        let width = inputs + hidden;
        let chunks = gates.div_ceil(lanes);
        let mut weights = vec![0.0; chunks * width * lanes];
        for g in 0..gates {
            let (chunk, j) = (g / lanes, g % lanes);
            for k in 0..width {
                weights[(chunk * width + k) * lanes + j] = if k < inputs {
                    w[g * inputs + k]
                } else {
                    r[g * hidden + k - inputs]
                };
            }
        }
        let mut bias = vec![0.0; chunks * lanes];
        for (g, bias) in bias.iter_mut().take(gates).enumerate() {
            *bias = b[g] + b[gates + g];
        }
        Ok(Layer {
            inputs,
            weights,
            bias,
        })
    }

    /// `name` must be `Slice(state, [l], [l + 1], axes [0], steps [1])` of the graph input `state`.
    fn expect_state_slice(&self, name: &str, state: &str, l: usize) -> Result<(), ModelError> {
        let node = self.producer(name)?;
        expect_op(node, "Slice")?;
        let l = l as i64;
        let consts = |ix: usize| -> Result<Option<Vec<i64>>, ModelError> {
            match node.input.get(ix).filter(|n| !n.is_empty()) {
                Some(n) => self.const_i64(n).map(Some),
                None => Ok(None),
            }
        };
        let ok = input(node, 0)? == state
            && !self.producers.contains_key(state)
            && !self.consts.contains_key(state)
            && node.attribute.is_empty()
            && consts(1)?.as_deref() == Some(&[l])
            && consts(2)?.as_deref() == Some(&[l + 1])
            && matches!(consts(3)?.as_deref(), None | Some(&[0]))
            && matches!(consts(4)?.as_deref(), None | Some(&[1]));
        if ok {
            Ok(())
        } else {
            Err(unsupported(format!(
                "Slice {:?} is not {state}[{l}..{}] on axis 0",
                node.name,
                l + 1
            )))
        }
    }

    /// `output` must be the LSTMs' output `port` (1: Y_h, 2: Y_c) concatenated in layer order
    /// on axis 0 (or, for one layer, that output itself).
    fn expect_layer_concat(
        &self,
        output: &str,
        lstms: &[&NodeProto],
        port: usize,
    ) -> Result<(), ModelError> {
        let is_layer_output = |name: &str, l: usize| {
            self.producer_port(name)
                .is_ok_and(|(node, p)| std::ptr::eq(node, lstms[l]) && p == port)
        };
        if lstms.len() == 1 && is_layer_output(output, 0) {
            return Ok(());
        }
        let node = self.producer(output)?;
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map(|a| a.i);
        let ok = node.op_type == "Concat"
            && axis == Some(0)
            && node.input.len() == lstms.len()
            && node
                .input
                .iter()
                .enumerate()
                .all(|(l, name)| is_layer_output(name, l));
        if ok {
            Ok(())
        } else {
            Err(unsupported(format!(
                "{output} is not the layers' final states concatenated in layer order"
            )))
        }
    }
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
    use super::*;
    use tract_onnx::prelude::Framework;

    #[test]
    fn the_load_time_probe_refuses_results_that_differ_from_tract() {
        // The native engine runs the demo; the "reference" is the demo with a shifted velocity
        // bias, standing in for a graph whose meaning the extraction got wrong.
        let native = Model::demo_with(&crate::Engine::Native).unwrap();
        let onnx: &[u8] = include_bytes!("../../../models/demo_lstm.onnx");
        let sidecar: &[u8] = include_bytes!("../../../models/demo_lstm.json");
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
        let onnx: &[u8] = include_bytes!("../../../models/demo_lstm.onnx");
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
