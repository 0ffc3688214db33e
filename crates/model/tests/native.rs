//! The native engine against tract: same results (within 1e-5; relative for the cell state) for the same calls with state
//! carried across calls, over long sequences and on the stateless fixture; bit-identical
//! results whatever batch a sequence lands in; and graphs it does not support refused at load
//! with a typed error.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use prost::Message;
use sensorflow_model::{Engine, MAX_BATCH, Model, ModelError};
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{self, Tensor};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

mod common;
use common::{Noise, Seq, run_all};

static DEMO_ONNX: &[u8] = include_bytes!("../../../models/demo_lstm.onnx");
static DEMO_SIDECAR: &[u8] = include_bytes!("../../../models/demo_lstm.json");
static STATELESS_ONNX: &[u8] = include_bytes!("fixtures/stateless_lstm.onnx");
static STATELESS_SIDECAR: &[u8] = include_bytes!("fixtures/stateless_lstm.json");

/// Largest difference allowed between the native kernel and tract.
const TOLERANCE: f32 = 1e-5;

fn native() -> Model {
    Model::demo_with(&Engine::Native).unwrap()
}

/// `c` within [`TOLERANCE`] relative to `max(1, |c|)`: it grows to ~15 over long sequences,
/// where 1e-5 absolute is ~10 ulp, the rounding of any different summation order.
fn assert_close(got: &Seq, tract: &Seq, what: &str) {
    common::assert_close("native", got, tract, what, TOLERANCE, true);
}

#[test]
fn native_equals_tract_over_three_calls_with_mixed_lengths_and_batches() {
    let tract = Model::demo().unwrap();
    let native = native();
    assert_eq!(native.engine_name(), "native");
    assert_eq!(native.state_len(), tract.state_len());

    // Groups of one length each: batch 1, 3, 5, 64 and 300 (more than MAX_BATCH: two calls),
    // plus an empty sequence that needs no call.
    let groups = [(1, 5), (3, 1), (5, 17), (64, 33), (300, 64), (1, 0)];
    const { assert!(300 > MAX_BATCH) };
    let mut noise = Noise(0x0bad_cafe_1234_5678);
    let mut native_seqs: Vec<Seq> = groups
        .iter()
        .flat_map(|&(n, t)| vec![t; n])
        .map(|t| Seq::random(&tract, &mut noise, t))
        .collect();
    let mut tract_seqs = native_seqs.clone();
    for call in 0..3 {
        // New samples each call; each engine continues from the state it wrote last time.
        for (n, t) in native_seqs.iter_mut().zip(&mut tract_seqs) {
            n.next_packet(&mut noise);
            t.features.clone_from(&n.features);
        }
        let initial_h = native_seqs[0].h.clone();
        run_all(&native, &mut native_seqs);
        run_all(&tract, &mut tract_seqs);
        assert_ne!(
            native_seqs[0].h, initial_h,
            "call {call}: state was carried"
        );
        for (i, (n, t)) in native_seqs.iter().zip(&tract_seqs).enumerate() {
            assert_close(
                n,
                t,
                &format!("call {call}, sequence {i} (T={})", n.velocity.len()),
            );
        }
    }
}

#[test]
fn native_stays_within_1e_5_of_tract_over_512_carried_timesteps() {
    let tract = Model::demo().unwrap();
    let native = native();
    let mut noise = Noise(0x5151_2024);
    // One long call, then the same sequences continued as eight 64-sample packets.
    let mut native_seqs: Vec<Seq> = (0..5)
        .map(|_| Seq::random(&tract, &mut noise, 512))
        .collect();
    let mut tract_seqs = native_seqs.clone();
    run_all(&native, &mut native_seqs);
    run_all(&tract, &mut tract_seqs);
    for (i, (n, t)) in native_seqs.iter().zip(&tract_seqs).enumerate() {
        assert_close(n, t, &format!("T=512 sequence {i}"));
    }
    let mut native_packets: Vec<Seq> = native_seqs
        .iter()
        .map(|s| Seq {
            features: Vec::new(),
            velocity: vec![f32::NAN; 64],
            movement: vec![f32::NAN; 64],
            ..s.clone()
        })
        .collect();
    let mut tract_packets = native_packets.clone();
    for packet in 0..8 {
        for (n, t) in native_packets.iter_mut().zip(&mut tract_packets) {
            n.features = noise.vec(64 * 2, 2.0);
            t.features.clone_from(&n.features);
        }
        run_all(&native, &mut native_packets);
        run_all(&tract, &mut tract_packets);
        for (i, (n, t)) in native_packets.iter().zip(&tract_packets).enumerate() {
            assert_close(n, t, &format!("packet {packet}, sequence {i}"));
        }
    }
}

#[test]
fn stateless_model_on_native_equals_tract() {
    let tract = Model::from_bytes(STATELESS_ONNX, STATELESS_SIDECAR).unwrap();
    let native =
        Model::from_bytes_with(STATELESS_ONNX, STATELESS_SIDECAR, &Engine::Native).unwrap();
    assert_eq!(native.state_len(), 0);
    let mut noise = Noise(7);
    let mut native_seqs: Vec<Seq> = [32, 32, 32, 32, 32, 8, 1]
        .into_iter()
        .map(|t| Seq::random(&tract, &mut noise, t))
        .collect();
    let mut tract_seqs = native_seqs.clone();
    run_all(&native, &mut native_seqs);
    run_all(&tract, &mut tract_seqs);
    for (i, (n, t)) in native_seqs.iter().zip(&tract_seqs).enumerate() {
        assert_close(n, t, &format!("sequence {i}"));
    }
}

#[test]
fn a_sequence_alone_equals_the_same_sequence_in_a_batch_of_64_bit_for_bit() {
    let native = native();
    let mut noise = Noise(0xb17_b17);
    let batch: Vec<Seq> = (0..64)
        .map(|_| Seq::random(&native, &mut noise, 64))
        .collect();
    let mut batched = batch.clone();
    run_all(&native, &mut batched);
    // First and middle rows of full blocks, and the last row (a remainder on some kernels).
    for i in [0, 1, 30, 62, 63] {
        let mut alone = vec![batch[i].clone()];
        run_all(&native, &mut alone);
        assert_eq!(alone[0], batched[i], "sequence {i}");
    }
    // And inside a batch of a different size, next to sequences of another length.
    let mut mixed: Vec<Seq> = (0..6)
        .map(|_| Seq::random(&native, &mut noise, 9))
        .chain([batch[30].clone()])
        .collect();
    run_all(&native, &mut mixed);
    assert_eq!(mixed[6], batched[30]);
}

fn demo_proto() -> ModelProto {
    ModelProto::decode(DEMO_ONNX).unwrap()
}

fn lstm_nodes(proto: &mut ModelProto) -> impl Iterator<Item = &mut NodeProto> {
    proto
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .filter(|n| n.op_type == "LSTM")
}

fn load_native(proto: &ModelProto, sidecar: &[u8]) -> Result<Model, ModelError> {
    Model::from_bytes_with(&proto.encode_to_vec(), sidecar, &Engine::Native)
}

#[test]
fn refuses_a_bidirectional_lstm_with_a_typed_error() {
    let mut proto = demo_proto();
    for node in lstm_nodes(&mut proto) {
        for attr in node.attribute.iter_mut().filter(|a| a.name == "direction") {
            attr.s = b"bidirectional".to_vec();
        }
    }
    let err = load_native(&proto, DEMO_SIDECAR).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedGraph(what) if what.contains(r#"attribute "direction""#)),
        "{err}"
    );
}

#[test]
fn refuses_clipping_and_other_activations_that_tract_would_run() {
    let mut proto = demo_proto();
    let node = lstm_nodes(&mut proto).nth(1).unwrap();
    node.attribute.push(AttributeProto {
        name: "clip".into(),
        f: 0.5,
        r#type: 1, // FLOAT
        ..Default::default()
    });
    // tract runs the clipped model; only the native engine refuses it.
    Model::from_bytes(&proto.encode_to_vec(), DEMO_SIDECAR).unwrap();
    let err = load_native(&proto, DEMO_SIDECAR).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedGraph(what) if what.contains(r#"attribute "clip""#)),
        "{err}"
    );

    let mut proto = demo_proto();
    let node = lstm_nodes(&mut proto).next().unwrap();
    node.attribute.push(AttributeProto {
        name: "activations".into(),
        strings: vec![b"Sigmoid".to_vec(), b"Relu".to_vec(), b"Tanh".to_vec()],
        r#type: 8, // STRINGS
        ..Default::default()
    });
    let err = load_native(&proto, DEMO_SIDECAR).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedGraph(what) if what.contains(r#"attribute "activations""#)),
        "{err}"
    );
}

#[test]
fn refuses_a_head_that_is_not_a_constant_linear_layer() {
    // movement_prob straight from the gathered logit, without its Sigmoid.
    let mut proto = demo_proto();
    let graph = proto.graph.as_mut().unwrap();
    graph.node.retain(|n| n.op_type != "Sigmoid");
    for node in &mut graph.node {
        for out in node.output.iter_mut().filter(|o| *o == "movement_logit") {
            *out = "movement_prob".into();
        }
    }
    Model::from_bytes(&proto.encode_to_vec(), DEMO_SIDECAR).unwrap();
    let err = load_native(&proto, DEMO_SIDECAR).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedGraph(what) if what.contains("Sigmoid")),
        "{err}"
    );
}

/// ONNX attribute type codes used below.
const ATTR_INT: i32 = 2;
const ATTR_STRING: i32 = 3;
const ATTR_INTS: i32 = 7;

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: outputs[0].into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: ATTR_INT,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: values,
        ..Default::default()
    }
}

fn ints(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 7,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

/// An f32 graph input or output with dimensions given as numbers or symbols.
fn value_info(name: &str, dims: &[&str]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse() {
                Ok(n) => dimension::Value::DimValue(n),
                Err(_) => dimension::Value::DimParam(d.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A contract model built from scratch as `scripts/train_demo_model.py` exports it, with
/// random weights: `layers` forward LSTMs of `hidden` units over `features` inputs and a
/// 3-column head of which column 2 is the velocity and column 0 the movement logit. Returns
/// the ONNX bytes and the sidecar.
fn built_model(
    layers: usize,
    hidden: usize,
    features: usize,
    stateful: bool,
    noise: &mut Noise,
) -> (Vec<u8>, Vec<u8>) {
    let (l_dim, h_dim, f_dim) = (layers.to_string(), hidden.to_string(), features.to_string());
    let h = hidden as i64;
    let mut inits = vec![ints("axis1", &[1], &[1]), ints("axis0", &[1], &[0])];
    let mut nodes = vec![node(
        "Transpose",
        &["sequence_features"],
        &["x_tbf"],
        vec![attr_ints("perm", &[1, 0, 2])],
    )];
    let mut inputs = vec![value_info("sequence_features", &["batch", "T", &f_dim])];
    let mut outputs = vec![
        value_info("velocity_pred", &["batch", "T"]),
        value_info("movement_prob", &["batch", "T"]),
    ];
    if stateful {
        for name in ["h_0", "c_0"] {
            inputs.push(value_info(name, &[&l_dim, "batch", &h_dim]));
        }
        for name in ["h_n", "c_n"] {
            outputs.push(value_info(name, &[&l_dim, "batch", &h_dim]));
        }
    }
    let scale = 2.0 / (hidden as f32).sqrt();
    let mut y = "x_tbf".to_string();
    let (mut finals_h, mut finals_c) = (Vec::new(), Vec::new());
    for l in 0..layers {
        let n_in = if l == 0 { features } else { hidden } as i64;
        let (w, r, b) = (format!("W{l}"), format!("R{l}"), format!("B{l}"));
        inits.push(floats(
            &w,
            &[1, 4 * h, n_in],
            noise.vec((4 * h * n_in) as usize, scale),
        ));
        inits.push(floats(
            &r,
            &[1, 4 * h, h],
            noise.vec((4 * h * h) as usize, scale),
        ));
        inits.push(floats(&b, &[1, 8 * h], noise.vec((8 * h) as usize, 0.5)));
        let mut lstm_inputs = vec![y.clone(), w, r, b];
        if stateful {
            let (start, end) = (format!("start{l}"), format!("end{l}"));
            inits.push(ints(&start, &[1], &[l as i64]));
            inits.push(ints(&end, &[1], &[l as i64 + 1]));
            for state in ["h", "c"] {
                let sliced = format!("{state}0_l{l}");
                let whole = format!("{state}_0");
                nodes.push(node(
                    "Slice",
                    &[&whole, &start, &end, "axis0"],
                    &[&sliced],
                    vec![],
                ));
            }
            lstm_inputs.extend([String::new(), format!("h0_l{l}"), format!("c0_l{l}")]);
        }
        // One layer's final states are the model's outputs directly; more are concatenated.
        let (hn, cn) = if layers == 1 {
            ("h_n".to_string(), "c_n".to_string())
        } else {
            (format!("hn_l{l}"), format!("cn_l{l}"))
        };
        let y_l = format!("y_l{l}");
        let lstm_inputs: Vec<&str> = lstm_inputs.iter().map(String::as_str).collect();
        let lstm_outputs: Vec<&str> = if stateful {
            vec![&y_l, &hn, &cn]
        } else {
            vec![&y_l]
        };
        nodes.push(node(
            "LSTM",
            &lstm_inputs,
            &lstm_outputs,
            vec![
                attr_int("hidden_size", h),
                AttributeProto {
                    name: "direction".into(),
                    s: b"forward".to_vec(),
                    r#type: ATTR_STRING,
                    ..Default::default()
                },
            ],
        ));
        let squeezed = format!("y_l{l}_s");
        nodes.push(node("Squeeze", &[&y_l, "axis1"], &[&squeezed], vec![]));
        y = squeezed;
        finals_h.push(hn);
        finals_c.push(cn);
    }
    if stateful && layers > 1 {
        for (out, finals) in [("h_n", &finals_h), ("c_n", &finals_c)] {
            let finals: Vec<&str> = finals.iter().map(String::as_str).collect();
            nodes.push(node("Concat", &finals, &[out], vec![attr_int("axis", 0)]));
        }
    }
    inits.push(floats("head.W", &[h, 3], noise.vec(3 * hidden, scale)));
    inits.push(floats("head.b", &[3], noise.vec(3, 0.5)));
    inits.push(ints("idx0", &[], &[0]));
    inits.push(ints("idx2", &[], &[2]));
    let gather = |index, out| {
        node(
            "Gather",
            &["head_out", index],
            &[out],
            vec![attr_int("axis", 2)],
        )
    };
    nodes.extend([
        node(
            "Transpose",
            &[&y],
            &["y_btf"],
            vec![attr_ints("perm", &[1, 0, 2])],
        ),
        node("MatMul", &["y_btf", "head.W"], &["head_mm"], vec![]),
        node("Add", &["head_mm", "head.b"], &["head_out"], vec![]),
        gather("idx2", "velocity_pred"),
        gather("idx0", "movement_logit"),
        node("Sigmoid", &["movement_logit"], &["movement_prob"], vec![]),
    ]);
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "built".into(),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    let cols: Vec<String> = (0..features).map(|i| format!("f{i}")).collect();
    let zeros: serde_json::Map<String, serde_json::Value> =
        cols.iter().map(|c| (c.clone(), 0.0.into())).collect();
    let ones: serde_json::Map<String, serde_json::Value> =
        cols.iter().map(|c| (c.clone(), 1.0.into())).collect();
    let mut sidecar = serde_json::json!({
        "feature_cols": cols,
        "scaler": {"mean": zeros, "std": ones},
        "movement_threshold": 0.5,
    });
    if stateful {
        sidecar["state"] = serde_json::json!({"layers": layers, "directions": 1, "hidden": hidden});
    }
    (model.encode_to_vec(), serde_json::to_vec(&sidecar).unwrap())
}

#[test]
fn native_equals_tract_on_other_depths_widths_and_feature_counts() {
    let mut noise = Noise(0xdee9_5eed);
    // Widths that are not a multiple of the kernel's vectors or chunks, one layer (final
    // states output directly), three layers, one feature, and a stateless stack.
    for (layers, hidden, features, stateful) in [
        (1, 5, 3, true),
        (3, 20, 1, true),
        (2, 7, 4, false),
        (2, 33, 2, true),
    ] {
        let what = format!("L={layers} H={hidden} F={features} stateful={stateful}");
        let (onnx, sidecar) = built_model(layers, hidden, features, stateful, &mut noise);
        let tract = Model::from_bytes(&onnx, &sidecar).unwrap();
        let native = Model::from_bytes_with(&onnx, &sidecar, &Engine::Native)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(native.state_len(), tract.state_len());
        let mut native_seqs: Vec<Seq> = [13, 13, 13, 13, 13, 1, 40, 40, 40, 40, 40, 40, 40, 40, 40]
            .into_iter()
            .map(|t| Seq::random(&tract, &mut noise, t))
            .collect();
        let mut tract_seqs = native_seqs.clone();
        for call in 0..2 {
            for (n, t) in native_seqs.iter_mut().zip(&mut tract_seqs) {
                n.next_packet(&mut noise);
                t.features.clone_from(&n.features);
            }
            run_all(&native, &mut native_seqs);
            run_all(&tract, &mut tract_seqs);
            for (i, (n, t)) in native_seqs.iter().zip(&tract_seqs).enumerate() {
                assert_close(n, t, &format!("{what}, call {call}, sequence {i}"));
            }
        }
    }
}
