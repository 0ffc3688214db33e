//! The ONNX Runtime engine ([`Engine::OnnxRuntime`](crate::Engine::OnnxRuntime)): one ONNX
//! Runtime session per model, fed by the same gather/scatter as tract, so batching, state
//! carry-over and errors are identical and only the kernels differ.
//!
//! ONNX Runtime is a C++ library loaded at run time (`ort`'s `load-dynamic`): the build stays
//! pure Rust and downloads nothing, and the library comes from wherever the deployment has one
//! (the `onnxruntime` PyPI wheel ships `libonnxruntime.so.1.x`). The library and ONNX
//! Runtime's environment are process-wide: loaded by the first model that asks, and kept until
//! the process exits (ONNX Runtime cannot be unloaded safely once sessions existed).
//!
//! Unlike tract there is no per-shape plan: one session runs every `(batch, T)`, so calls run
//! the exact batch rather than a padded bucket.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::TensorRef;

use crate::batch::Call;
use crate::model::{self, C_0, C_N, FEATURES, H_0, H_N, MOVEMENT, SequenceMut, VELOCITY};
use crate::{ModelError, StateSpec};

/// The loaded ONNX Runtime library (canonical path) and the environment sessions are made in.
static RUNTIME: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// A model's ONNX Runtime session with the buffers its calls reuse.
///
/// `ort`'s `Session::run` takes `&mut self`, while [`crate::Model::run`] takes `&self` and
/// `Model` must be `Sync`. A `Mutex` around one session (rather than a session per thread or a
/// pool) is the choice because: the pipeline calls a model from one thread per shard, so the
/// lock is uncontended in practice; each extra session would hold another copy of the weights
/// and, with `intra_threads > 1`, another thread pool competing for the same cores; and the
/// lock also guards the reusable input buffers, which makes calls allocation-free on our side.
/// A caller wanting parallel inference on one model can load it once per thread.
pub(crate) struct OrtEngine {
    inner: Mutex<Inner>,
    state: Option<StateSpec>,
}

struct Inner {
    session: Session,
    /// Input buffers, `[batch, T, F]` and `[stacks, batch, hidden]`, grown to the largest call
    /// seen and reused; ONNX Runtime reads them in place (no copy into its own tensors).
    features: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
}

impl OrtEngine {
    /// Loads the library at `library` if no ONNX Runtime is loaded yet, then creates a session
    /// for `onnx` with `intra_threads` intra-op threads (0: ONNX Runtime's default).
    ///
    /// The graph's contract (input and output names, declared shapes) has already been
    /// checked on tract's parse; here only the session's own view of the names is confirmed.
    pub(crate) fn new(
        onnx: &[u8],
        library: &Path,
        intra_threads: usize,
        state: Option<StateSpec>,
    ) -> Result<OrtEngine, ModelError> {
        let env = environment(library)?;
        let session_error = |e: ort::Error<_>| ModelError::RuntimeSession(e.to_string());
        let session = Session::builder(&env)
            .map_err(|e| ModelError::RuntimeSession(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(session_error)?
            .with_intra_threads(intra_threads)
            .map_err(session_error)?
            // Idle intra-op workers would otherwise spin between calls, burning cores that the
            // rest of the pipeline (decode, windows, sinks) needs.
            .with_intra_op_spinning(false)
            .map_err(session_error)?
            .commit_from_memory(onnx)
            .map_err(|e| ModelError::RuntimeSession(e.to_string()))?;

        let has_input = |name: &str| session.inputs().iter().any(|i| i.name() == name);
        let has_output = |name: &str| session.outputs().iter().any(|o| o.name() == name);
        let mut required_inputs = vec![FEATURES];
        let mut required_outputs = vec![VELOCITY, MOVEMENT];
        if state.is_some() {
            required_inputs.extend([H_0, C_0]);
            required_outputs.extend([H_N, C_N]);
        }
        if let Some(missing) = required_inputs.into_iter().find(|n| !has_input(n)) {
            return Err(ModelError::MissingInput(missing));
        }
        if let Some(missing) = required_outputs.into_iter().find(|n| !has_output(n)) {
            return Err(ModelError::MissingOutput(missing));
        }
        if let Some(extra) = session.inputs().iter().find(|i| {
            ![FEATURES, H_0, C_0].contains(&i.name()) || (state.is_none() && i.name() != FEATURES)
        }) {
            return Err(ModelError::UnexpectedInput(extra.name().to_string()));
        }
        Ok(OrtEngine {
            inner: Mutex::new(Inner {
                session,
                features: Vec::new(),
                h: Vec::new(),
                c: Vec::new(),
            }),
            state,
        })
    }

    /// Runs one zero sample (batch 1, T 1) and checks every output's exact shape, so a graph
    /// ONNX Runtime accepts but runs with the wrong output shapes fails at load.
    pub(crate) fn probe(&self, n_features: usize) -> Result<(), ModelError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner {
            session,
            features,
            h,
            c,
        } = &mut *inner;
        features.clear();
        features.resize(n_features, 0.0);
        let state_len = self.state.map_or(0, |s| s.len());
        h.clear();
        h.resize(state_len, 0.0);
        c.clear();
        c.resize(state_len, 0.0);
        let outputs = run_session(session, self.state, 1, 1, n_features, features, h, c)?;
        output(&outputs, VELOCITY, &[1, 1])?;
        output(&outputs, MOVEMENT, &[1, 1])?;
        if let Some(spec) = self.state {
            output(&outputs, H_N, &[spec.stacks(), 1, spec.hidden])?;
            output(&outputs, C_N, &[spec.stacks(), 1, spec.hidden])?;
        }
        Ok(())
    }

    /// Runs one batched call: gathers the members (exact batch, no padding), runs the session,
    /// scatters outputs and final states back. Sequence buffers were checked by the caller.
    pub(crate) fn run_call(
        &self,
        call: &Call,
        seqs: &mut [SequenceMut<'_>],
        n_features: usize,
    ) -> Result<(), ModelError> {
        let (b, t) = (call.members.len(), call.steps);
        // A poisoned lock only means another thread panicked mid-call; the session is still
        // usable and the buffers are rewritten by every call.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner {
            session,
            features,
            h,
            c,
        } = &mut *inner;
        model::gather(call, b, seqs, n_features, self.state, features, h, c);
        let outputs = run_session(session, self.state, b, t, n_features, features, h, c)?;
        let velocity = output(&outputs, VELOCITY, &[b, t])?;
        let movement = output(&outputs, MOVEMENT, &[b, t])?;
        let state_out = match self.state {
            Some(spec) => {
                let shape = [spec.stacks(), b, spec.hidden];
                Some((
                    spec,
                    output(&outputs, H_N, &shape)?,
                    output(&outputs, C_N, &shape)?,
                ))
            }
            None => None,
        };
        model::scatter(call, b, seqs, velocity, movement, state_out);
        Ok(())
    }
}

/// The process-wide ONNX Runtime environment, loading `library` on first use.
///
/// `ort` keeps the first library it loads for the life of the process and silently ignores
/// later paths; asking for a different one is reported instead of running on a library the
/// caller did not choose.
fn environment(library: &Path) -> Result<Environment, ModelError> {
    let load_error = |reason: String| ModelError::RuntimeLibrary {
        path: library.to_path_buf(),
        reason,
    };
    // `ort` resolves relative paths against the executable's directory; resolve them against
    // the working directory instead, as every other path in the configuration is.
    let absolute = std::path::absolute(library).map_err(|e| load_error(e.to_string()))?;
    let canonical = std::fs::canonicalize(&absolute).map_err(|e| load_error(e.to_string()))?;
    let mut runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = runtime.as_ref() {
        if *loaded != canonical {
            return Err(ModelError::RuntimeLibraryConflict {
                loaded: loaded.clone(),
                requested: canonical,
            });
        }
        return Ok(env.clone());
    }
    let env = ort::init_from(&canonical)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("sensorflow")
        .with_telemetry(false)
        .build()
        .map_err(|e| ModelError::RuntimeSession(e.to_string()))?;
    tracing::info!(library = %canonical.display(), "ONNX Runtime loaded");
    *runtime = Some((canonical, env.clone()));
    Ok(env)
}

/// Runs `session` on the input buffers (already laid out for batch `b`, `t` timesteps).
#[allow(clippy::too_many_arguments)] // The split borrows of `Inner` are passed one by one.
fn run_session<'s>(
    session: &'s mut Session,
    state: Option<StateSpec>,
    b: usize,
    t: usize,
    n_features: usize,
    features: &[f32],
    h: &[f32],
    c: &[f32],
) -> Result<SessionOutputs<'s>, ModelError> {
    let tensor = |shape: [usize; 3], data| {
        TensorRef::from_array_view((shape, data))
            .map(SessionInputValue::from)
            .map_err(ModelError::inference)
    };
    // Inputs by name: the session's input order is the graph's, not necessarily the contract's.
    let mut inputs = Vec::with_capacity(3);
    inputs.push((FEATURES, tensor([b, t, n_features], features)?));
    if let Some(spec) = state {
        let shape = [spec.stacks(), b, spec.hidden];
        inputs.push((H_0, tensor(shape, h)?));
        inputs.push((C_0, tensor(shape, c)?));
    }
    session.run(inputs).map_err(ModelError::inference)
}

/// Output `name` as a flat f32 slice, checked to have exactly `shape`.
fn output<'a>(
    outputs: &'a SessionOutputs<'_>,
    name: &'static str,
    shape: &[usize],
) -> Result<&'a [f32], ModelError> {
    let value = outputs.get(name).ok_or(ModelError::MissingOutput(name))?;
    let (found, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| ModelError::TensorShape {
            tensor: name,
            expected: format!("f32 {shape:?}"),
            found: e.to_string(),
        })?;
    let same = found.len() == shape.len()
        && found
            .iter()
            .zip(shape)
            .all(|(&d, &want)| usize::try_from(d) == Ok(want));
    if !same {
        return Err(ModelError::TensorShape {
            tensor: name,
            expected: format!("f32 {shape:?}"),
            found: format!("{:?}", &found[..]),
        });
    }
    Ok(data)
}
