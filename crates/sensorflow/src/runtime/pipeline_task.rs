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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sensorflow_api::Hub;
use sensorflow_log::{Log, LogError, LogReader};
use sensorflow_pipeline::{Outputs, SampleChunk, SessionEvent, ShardedPipeline};
use sensorflow_protocol::record::IngestRecordRef;

use super::sink_queue::WeightedSender;
use super::status::SharedStatus;
use super::checkpoint::Checkpoint;
use super::{SinkBatch, SinkMsg, now_us};

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
}

/// How often the `/sensors` snapshot is rebuilt.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

impl PipelineTask {
    pub(crate) fn run(mut self) {
        let mut buf = Vec::with_capacity(self.batch_records);
        let mut out = Outputs::default();
        let mut next_tick = Instant::now() + self.tick;
        let mut next_status = Instant::now();
        let mut next_checkpoint = Instant::now() + self.checkpoint_interval;
        let replay_until = self.live_until.load(Ordering::Acquire);
        loop {
            if self.sink_failed.load(Ordering::Acquire) {
                return;
            }
            let wait = next_tick.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
            // Replaying what an earlier run already published: read no further than that, and
            // keep this turn's results (timers' included) off the hub.
            let replay_left = replay_until.saturating_sub(self.reader.position());
            let live = replay_left == 0;
            let max_records = if live {
                self.batch_records
            } else {
                usize::try_from(replay_left).map_or(self.batch_records, |left| left.min(self.batch_records))
            };
            match self.reader.read_batch(&mut buf, max_records, wait) {
                Ok(_) => {}
                Err(LogError::Closed) => break,
                Err(e) => {
                    tracing::error!(error = %e, "reading the log failed; retrying");
                    self.status.set_component("pipeline", false, format!("log read failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            if !buf.is_empty() {
                let status = &self.status;
                let records = buf.iter().filter_map(|(offset, bytes)| match IngestRecordRef::decode(bytes) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        status.count_corrupt_record();
                        tracing::warn!(offset, error = %e, "skipping undecodable log record");
                        None
                    }
                });
                self.pipeline.process(records, now_us(), &mut out);
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
                self.live_until.fetch_max(self.reader.position(), Ordering::AcqRel);
            }
            if !out.is_empty() && !self.dispatch(&mut out, live) {
                return;
            }
            self.reader.commit(self.reader.position());
            if now >= next_checkpoint {
                if !self.checkpoint() {
                    return;
                }
                next_checkpoint = Instant::now() + self.checkpoint_interval;
            }
            if self.draining.load(Ordering::Acquire) && self.reader.position() >= self.log.end_offset() {
                break;
            }
        }
        self.pipeline.close_all(now_us(), &mut out);
        if self.dispatch(&mut out, true) {
            self.checkpoint();
        }
        self.status.refresh_sensors(&self.pipeline, Instant::now());
        let stats = self.pipeline.stats();
        tracing::info!(records = stats.records, samples = stats.samples_out, "pipeline drained");
    }

    /// Asks the sink thread to checkpoint: the pipeline's state as of the current log position,
    /// queued behind every output produced so far. Returns false when the sink thread is gone.
    fn checkpoint(&mut self) -> bool {
        let snapshot = self.pipeline.snapshot().encode();
        let msg = SinkMsg::Checkpoint(Checkpoint { epoch: self.next_epoch, log_offset: self.reader.position(), snapshot });
        self.next_epoch += 1;
        if self.sink.send(msg, 0).is_err() {
            return false;
        }
        true
    }

    /// Publishes results live (unless they are a replay, see `live_until`) and passes
    /// everything to the sink thread. Returns false when the sink thread is gone (it failed),
    /// which ends this run of the pipeline.
    fn dispatch(&mut self, out: &mut Outputs, live: bool) -> bool {
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
