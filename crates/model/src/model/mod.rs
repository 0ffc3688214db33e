//! Loading an ONNX model, checking it against the model contract, and running many keys'
//! sequences in few batched calls with their recurrent state carried.
//!
//! The contract is always checked on tract's parse of the graph, whatever the [`Engine`]; the
//! engine then only executes calls. With tract the parsed graph is kept with symbolic `batch`
//! and `T`; each `(batch bucket, T)` shape a caller needs gets its own plan, typed and
//! optimised for exactly that shape (tract is several times faster on a fixed shape), compiled
//! on first use and cached. ONNX Runtime (`crate::onnxruntime`) takes any shape in one session.
//! Gathering sequences into batch tensors and scattering results back is shared by tract and
//! ONNX Runtime ([`gather`], [`scatter`]), so batching behaves identically. The native engine
//! (`crate::native`) gets the same planned calls but reads and writes the sequences directly;
//! it is checked at load against a tract instance of the same graph, which is then dropped.
//!
//! Here: [`Model`], its loading and batched runs. [`contract`] holds the contract's names and
//! checks the parsed graph against them; [`tract`] runs calls on tract's cached plans.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModel;

use crate::batch::{self, Call};
use crate::{Engine, ModelError, Sidecar, StateSpec};

mod contract;
mod tract;

pub(crate) use contract::{C_0, C_N, FEATURES, H_0, H_N, MOVEMENT, VELOCITY};
use contract::{Io, check_declared_input, find_io};
use tract::{PlanCache, tensor};

static DEMO_ONNX: &[u8] = include_bytes!("../../../../models/demo_lstm.onnx");
static DEMO_SIDECAR: &[u8] = include_bytes!("../../../../models/demo_lstm.json");

/// One key's sequence for [`Model::run`]: scaled features in, predictions out, recurrent state
/// read and written in place.
#[derive(Debug)]
pub struct SequenceMut<'a> {
    /// `T * n_features` values, row-major (`[t][feature]`), already standard-scaled with the
    /// sidecar's scaler.
    pub features: &'a [f32],
    /// Hidden state, `state_len` values laid out `[layers * directions, hidden]`: read as the
    /// initial state, overwritten with the state after the last timestep. Empty for a
    /// stateless model.
    pub h: &'a mut [f32],
    /// Cell state, same layout and contract as `h`.
    pub c: &'a mut [f32],
    /// `T` outputs: predicted velocity per timestep. Its length defines `T`.
    pub velocity: &'a mut [f32],
    /// `T` outputs: movement probability per timestep.
    pub movement_prob: &'a mut [f32],
}

impl<'a> SequenceMut<'a> {
    /// One sequence per index over parallel per-sequence buffers (all slices the same length;
    /// the shortest bounds the result): how callers that keep each sequence's buffers in
    /// separate `Vec`s build the argument of [`Model::run`].
    pub fn zip_all(
        features: &'a [Vec<f32>],
        h: &'a mut [Vec<f32>],
        c: &'a mut [Vec<f32>],
        velocity: &'a mut [Vec<f32>],
        movement_prob: &'a mut [Vec<f32>],
    ) -> Vec<SequenceMut<'a>> {
        features
            .iter()
            .zip(h.iter_mut().zip(c.iter_mut()))
            .zip(velocity.iter_mut().zip(movement_prob.iter_mut()))
            .map(
                |((features, (h, c)), (velocity, movement_prob))| SequenceMut {
                    features,
                    h,
                    c,
                    velocity,
                    movement_prob,
                },
            )
            .collect()
    }
}

/// A loaded model with its sidecar, ready to run.
///
/// `Model` is `Send + Sync`: [`Model::run`] takes `&self`, so one model can be shared by
/// several pipeline threads. With tract they only serialise briefly on the plan cache; with
/// ONNX Runtime calls of one model run one at a time (see `crate::onnxruntime` for why).
pub struct Model {
    sidecar: Sidecar,
    /// `model_version` of every prediction (see [`Model::version`]).
    version: Arc<str>,
    io: Io,
    n_features: usize,
    state: Option<StateSpec>,
    backend: Backend,
}

/// See [`Model::version`].
fn version_of(sidecar: &Sidecar, onnx: &[u8]) -> Arc<str> {
    match &sidecar.version {
        Some(v) => Arc::from(v.as_str()),
        None => {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(onnx);
            let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
            Arc::from(hex)
        }
    }
}

/// The engine-specific half of a [`Model`].
enum Backend {
    Tract {
        /// The parsed graph with symbolic `batch` and `T`, specialised per shape into `plans`.
        graph: InferenceModel,
        plans: Mutex<PlanCache>,
    },
    /// The fused LSTM kernel (`crate::native`), weights extracted from the graph at load.
    Native(crate::native::NativeEngine),
    #[cfg(feature = "onnxruntime")]
    OnnxRuntime(crate::onnxruntime::OrtEngine),
}

impl Backend {
    fn tract(graph: InferenceModel) -> Backend {
        Backend::Tract {
            graph,
            plans: Mutex::new(PlanCache::default()),
        }
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("engine", &self.engine_name())
            .field("sidecar", &self.sidecar)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads `onnx_path` and its sidecar, the same path with the extension `.json`, on tract.
    pub fn load(onnx_path: &Path) -> Result<Model, ModelError> {
        Model::load_with(onnx_path, &Engine::Tract)
    }

    /// Loads `onnx_path` and its sidecar (the same path with the extension `.json`) to run on
    /// `engine`. Contract checks and errors are those of [`Model::from_bytes_with`].
    pub fn load_with(onnx_path: &Path, engine: &Engine) -> Result<Model, ModelError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ModelError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let onnx = read(onnx_path)?;
        let sidecar = read(&onnx_path.with_extension("json"))?;
        let model = Model::from_bytes_with(&onnx, &sidecar, engine)?;
        tracing::info!(
            path = %onnx_path.display(),
            engine = engine.name(),
            state = ?model.state,
            "model loaded"
        );
        Ok(model)
    }

    /// Loads a model from the bytes of its ONNX file and of its JSON sidecar, on tract.
    ///
    /// Validates the sidecar, checks the graph's inputs and outputs against the contract and
    /// the sidecar (names, element type, the feature and state dimensions it declares), then
    /// compiles and runs a one-sample plan to prove the graph executes and yields the
    /// contract's output shapes.
    pub fn from_bytes(onnx: &[u8], sidecar_json: &[u8]) -> Result<Model, ModelError> {
        Model::from_bytes_with(onnx, sidecar_json, &Engine::Tract)
    }

    /// Loads a model from the bytes of its ONNX file and JSON sidecar to run on `engine`.
    ///
    /// The sidecar and the graph's declared inputs and outputs are checked as in
    /// [`Model::from_bytes`] (on tract's parse of the graph, for every engine); then the engine
    /// is set up and runs one zero sample to prove the graph executes and yields the contract's
    /// output shapes. For [`Engine::OnnxRuntime`] the library is loaded on first use
    /// ([`ModelError::RuntimeLibrary`], [`ModelError::RuntimeLibraryConflict`]) and a session
    /// is created ([`ModelError::RuntimeSession`]); without the crate feature `onnxruntime`
    /// that engine fails with [`ModelError::EngineNotBuilt`].
    pub fn from_bytes_with(
        onnx: &[u8],
        sidecar_json: &[u8],
        engine: &Engine,
    ) -> Result<Model, ModelError> {
        let sidecar = Sidecar::from_json(sidecar_json)?;
        let version = version_of(&sidecar, onnx);
        let graph = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(ModelError::onnx)?;
        let io = find_io(&graph)?;
        let state = match (io.state_in, sidecar.state) {
            (Some(_), Some(spec)) => Some(spec),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ModelError::StateMismatch {
                    model: "takes h_0",
                    sidecar: "has no state",
                });
            }
            (None, Some(_)) => {
                return Err(ModelError::StateMismatch {
                    model: "takes no h_0",
                    sidecar: "declares a state",
                });
            }
        };
        let n_features = sidecar.feature_cols.len();
        check_declared_input(
            &graph,
            io.features,
            FEATURES,
            &[None, None, Some(n_features)],
        )?;
        if let (Some((h, c)), Some(s)) = (io.state_in, state) {
            let dims = [Some(s.stacks()), None, Some(s.hidden)];
            check_declared_input(&graph, h, H_0, &dims)?;
            check_declared_input(&graph, c, C_0, &dims)?;
        }
        // The native engine is checked against tract running the same graph.
        let mut reference = None;
        let backend = match engine {
            Engine::Tract => Backend::tract(graph),
            Engine::Native => {
                let proto = tract_onnx::onnx()
                    .proto_model_for_read(&mut &onnx[..])
                    .map_err(ModelError::onnx)?;
                let native = crate::native::NativeEngine::from_proto(&proto, n_features, state)?;
                let tract = Model {
                    sidecar: sidecar.clone(),
                    version: version.clone(),
                    io,
                    n_features,
                    state,
                    backend: Backend::tract(graph),
                };
                tract.probe()?;
                reference = Some(tract);
                Backend::Native(native)
            }
            #[cfg(feature = "onnxruntime")]
            Engine::OnnxRuntime {
                library,
                intra_threads,
            } => Backend::OnnxRuntime(crate::onnxruntime::OrtEngine::new(
                onnx,
                library,
                *intra_threads,
                state,
            )?),
            #[cfg(not(feature = "onnxruntime"))]
            Engine::OnnxRuntime { .. } => return Err(ModelError::EngineNotBuilt("onnxruntime")),
        };
        let model = Model {
            sidecar,
            version,
            io,
            n_features,
            state,
            backend,
        };
        match &model.backend {
            Backend::Tract { .. } => model.probe()?,
            Backend::Native(_) => {
                let Some(tract) = &reference else {
                    return Err(ModelError::Inference(
                        "internal: native model loaded without its tract reference".into(),
                    ));
                };
                crate::native::cross_check(&model, tract)?;
            }
            #[cfg(feature = "onnxruntime")]
            Backend::OnnxRuntime(ort) => ort.probe(n_features)?,
        }
        Ok(model)
    }

    /// The bundled demo model (`models/demo_lstm.onnx` and its sidecar, compiled into the
    /// binary): a 2-layer LSTM over scaled `accl_mag`/`gyro_mag`, trained by
    /// `scripts/train_demo_model.py` on the simulator's synthetic motion.
    pub fn demo() -> Result<Model, ModelError> {
        Model::from_bytes(DEMO_ONNX, DEMO_SIDECAR)
    }

    /// The bundled demo model (see [`Model::demo`]) running on `engine`.
    pub fn demo_with(engine: &Engine) -> Result<Model, ModelError> {
        Model::from_bytes_with(DEMO_ONNX, DEMO_SIDECAR, engine)
    }

    /// The name of the engine running this model: `"tract"`, `"native"` or `"onnxruntime"`.
    pub fn engine_name(&self) -> &'static str {
        match self.backend {
            Backend::Tract { .. } => "tract",
            Backend::Native(_) => "native",
            #[cfg(feature = "onnxruntime")]
            Backend::OnnxRuntime(_) => "onnxruntime",
        }
    }

    /// The model's version, stamped on every sample row as `model_version`: the sidecar's
    /// `version` if it has one, else the first 12 hex digits of the ONNX file's SHA-256.
    pub fn version(&self) -> &Arc<str> {
        &self.version
    }

    /// The model's sidecar (feature columns, scaler, state spec, movement threshold).
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Features per timestep (`F`, the length of `feature_cols`).
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Floats per key for `h` (and the same for `c`): `layers * directions * hidden`; 0 for a
    /// stateless model.
    pub fn state_len(&self) -> usize {
        self.state.map_or(0, |s| s.len())
    }

    /// Runs independent sequences (typically one per sensor) in as few model calls as possible.
    ///
    /// Sequences of equal length share a call (at most [`MAX_BATCH`](crate::MAX_BATCH) each); on
    /// tract the batch dimension is padded up to a bucket size so only a few plans are ever
    /// compiled (ONNX Runtime runs the exact batch: it needs no per-shape plan).
    /// Each sequence's `h`/`c` are its initial state and are overwritten with its final
    /// state, so consecutive calls continue the recurrence. Results equal running each
    /// sequence alone, up to float rounding of differently-shaped kernels (<= 1e-5 in tests).
    ///
    /// Every sequence's buffer lengths are checked before anything runs; if the engine fails
    /// part-way, sequences of earlier calls have already been updated.
    pub fn run(&self, seqs: &mut [SequenceMut<'_>]) -> Result<(), ModelError> {
        let state_len = self.state_len();
        let mut steps = Vec::with_capacity(seqs.len());
        for (index, s) in seqs.iter().enumerate() {
            let t = s.velocity.len();
            let check = |buffer, expected: usize, found: usize| {
                if expected == found {
                    Ok(())
                } else {
                    Err(ModelError::SequenceShape {
                        index,
                        buffer,
                        expected,
                        found,
                    })
                }
            };
            check("features", t * self.n_features, s.features.len())?;
            check("movement_prob", t, s.movement_prob.len())?;
            check("h", state_len, s.h.len())?;
            check("c", state_len, s.c.len())?;
            steps.push(t);
        }
        let max_batch = match &self.backend {
            Backend::Tract { .. } | Backend::Native(_) => batch::MAX_BATCH,
            #[cfg(feature = "onnxruntime")]
            Backend::OnnxRuntime(_) => batch::ORT_MAX_BATCH,
        };
        for call in batch::plan_calls(&steps, max_batch) {
            match &self.backend {
                Backend::Tract { .. } => self.run_tract_call(&call, seqs)?,
                Backend::Native(native) => native.run_call(&call, seqs),
                #[cfg(feature = "onnxruntime")]
                Backend::OnnxRuntime(ort) => ort.run_call(&call, seqs, self.n_features)?,
            }
        }
        Ok(())
    }

    /// Runs one zero sample through a batch-1 plan and checks every output's shape, so a model
    /// that parses but cannot run, or runs with the wrong output shapes, fails at load.
    fn probe(&self) -> Result<(), ModelError> {
        let plan = self.plan(1, 1)?;
        let mut inputs: Vec<Option<TValue>> = vec![None; self.io.n_inputs];
        inputs[self.io.features] = Some(tensor(
            &[1, 1, self.n_features],
            &vec![0.0; self.n_features],
        )?);
        let mut expected = vec![
            (self.io.velocity, VELOCITY, vec![1, 1]),
            (self.io.movement, MOVEMENT, vec![1, 1]),
        ];
        if let (Some((h, c)), Some(spec)) = (self.io.state_in, self.state) {
            let zeros = vec![0.0; spec.len()];
            inputs[h] = Some(tensor(&[spec.stacks(), 1, spec.hidden], &zeros)?);
            inputs[c] = Some(tensor(&[spec.stacks(), 1, spec.hidden], &zeros)?);
        }
        if let (Some((h, c)), Some(spec)) = (self.io.state_out, self.state) {
            expected.push((h, H_N, vec![spec.stacks(), 1, spec.hidden]));
            expected.push((c, C_N, vec![spec.stacks(), 1, spec.hidden]));
        }
        let outputs = plan
            .run(inputs.into_iter().flatten().collect())
            .map_err(ModelError::onnx)?;
        for (ix, name, shape) in expected {
            let found = outputs.get(ix).ok_or(ModelError::MissingOutput(name))?;
            if found.shape() != shape.as_slice() || found.datum_type() != f32::datum_type() {
                return Err(ModelError::TensorShape {
                    tensor: name,
                    expected: format!("f32 {shape:?} for batch 1, T 1"),
                    found: format!("{:?} {:?}", found.datum_type(), found.shape()),
                });
            }
        }
        Ok(())
    }
}

/// Copies the members of `call` into batch-major input buffers of `rows` batch rows: features
/// `[rows, T, F]` and, for a stateful model, `h`/`c` `[stacks, rows, hidden]`. Rows past the
/// members (padding, `rows > members`) are zero. The buffers are cleared and resized, so
/// callers may reuse them across calls without reallocating.
#[allow(clippy::too_many_arguments)] // Three separate out-buffers keep callers' borrows simple.
pub(crate) fn gather(
    call: &Call,
    rows: usize,
    seqs: &[SequenceMut<'_>],
    n_features: usize,
    state: Option<StateSpec>,
    features: &mut Vec<f32>,
    h: &mut Vec<f32>,
    c: &mut Vec<f32>,
) {
    let (t, f) = (call.steps, n_features);
    features.clear();
    features.resize(rows * t * f, 0.0);
    for (row, &i) in call.members.iter().enumerate() {
        features[row * t * f..(row + 1) * t * f].copy_from_slice(seqs[i].features);
    }
    h.clear();
    c.clear();
    if let Some(spec) = state {
        let (stacks, hidden) = (spec.stacks(), spec.hidden);
        h.resize(stacks * rows * hidden, 0.0);
        c.resize(stacks * rows * hidden, 0.0);
        // Per key the state is [stacks, hidden]; the model wants [stacks, batch, hidden].
        for (row, &i) in call.members.iter().enumerate() {
            for s in 0..stacks {
                let dst = (s * rows + row) * hidden..(s * rows + row + 1) * hidden;
                let src = s * hidden..(s + 1) * hidden;
                h[dst.clone()].copy_from_slice(&seqs[i].h[src.clone()]);
                c[dst].copy_from_slice(&seqs[i].c[src]);
            }
        }
    }
}

/// The inverse of [`gather`]: copies each member's rows of the outputs (`velocity`/`movement`
/// `[rows, T]`, `h_n`/`c_n` `[stacks, rows, hidden]`, lengths already checked) back into its
/// sequence. Padding rows are ignored.
pub(crate) fn scatter(
    call: &Call,
    rows: usize,
    seqs: &mut [SequenceMut<'_>],
    velocity: &[f32],
    movement: &[f32],
    state_out: Option<(StateSpec, &[f32], &[f32])>,
) {
    let t = call.steps;
    for (row, &i) in call.members.iter().enumerate() {
        seqs[i]
            .velocity
            .copy_from_slice(&velocity[row * t..(row + 1) * t]);
        seqs[i]
            .movement_prob
            .copy_from_slice(&movement[row * t..(row + 1) * t]);
    }
    if let Some((spec, h_n, c_n)) = state_out {
        let (stacks, hidden) = (spec.stacks(), spec.hidden);
        for (row, &i) in call.members.iter().enumerate() {
            for s in 0..stacks {
                let src = (s * rows + row) * hidden..(s * rows + row + 1) * hidden;
                let dst = s * hidden..(s + 1) * hidden;
                seqs[i].h[dst.clone()].copy_from_slice(&h_n[src.clone()]);
                seqs[i].c[dst].copy_from_slice(&c_n[src]);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use prost::Message;
    use tract_onnx::pb::{ModelProto, TensorProto};

    static STATELESS_ONNX: &[u8] = include_bytes!("../../tests/fixtures/stateless_lstm.onnx");
    static STATELESS_SIDECAR: &[u8] = include_bytes!("../../tests/fixtures/stateless_lstm.json");

    use crate::test_common::{Noise, Seq, run_all};

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn assert_same(a: &Seq, b: &Seq, tol: f32, what: &str) {
        for (name, x, y) in [
            ("velocity", &a.velocity, &b.velocity),
            ("movement_prob", &a.movement, &b.movement),
            ("h", &a.h, &b.h),
            ("c", &a.c, &b.c),
        ] {
            assert!(
                x.iter().all(|v| v.is_finite()),
                "{what}: {name} not fully written"
            );
            let d = max_diff(x, y);
            assert!(d <= tol, "{what}: {name} differs by {d}");
        }
    }

    #[test]
    fn demo_loads_with_the_contract_shapes() {
        let model = Model::demo().unwrap();
        assert_eq!(model.n_features(), 2);
        assert_eq!(model.sidecar().feature_cols, ["accl_mag", "gyro_mag"]);
        assert_eq!(
            model.sidecar().state,
            Some(StateSpec {
                layers: 2,
                directions: 1,
                hidden: 32
            })
        );
        assert_eq!(model.state_len(), 64);
        assert_eq!(model.sidecar().movement_threshold, 0.5);
    }

    #[cfg(not(feature = "onnxruntime"))]
    #[test]
    fn onnxruntime_engine_is_a_typed_error_when_not_compiled_in() {
        let engine = Engine::OnnxRuntime {
            library: "/any/libonnxruntime.so".into(),
            intra_threads: 1,
        };
        let err = Model::demo_with(&engine).unwrap_err();
        assert!(
            matches!(err, ModelError::EngineNotBuilt("onnxruntime")),
            "{err}"
        );
    }

    #[test]
    fn model_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Model>();
    }

    #[test]
    fn batched_run_equals_per_sequence_runs() {
        let model = Model::demo().unwrap();
        let mut noise = Noise(0x5eed_1234_abcd_0001);
        // Mixed lengths, groups that need padding (5 -> 6, 70 -> 96) and a lone sequence.
        let mut lengths = vec![64; 70];
        lengths.extend([1, 7, 7, 7, 7, 7, 100, 0]);
        let mut batched: Vec<Seq> = lengths
            .iter()
            .map(|&t| Seq::random(&model, &mut noise, t))
            .collect();
        let mut alone = batched.clone();
        run_all(&model, &mut batched);
        for (i, seq) in alone.iter_mut().enumerate() {
            run_all(&model, std::slice::from_mut(seq));
            assert_same(
                &batched[i],
                seq,
                1e-5,
                &format!("sequence {i} (T={})", lengths[i]),
            );
        }
        assert!(
            batched[0].h != Seq::random(&model, &mut Noise(1), 64).h,
            "state was updated"
        );
    }

    #[test]
    fn carried_state_makes_two_halves_equal_one_whole() {
        let model = Model::demo().unwrap();
        let mut noise = Noise(42);
        let mut whole: Vec<Seq> = (0..3)
            .map(|_| Seq::random(&model, &mut noise, 128))
            .collect();
        let mut halves: Vec<[Seq; 2]> = whole
            .iter()
            .map(|w| {
                let mut first = Seq {
                    velocity: vec![f32::NAN; 64],
                    movement: vec![f32::NAN; 64],
                    ..w.clone()
                };
                first.features.truncate(64 * 2);
                let second = Seq {
                    features: w.features[64 * 2..].to_vec(),
                    ..first.clone()
                };
                [first, second]
            })
            .collect();
        run_all(&model, &mut whole);
        for (i, [first, second]) in halves.iter_mut().enumerate() {
            let mut firsts = vec![first.clone()];
            run_all(&model, &mut firsts);
            second.h = firsts[0].h.clone();
            second.c = firsts[0].c.clone();
            run_all(&model, std::slice::from_mut(second));
            let joined = Seq {
                velocity: [firsts[0].velocity.clone(), second.velocity.clone()].concat(),
                movement: [firsts[0].movement.clone(), second.movement.clone()].concat(),
                ..second.clone()
            };
            assert_same(&whole[i], &joined, 1e-5, &format!("sequence {i}"));
        }
    }

    #[test]
    fn demo_predicts_rest_for_resting_input() {
        let model = Model::demo().unwrap();
        let sc = model.sidecar();
        // A sensor lying still: |acc| = 1 g, |gyro| ~ 0.015 rad/s of noise.
        let t = 400;
        let row = [sc.scale(0, 1.0), sc.scale(1, 0.015)];
        let mut seq = Seq {
            features: row.repeat(t),
            h: vec![0.0; 64],
            c: vec![0.0; 64],
            velocity: vec![f32::NAN; t],
            movement: vec![f32::NAN; t],
        };
        run_all(&model, std::slice::from_mut(&mut seq));
        let tail = t - 100..t;
        assert!(
            seq.velocity[tail.clone()].iter().all(|v| v.abs() < 0.2),
            "{:?}",
            &seq.velocity[tail.clone()]
        );
        assert!(
            seq.movement[tail.clone()].iter().all(|p| *p < 0.2),
            "{:?}",
            &seq.movement[tail]
        );
    }

    #[test]
    fn stateless_model_runs_like_the_stateful_one_from_zero_state() {
        // The fixture has the demo's weights with the initial state fixed at zero.
        let stateless = Model::from_bytes(STATELESS_ONNX, STATELESS_SIDECAR).unwrap();
        assert_eq!(stateless.state_len(), 0);
        let stateful = Model::demo().unwrap();
        let mut noise = Noise(7);
        let mut a: Vec<Seq> = (0..4)
            .map(|_| Seq::random(&stateless, &mut noise, 32))
            .collect();
        let mut b: Vec<Seq> = a
            .iter()
            .map(|s| Seq {
                h: vec![0.0; 64],
                c: vec![0.0; 64],
                ..s.clone()
            })
            .collect();
        run_all(&stateless, &mut a);
        run_all(&stateful, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!(max_diff(&x.velocity, &y.velocity) <= 1e-5);
            assert!(max_diff(&x.movement, &y.movement) <= 1e-5);
        }
    }

    #[test]
    fn rejects_sequences_with_wrong_buffer_lengths() {
        let model = Model::demo().unwrap();
        let mut noise = Noise(3);
        let mut ok = Seq::random(&model, &mut noise, 8);
        let mut bad = Seq::random(&model, &mut noise, 8);
        bad.features.pop();
        let mut views = vec![ok.as_mut(), bad.as_mut()];
        let err = model.run(&mut views).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::SequenceShape {
                    index: 1,
                    buffer: "features",
                    expected: 16,
                    found: 15
                }
            ),
            "{err}"
        );
        let mut short_state = Seq::random(&model, &mut noise, 8);
        short_state.c.truncate(10);
        let err = model.run(&mut [short_state.as_mut()]).unwrap_err();
        assert!(matches!(
            err,
            ModelError::SequenceShape {
                buffer: "c",
                expected: 64,
                found: 10,
                ..
            }
        ));
        assert!(
            ok.velocity.iter().all(|v| v.is_nan()),
            "nothing runs when any sequence is malformed"
        );
    }

    fn demo_proto() -> ModelProto {
        ModelProto::decode(DEMO_ONNX).unwrap()
    }

    fn load_proto(proto: &ModelProto, sidecar: &[u8]) -> Result<Model, ModelError> {
        Model::from_bytes(&proto.encode_to_vec(), sidecar)
    }

    #[test]
    fn reports_a_missing_c_0_input() {
        // Turn c_0 into a constant: the graph still runs but no longer takes c_0.
        let mut proto = demo_proto();
        let graph = proto.graph.as_mut().unwrap();
        graph.input.retain(|i| i.name != "c_0");
        graph.initializer.push(TensorProto {
            name: "c_0".into(),
            dims: vec![2, 1, 32],
            data_type: 1,
            float_data: vec![0.0; 64],
            ..Default::default()
        });
        let err = load_proto(&proto, DEMO_SIDECAR).unwrap_err();
        assert!(matches!(err, ModelError::MissingInput("c_0")), "{err}");
    }

    #[test]
    fn reports_unexpected_inputs_and_missing_outputs() {
        let mut proto = demo_proto();
        let graph = proto.graph.as_mut().unwrap();
        graph
            .input
            .iter_mut()
            .filter(|i| i.name == "h_0")
            .for_each(|i| i.name = "hidden".into());
        for node in &mut graph.node {
            node.input
                .iter_mut()
                .filter(|n| *n == "h_0")
                .for_each(|n| *n = "hidden".into());
        }
        let err = load_proto(&proto, DEMO_SIDECAR).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnexpectedInput(n) if n == "hidden"),
            "{err}"
        );

        let mut proto = demo_proto();
        proto
            .graph
            .as_mut()
            .unwrap()
            .output
            .retain(|o| o.name != "movement_prob");
        let err = load_proto(&proto, DEMO_SIDECAR).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingOutput("movement_prob")),
            "{err}"
        );

        let mut proto = demo_proto();
        proto
            .graph
            .as_mut()
            .unwrap()
            .output
            .retain(|o| o.name != "c_n");
        let err = load_proto(&proto, DEMO_SIDECAR).unwrap_err();
        assert!(matches!(err, ModelError::MissingOutput("c_n")), "{err}");
    }

    fn demo_sidecar_with(edit: impl FnOnce(&mut Sidecar)) -> Vec<u8> {
        let mut sidecar = Sidecar::from_json(DEMO_SIDECAR).unwrap();
        edit(&mut sidecar);
        serde_json::to_vec(&sidecar).unwrap()
    }

    #[test]
    fn rejects_a_sidecar_that_disagrees_with_the_graph() {
        let three_features = demo_sidecar_with(|s| {
            s.feature_cols.push("mag_mag".into());
            s.scaler.mean.insert("mag_mag".into(), 0.0);
            s.scaler.std.insert("mag_mag".into(), 1.0);
        });
        let err = Model::from_bytes(DEMO_ONNX, &three_features).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::TensorShape {
                    tensor: "sequence_features",
                    ..
                }
            ),
            "{err}"
        );

        let wrong_hidden = demo_sidecar_with(|s| {
            s.state = Some(StateSpec {
                layers: 2,
                directions: 1,
                hidden: 16,
            })
        });
        let err = Model::from_bytes(DEMO_ONNX, &wrong_hidden).unwrap_err();
        assert!(
            matches!(err, ModelError::TensorShape { tensor: "h_0", .. }),
            "{err}"
        );

        let err = Model::from_bytes(DEMO_ONNX, STATELESS_SIDECAR).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::StateMismatch {
                    model: "takes h_0",
                    ..
                }
            ),
            "{err}"
        );
        let err = Model::from_bytes(STATELESS_ONNX, DEMO_SIDECAR).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::StateMismatch {
                    model: "takes no h_0",
                    ..
                }
            ),
            "{err}"
        );

        let bad_std = demo_sidecar_with(|s| {
            s.scaler.std.insert("gyro_mag".into(), 0.0);
        });
        assert!(matches!(
            Model::from_bytes(DEMO_ONNX, &bad_std),
            Err(ModelError::BadStd { .. })
        ));
    }

    #[test]
    fn rejects_bytes_that_are_not_onnx_and_missing_files() {
        let err = Model::from_bytes(b"definitely not protobuf", DEMO_SIDECAR).unwrap_err();
        assert!(matches!(err, ModelError::Onnx(_)), "{err}");
        let err = Model::load(Path::new("/nonexistent/model.onnx")).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }), "{err}");
    }

    #[test]
    fn loads_model_and_sidecar_from_a_path() {
        let dir =
            std::env::temp_dir().join(format!("sensorflow-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.onnx"), DEMO_ONNX).unwrap();
        std::fs::write(dir.join("m.json"), DEMO_SIDECAR).unwrap();
        let loaded = Model::load(&dir.join("m.onnx"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap().sidecar(), Model::demo().unwrap().sidecar());
    }
}
