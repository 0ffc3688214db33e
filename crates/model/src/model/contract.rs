//! The model contract's names (DESIGN.md, "Model contract") and the checks of a parsed graph
//! against them: which inputs and outputs a model must have, what their declared shapes may be.

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModel};
use tract_onnx::tract_hir::internal::DimLike;

use crate::ModelError;

/// Input and output names fixed by the model contract (DESIGN.md).
pub(crate) const FEATURES: &str = "sequence_features";
pub(crate) const H_0: &str = "h_0";
pub(crate) const C_0: &str = "c_0";
pub(crate) const VELOCITY: &str = "velocity_pred";
pub(crate) const MOVEMENT: &str = "movement_prob";
pub(crate) const H_N: &str = "h_n";
pub(crate) const C_N: &str = "c_n";

/// Where the contract's tensors sit among the graph's inputs and outputs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Io {
    pub(super) n_inputs: usize,
    pub(super) features: usize,
    /// `(h_0, c_0)` input positions of a stateful model.
    pub(super) state_in: Option<(usize, usize)>,
    pub(super) velocity: usize,
    pub(super) movement: usize,
    /// `(h_n, c_n)` output positions of a stateful model.
    pub(super) state_out: Option<(usize, usize)>,
}

/// Locates the contract's inputs (by source node name) and outputs (by outlet label).
pub(super) fn find_io(graph: &InferenceModel) -> Result<Io, ModelError> {
    let (mut features, mut h, mut c) = (None, None, None);
    let input_outlets = graph.input_outlets().map_err(ModelError::onnx)?;
    for (ix, outlet) in input_outlets.iter().enumerate() {
        match graph.node(outlet.node).name.as_str() {
            FEATURES => features = Some(ix),
            H_0 => h = Some(ix),
            C_0 => c = Some(ix),
            other => return Err(ModelError::UnexpectedInput(other.to_string())),
        }
    }
    let features = features.ok_or(ModelError::MissingInput(FEATURES))?;
    let state_in = match (h, c) {
        (Some(h), Some(c)) => Some((h, c)),
        (None, None) => None,
        (Some(_), None) => return Err(ModelError::MissingInput(C_0)),
        (None, Some(_)) => return Err(ModelError::MissingInput(H_0)),
    };
    let output_outlets = graph.output_outlets().map_err(ModelError::onnx)?;
    let find_output = |name: &'static str| {
        output_outlets
            .iter()
            .position(|o| graph.outlet_label(*o) == Some(name))
            .ok_or(ModelError::MissingOutput(name))
    };
    let velocity = find_output(VELOCITY)?;
    let movement = find_output(MOVEMENT)?;
    let state_out = match state_in {
        Some(_) => Some((find_output(H_N)?, find_output(C_N)?)),
        None => None,
    };
    Ok(Io {
        n_inputs: input_outlets.len(),
        features,
        state_in,
        velocity,
        movement,
        state_out,
    })
}

/// Checks what the ONNX file declares for an input: f32 (if typed), rank 3 (if known), and
/// each dimension that the contract fixes and the file states concretely.
pub(super) fn check_declared_input(
    graph: &InferenceModel,
    ix: usize,
    name: &'static str,
    expected: &[Option<usize>; 3],
) -> Result<(), ModelError> {
    let fact = graph.input_fact(ix).map_err(ModelError::onnx)?;
    let describe = || {
        let dims: Vec<String> = expected
            .iter()
            .map(|d| d.map_or("_".to_string(), |d| d.to_string()))
            .collect();
        format!("f32 [{}]", dims.join(", "))
    };
    let mismatch = || ModelError::TensorShape {
        tensor: name,
        expected: describe(),
        found: fact.format_dt_shape(),
    };
    if let Some(dt) = fact.datum_type.concretize()
        && dt != f32::datum_type()
    {
        return Err(mismatch());
    }
    if fact.shape.is_open() {
        return Ok(());
    }
    let dims: Vec<_> = fact.shape.dims().collect();
    if dims.len() != expected.len() {
        return Err(mismatch());
    }
    for (dim, want) in dims.iter().zip(expected) {
        let declared = dim.concretize().and_then(|d| d.to_usize().ok());
        if let (Some(declared), Some(want)) = (declared, want)
            && declared != *want
        {
            return Err(mismatch());
        }
    }
    Ok(())
}
