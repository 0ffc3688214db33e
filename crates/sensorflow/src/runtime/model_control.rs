//! The model lifecycle of a running platform: which model is active, loading another and
//! swapping it in between two pipeline steps (DESIGN "Model contract").
//!
//! A swap goes: `POST /model` (or SIGHUP) → [`ModelControlImpl::swap`] fetches the model and
//! validates it on every engine shard (contract, shapes, a test inference) off the async
//! executor → the validated model waits in the [`ModelSlot`] → the pipeline thread takes it
//! between two steps, swaps it in (recurrent state restarts from zeros) and checkpoints at once
//! → the sink thread writes that checkpoint (which names the new model) and only then marks the
//! model committed and answers the request. So the swap sits at one log offset: samples before
//! it were scored by the old model and after it by the new one, and a crash replays each side
//! with its own model. If the dataflow fails before that checkpoint, the swap never happened:
//! the request is answered 503 and the restart runs the committed (old) model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use sensorflow_api::{ApiError, ModelControl, ModelInfo, SwapFuture};
use sensorflow_model::Model;
use tokio::sync::oneshot;

use super::checkpoint::CheckpointModel;
use super::engine::{ModelSource, load_models};
use super::now_us;
use crate::config::Config;
use crate::model_source::{ModelBytes, ModelCache};

/// How long `POST /model` waits for the pipeline to swap and checkpoint.
const SWAP_TIMEOUT: Duration = Duration::from_secs(120);

/// A loaded, validated model: one instance per pipeline shard and what `GET /model` shows.
pub(crate) struct ActiveModel {
    /// `None` for the bundled demo model.
    pub(crate) location: Option<String>,
    pub(crate) version: Arc<str>,
    /// Hex SHA-256 of the ONNX file and sidecar (`None` for the bundled model).
    pub(crate) sha256: Option<String>,
    pub(crate) loaded_at_us: i64,
    /// The sidecar as its file has it (numbers unrounded, extra keys kept).
    pub(crate) sidecar: serde_json::Value,
    pub(crate) models: Vec<Arc<Model>>,
}

impl ActiveModel {
    pub(crate) fn info(&self) -> ModelInfo {
        let first = self.models.first();
        ModelInfo {
            version: self.version.to_string(),
            location: self.location.clone(),
            loaded_at_us: self.loaded_at_us,
            engine: first.map_or("none", |m| m.engine_name()).to_owned(),
            sidecar: self.sidecar.clone(),
        }
    }

    /// What a checkpoint records of this model.
    pub(crate) fn checkpoint_model(&self, configured: Option<&str>) -> CheckpointModel {
        CheckpointModel {
            location: self.location.clone(),
            configured: configured.map(str::to_owned),
            version: self.version.to_string(),
            sha256: self.sha256.clone(),
        }
    }
}

/// Loads models the way the configuration says (engines, shards, fetch limits, cache).
#[derive(Clone)]
pub(crate) struct ModelLoader {
    config: Arc<Config>,
    cache: ModelCache,
}

impl ModelLoader {
    pub(crate) fn new(config: &Config) -> ModelLoader {
        ModelLoader {
            cache: ModelCache::new(&config.data_dir),
            config: Arc::new(config.clone()),
        }
    }

    /// Fetches (or, with `exact_sha256`, first looks in the cache for exactly that file) and
    /// loads the model at `location` on every shard; `None` loads the bundled demo model.
    /// Remote models that validated are cached.
    pub(crate) async fn load(
        &self,
        location: Option<&str>,
        exact_sha256: Option<&str>,
    ) -> anyhow::Result<ActiveModel> {
        let bytes = match location {
            None => None,
            Some(location) => Some(
                match exact_sha256.and_then(|sha| self.cache.load(location, Some(sha))) {
                    Some(cached) => cached,
                    None => {
                        crate::model_source::fetch(
                            location,
                            self.config.model.fetch_limits(),
                            &self.cache,
                        )
                        .await?
                    }
                },
            ),
        };
        let config = self.config.clone();
        let (models, bytes) = tokio::task::spawn_blocking(move || {
            let source = bytes.as_ref().map_or(ModelSource::Demo, ModelSource::Bytes);
            load_models(&config, source).map(|models| (models, bytes))
        })
        .await
        .context("the model loading task failed")??;
        if let Some(b) = &bytes
            && !b.from_cache
            && crate::model_source::Location::parse(&b.location).is_ok_and(|l| l.is_remote())
            && let Err(e) = self.cache.store(b)
        {
            tracing::warn!(location = b.location, error = %e, "caching the model failed; it runs anyway");
        }
        Ok(active(models, bytes.as_ref()))
    }
}

fn active(models: Vec<Arc<Model>>, bytes: Option<&ModelBytes>) -> ActiveModel {
    let version = models
        .first()
        .map_or_else(|| Arc::from(""), |m| m.version().clone());
    // The bundled model's sidecar is only known parsed.
    let sidecar = bytes
        .and_then(|b| serde_json::from_slice(&b.sidecar).ok())
        .or_else(|| {
            models
                .first()
                .and_then(|m| serde_json::to_value(m.sidecar()).ok())
        })
        .unwrap_or_default();
    ActiveModel {
        sidecar,
        location: bytes.map(|b| b.location.clone()),
        version,
        sha256: bytes.map(|b| b.sha256.clone()),
        loaded_at_us: now_us(),
        models,
    }
}

/// A validated model on its way into the pipeline, with whom to tell when it is committed.
pub(crate) struct PendingSwap {
    pub(crate) model: Arc<ActiveModel>,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// Shared by the API, the pipeline thread and the sink thread.
pub(crate) struct ModelSlot {
    /// The model of the newest checkpoint: what a (re)started dataflow runs.
    committed: Mutex<Arc<ActiveModel>>,
    /// `model.path` as configured when this process started.
    pub(crate) configured: Option<String>,
    pending: Mutex<Option<PendingSwap>>,
    has_pending: AtomicBool,
    pub(crate) swaps: AtomicU64,
    pub(crate) load_failures: AtomicU64,
}

impl ModelSlot {
    pub(crate) fn new(model: ActiveModel, configured: Option<String>) -> ModelSlot {
        ModelSlot {
            committed: Mutex::new(Arc::new(model)),
            configured,
            pending: Mutex::new(None),
            has_pending: AtomicBool::new(false),
            swaps: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
        }
    }

    pub(crate) fn committed(&self) -> Arc<ActiveModel> {
        self.committed.lock().clone()
    }

    /// Called by the sink thread once the checkpoint naming `model` is durable.
    pub(crate) fn commit(&self, model: Arc<ActiveModel>) {
        tracing::info!(
            version = &*model.version,
            location = model.location.as_deref().unwrap_or("bundled demo model"),
            "model swap committed"
        );
        *self.committed.lock() = model;
        self.swaps.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a swap for the pipeline thread; fails if one is already queued.
    fn submit(&self, swap: PendingSwap) -> Result<(), PendingSwap> {
        let mut pending = self.pending.lock();
        if pending.is_some() {
            return Err(swap);
        }
        *pending = Some(swap);
        self.has_pending.store(true, Ordering::Release);
        Ok(())
    }

    /// The queued swap, if any (cheap when there is none: called every pipeline turn).
    pub(crate) fn take_pending(&self) -> Option<PendingSwap> {
        if !self.has_pending.load(Ordering::Acquire) {
            return None;
        }
        self.has_pending.store(false, Ordering::Release);
        self.pending.lock().take()
    }
}

/// [`ModelControl`] for the embedded runtime.
pub(crate) struct ModelControlImpl {
    pub(crate) loader: ModelLoader,
    pub(crate) slot: Arc<ModelSlot>,
}

impl ModelControl for ModelControlImpl {
    fn current(&self) -> ModelInfo {
        self.slot.committed().info()
    }

    fn swap(&self, location: String) -> SwapFuture {
        let loader = self.loader.clone();
        let slot = self.slot.clone();
        Box::pin(async move { swap(&loader, &slot, &location).await })
    }
}

/// Loads, validates and swaps in the model at `location`; see the module docs.
pub(crate) async fn swap(
    loader: &ModelLoader,
    slot: &ModelSlot,
    location: &str,
) -> Result<ModelInfo, ApiError> {
    let model = match loader.load(Some(location), None).await {
        Ok(m) => Arc::new(m),
        Err(e) => {
            slot.load_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                location,
                error = format!("{e:#}"),
                "model refused; the running one stays"
            );
            return Err(ApiError::Unprocessable(format!("{e:#}")));
        }
    };
    let (done, answer) = oneshot::channel();
    slot.submit(PendingSwap {
        model: model.clone(),
        done,
    })
    .map_err(|_| ApiError::Conflict("another model swap is in progress".into()))?;
    match tokio::time::timeout(SWAP_TIMEOUT, answer).await {
        Ok(Ok(Ok(()))) => Ok(model.info()),
        Ok(Ok(Err(refused))) => {
            slot.load_failures.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::Unprocessable(refused))
        }
        Ok(Err(_)) => Err(ApiError::Unavailable(
            "the dataflow restarted before the swap was checkpointed; the previous model stays active, retry".into(),
        )),
        Err(_) => Err(ApiError::Unavailable(format!(
            "the pipeline did not take the new model within {} s; it will still be swapped in when it does",
            SWAP_TIMEOUT.as_secs()
        ))),
    }
}
