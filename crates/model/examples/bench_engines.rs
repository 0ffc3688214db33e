//! Inference throughput of the demo model on each engine: tract, the native fused LSTM kernel,
//! and ONNX Runtime with 1 and 2 intra-op threads, through [`Model::run`] as the pipeline calls
//! it (`B` sensors with `T = 64` new samples each, state carried between calls); then the
//! native engine and ONNX Runtime as two single-threaded models in parallel, as the pipeline's
//! two shards run them. `ns/ts` is nanoseconds per timestep-sample (per thread for 2 x 1). `scripts/bench_onnxruntime.py` measures
//! Python onnxruntime on the same model for comparison.
//!
//! ```text
//! cargo run --release -p sensorflow-model --example bench_engines [-- SECONDS_PER_CASE [LIBRARY]]
//! ```
//!
//! The ONNX Runtime library is `LIBRARY`, else `ORT_DYLIB_PATH`, else the `onnxruntime` wheel
//! in the workspace's `.venv`; without one only tract is measured.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensorflow_model::{Engine, Model, SequenceMut};

/// Timesteps per sensor and call: one 64-sample packet.
const STEPS: usize = 64;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2.0);
    let library = args
        .next()
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .or_else(venv_library);

    let mut engines = vec![("tract", Engine::Tract), ("native", Engine::Native)];
    match &library {
        Some(library) => {
            for (name, intra_threads) in [("onnxruntime 1 thread", 1), ("onnxruntime 2 threads", 2)]
            {
                engines.push((
                    name,
                    Engine::OnnxRuntime {
                        library: library.clone(),
                        intra_threads,
                    },
                ));
            }
            println!("ONNX Runtime library: {}", library.display());
        }
        None => println!("no ONNX Runtime library found: measuring tract only"),
    }
    println!("demo model, T = {STEPS}, {secs} s per case");
    println!(
        "{:<22} {:>6} {:>10} {:>14} {:>12} {:>8}",
        "engine", "batch", "calls/s", "timesteps/s", "us/call", "ns/ts"
    );
    for (name, engine) in &engines {
        let model = Model::demo_with(engine)?;
        for batch in [1, 16, 64, 256] {
            let (calls_per_s, us_per_call) = measure(&model, batch, secs)?;
            println!(
                "{name:<22} {batch:>6} {calls_per_s:>10.0} {:>14.0} {us_per_call:>12.1} {:>8.0}",
                calls_per_s * (batch * STEPS) as f64,
                us_per_call * 1e3 / (batch * STEPS) as f64
            );
        }
    }
    // How `sensorflow run` uses two cores: two pipeline shards, each with its own
    // single-threaded model, calling in parallel.
    let mut parallel = vec![("native 2 x 1 thr", Engine::Native)];
    if let Some(library) = &library {
        parallel.push((
            "onnxruntime 2 x 1 thr",
            Engine::OnnxRuntime {
                library: library.clone(),
                intra_threads: 1,
            },
        ));
    }
    for (name, engine) in &parallel {
        let models = [Model::demo_with(engine)?, Model::demo_with(engine)?];
        for batch in [64, 256] {
            let results: Vec<Result<(f64, f64), String>> = std::thread::scope(|scope| {
                let handles: Vec<_> = models
                    .iter()
                    .map(|m| {
                        scope.spawn(move || measure(m, batch, secs).map_err(|e| e.to_string()))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("bench thread panicked".into()))
                    })
                    .collect()
            });
            let (mut calls_per_s, mut us_per_call) = (0.0, 0.0);
            for r in results {
                let (calls, us) = r?;
                calls_per_s += calls;
                us_per_call += us / 2.0;
            }
            println!(
                "{name:<22} {batch:>6} {calls_per_s:>10.0} {:>14.0} {:>12} {:>8.0}",
                calls_per_s * (batch * STEPS) as f64,
                "-",
                us_per_call * 1e3 / (batch * STEPS) as f64
            );
        }
    }
    Ok(())
}

/// Calls per second and microseconds per call of `model.run` over `batch` sensors.
fn measure(model: &Model, batch: usize, secs: f64) -> Result<(f64, f64), Box<dyn Error>> {
    let (f, s) = (model.n_features(), model.state_len());
    // A slow sine per sensor stands in for scaled features; values do not affect speed.
    let features: Vec<Vec<f32>> = (0..batch)
        .map(|b| {
            (0..STEPS * f)
                .map(|i| ((i + b) as f32 * 0.01).sin())
                .collect()
        })
        .collect();
    let mut h = vec![vec![0.0; s]; batch];
    let mut c = vec![vec![0.0; s]; batch];
    let mut velocity = vec![vec![0.0; STEPS]; batch];
    let mut movement = vec![vec![0.0; STEPS]; batch];
    let mut call = || {
        let mut seqs =
            SequenceMut::zip_all(&features, &mut h, &mut c, &mut velocity, &mut movement);
        model.run(&mut seqs)
    };
    call()?; // warms up: compiles tract's plan for this shape, ONNX Runtime's allocations
    let (started, mut calls) = (Instant::now(), 0u64);
    while started.elapsed() < Duration::from_secs_f64(secs) {
        call()?;
        calls += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((calls as f64 / elapsed, elapsed * 1e6 / calls as f64))
}

/// `libonnxruntime.so.*` of the `onnxruntime` wheel in the workspace's `.venv`, if installed.
fn venv_library() -> Option<PathBuf> {
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
    std::fs::read_dir(venv_lib)
        .ok()?
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("python3."))
        .filter_map(|d| std::fs::read_dir(d.path().join("site-packages/onnxruntime/capi")).ok())
        .flat_map(|files| files.flatten().map(|f| f.path()))
        .find(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
        })
}
