//! The fused LSTM kernel: gate sums kept in registers, a vectorised `exp`, the cell update as
//! one fraction, per kernel variant (see the parent module's docs, "Exactness" and "Kernel
//! variants").

use super::{Isa, Layer, NativeEngine};
use crate::batch::Call;
use crate::model::SequenceMut;

impl NativeEngine {
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
pub(super) fn gate_exponentials<const FMA: bool>(z: &mut [f32]) {
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
pub(super) fn cell_update<const FMA: bool>(z: &[f32], c: &mut [f32], h: &mut [f32]) {
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
pub(super) fn exp<const FMA: bool>(x: f32) -> f32 {
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
pub(super) fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-x))
}

/// `a * b + c`: one fused, exactly rounded FMA on the FMA variants; a multiply then an add on
/// the portable one, where `mul_add` without hardware FMA would be a slow library call. Either
/// way every row computes it the same.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}
