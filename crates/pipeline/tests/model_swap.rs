//! Swapping the model between two steps (DESIGN "Model contract"): later samples carry the new
//! `model_version` and are scored from a zero recurrent state, sessions carry on, and a model
//! the pipeline cannot feed is refused without changing anything.

#![allow(clippy::unwrap_used)] // tests unwrap freely

mod common;

use std::sync::Arc;

use common::{NOW, P, T0, binary, encoded, model, motion};
use sensorflow_model::Model;
use sensorflow_pipeline::{Outputs, Pipeline, PipelineConfig, PipelineError, ShardedPipeline};
use sensorflow_protocol::record::IngestRecord;

const SENSORS: [&str; 3] = ["a", "b", "c"];

fn demo_with_sidecar(edit: impl FnOnce(&mut serde_json::Value)) -> Arc<Model> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let onnx = std::fs::read(dir.join("demo_lstm.onnx")).unwrap();
    let mut sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("demo_lstm.json")).unwrap()).unwrap();
    edit(&mut sidecar);
    Arc::new(Model::from_bytes(&onnx, &serde_json::to_vec(&sidecar).unwrap()).unwrap())
}

/// Step `k`: one 64-sample packet per sensor.
fn step(k: u64) -> Vec<IngestRecord> {
    SENSORS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let base = (64 * k) as u32;
            let samples = motion(64, (10 * i as u64 + k) as u32, 0.2);
            binary(s, encoded(base, T0 + 64 * k * P, &samples), NOW)
        })
        .collect()
}

fn run(p: &mut Pipeline, steps: std::ops::Range<u64>) -> Outputs {
    let mut out = Outputs::default();
    for k in steps {
        let records = step(k);
        p.process(records.iter().map(IngestRecord::as_ref), NOW, &mut out);
    }
    out
}

#[test]
fn after_a_swap_samples_carry_the_new_version_and_start_from_zero_state() {
    let v2 = demo_with_sidecar(|s| s["version"] = "v2".into());
    let mut swapped = Pipeline::new(PipelineConfig::default(), model()).unwrap();
    let before = run(&mut swapped, 0..3);
    swapped.set_model(v2.clone()).unwrap();
    let after = run(&mut swapped, 3..6);

    let demo_version = model().version().clone();
    assert_eq!(demo_version.len(), 12, "a SHA-256 prefix: {demo_version}");
    assert!(
        before
            .samples
            .iter()
            .all(|c| c.model_version == demo_version)
    );
    assert!(after.samples.iter().all(|c| &*c.model_version == "v2"));
    // Sessions carry on across the swap: no session ends or starts after it.
    assert!(
        after.session_events.is_empty(),
        "{:?}",
        after.session_events
    );
    assert!(
        after
            .samples
            .iter()
            .all(|c| before.samples.iter().any(|b| b.session_id == c.session_id))
    );

    // Zero state: the predictions equal those of a pipeline that met these sensors only now.
    let mut fresh = Pipeline::new(PipelineConfig::default(), v2).unwrap();
    let reference = run(&mut fresh, 3..6);
    let raw = |o: &Outputs, s: &str| -> Vec<f32> {
        o.samples
            .iter()
            .filter(|c| &*c.sensor_id == s)
            .flat_map(|c| c.velocity_raw.iter().copied())
            .collect()
    };
    for s in SENSORS {
        let (got, want) = (raw(&after, s), raw(&reference, s));
        assert_eq!(got.len(), 3 * 64);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "sensor {s}: predictions after the swap differ from a zero-state run"
        );
    }
    // ...and differ from carrying the old model's state on (the check above could not tell).
    let mut unswapped = Pipeline::new(PipelineConfig::default(), model()).unwrap();
    run(&mut unswapped, 0..3);
    let carried = run(&mut unswapped, 3..6);
    assert_ne!(raw(&carried, "a"), raw(&after, "a"));
}

#[test]
fn a_model_reading_a_feature_the_pipeline_lacks_is_refused_and_nothing_changes() {
    let bogus = demo_with_sidecar(|s| {
        s["feature_cols"] = serde_json::json!(["accl_mag", "bogus"]);
        s["scaler"]["mean"]["bogus"] = 0.0.into();
        s["scaler"]["std"]["bogus"] = 1.0.into();
    });
    let mut sharded = ShardedPipeline::new(PipelineConfig::default(), &[model(), model()]).unwrap();
    let err = sharded.set_models(&[bogus.clone(), bogus]).unwrap_err();
    assert!(
        matches!(err, PipelineError::UnknownFeature(ref f) if f == "bogus"),
        "{err}"
    );
    let mut out = Outputs::default();
    let records = step(0);
    sharded.process(records.iter().map(IngestRecord::as_ref), NOW, &mut out);
    assert!(
        out.samples
            .iter()
            .all(|c| c.model_version == *model().version())
    );
    assert!(matches!(
        sharded.set_models(&[model()]),
        Err(PipelineError::Config(_))
    ));
}
