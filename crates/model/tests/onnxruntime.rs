//! The ONNX Runtime engine against tract: same results (within 1e-4) for the same calls, with
//! state carried across calls, mixed lengths and batch sizes around [`MAX_BATCH`], stateless
//! models, and the engine's own errors.
//!
//! The ONNX Runtime library comes from `ORT_DYLIB_PATH`, else from the workspace's `.venv`
//! (the `onnxruntime` wheel that `scripts/test.sh` installs). Without either the tests fail:
//! a missing library must not look like a passing engine.

#![cfg(feature = "onnxruntime")]
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};

use sensorflow_model::{Engine, MAX_BATCH, Model, ModelError};

mod common;
use common::{Noise, Seq, run_all};

static STATELESS_ONNX: &[u8] = include_bytes!("fixtures/stateless_lstm.onnx");
static STATELESS_SIDECAR: &[u8] = include_bytes!("fixtures/stateless_lstm.json");

/// Largest difference allowed between the engines' kernels.
const TOLERANCE: f32 = 1e-4;

/// The ONNX Runtime shared library to test with; panics with how to get one if there is none.
fn library() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ORT_DYLIB_PATH={} is not a file (unset it to use the .venv's onnxruntime wheel, \
             which scripts/test.sh installs)",
            path.display()
        );
        return path;
    }
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
    let found = std::fs::read_dir(&venv_lib).ok().and_then(|dirs| {
        dirs.flatten()
            .filter(|d| d.file_name().to_string_lossy().starts_with("python3."))
            .map(|d| d.path().join("site-packages/onnxruntime/capi"))
            .filter_map(|capi| std::fs::read_dir(capi).ok())
            .flat_map(|files| files.flatten().map(|f| f.path()))
            .find(|f| {
                f.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
            })
    });
    match found {
        Some(path) => path,
        None => panic!(
            "no ONNX Runtime library: set ORT_DYLIB_PATH to a libonnxruntime.so (1.17 or newer), \
             or create the venv with the onnxruntime wheel: `scripts/test.sh` (or \
             `python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt`) \
             in the workspace root; looked in {}",
            venv_lib.display()
        ),
    }
}

fn ort_engine(intra_threads: usize) -> Engine {
    Engine::OnnxRuntime {
        library: library(),
        intra_threads,
    }
}

fn assert_close(got: &Seq, tract: &Seq, what: &str) {
    common::assert_close("onnxruntime", got, tract, what, TOLERANCE, false);
}

#[test]
fn onnxruntime_equals_tract_over_three_calls_with_mixed_lengths_and_batches() {
    let tract = Model::demo().unwrap();
    let ort = Model::demo_with(&ort_engine(1)).unwrap();
    assert_eq!(ort.engine_name(), "onnxruntime");
    assert_eq!(ort.state_len(), tract.state_len());

    // Groups of one length each: batch 1, 3, 64 and 300 (more than MAX_BATCH: two calls),
    // plus an empty sequence that needs no call.
    let groups = [(1, 5), (3, 1), (64, 33), (300, 64), (1, 0)];
    const { assert!(300 > MAX_BATCH) };
    let mut noise = Noise(0x0bad_cafe_1234_5678);
    let mut ort_seqs: Vec<Seq> = groups
        .iter()
        .flat_map(|&(n, t)| vec![t; n])
        .map(|t| Seq::random(&tract, &mut noise, t))
        .collect();
    let mut tract_seqs = ort_seqs.clone();
    for call in 0..3 {
        // New samples each call; each engine continues from the state it wrote last time.
        for (o, t) in ort_seqs.iter_mut().zip(&mut tract_seqs) {
            o.features = noise.vec(o.features.len(), 2.0);
            t.features.clone_from(&o.features);
            o.velocity.fill(f32::NAN);
            o.movement.fill(f32::NAN);
        }
        let initial_h = ort_seqs[0].h.clone();
        run_all(&ort, &mut ort_seqs);
        run_all(&tract, &mut tract_seqs);
        assert_ne!(ort_seqs[0].h, initial_h, "call {call}: state was carried");
        for (i, (o, t)) in ort_seqs.iter().zip(&tract_seqs).enumerate() {
            assert_close(
                o,
                t,
                &format!("call {call}, sequence {i} (T={})", o.velocity.len()),
            );
        }
    }
}

#[test]
fn onnxruntime_with_two_threads_equals_tract() {
    let tract = Model::demo().unwrap();
    let ort = Model::demo_with(&ort_engine(2)).unwrap();
    let mut noise = Noise(99);
    let mut ort_seqs: Vec<Seq> = (0..96)
        .map(|i| Seq::random(&tract, &mut noise, if i % 2 == 0 { 64 } else { 17 }))
        .collect();
    let mut tract_seqs = ort_seqs.clone();
    run_all(&ort, &mut ort_seqs);
    run_all(&tract, &mut tract_seqs);
    for (i, (o, t)) in ort_seqs.iter().zip(&tract_seqs).enumerate() {
        assert_close(o, t, &format!("sequence {i}"));
    }
}

#[test]
fn stateless_model_on_onnxruntime_equals_tract() {
    let tract = Model::from_bytes(STATELESS_ONNX, STATELESS_SIDECAR).unwrap();
    let ort = Model::from_bytes_with(STATELESS_ONNX, STATELESS_SIDECAR, &ort_engine(1)).unwrap();
    assert_eq!(ort.state_len(), 0);
    let mut noise = Noise(7);
    let mut ort_seqs: Vec<Seq> = [32, 32, 32, 8]
        .into_iter()
        .map(|t| Seq::random(&tract, &mut noise, t))
        .collect();
    let mut tract_seqs = ort_seqs.clone();
    run_all(&ort, &mut ort_seqs);
    run_all(&tract, &mut tract_seqs);
    for (i, (o, t)) in ort_seqs.iter().zip(&tract_seqs).enumerate() {
        assert_close(o, t, &format!("sequence {i}"));
    }
}

#[test]
fn onnxruntime_rejects_malformed_sequences_before_running_any() {
    let ort = Model::demo_with(&ort_engine(1)).unwrap();
    let mut noise = Noise(3);
    let mut ok = Seq::random(&ort, &mut noise, 8);
    let mut bad = Seq::random(&ort, &mut noise, 8);
    bad.h.pop();
    let err = ort.run(&mut [ok.as_mut(), bad.as_mut()]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SequenceShape {
                index: 1,
                buffer: "h",
                expected: 64,
                found: 63
            }
        ),
        "{err}"
    );
    assert!(ok.velocity.iter().all(|v| v.is_nan()), "nothing ran");
}

#[test]
fn a_missing_library_is_a_typed_error() {
    let engine = Engine::OnnxRuntime {
        library: PathBuf::from("/nonexistent/libonnxruntime.so.1.32.0"),
        intra_threads: 1,
    };
    let err = Model::demo_with(&engine).unwrap_err();
    assert!(
        matches!(&err, ModelError::RuntimeLibrary { path, .. } if path.starts_with("/nonexistent")),
        "{err}"
    );
}

#[test]
fn a_second_different_library_is_refused() {
    let real = library();
    Model::demo_with(&ort_engine(1)).unwrap();
    // Any other existing file: the check happens before anything is loaded from it.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let err = Model::demo_with(&Engine::OnnxRuntime {
        library: other,
        intra_threads: 1,
    })
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::RuntimeLibraryConflict { loaded, .. }
            if *loaded == std::fs::canonicalize(&real).unwrap()),
        "{err}"
    );
}

#[test]
fn load_with_reads_model_and_sidecar_for_onnxruntime() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo_lstm.onnx");
    let ort = Model::load_with(&root, &ort_engine(1)).unwrap();
    assert_eq!(ort.engine_name(), "onnxruntime");
    assert_eq!(ort.sidecar(), Model::demo().unwrap().sidecar());
}
