//! The dataflow: the pipeline thread and the sink thread, started from the last checkpoint and
//! restarted from it when a sink fails.
//!
//! A failed lake or sessions-store write leaves the sink unsure of what reached the disk, so
//! patching up in place is not safe. Instead the whole dataflow fails over the way a Flink job
//! does under a restart strategy: both threads stop, and after a backoff (doubling from
//! [`INITIAL_BACKOFF`] to [`MAX_BACKOFF`]) it is rebuilt exactly as at process start: restore
//! the newest checkpoint, delete lake files of later epochs, replay the log from the
//! checkpoint's offset. Outputs stay exactly-once in the lake and the sessions store; live
//! WebSocket feeds see the replayed rows again (they are at-least-once by nature).
//!
//! While the dataflow is down a tracked log reader stays parked at the checkpoint's offset, so
//! the log's unconsumed bytes grow until `log.max_unconsumed_bytes` holds appends back: ingest
//! then stops reading sockets and withholds PUBACKs until the restart catches up. `/ready`
//! reports the failure and the planned restart the whole time; the process stays up.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;
use sensorflow_api::Hub;
use sensorflow_lake::{LakeConfig, LakeWriter, SessionsStore};
use sensorflow_log::{Log, LogReader, Retention};
use sensorflow_pipeline::{PipelineConfig, PipelineSnapshot, ShardedPipeline};

use super::checkpoint::CheckpointStore;
use super::dead_letter::{DeadLetters, RunFailure};
use super::model_control::{ActiveModel, ModelSlot};
use super::pipeline_task::PipelineTask;
use super::sink_queue;
use super::sink_task::SinkTask;
use super::status::SharedStatus;

/// Pipeline turns buffered between the pipeline and the sink thread...
const SINK_QUEUE_BATCHES: usize = 64;
/// ...and samples in them at most: about 2 s at a million samples/s, ~150 MB of columns (see
/// `sink_queue`).
const SINK_QUEUE_SAMPLES: usize = 2_000_000;
/// First wait before restarting a failed dataflow.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between restart attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the backoff: its failure is a new incident.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// How often a backoff wait checks for shutdown.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Everything the dataflow needs from the configuration.
pub(crate) struct DataflowSettings {
    pub(crate) pipeline: PipelineConfig,
    pub(crate) lake: LakeConfig,
    pub(crate) sessions_path: PathBuf,
    pub(crate) checkpoint_dir: PathBuf,
    pub(crate) keep_checkpoints: usize,
    /// Log segments behind the oldest kept checkpoint are still kept this long (for replay).
    pub(crate) retention: Retention,
    pub(crate) batch_records: usize,
    pub(crate) tick: Duration,
    pub(crate) checkpoint_interval: Duration,
}

/// The supervised dataflow; [`Dataflow::start`] recovers and runs it on its own thread.
pub(crate) struct Dataflow {
    pub(crate) settings: DataflowSettings,
    /// The committed model (what a start or restart runs) and swaps on their way in.
    pub(crate) model: Arc<ModelSlot>,
    pub(crate) log: Log,
    pub(crate) hub: Hub,
    pub(crate) status: Arc<SharedStatus>,
    /// Set on shutdown: drain to the end of the log and stop; never restart.
    pub(crate) draining: Arc<AtomicBool>,
    /// Log offset up to which results have been published live, kept across restarts so a
    /// restarted run does not publish its replay again (see `PipelineTask::live_until`).
    pub(crate) live_until: Arc<AtomicU64>,
    /// Records found to make a stage fail, kept across restarts (see `dead_letter`).
    pub(crate) dead_letters: Arc<Mutex<DeadLetters>>,
}

/// The state one run starts from: a restored pipeline, its reader, and freshly opened sinks.
struct Recovered {
    pipeline: ShardedPipeline,
    /// The model `pipeline` runs.
    model: Arc<ActiveModel>,
    reader: LogReader,
    lake: LakeWriter,
    store: SessionsStore,
    checkpoints: CheckpointStore,
    epoch: u64,
}

impl Dataflow {
    /// Recovers from the newest checkpoint and starts the dataflow thread. Errors here (e.g. an
    /// unreadable checkpoint directory or model mismatch) are fatal: the process should not
    /// come up half-working. Failures after this point are retried.
    pub(crate) fn start(self) -> anyhow::Result<JoinHandle<()>> {
        let first = self.recover()?;
        std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || self.supervise(first))
            .context("spawning the pipeline thread")
    }

    /// Restores the newest checkpoint that verifies, deletes lake files of epochs it does not
    /// cover and positions a reader at its log offset (see `checkpoint.rs`).
    fn recover(&self) -> anyhow::Result<Recovered> {
        let s = &self.settings;
        let checkpoints = CheckpointStore::open(s.checkpoint_dir.clone())
            .context("opening the checkpoint directory")?;
        let loaded = checkpoints.load_latest().context("reading checkpoints")?;
        for path in &loaded.corrupt {
            tracing::warn!(path = %path.display(), "checkpoint failed verification; using the previous one");
        }
        let (epoch, from_offset, snapshot, snapshot_model) = match loaded.checkpoint {
            Some(c) => (c.epoch, c.log_offset, Some(c.snapshot), c.model),
            None => (0, self.log.start_offset(), None, None),
        };
        let local_root = s.lake.root.local_root();
        std::fs::create_dir_all(local_root)
            .with_context(|| format!("creating lake root {}", local_root.display()))?;
        // On an object store, found by listing the prefix.
        let files_removed = s
            .lake
            .root
            .remove_files_after_epoch(epoch)
            .with_context(|| {
                format!(
                    "removing lake files of incomplete epochs in {}",
                    s.lake.root
                )
            })?;
        let replay = self.log.end_offset().saturating_sub(from_offset);
        tracing::info!(
            checkpoint_epoch = epoch,
            from_offset,
            replay_records = replay,
            lake_files_removed = files_removed,
            lake = %s.lake.root,
            "recovering from checkpoint"
        );
        let reader = self
            .log
            .reader(from_offset)
            .context("opening a log reader")?;
        let mut lake = LakeWriter::open(s.lake.clone()).context("opening the lake")?;
        lake.set_epoch(epoch + 1);
        let store = SessionsStore::open(&s.sessions_path).context("opening the sessions store")?;
        let model = self.model.committed();
        let pipeline = match snapshot {
            Some(bytes) => {
                let snapshot = PipelineSnapshot::decode(&bytes)
                    .context("decoding the checkpoint's pipeline snapshot")?;
                let mut pipeline =
                    ShardedPipeline::restore(s.pipeline.clone(), &model.models, snapshot)
                        .context("restoring the pipeline from the checkpoint")?;
                // Recurrent state belongs to the model that produced it: with another model
                // (the configuration named a new one) it restarts from zeros.
                if let Some(m) = snapshot_model.filter(|m| *m.version != *model.version) {
                    tracing::info!(
                        checkpointed = m.version,
                        running = &*model.version,
                        "the checkpoint's model state belongs to another model version; it restarts from zeros"
                    );
                    pipeline
                        .set_models(&model.models)
                        .context("setting the model")?;
                }
                pipeline
            }
            None => ShardedPipeline::new(s.pipeline.clone(), &model.models)
                .context("building the pipeline")?,
        };
        self.status
            .checkpoints_corrupt
            .fetch_add(loaded.corrupt.len() as u64, Ordering::Relaxed);
        *self.status.recovery.lock() = (files_removed, replay);
        Ok(Recovered {
            pipeline,
            model,
            reader,
            lake,
            store,
            checkpoints,
            epoch,
        })
    }

    /// Runs the dataflow until it drains on shutdown, restarting it from the last checkpoint
    /// after each failure.
    fn supervise(self, first: Recovered) {
        let mut next = first;
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let began = Instant::now();
            let started_at = (next.epoch, next.reader.position());
            let failure = match self.run(next) {
                Ok(()) => return,
                Err(failure) => failure,
            };
            if let Some(origin) = failure.origin.clone() {
                self.dead_letters.lock().failed(origin, &failure.message);
            }
            // The checkpoint the restart will start from: the run's own last one, if it wrote
            // any. (The one it started from may be gone from the log by now: each checkpoint
            // lets retention delete what the one before it covered.)
            let (epoch, checkpoint_offset) = self
                .status
                .last_checkpoint()
                .filter(|&(e, _)| e > started_at.0)
                .unwrap_or(started_at);
            if self.draining.load(Ordering::Acquire) {
                tracing::error!(error = %failure, "the dataflow failed while stopping; the log keeps everything after checkpoint {epoch} for the next start");
                return;
            }
            self.status
                .dataflow_restarts
                .fetch_add(1, Ordering::Relaxed);
            if began.elapsed() >= BACKOFF_RESET {
                backoff = INITIAL_BACKOFF;
            }
            // Park a tracked reader there: its unconsumed bytes hold appends (and so PUBACKs)
            // back once the log's bound is reached. Failing that, anywhere in the log rather
            // than nowhere, which would let appends run on until the disk is full.
            let _parked = self.log.reader(checkpoint_offset).or_else(|e| {
                tracing::warn!(error = %e, "cannot hold the log at the checkpoint; holding it at its start");
                self.log.reader(self.log.start_offset())
            });
            next = loop {
                let detail = format!(
                    "{failure}; restarting from checkpoint {epoch} in {:.1} s",
                    backoff.as_secs_f64()
                );
                tracing::error!("dataflow failed: {detail}");
                self.status.set_component("dataflow", false, detail);
                if !self.wait_unless_draining(backoff) {
                    tracing::warn!(
                        "stopping while the dataflow is down; the log keeps everything after checkpoint {epoch} for the next start"
                    );
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match self.recover() {
                    Ok(recovered) => break recovered,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "restarting the dataflow failed");
                        self.status.set_component(
                            "dataflow",
                            false,
                            format!("restart failed: {e:#}"),
                        );
                    }
                }
            };
            tracing::info!(checkpoint_epoch = next.epoch, "dataflow restarted");
            self.status.set_component(
                "dataflow",
                true,
                format!("restarted from checkpoint {}", next.epoch),
            );
        }
    }

    /// One run: the sink thread plus the pipeline on this thread. `Ok` when it drained on
    /// shutdown, `Err` with the pipeline's or the sink's failure otherwise.
    fn run(&self, r: Recovered) -> Result<(), RunFailure> {
        let s = &self.settings;
        let failed = Arc::new(AtomicBool::new(false));
        let (sink_tx, sink_rx) = sink_queue::bounded(SINK_QUEUE_BATCHES, SINK_QUEUE_SAMPLES);
        let sink = SinkTask {
            lake: r.lake,
            store: r.store,
            rx: sink_rx,
            status: self.status.clone(),
            checkpoints: r.checkpoints,
            keep_checkpoints: s.keep_checkpoints,
            retention: s.retention,
            log: self.log.clone(),
            failed: failed.clone(),
            compacted: Default::default(),
            model_slot: self.model.clone(),
            awaiting_swap: None,
        };
        let sink_thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || sink.run())
            .map_err(|e| RunFailure {
                message: format!("spawning the sink thread: {e}"),
                origin: None,
            })?;
        let pipeline_failure = PipelineTask {
            pipeline: r.pipeline,
            log: self.log.clone(),
            reader: r.reader,
            sink: sink_tx,
            sink_failed: failed,
            hub: self.hub.clone(),
            status: self.status.clone(),
            draining: self.draining.clone(),
            live_until: self.live_until.clone(),
            batch_records: s.batch_records,
            tick: s.tick,
            checkpoint_interval: s.checkpoint_interval,
            next_epoch: r.epoch + 1,
            dead_letters: self.dead_letters.clone(),
            model_slot: self.model.clone(),
            model: r.model,
        }
        .run();
        // The pipeline hung up, so the sink finishes too.
        let sink_result = match sink_thread.join() {
            Ok(result) => result,
            Err(_) => Err(RunFailure {
                message: "the sink thread panicked".into(),
                origin: None,
            }),
        };
        match pipeline_failure {
            Some(failure) => Err(failure),
            None => sink_result,
        }
    }

    /// Waits `d`; false if shutdown began meanwhile.
    fn wait_unless_draining(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.draining.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(DRAIN_POLL.min(until.saturating_duration_since(Instant::now())));
        }
        !self.draining.load(Ordering::Acquire)
    }
}
