//! Runs a model over consecutive calls described in a JSON file, carrying recurrent state
//! between calls, and prints every call's outputs as JSON. Used by
//! `tests/python/test_inference_crosscheck.py` to compare tract with onnxruntime.
//!
//! ```text
//! cargo run -q -p sensorflow-model --example infer_json -- [--model FILE.onnx] IN.json
//! ```
//!
//! Input (tensor layouts as in the ONNX contract; `h0`/`c0` optional, zeros by default, read
//! from the first call only):
//! `{"calls":[{"features":[[[f32; F]; T]; batch], "h0":[[[f32; H]; batch]; L*D], "c0":..}, ..]}`
//! Every call has the same batch (one sequence per batch item, state carried per item); `T`
//! may differ between calls and between items. Output:
//! `{"calls":[{"velocity_pred":[[f32; T]; batch], "movement_prob":.., "h_n":[[[f32; H]; batch]; L*D], "c_n":..}, ..]}`
//! (`h_n`/`c_n` are empty for a stateless model).

use std::error::Error;
use std::path::PathBuf;

use sensorflow_model::{Model, SequenceMut};
use serde::{Deserialize, Serialize};

type Matrix3 = Vec<Vec<Vec<f32>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    calls: Vec<CallIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallIn {
    features: Matrix3,
    #[serde(default)]
    h0: Option<Matrix3>,
    #[serde(default)]
    c0: Option<Matrix3>,
}

#[derive(Serialize)]
struct CallOut {
    velocity_pred: Vec<Vec<f32>>,
    movement_prob: Vec<Vec<f32>>,
    h_n: Matrix3,
    c_n: Matrix3,
}

#[derive(Serialize)]
struct Output {
    calls: Vec<CallOut>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (mut model_path, mut input_path) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => {
                model_path = Some(PathBuf::from(args.next().ok_or("--model needs a path")?))
            }
            _ if input_path.is_none() => input_path = Some(PathBuf::from(arg)),
            _ => return Err(format!("unexpected argument {arg:?}").into()),
        }
    }
    let input_path = input_path.ok_or("usage: infer_json [--model FILE.onnx] IN.json")?;
    let model = match model_path {
        Some(p) => Model::load(&p)?,
        None => Model::demo()?,
    };
    let input: Input = serde_json::from_slice(&std::fs::read(&input_path)?)?;
    let output = run(&model, &input)?;
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

fn run(model: &Model, input: &Input) -> Result<Output, Box<dyn Error>> {
    let first = input.calls.first().ok_or("no calls")?;
    let batch = first.features.len();
    let (stacks, hidden) = model
        .sidecar()
        .state
        .map_or((0, 0), |s| (s.stacks(), s.hidden));
    // Per batch item, state laid out [stacks, hidden] as Model::run wants it.
    let mut h = per_item_state(first.h0.as_ref(), batch, stacks, hidden)?;
    let mut c = per_item_state(first.c0.as_ref(), batch, stacks, hidden)?;
    let mut calls = Vec::with_capacity(input.calls.len());
    for (n, call) in input.calls.iter().enumerate() {
        if call.features.len() != batch {
            return Err(format!(
                "call {n}: batch {} differs from the first call's {batch}",
                call.features.len()
            )
            .into());
        }
        let features: Vec<Vec<f32>> = call.features.iter().map(|rows| rows.concat()).collect();
        let mut velocity: Vec<Vec<f32>> = call
            .features
            .iter()
            .map(|rows| vec![0.0; rows.len()])
            .collect();
        let mut movement = velocity.clone();
        let mut seqs =
            SequenceMut::zip_all(&features, &mut h, &mut c, &mut velocity, &mut movement);
        model.run(&mut seqs)?;
        drop(seqs);
        calls.push(CallOut {
            velocity_pred: velocity,
            movement_prob: movement,
            h_n: onnx_state(&h, stacks, hidden),
            c_n: onnx_state(&c, stacks, hidden),
        });
    }
    Ok(Output { calls })
}

/// Converts an ONNX-layout state `[stacks][batch][hidden]` (zeros when absent) to one
/// `[stacks * hidden]` vector per batch item.
fn per_item_state(
    state: Option<&Matrix3>,
    batch: usize,
    stacks: usize,
    hidden: usize,
) -> Result<Vec<Vec<f32>>, Box<dyn Error>> {
    let Some(state) = state else {
        return Ok(vec![vec![0.0; stacks * hidden]; batch]);
    };
    if state.len() != stacks
        || state
            .iter()
            .any(|s| s.len() != batch || s.iter().any(|v| v.len() != hidden))
    {
        return Err(format!("initial state must be [{stacks}][{batch}][{hidden}]").into());
    }
    Ok((0..batch)
        .map(|b| {
            (0..stacks)
                .flat_map(|s| state[s][b].iter().copied())
                .collect()
        })
        .collect())
}

/// The inverse of [`per_item_state`].
fn onnx_state(per_item: &[Vec<f32>], stacks: usize, hidden: usize) -> Matrix3 {
    (0..stacks)
        .map(|s| {
            per_item
                .iter()
                .map(|item| item[s * hidden..(s + 1) * hidden].to_vec())
                .collect()
        })
        .collect()
}
