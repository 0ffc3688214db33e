//! The tract engine: one plan per `(batch bucket, T)` shape, typed and optimised for exactly that
//! shape, compiled on first use and cached (see the parent module's docs).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModel;

use super::{Backend, C_N, H_N, MOVEMENT, Model, SequenceMut, VELOCITY, gather, scatter};
use crate::ModelError;
use crate::batch::Call;

/// Compiled plans kept at once. Steady state needs a handful (one `T` per packet size, a few
/// batch buckets); the bound only stops a caller cycling through many lengths from growing
/// memory without limit.
pub(super) const MAX_PLANS: usize = 64;

pub(super) type Plan = TypedRunnableModel;

/// Compiled plans by `(batch, T)`, each with the clock of its last use (the least recently used
/// is evicted beyond [`MAX_PLANS`]).
#[derive(Default)]
pub(super) struct PlanCache {
    plans: HashMap<(usize, usize), (Arc<Plan>, u64)>,
    clock: u64,
}

impl Model {
    /// Runs one batched call on tract: gathers members into padded input tensors, runs the plan
    /// for `(call.batch, call.steps)`, scatters outputs and final states back.
    pub(super) fn run_tract_call(
        &self,
        call: &Call,
        seqs: &mut [SequenceMut<'_>],
    ) -> Result<(), ModelError> {
        let (b, t, f) = (call.batch, call.steps, self.n_features);
        let plan = self.plan(b, t)?;

        let (mut features, mut h, mut c) = (Vec::new(), Vec::new(), Vec::new());
        gather(call, b, seqs, f, self.state, &mut features, &mut h, &mut c);
        let mut inputs: Vec<Option<TValue>> = vec![None; self.io.n_inputs];
        inputs[self.io.features] = Some(tensor(&[b, t, f], &features)?);
        if let (Some((h_ix, c_ix)), Some(spec)) = (self.io.state_in, self.state) {
            let shape = [spec.stacks(), b, spec.hidden];
            inputs[h_ix] = Some(tensor(&shape, &h)?);
            inputs[c_ix] = Some(tensor(&shape, &c)?);
        }
        let inputs: TVec<TValue> = inputs.into_iter().flatten().collect();
        let outputs = plan.run(inputs).map_err(ModelError::inference)?;

        let velocity = output(&outputs, self.io.velocity, VELOCITY, b * t)?;
        let movement = output(&outputs, self.io.movement, MOVEMENT, b * t)?;
        let state_out = match (self.io.state_out, self.state) {
            (Some((hn_ix, cn_ix)), Some(spec)) => {
                let len = spec.stacks() * b * spec.hidden;
                Some((
                    spec,
                    output(&outputs, hn_ix, H_N, len)?,
                    output(&outputs, cn_ix, C_N, len)?,
                ))
            }
            _ => None,
        };
        scatter(call, b, seqs, velocity, movement, state_out);
        Ok(())
    }

    /// The plan for inputs of batch `b` and `t` timesteps, compiled on first use.
    ///
    /// Compiling holds the cache lock: two threads needing the same new shape then compile
    /// it once, and compilation happens only while a new shape warms up.
    pub(super) fn plan(&self, b: usize, t: usize) -> Result<Arc<Plan>, ModelError> {
        let (graph, plans) = match &self.backend {
            Backend::Tract { graph, plans } => (graph, plans),
            _ => {
                return Err(ModelError::Inference(format!(
                    "internal: tract plan requested for a {} model",
                    self.engine_name()
                )));
            }
        };
        // A poisoned lock only means another thread panicked mid-lookup; the map is still valid.
        let mut cache = plans.lock().unwrap_or_else(PoisonError::into_inner);
        cache.clock += 1;
        let now = cache.clock;
        if let Some((plan, last_used)) = cache.plans.get_mut(&(b, t)) {
            *last_used = now;
            return Ok(Arc::clone(plan));
        }
        if cache.plans.len() >= MAX_PLANS
            && let Some(oldest) = cache
                .plans
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            cache.plans.remove(&oldest);
        }
        let started = std::time::Instant::now();
        let plan = self.compile(graph, b, t)?;
        tracing::debug!(
            batch = b,
            steps = t,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled model plan"
        );
        cache.plans.insert((b, t), (Arc::clone(&plan), now));
        Ok(plan)
    }

    fn compile(&self, graph: &InferenceModel, b: usize, t: usize) -> Result<Arc<Plan>, ModelError> {
        let mut graph = graph.clone();
        let f32_fact = |shape: &[usize]| InferenceFact::dt_shape(f32::datum_type(), shape);
        graph
            .set_input_fact(self.io.features, f32_fact(&[b, t, self.n_features]))
            .map_err(ModelError::onnx)?;
        if let (Some((h, c)), Some(spec)) = (self.io.state_in, self.state) {
            let shape = [spec.stacks(), b, spec.hidden];
            graph
                .set_input_fact(h, f32_fact(&shape))
                .map_err(ModelError::onnx)?;
            graph
                .set_input_fact(c, f32_fact(&shape))
                .map_err(ModelError::onnx)?;
        }
        graph
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::onnx)
    }
}

pub(super) fn tensor(shape: &[usize], data: &[f32]) -> Result<TValue, ModelError> {
    Tensor::from_shape(shape, data)
        .map(IntoTValue::into_tvalue)
        .map_err(ModelError::inference)
}

/// Output `ix` as a flat f32 slice of exactly `len` values.
pub(super) fn output<'a>(
    outputs: &'a [TValue],
    ix: usize,
    name: &'static str,
    len: usize,
) -> Result<&'a [f32], ModelError> {
    let value = outputs.get(ix).ok_or(ModelError::MissingOutput(name))?;
    let slice = value
        .try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .map_err(ModelError::inference)?;
    if slice.len() != len {
        return Err(ModelError::TensorShape {
            tensor: name,
            expected: format!("{len} values"),
            found: format!("{:?}", value.shape()),
        });
    }
    Ok(slice)
}
