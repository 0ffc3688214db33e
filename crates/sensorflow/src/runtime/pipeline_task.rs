//! The pipeline thread: tails the log, runs the pipeline, fans results out.
//!
//! One OS thread owns the [`Pipeline`] (its state is plain data, no locks). Each turn reads a
//! batch of durable log records, processes it, publishes live results to the hub (never
//! blocking: the hub drops for slow clients) and hands the rest to the sink thread over a
//! queue bounded in turns and in samples (`sink_queue`). That `send` is where backpressure
//! starts: a slow lake blocks this thread, the log's unconsumed bytes grow, and appends (hence
//! PUBACKs) wait.
//!
//! After a failure the supervisor restarts the dataflow from the last checkpoint, and the new
//! run processes again the records the failed one had processed since. Their results go to the
//! sinks (which dropped the uncommitted ones) but not to the hub a second time: WebSocket
//! clients saw them already. Reads are cut at the offset the failed run had published up to,
//! so each turn is either all replay or all new (see `live_until`).
//!
//! A step that panics ends the run with the step's log offsets, and records known to make a
//! stage fail are set aside into the quarantine table instead of being processed (see
//! [`super::dead_letter`]).

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use sensorflow_api::Hub;
use sensorflow_log::{Log, LogError, LogReader};
use sensorflow_pipeline::{Outputs, QuarantineRecord, SampleChunk, SessionEvent, ShardedPipeline};
use sensorflow_protocol::record::IngestRecordRef;

use super::checkpoint::Checkpoint;
use super::dead_letter::{DeadLetters, RunFailure};
use super::model_control::{ActiveModel, ModelSlot, PendingSwap};
use super::sink_queue::WeightedSender;
use super::status::SharedStatus;
use super::{CheckpointRequest, SinkBatch, SinkMsg, now_us};

pub(crate) struct PipelineTask {
    pub(crate) pipeline: ShardedPipeline,
    pub(crate) log: Log,
    pub(crate) reader: LogReader,
    /// Weighted by samples (see `sink_queue`).
    pub(crate) sink: WeightedSender<SinkMsg>,
    /// Raised by the sink thread when it fails: stop at once, the supervisor restarts us.
    pub(crate) sink_failed: Arc<AtomicBool>,
    pub(crate) hub: Hub,
    pub(crate) status: Arc<SharedStatus>,
    /// Set on shutdown: finish once everything appended so far is processed.
    pub(crate) draining: Arc<AtomicBool>,
    /// Log offset below which every record's results have been published to the hub, by this
    /// run or an earlier one of the same process. Shared across restarts; only grows.
    pub(crate) live_until: Arc<AtomicU64>,
    pub(crate) batch_records: usize,
    pub(crate) tick: Duration,
    pub(crate) checkpoint_interval: Duration,
    /// Epoch of the next checkpoint (one more than the last completed one).
    pub(crate) next_epoch: u64,
    /// Records suspected of or found to be failing a stage, shared across restarts.
    pub(crate) dead_letters: Arc<Mutex<DeadLetters>>,
    /// Where model swaps wait to be taken between two steps (see `model_control`).
    pub(crate) model_slot: Arc<ModelSlot>,
    /// The model the pipeline runs now (checkpoints name it).
    pub(crate) model: Arc<ActiveModel>,
}

/// How often the `/sensors` snapshot is rebuilt.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

impl PipelineTask {
    /// Runs until the log is closed or drained on shutdown (`None`), the sink thread is gone
    /// (`None`: the sink reports its own failure), or a step fails (`Some`).
    pub(crate) fn run(mut self) -> Option<RunFailure> {
        let mut buf = Vec::with_capacity(self.batch_records);
        let mut out = Outputs::default();
        let mut next_tick = Instant::now() + self.tick;
        let mut next_status = Instant::now();
        let mut next_checkpoint = Instant::now() + self.checkpoint_interval;
        let replay_until = self.live_until.load(Ordering::Acquire);
        loop {
            if self.sink_failed.load(Ordering::Acquire) {
                return None;
            }
            // Between two steps (`out` was dispatched at the end of the last turn): the only
            // place a model is swapped in.
            if let Some(swap) = self.model_slot.take_pending()
                && !self.swap_model(swap)
            {
                return None;
            }
            let wait = next_tick
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            // Replaying what an earlier run already published: read no further than that, and
            // keep this turn's results (timers' included) off the hub.
            let replay_left = replay_until.saturating_sub(self.reader.position());
            let live = replay_left == 0;
            let max_records = if live {
                self.batch_records
            } else {
                usize::try_from(replay_left)
                    .map_or(self.batch_records, |left| left.min(self.batch_records))
            };
            match self.reader.read_batch(&mut buf, max_records, wait) {
                Ok(_) => {}
                Err(LogError::Closed) => break,
                Err(e) => {
                    tracing::error!(error = %e, "reading the log failed; retrying");
                    self.status
                        .set_component("pipeline", false, format!("log read failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let mut origin = 0..0;
            if let (Some(first), Some(last)) = (buf.first(), buf.last()) {
                let range = first.0..last.0 + 1;
                if self.dead_letters.lock().is_suspect(&range) {
                    // One record per step, each dispatched on its own, so that a failure that
                    // repeats names its record.
                    for i in 0..buf.len() {
                        let offset = buf[i].0;
                        if let Err(failure) = self.step(&buf[i..=i], live, &mut out) {
                            return Some(failure);
                        }
                        if !out.is_empty() && !self.dispatch(&mut out, live, offset..offset + 1) {
                            return None;
                        }
                    }
                } else {
                    if let Err(failure) = self.step(&buf, live, &mut out) {
                        return Some(failure);
                    }
                    origin = range;
                }
                buf.clear();
            }
            let now = Instant::now();
            if now >= next_tick {
                self.pipeline.on_tick(now_us(), &mut out);
                next_tick = now + self.tick;
            }
            if now >= next_status {
                self.status.refresh_sensors(&self.pipeline, now);
                next_status = now + STATUS_INTERVAL;
            }
            if live {
                // Before dispatching: a sink failure there ends this run after the hub got them.
                self.live_until
                    .fetch_max(self.reader.position(), Ordering::AcqRel);
            }
            if !out.is_empty() && !self.dispatch(&mut out, live, origin) {
                return None;
            }
            self.reader.commit(self.reader.position());
            self.dead_letters.lock().passed(self.reader.position());
            if now >= next_checkpoint {
                if !self.checkpoint() {
                    return None;
                }
                next_checkpoint = Instant::now() + self.checkpoint_interval;
            }
            if self.draining.load(Ordering::Acquire)
                && self.reader.position() >= self.log.end_offset()
            {
                break;
            }
        }
        // A clean stop ends no session and emits no open window: the final checkpoint keeps
        // them, model state included, and the next start continues them. Only the session gap,
        // in event or processing time, ends a session (DESIGN stage 3).
        if out.is_empty() || self.dispatch(&mut out, true, 0..0) {
            self.checkpoint();
        }
        self.status.refresh_sensors(&self.pipeline, Instant::now());
        let stats = self.pipeline.stats();
        tracing::info!(
            records = stats.records,
            samples = stats.samples_out,
            "pipeline drained"
        );
        None
    }

    /// Processes `records` (consecutive log records) as one pipeline step. Poisoned records are
    /// set aside into the quarantine table instead; a panic of the step is caught and returned
    /// with the step's offsets, since the pipeline's state may be half-updated: the dataflow
    /// restarts from its checkpoint.
    fn step(
        &mut self,
        records: &[(u64, Bytes)],
        live: bool,
        out: &mut Outputs,
    ) -> Result<(), RunFailure> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let range = first.0..last.0 + 1;
        let now = now_us();
        // Taken once, outside the step: the lock is not held while the records are processed.
        let poisoned = self.dead_letters.lock().poisoned_in(&range);
        for (offset, failure) in &poisoned {
            let Some((_, bytes)) = records.iter().find(|(o, _)| o == offset) else {
                continue;
            };
            if let Ok(r) = IngestRecordRef::decode(bytes) {
                out.quarantine.push(dead_letter(&r, failure, now));
                if live {
                    self.status.dead_letter(r.sensor_id);
                }
            }
        }
        let skip = |offset: u64| poisoned.iter().any(|(o, _)| *o == offset);
        let status = &self.status;
        let pipeline = &mut self.pipeline;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let decoded = records
                .iter()
                .filter(|(offset, _)| !skip(*offset))
                .filter_map(|(offset, bytes)| match IngestRecordRef::decode(bytes) {
                    Ok(r) => {
                        poison_failpoint(r.sensor_id);
                        Some(r)
                    }
                    Err(e) => {
                        status.count_corrupt_record();
                        tracing::warn!(offset, error = %e, "skipping undecodable log record");
                        None
                    }
                });
            pipeline.process(decoded, now, out);
        }));
        result.map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            // Whatever the step produced before it failed belongs to a state being thrown away.
            out.clear();
            RunFailure {
                message: format!("a pipeline stage failed: {what}"),
                origin: Some(range),
            }
        })
    }

    /// Swaps in `swap`'s model and checkpoints at once, so the swap sits at this log offset;
    /// the request is answered when that checkpoint is written. A model the pipeline cannot
    /// run is refused and the current one stays. Returns false when the sink thread is gone.
    fn swap_model(&mut self, swap: PendingSwap) -> bool {
        if let Err(e) = self.pipeline.set_models(&swap.model.models) {
            let _ = swap
                .done
                .send(Err(format!("the pipeline cannot run this model: {e}")));
            return true;
        }
        tracing::info!(
            from = &*self.model.version,
            to = &*swap.model.version,
            log_offset = self.reader.position(),
            "model swapped in; recurrent state restarts from zeros"
        );
        self.model = swap.model;
        self.checkpoint_with(Some(swap.done))
    }

    /// Asks the sink thread to checkpoint: the pipeline's state as of the current log position,
    /// queued behind every output produced so far. Returns false when the sink thread is gone.
    fn checkpoint(&mut self) -> bool {
        self.checkpoint_with(None)
    }

    fn checkpoint_with(
        &mut self,
        swap_done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> bool {
        let snapshot = self.pipeline.snapshot().encode();
        let configured = self.model_slot.configured.as_deref();
        let msg = SinkMsg::Checkpoint(CheckpointRequest {
            checkpoint: Checkpoint {
                epoch: self.next_epoch,
                log_offset: self.reader.position(),
                snapshot,
                model: Some(self.model.checkpoint_model(configured)),
            },
            model: self.model.clone(),
            swap_done,
        });
        self.next_epoch += 1;
        if self.sink.send(msg, 0).is_err() {
            return false;
        }
        true
    }

    /// Publishes results live (unless they are a replay, see `live_until`) and passes
    /// everything to the sink thread. Returns false when the sink thread is gone (it failed),
    /// which ends this run of the pipeline.
    fn dispatch(&mut self, out: &mut Outputs, live: bool, origin: Range<u64>) -> bool {
        let samples: Vec<_> = out.samples.drain(..).map(Arc::new).collect();
        if live {
            self.publish_live(&samples, out);
        }
        let batch = SinkBatch {
            samples,
            windows: std::mem::take(&mut out.windows),
            session_events: std::mem::take(&mut out.session_events),
            aggregates: std::mem::take(&mut out.aggregates),
            gaps: std::mem::take(&mut out.gaps),
            late: std::mem::take(&mut out.late),
            quarantine: std::mem::take(&mut out.quarantine),
            origin,
        };
        let samples = batch.samples.iter().map(|c| c.len()).sum();
        if self.sink.send(SinkMsg::Batch(batch), samples).is_err() {
            return false;
        }
        true
    }

    /// Sends a turn's results to the hub and counts its ended sessions: both once per result,
    /// so a replay, which the failed run already sent and counted, skips this.
    fn publish_live(&self, samples: &[Arc<SampleChunk>], out: &Outputs) {
        for chunk in samples {
            self.hub.publish_samples(chunk.clone());
        }
        for w in &out.windows {
            self.hub.publish_window(Arc::new(w.clone()));
        }
        for a in &out.aggregates {
            self.hub.publish_aggregate(Arc::new(a.clone()));
        }
        for e in &out.session_events {
            self.hub.publish_session_event(Arc::new(e.clone()));
            if let SessionEvent::Ended { .. } = e {
                self.status.sessions_ended.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for PipelineTask {
    /// However the run ends, its model time is counted.
    fn drop(&mut self) {
        self.status.pipeline_finished(&self.pipeline);
    }
}

/// The quarantine row of a poisoned log record: its payload as received, and what failed.
fn dead_letter(record: &IngestRecordRef<'_>, failure: &str, now_us: i64) -> QuarantineRecord {
    QuarantineRecord::stage_failed(
        record.sensor_id,
        record.ingest_us,
        record.payload,
        failure,
        now_us,
    )
}

/// Fault injection for the dead-letter tests: with the `failpoints` feature and
/// `FAILPOINTS=pipeline-poison=return(SENSOR)`, a step panics on a record of sensor `SENSOR`,
/// the way an operator bug triggered by one record's data would. Compiled to nothing otherwise
/// (which leaves `sensor_id` unused).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn poison_failpoint(sensor_id: &str) {
    fail::fail_point!("pipeline-poison", |target: Option<String>| {
        if target.as_deref() == Some(sensor_id) {
            panic!("fail point pipeline-poison hit by a record of sensor {sensor_id}");
        }
    });
}
