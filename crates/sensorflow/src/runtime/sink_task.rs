//! The sink thread: writes pipeline results to the Parquet lake and the sessions store.
//!
//! Both sinks do blocking file I/O, so they get their own OS thread, fed by a bounded channel
//! from the pipeline thread. Lake files are closed by age even when no data flows, so data is
//! visible in the lake within `lake.max_file_age_secs`.
//!
//! Checkpoints arrive on the same channel, behind the outputs they cover. Handling one commits
//! every open lake file, writes the checkpoint (see [`super::checkpoint`]), starts the next lake
//! epoch and trims the log below the oldest checkpoint kept. After a lake write failure no
//! checkpoint is written any more: rows may be missing from the lake, and only a restart that
//! replays the log from the last good checkpoint puts them back (`/ready` says so).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use sensorflow_lake::{LakeWriter, SessionsStore};
use sensorflow_pipeline::{SessionEvent, SessionRecord};

use sensorflow_log::Log;

use super::checkpoint::{Checkpoint, CheckpointStore};
use super::status::SharedStatus;
use super::{SinkBatch, SinkMsg};

pub(crate) struct SinkTask {
    pub(crate) lake: LakeWriter,
    pub(crate) store: SessionsStore,
    pub(crate) rx: Receiver<SinkMsg>,
    pub(crate) status: Arc<SharedStatus>,
    pub(crate) checkpoints: CheckpointStore,
    pub(crate) keep_checkpoints: usize,
    pub(crate) log: Log,
    /// Set by a lake failure: rows may be missing, so no later checkpoint may claim them.
    pub(crate) poisoned: bool,
}

impl SinkTask {
    pub(crate) fn run(mut self) {
        let mut ended: Vec<SessionRecord> = Vec::new();
        loop {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(SinkMsg::Batch(batch)) => self.write(batch, &mut ended),
                Ok(SinkMsg::Checkpoint(c)) => self.checkpoint(c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Err(e) = self.lake.roll_due(Instant::now()) {
                self.lake_failed(&e);
            }
            self.status.set_lake_stats(self.lake.stats());
        }
        // The pipeline's last message is a checkpoint, which flushed the lake; anything still
        // open here belongs to no checkpoint and is replayed from the log on the next start.
        match self.lake.flush() {
            Ok(0) => {}
            Ok(files) => tracing::info!(files, "lake flushed"),
            Err(e) => self.lake_failed(&e),
        }
        self.status.set_lake_stats(self.lake.stats());
    }

    fn checkpoint(&mut self, c: Checkpoint) {
        if self.poisoned {
            return;
        }
        if let Err(e) = self.lake.flush() {
            self.lake_failed(&e);
            return;
        }
        if let Err(e) = self.checkpoints.write(&c) {
            tracing::error!(error = %e, epoch = c.epoch, "writing a checkpoint failed; the next one retries");
            self.status.set_component("checkpoint", false, format!("write failed: {e}"));
            return;
        }
        self.lake.set_epoch(c.epoch + 1);
        self.status.checkpoint_written(c.epoch, c.log_offset, c.snapshot.len());
        self.status.set_component("checkpoint", true, format!("epoch {} at log offset {}", c.epoch, c.log_offset));
        match self.checkpoints.prune(self.keep_checkpoints) {
            Ok(Some(oldest)) => {
                if let Err(e) = self.log.delete_before(oldest) {
                    tracing::warn!(error = %e, "trimming the log failed");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "pruning old checkpoints failed"),
        }
    }

    fn write(&mut self, batch: SinkBatch, ended: &mut Vec<SessionRecord>) {
        if let Err(e) = self.store.apply(&batch.session_events, &batch.aggregates) {
            tracing::error!(error = %e, "sessions store write failed");
            self.status.set_component("sessions_store", false, e.to_string());
        } else {
            self.status.set_component("sessions_store", true, "ok".into());
        }
        ended.clear();
        ended.extend(batch.session_events.iter().filter_map(|e| match e {
            SessionEvent::Ended { session, .. } => Some(session.clone()),
            SessionEvent::Started { .. } => None,
        }));
        let result = (|| {
            for chunk in &batch.samples {
                self.lake.write_samples(std::slice::from_ref(&**chunk))?;
            }
            self.lake.write_windows(&batch.windows)?;
            self.lake.write_aggregates(&batch.aggregates)?;
            self.lake.write_sessions(ended)?;
            self.lake.write_gaps(&batch.gaps)?;
            self.lake.write_late(&batch.late)
        })();
        match result {
            Ok(()) if !self.poisoned => self.status.set_component("lake", true, "ok".into()),
            Ok(()) => {}
            Err(e) => self.lake_failed(&e),
        }
    }

    fn lake_failed(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!(error = %e, "lake write failed; no further checkpoints until a restart replays the log");
        self.poisoned = true;
        self.status.set_component("lake", false, format!("{e} (restart to replay from the last checkpoint)"));
    }
}
