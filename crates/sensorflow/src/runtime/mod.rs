//! The embedded runtime (`sensorflow run`): every role in one process.
//!
//! ```text
//! MQTT (ntex workers) --append--> log (writer thread) --tail--> pipeline thread --> hub --> WebSockets
//!        ^ PUBACK when durable                                        |
//!                                                                     +--bounded--> sink thread --> lake, sessions store
//! HTTP API (tokio) reads snapshots from `status` and feeds from the hub.
//! ```
//!
//! Invariants: a QoS 1 publish is acknowledged only after its log append is durable; the
//! pipeline reads only durable records; every queue between stages is bounded, so a slow stage
//! slows the publishers down instead of dropping data.

mod checkpoint;
mod pipeline_task;
mod sink_task;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::FutureExt;
use futures::future::BoxFuture;
use sensorflow_api::{ApiConfig, ApiState, Hub, HubConfig};
use sensorflow_ingest::{IngestConfig, IngestServer, IngestSink, SinkError, TopicPattern};
use sensorflow_lake::{Compression, LakeConfig, LakeWriter, SessionsStore};
use sensorflow_log::{Durability, Log, LogConfig};
use sensorflow_model::Model;
use sensorflow_api::StoreError;
use sensorflow_pipeline::{GapRecord, LateRecord, Pipeline, PipelineSnapshot, SampleChunk, SessionAggregate, SessionEvent, SessionRecord, WindowRecord};
use sensorflow_protocol::record::IngestRecord;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, DurabilityMode};
use status::SharedStatus;

/// Results of one pipeline turn on their way to the sink thread.
pub(crate) struct SinkBatch {
    pub(crate) samples: Vec<Arc<SampleChunk>>,
    pub(crate) windows: Vec<WindowRecord>,
    pub(crate) session_events: Vec<SessionEvent>,
    pub(crate) aggregates: Vec<SessionAggregate>,
    pub(crate) gaps: Vec<GapRecord>,
    pub(crate) late: Vec<LateRecord>,
}

/// What the pipeline thread sends the sink thread, in order.
pub(crate) enum SinkMsg {
    Batch(SinkBatch),
    Checkpoint(checkpoint::Checkpoint),
}

/// Pipeline turns buffered between the pipeline and the sink thread.
const SINK_QUEUE_BATCHES: usize = 64;

/// Wall clock in µs since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Ingest's sink: encodes each record and appends it to the log; the future resolves once the
/// record is durable, which is when ingest sends the PUBACK.
///
/// Order matters (dedupe relies on a sensor's packets staying in order), and ingest calls
/// `append` in arrival order but polls the futures concurrently. So `append` only queues the
/// record, synchronously, on a channel; one forwarder task admits records to the log in channel
/// order and hands each completion to its caller without waiting for it, so fsync waits
/// overlap. The channel is unbounded, but what can be in it is bounded by ingest's per-connection
/// in-flight limit (`mqtt.receive_maximum`), and the forwarder waits in `admit` when the log
/// applies backpressure.
struct LogSink {
    tx: mpsc::UnboundedSender<(Bytes, oneshot::Sender<Result<(), SinkError>>)>,
}

impl LogSink {
    fn spawn(log: Log) -> LogSink {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Bytes, oneshot::Sender<Result<(), SinkError>>)>();
        tokio::spawn(async move {
            while let Some((payload, done)) = rx.recv().await {
                match log.admit(payload).await {
                    Ok(pending) => {
                        tokio::spawn(async move {
                            let _ = done.send(pending.await.map(|_| ()).map_err(|e| SinkError::Unavailable(e.to_string())));
                        });
                    }
                    Err(e) => {
                        let _ = done.send(Err(SinkError::Unavailable(e.to_string())));
                    }
                }
            }
        });
        LogSink { tx }
    }
}

impl IngestSink for LogSink {
    fn append(&self, record: IngestRecord) -> BoxFuture<'static, Result<(), SinkError>> {
        let mut buf = Vec::with_capacity(record.encoded_len());
        if let Err(e) = record.try_encode(&mut buf) {
            return futures::future::ready(Err(SinkError::Rejected(e.to_string()))).boxed();
        }
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send((buf.into(), done_tx)).is_err() {
            return futures::future::ready(Err(SinkError::Unavailable("the log is closed".into()))).boxed();
        }
        async move { done_rx.await.unwrap_or_else(|_| Err(SinkError::Unavailable("the log is closed".into()))) }.boxed()
    }
}

/// A running embedded platform.
pub(crate) struct Embedded {
    pub(crate) mqtt_addr: SocketAddr,
    pub(crate) http_addr: SocketAddr,
    ingest: IngestServer,
    log: Log,
    draining: Arc<AtomicBool>,
    pipeline_thread: JoinHandle<()>,
    sink_thread: JoinHandle<()>,
    http_shutdown: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Embedded {
    /// Opens the log, lake and store under the data dir, loads the model and starts every role.
    pub(crate) async fn start(config: &Config) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let model = Arc::new(load_model(config)?);

        let mut log_config = LogConfig::new(config.data_dir.join("log"));
        log_config.segment_bytes = config.log.segment_bytes;
        log_config.max_unconsumed_bytes = config.log.max_unconsumed_bytes;
        log_config.durability = match config.log.durability {
            DurabilityMode::Fsync => Durability::Fsync,
            DurabilityMode::Batch => Durability::Batch { interval: Duration::from_millis(config.log.batch_interval_ms) },
            DurabilityMode::None => Durability::None,
        };
        let (log, report) = Log::open(log_config).context("opening the log")?;
        tracing::info!(?report, "log opened");

        // Recovery: restore the newest checkpoint that verifies, delete lake files of epochs it
        // does not cover, replay the log from its offset (see runtime/checkpoint.rs).
        let checkpoints = checkpoint::CheckpointStore::open(checkpoint::dir_in(&config.data_dir)).context("opening the checkpoint directory")?;
        let loaded = checkpoints.load_latest().context("reading checkpoints")?;
        for path in &loaded.corrupt {
            tracing::warn!(path = %path.display(), "checkpoint failed verification; using the previous one");
        }
        let (restored_epoch, from_offset, snapshot) = match loaded.checkpoint {
            Some(c) => (c.epoch, c.log_offset, Some(c.snapshot)),
            None => (0, log.start_offset(), None),
        };
        let lake_root = config.lake_root();
        std::fs::create_dir_all(&lake_root).with_context(|| format!("creating lake root {}", lake_root.display()))?;
        let files_removed = sensorflow_lake::remove_files_after_epoch(&lake_root, restored_epoch).context("removing lake files of incomplete epochs")?;
        let replay = log.end_offset().saturating_sub(from_offset);
        tracing::info!(checkpoint_epoch = restored_epoch, from_offset, replay_records = replay, lake_files_removed = files_removed, "recovering from checkpoint");
        let reader = log.reader(from_offset).context("opening a log reader")?;

        let mut lake = LakeWriter::open(LakeConfig {
            target_file_bytes: config.lake.target_file_bytes,
            max_file_age: Duration::from_secs(config.lake.max_file_age_secs),
            row_group_rows: config.lake.row_group_rows,
            compression: match config.lake.compression.as_str() {
                "snappy" => Compression::Snappy,
                _ => Compression::Zstd { level: 1 },
            },
            ..LakeConfig::new(config.lake_root())
        })
        .context("opening the lake")?;
        lake.set_epoch(restored_epoch + 1);
        let store = SessionsStore::open(&config.data_dir.join("sessions.sqlite")).context("opening the sessions store")?;
        let sessions_reader = store.reader().context("opening a sessions store reader")?;

        let status = Arc::new(SharedStatus::new(log.clone(), Box::new(SessionsAdapter(sessions_reader))));
        status.checkpoints_corrupt.store(loaded.corrupt.len() as u64, Ordering::Relaxed);
        *status.recovery.lock() = (files_removed, replay);
        let hub = Hub::new(HubConfig { topic_capacity: config.http.ws_buffer_messages, ..HubConfig::default() });
        let pipeline = match snapshot {
            Some(bytes) => {
                let snapshot = PipelineSnapshot::decode(&bytes).context("decoding the checkpoint's pipeline snapshot")?;
                Pipeline::restore(config.pipeline.clone(), model, snapshot).context("restoring the pipeline from the checkpoint")?
            }
            None => Pipeline::new(config.pipeline.clone(), model).context("building the pipeline")?,
        };
        let draining = Arc::new(AtomicBool::new(false));

        let (sink_tx, sink_rx) = std::sync::mpsc::sync_channel(SINK_QUEUE_BATCHES);
        let sink_thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn({
                let status = status.clone();
                let log = log.clone();
                let keep_checkpoints = config.checkpoint.keep;
                move || sink_task::SinkTask { lake, store, rx: sink_rx, status, checkpoints, keep_checkpoints, log, poisoned: false }.run()
            })
            .context("spawning the sink thread")?;
        let pipeline_thread = std::thread::Builder::new()
            .name("pipeline".into())
            .spawn({
                let task = pipeline_task::PipelineTask {
                    pipeline,
                    log: log.clone(),
                    reader,
                    sink: sink_tx,
                    hub: hub.clone(),
                    status: status.clone(),
                    draining: draining.clone(),
                    batch_records: config.runtime.batch_records,
                    tick: Duration::from_millis(config.runtime.tick_ms),
                    checkpoint_interval: Duration::from_secs_f64(config.checkpoint.interval_secs),
                    next_epoch: restored_epoch + 1,
                };
                move || task.run()
            })
            .context("spawning the pipeline thread")?;

        let ingest_config = IngestConfig {
            listen: config.mqtt.listen,
            binary_topic: TopicPattern::parse(&config.mqtt.binary_topic)?,
            json_topic: TopicPattern::parse(&config.mqtt.json_topic)?,
            max_message_bytes: config.mqtt.max_message_bytes,
            receive_maximum: config.mqtt.receive_maximum,
            max_connections: config.mqtt.max_connections,
            ..IngestConfig::default()
        };
        let ingest = IngestServer::start(ingest_config, Arc::new(LogSink::spawn(log.clone())), status.clone())
            .await
            .context("starting MQTT ingest")?;
        let mqtt_addr = ingest.local_addr();
        status.set_ingest(mqtt_addr, ingest.stats_handle());
        tracing::info!("mqtt listening on {mqtt_addr}");

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding HTTP listener {}", config.http.listen))?;
        let http_addr = listener.local_addr()?;
        tracing::info!("http listening on {http_addr}");
        let (http_shutdown, mut shutdown_rx) = watch::channel(false);
        let state = ApiState::new(hub, status, ApiConfig { listen: http_addr, ..ApiConfig::default() });
        let http_task = tokio::spawn(sensorflow_api::serve(listener, state, async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        }));

        Ok(Embedded { mqtt_addr, http_addr, ingest, log, draining, pipeline_thread, sink_thread, http_shutdown, http_task })
    }

    /// Graceful shutdown: stop accepting MQTT, let in-flight appends complete, drain the
    /// pipeline up to the end of the log, flush the lake and the store, stop HTTP.
    pub(crate) async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutting down: stopping MQTT ingest");
        self.ingest.stop().await;
        tracing::info!(end_offset = self.log.end_offset(), "draining the pipeline");
        self.draining.store(true, Ordering::Release);
        tokio::task::spawn_blocking(move || {
            let _ = self.pipeline_thread.join();
            let _ = self.sink_thread.join();
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

fn load_model(config: &Config) -> anyhow::Result<Model> {
    if config.model.path.is_empty() {
        tracing::info!("using the bundled demo model");
        Model::demo().context("loading the bundled demo model")
    } else {
        tracing::info!(path = %config.model.path, "loading model");
        Model::load(std::path::Path::new(&config.model.path)).with_context(|| format!("loading model {}", config.model.path))
    }
}

/// Serves the API's sessions queries from the SQLite store.
struct SessionsAdapter(sensorflow_lake::SessionsReader);

impl sensorflow_api::SessionsQuery for SessionsAdapter {
    fn list(&self, q: &sensorflow_api::SessionQuery) -> Result<Vec<SessionRecord>, StoreError> {
        let q = sensorflow_lake::SessionQuery {
            sensor_id: q.sensor_id.clone(),
            active: q.active,
            from_us: q.from_us,
            to_us: q.to_us,
            limit: q.limit,
            offset: q.offset,
        };
        let rows = self.0.list(&q).map_err(|e| StoreError(e.to_string()))?;
        Ok(rows.into_iter().map(session_record).collect())
    }

    fn get(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.0.get(id).map_err(|e| StoreError(e.to_string()))?.map(session_record))
    }
}

fn session_record(v: sensorflow_lake::SessionView) -> SessionRecord {
    SessionRecord {
        session_id: v.session_id.into(),
        sensor_id: v.sensor_id.into(),
        start_us: v.start_us,
        end_us: v.end_us,
        last_seen_us: v.last_seen_us,
        sample_count: v.sample_count,
    }
}
