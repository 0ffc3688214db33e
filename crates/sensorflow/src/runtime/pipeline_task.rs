//! The pipeline thread: tails the log, runs the pipeline, fans results out.
//!
//! One OS thread owns the [`Pipeline`] (its state is plain data, no locks). Each turn reads a
//! batch of durable log records, processes it, publishes live results to the hub (never
//! blocking: the hub drops for slow clients) and hands the rest to the sink thread over a
//! bounded channel. That `send` is where backpressure starts: a slow lake blocks this thread,
//! the log's unconsumed bytes grow, and appends (hence PUBACKs) wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use sensorflow_api::Hub;
use sensorflow_log::{Log, LogError, LogReader};
use sensorflow_pipeline::{Outputs, Pipeline, SessionEvent};
use sensorflow_protocol::record::IngestRecordRef;

use super::status::SharedStatus;
use super::{SinkBatch, now_us};

pub(crate) struct PipelineTask {
    pub(crate) pipeline: Pipeline,
    pub(crate) log: Log,
    pub(crate) reader: LogReader,
    pub(crate) sink: SyncSender<SinkBatch>,
    pub(crate) hub: Hub,
    pub(crate) status: Arc<SharedStatus>,
    /// Set on shutdown: finish once everything appended so far is processed.
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) batch_records: usize,
    pub(crate) tick: Duration,
}

/// How often the `/sensors` snapshot is rebuilt.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// How often fully consumed log segments are deleted. Until operator state is checkpointed
/// with log offsets, nothing ever reads a segment again once the pipeline has passed it.
const RETENTION_INTERVAL: Duration = Duration::from_secs(10);

impl PipelineTask {
    pub(crate) fn run(mut self) {
        let mut buf = Vec::with_capacity(self.batch_records);
        let mut out = Outputs::default();
        let mut next_tick = Instant::now() + self.tick;
        let mut next_status = Instant::now();
        let mut next_retention = Instant::now() + RETENTION_INTERVAL;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
            match self.reader.read_batch(&mut buf, self.batch_records, wait) {
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
            if now >= next_retention {
                match self.log.delete_before(self.reader.position()) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(segments = n, "deleted consumed log segments"),
                    Err(e) => tracing::warn!(error = %e, "deleting consumed log segments failed"),
                }
                next_retention = now + RETENTION_INTERVAL;
            }
            if now >= next_status {
                self.status.refresh_sensors(&self.pipeline, now);
                next_status = now + STATUS_INTERVAL;
            }
            if !out.is_empty() && !self.dispatch(&mut out) {
                return;
            }
            self.reader.commit(self.reader.position());
            if self.draining.load(Ordering::Acquire) && self.reader.position() >= self.log.end_offset() {
                break;
            }
        }
        self.pipeline.close_all(now_us(), &mut out);
        self.dispatch(&mut out);
        self.status.refresh_sensors(&self.pipeline, Instant::now());
        tracing::info!(records = self.pipeline.stats().records, samples = self.pipeline.stats().samples_out, "pipeline drained");
    }

    /// Publishes live results and passes everything to the sink thread. Returns false when the
    /// sink thread is gone (it only goes on a fatal error), which ends the pipeline.
    fn dispatch(&mut self, out: &mut Outputs) -> bool {
        let samples: Vec<_> = out.samples.drain(..).map(Arc::new).collect();
        for chunk in &samples {
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
        let batch = SinkBatch {
            samples,
            windows: std::mem::take(&mut out.windows),
            session_events: std::mem::take(&mut out.session_events),
            aggregates: std::mem::take(&mut out.aggregates),
            gaps: std::mem::take(&mut out.gaps),
            late: std::mem::take(&mut out.late),
        };
        if self.sink.send(batch).is_err() {
            tracing::error!("sink thread stopped; stopping the pipeline");
            return false;
        }
        true
    }
}
