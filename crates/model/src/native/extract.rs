//! Recognising the contract's stacked-LSTM graph in an ONNX file and extracting its weights
//! into the layout the kernel runs (see the parent module's docs for what is accepted).

use std::collections::HashMap;

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

use super::{Head, Isa, Layer, NativeEngine, ONNX_FLOAT, ONNX_INT64};
use crate::model::{C_0, C_N, FEATURES, H_0, H_N, MOVEMENT, VELOCITY};
use crate::{ModelError, StateSpec};

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
    pub(super) fn from_proto_for(
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
pub(super) struct Graph<'a> {
    producers: HashMap<&'a str, (&'a NodeProto, usize)>,
    consts: HashMap<&'a str, &'a TensorProto>,
}

impl<'a> Graph<'a> {
    pub(super) fn new(nodes: &'a [NodeProto], initializers: &'a [TensorProto]) -> Graph<'a> {
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
    pub(super) fn const_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
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
