//! The embedded runtime (`sensorflow run`): every role in one process.
//!
//! ```text
//! MQTT (ntex workers) --append--> log (writer thread) --tail--> pipeline thread --> hub --> WebSockets
//!        ^ PUBACK when durable                                        |
//!                                                                     +--bounded--> sink thread --> lake, sessions store
//! HTTP API (tokio) reads snapshots from `status` and feeds from the hub.
//! ```
//!
//! The pipeline and sink threads form the dataflow, which [`dataflow`] starts from the last
//! checkpoint and restarts from it after a sink failure.
//!
//! Invariants: a QoS 1 publish is acknowledged only after its log append is durable; the
//! pipeline reads only durable records; every queue between stages is bounded, so a slow stage
//! slows the publishers down instead of dropping data.

mod checkpoint;
mod dataflow;
mod dead_letter;
mod engine;
mod log_sink;
pub(crate) mod model_control;
mod pipeline_task;
mod security;
mod sink_queue;
mod sink_task;
mod status;
mod tls;
// The gateway counts bad input the same bounded way.
pub(crate) use status::record_bad;
// The gateway applies the same anonymous-access rule as `run`.
pub(crate) use security::mqtt_policy;
// The api role serves HTTP with the same tokens, TLS, rates and metric helpers as `run`.
pub(crate) use security::api_tokens;
pub(crate) use status::{RateState, family, gauge_like, sample};
pub(crate) use tls::Tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sensorflow_api::{ApiConfig, ApiState, Hub, HubConfig};
use sensorflow_ingest::IngestServer;
use sensorflow_lake::SessionsStore;
use sensorflow_log::{Durability, Log, LogConfig, Retention};
use sensorflow_pipeline::{
    GapRecord, LateRecord, QuarantineRecord, SampleChunk, SessionAggregate, SessionEvent,
    WindowRecord,
};
use tokio::sync::watch;

use crate::config::{Config, DurabilityMode};
use log_sink::LogSink;
use status::SharedStatus;

/// Results of one pipeline turn on their way to the sink thread.
pub(crate) struct SinkBatch {
    pub(crate) samples: Vec<Arc<SampleChunk>>,
    pub(crate) windows: Vec<WindowRecord>,
    pub(crate) session_events: Vec<SessionEvent>,
    pub(crate) aggregates: Vec<SessionAggregate>,
    pub(crate) gaps: Vec<GapRecord>,
    pub(crate) late: Vec<LateRecord>,
    pub(crate) quarantine: Vec<QuarantineRecord>,
    /// Log offsets of the records whose processing produced this batch (empty for timers'
    /// output): a sink failure caused by its rows is traced back to them (see `dead_letter`).
    pub(crate) origin: std::ops::Range<u64>,
}

/// What the pipeline thread sends the sink thread, in order.
pub(crate) enum SinkMsg {
    Batch(SinkBatch),
    Checkpoint(CheckpointRequest),
}

/// A checkpoint to write, with the model its snapshot belongs to. Once it is written that
/// model is the committed one, and `swap_done` (set on the checkpoint right after a swap) is
/// answered (see `model_control`).
pub(crate) struct CheckpointRequest {
    pub(crate) checkpoint: checkpoint::Checkpoint,
    pub(crate) model: Arc<model_control::ActiveModel>,
    pub(crate) swap_done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// The HTTP API's settings of `config` (`[http]`, `[auth]`, `[tls]`), shared by `run` and the
/// api role.
pub(crate) fn api_config(
    config: &Config,
    listen: SocketAddr,
    tokens: Option<Arc<sensorflow_api::ApiTokens>>,
    tls: Option<&tls::Tls>,
) -> ApiConfig {
    ApiConfig {
        listen,
        header_read_timeout: Duration::from_secs(config.http.header_read_timeout_secs),
        max_connections_per_ip: config.http.max_connections_per_ip,
        max_connections: config.http.max_connections,
        tokens,
        tls: tls.map(|t| Arc::clone(&t.https)),
        cors_origins: config.auth.cors_origins.clone(),
        max_websockets_per_token: config.auth.max_websockets_per_token,
        max_request_head_bytes: config.http.max_request_head_bytes,
        ..ApiConfig::default()
    }
}

/// Wall clock in µs since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A running embedded platform.
pub(crate) struct Embedded {
    pub(crate) mqtt_addr: SocketAddr,
    pub(crate) http_addr: SocketAddr,
    ingest: IngestServer,
    log: Log,
    draining: Arc<AtomicBool>,
    dataflow_thread: JoinHandle<()>,
    http_shutdown: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Embedded {
    /// Opens the log, lake and store under the data dir, loads the model and starts every role.
    pub(crate) async fn start(config: &Config) -> anyhow::Result<Embedded> {
        // Security first: a platform that must not start should not touch its data.
        let tls = tls::Tls::load(&config.tls)?.map(Arc::new);
        let mut mqtt_listeners = vec![config.mqtt.listen];
        if tls.is_some() {
            mqtt_listeners.push(config.tls.mqtt_listen);
        }
        let mqtt_auth = security::mqtt_policy(
            &config.auth,
            &mqtt_listeners,
            config.tls.client_ca_file.is_some(),
        )?;
        let api_tokens = security::api_tokens(&config.auth)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let loader = model_control::ModelLoader::new(config);
        let active = initial_model(config, &loader).await?;
        let model_slot = Arc::new(model_control::ModelSlot::new(
            active,
            config.model.path.clone(),
        ));

        let mut log_config = LogConfig::new(config.data_dir.join("log"));
        log_config.segment_bytes = config.log.segment_bytes;
        log_config.max_unconsumed_bytes = config.log.max_unconsumed_bytes;
        log_config.durability = match config.log.durability {
            DurabilityMode::Fsync => Durability::Fsync,
            DurabilityMode::Batch => Durability::Batch {
                interval: Duration::from_millis(config.log.batch_interval_ms),
            },
            DurabilityMode::None => Durability::None,
        };
        // `Log::open` logs "log opened" with the report itself.
        let (log, report) = Log::open(log_config).context("opening the log")?;

        let lake = config.lake_config(config.lake_location()?);
        let sessions_path = config.data_dir.join("sessions.sqlite");
        // The API reads sessions through its own connection; the sink thread writes through
        // another, reopened by every (re)start of the dataflow.
        let sessions_reader = SessionsStore::open(&sessions_path)
            .and_then(|store| store.reader())
            .context("opening the sessions store")?;
        let status = Arc::new(SharedStatus::new(log.clone(), Box::new(sessions_reader)));
        status
            .log_truncated_bytes
            .store(report.truncated_bytes, Ordering::Relaxed);
        let hub = Hub::new(HubConfig {
            topic_capacity: config.http.ws_buffer_messages,
            ..HubConfig::default()
        });
        let draining = Arc::new(AtomicBool::new(false));
        let dataflow = dataflow::Dataflow {
            settings: dataflow::DataflowSettings {
                pipeline: config.pipeline.clone(),
                lake,
                sessions_path,
                checkpoint_dir: checkpoint::dir_in(&config.data_dir),
                keep_checkpoints: config.checkpoint.keep,
                retention: Retention {
                    max_age: Duration::from_secs(config.log.retention_secs),
                    max_bytes: config.log.retention_bytes,
                },
                batch_records: config.runtime.batch_records,
                tick: Duration::from_millis(config.runtime.tick_ms),
                checkpoint_interval: Duration::from_secs_f64(config.checkpoint.interval_secs),
            },
            model: model_slot.clone(),
            log: log.clone(),
            hub: hub.clone(),
            status: status.clone(),
            draining: draining.clone(),
            live_until: Arc::default(),
            dead_letters: Arc::default(),
        };
        let dataflow_thread = dataflow.start()?;

        let ingest_config = sensorflow_ingest::IngestConfig {
            auth: mqtt_auth,
            tls: tls.as_ref().map(|t| sensorflow_ingest::MqttTls {
                listen: config.tls.mqtt_listen,
                server_config: Arc::clone(&t.mqtt),
            }),
            ..config.ingest_config()?
        };
        let ingest = IngestServer::start(
            ingest_config,
            Arc::new(LogSink::spawn(log.clone())),
            status.clone(),
        )
        .await
        .context("starting MQTT ingest")?;
        let mqtt_addr = ingest.local_addr();
        status.set_ingest(mqtt_addr, ingest.stats_handle());
        tracing::info!("mqtt listening on {mqtt_addr}");
        if let Some(addr) = ingest.tls_addr() {
            tracing::info!("mqtts listening on {addr}");
        }
        if let Some(tls) = &tls {
            tls.reload_on_sighup();
        }

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding HTTP listener {}", config.http.listen))?;
        let http_addr = listener.local_addr()?;
        let https = if tls.is_some() { " (https)" } else { "" };
        tracing::info!("http listening on {http_addr}{https}");
        let (http_shutdown, mut shutdown_rx) = watch::channel(false);
        status.set_model_slot(model_slot.clone());
        spawn_sighup_reload(loader.clone(), model_slot.clone());
        let state = ApiState::new(
            hub,
            status,
            api_config(config, http_addr, api_tokens, tls.as_deref()),
        )
        .with_model_control(Arc::new(model_control::ModelControlImpl {
            loader,
            slot: model_slot,
        }));
        let http_task = tokio::spawn(sensorflow_api::serve(listener, state, async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        }));

        Ok(Embedded {
            mqtt_addr,
            http_addr,
            ingest,
            log,
            draining,
            dataflow_thread,
            http_shutdown,
            http_task,
        })
    }

    /// Graceful shutdown: stop accepting MQTT, let in-flight appends complete, drain the
    /// pipeline up to the end of the log, flush the lake and the store, stop HTTP.
    pub(crate) async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutting down: stopping MQTT ingest");
        self.ingest.stop().await;
        tracing::info!(end_offset = self.log.end_offset(), "draining the pipeline");
        self.draining.store(true, Ordering::Release);
        tokio::task::spawn_blocking(move || {
            let _ = self.dataflow_thread.join();
        })
        .await?;
        self.log.close().context("closing the log")?;
        let _ = self.http_shutdown.send(true);
        match tokio::time::timeout(Duration::from_secs(5), self.http_task).await {
            Ok(result) => result??,
            Err(_) => tracing::warn!("HTTP connections did not close within 5 s"),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The model to start with: the one of the newest checkpoint (a swap made at run time survives
/// a restart), unless `model.path` names another location than when that checkpoint's process
/// started (the operator chose a new model); else the configured one.
async fn initial_model(
    config: &Config,
    loader: &model_control::ModelLoader,
) -> anyhow::Result<model_control::ActiveModel> {
    let configured = config.model.path.as_deref();
    let checkpointed = checkpoint::CheckpointStore::open(checkpoint::dir_in(&config.data_dir))
        .and_then(|store| store.load_latest())
        .context("reading checkpoints")?
        .checkpoint
        .and_then(|c| c.model);
    match checkpointed {
        Some(m) if m.configured.as_deref() == configured => {
            // The exact file the checkpoint ran (from the cache for remote models), even if
            // the location's content changed meanwhile: SIGHUP or POST /model pick that up.
            let location = m.location.as_deref();
            if location != configured {
                tracing::info!(
                    location = location.unwrap_or("bundled demo model"),
                    version = m.version,
                    "starting with the model swapped in at run time (checkpointed)"
                );
            }
            match loader.load(location, m.sha256.as_deref()).await {
                Ok(active) => return Ok(active),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "the checkpointed model cannot be loaded; falling back to the configured one"
                ),
            }
        }
        Some(m) => tracing::info!(
            was = m.configured.as_deref().unwrap_or("bundled demo model"),
            "model.path changed since the last checkpoint: running the configured model"
        ),
        None => {}
    }
    loader
        .load(configured, None)
        .await
        .context("loading the model")
}

/// SIGHUP fetches the configured model location again and swaps it in (e.g. after a new
/// version was uploaded to the same URL), like `POST /model` with that location.
fn spawn_sighup_reload(loader: model_control::ModelLoader, slot: Arc<model_control::ModelSlot>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; models are swapped with POST /model only");
            return;
        };
        while hup.recv().await.is_some() {
            let Some(location) = slot.configured.clone() else {
                tracing::info!(
                    "SIGHUP: no model.path configured (bundled demo model); nothing to reload"
                );
                continue;
            };
            tracing::info!(location, "SIGHUP: reloading the configured model");
            if let Err(e) = model_control::swap(&loader, &slot, &location).await {
                tracing::warn!(error = %e, "SIGHUP model reload failed; the running model stays");
            }
        }
    });
}
