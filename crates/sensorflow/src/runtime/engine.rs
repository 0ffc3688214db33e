//! The model and its inference engine, as `model.*` configures them.

use std::sync::Arc;

use anyhow::Context;
use sensorflow_model::{Engine, Model, ModelError};

use crate::config::{Config, EngineChoice};
use crate::model_source::ModelBytes;

/// The engines to try for `model.engine`, best first. "auto" prefers the native fused LSTM
/// kernel (fastest, no library, but only for the contract's LSTM graphs), then ONNX Runtime
/// when its library is found, then tract, which runs any graph.
fn engines(config: &Config) -> anyhow::Result<Vec<Engine>> {
    let library = config
        .model
        .onnxruntime_library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(std::path::PathBuf::from));
    let onnxruntime = |library: std::path::PathBuf| Engine::OnnxRuntime {
        library,
        intra_threads: config.model.intra_threads,
    };
    Ok(match (config.model.engine, library) {
        (EngineChoice::Tract, _) => vec![Engine::Tract],
        (EngineChoice::Native, _) => vec![Engine::Native],
        (EngineChoice::Onnxruntime, Some(library)) => vec![onnxruntime(library)],
        (EngineChoice::Onnxruntime, None) => anyhow::bail!(
            "model.engine = \"onnxruntime\" needs model.onnxruntime_library or ORT_DYLIB_PATH"
        ),
        (EngineChoice::Auto, Some(library)) if library.exists() => {
            vec![Engine::Native, onnxruntime(library), Engine::Tract]
        }
        (EngineChoice::Auto, _) => vec![Engine::Native, Engine::Tract],
    })
}

/// Which model to load: the bundled demo model, or the bytes of a fetched one.
#[derive(Clone, Copy)]
pub(crate) enum ModelSource<'a> {
    Demo,
    Bytes(&'a ModelBytes),
}

impl ModelSource<'_> {
    fn name(&self) -> &str {
        match self {
            ModelSource::Demo => "bundled demo model",
            ModelSource::Bytes(m) => &m.location,
        }
    }
}

/// Loads a model once, on the first engine of [`engines`] that accepts it. Only the native
/// engine's "not a graph I run" refusals fall through to the next engine; any other failure
/// is the model's and is reported. Every engine validates fully: the sidecar, the graph's
/// inputs and outputs against the contract, and a test inference.
fn load_model(config: &Config, source: ModelSource<'_>) -> anyhow::Result<Model> {
    let name = source.name();
    let candidates = engines(config)?;
    let last = candidates.len() - 1;
    for (i, engine) in candidates.iter().enumerate() {
        let loaded = match source {
            ModelSource::Demo => Model::demo_with(engine),
            ModelSource::Bytes(m) => Model::from_bytes_with(&m.onnx, &m.sidecar, engine),
        };
        match loaded {
            Ok(model) => {
                tracing::info!(
                    model = name,
                    version = &**model.version(),
                    engine = model.engine_name(),
                    "model loaded"
                );
                return Ok(model);
            }
            Err(e @ (ModelError::UnsupportedGraph(_) | ModelError::NativeMismatch { .. }))
                if i < last =>
            {
                tracing::info!(model = name, error = %e, "the native engine does not run this model; trying the next engine");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("loading {name} on {}", engine.name()));
            }
        }
    }
    anyhow::bail!("no engine to load {name} on")
}

/// One model per pipeline shard: tract and native models are shared (their runs are
/// concurrent), ONNX Runtime gets a session per shard (a session runs one call at a time).
pub(crate) fn load_models(
    config: &Config,
    source: ModelSource<'_>,
) -> anyhow::Result<Vec<Arc<Model>>> {
    let first = Arc::new(load_model(config, source)?);
    let mut models = vec![first.clone()];
    for _ in 1..config.runtime.pipeline_threads {
        models.push(if first.engine_name() == "onnxruntime" {
            Arc::new(load_model(config, source)?)
        } else {
            first.clone()
        });
    }
    Ok(models)
}
