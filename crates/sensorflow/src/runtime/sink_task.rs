//! The sink thread: writes pipeline results to the Parquet lake and the sessions store.
//!
//! Both sinks do blocking file I/O, so they get their own OS thread, fed by a bounded channel
//! from the pipeline thread. Lake files are closed by age even when no data flows, so data is
//! visible in the lake within `lake.max_file_age_secs`.
//!
//! Checkpoints arrive on the same channel, behind the outputs they cover. Handling one commits
//! every open lake file, writes the checkpoint (see [`super::checkpoint`]), starts the next lake
//! epoch and trims the log below the oldest checkpoint kept (and beyond the retention). Then
//! it merges the small files of one closed partition, if any has some (see
//! [`SinkTask::compact_closed_partitions`]).
//!
//! A failed lake or sessions-store write ends the thread with the error: what reached the disk
//! is uncertain, so the supervisor (see [`super::dataflow`]) restarts the whole dataflow from
//! the last checkpoint, whose replay writes those rows again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime};

use chrono::{NaiveDate, Utc};
use sensorflow_lake::{LakeWriter, SessionsStore, Table};
use sensorflow_pipeline::{SessionEvent, SessionRecord};

use sensorflow_log::{Log, Retention};

use super::CheckpointRequest;
use super::checkpoint::CheckpointStore;
use super::dead_letter::RunFailure;
use super::model_control::ModelSlot;
use super::sink_queue::WeightedReceiver;
use super::status::SharedStatus;
use super::{SinkBatch, SinkMsg};

/// A checkpoint commit slower than this is logged: the pipeline may be waiting on the sink.
const SLOW_CHECKPOINT: Duration = Duration::from_millis(250);
/// A closed partition whose compaction failed is tried again after this long.
const COMPACTION_RETRY: Duration = Duration::from_secs(60);

/// What the last look at a closed partition found (see [`SinkTask::compact_closed_partitions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compacted {
    /// Nothing to merge while the partition had this stamp ([`LakeWriter::partition_stamp`]:
    /// the directory's modification time, or on an object store the writer's last commit there).
    Clean(SystemTime),
    /// The compaction failed; try again at this instant (it may have left a journal that the
    /// next call finishes).
    Failed(Instant),
}

pub(crate) struct SinkTask {
    pub(crate) lake: LakeWriter,
    pub(crate) store: SessionsStore,
    pub(crate) rx: WeightedReceiver<SinkMsg>,
    pub(crate) status: Arc<SharedStatus>,
    pub(crate) checkpoints: CheckpointStore,
    pub(crate) keep_checkpoints: usize,
    pub(crate) retention: Retention,
    pub(crate) log: Log,
    /// Raised when this thread fails, so the pipeline stops even while it has nothing to send.
    pub(crate) failed: Arc<AtomicBool>,
    /// Closed partitions looked at: with nothing to merge they are listed again only once a
    /// file lands in them (late data); after a failure, after [`COMPACTION_RETRY`].
    pub(crate) compacted: HashMap<(Table, NaiveDate), Compacted>,
    /// The committed model, updated when a checkpoint naming a swapped-in model is written.
    pub(crate) model_slot: Arc<ModelSlot>,
    /// A swap whose checkpoint failed to write: answered when the next one is written.
    pub(crate) awaiting_swap: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl SinkTask {
    /// Runs until the pipeline hangs up (`Ok`) or a sink write fails (`Err`, after raising
    /// `failed`; with the batch's log offsets when its rows caused it, see `dead_letter`).
    pub(crate) fn run(mut self) -> Result<(), RunFailure> {
        let result = self.run_inner();
        self.status.set_lake_stats(self.lake.stats());
        result.map_err(|failure| {
            self.failed.store(true, Ordering::Release);
            let message = failure.to_string();
            self.status
                .set_component(failure.component, false, message.clone());
            RunFailure {
                message,
                origin: failure.origin,
            }
        })
    }

    fn run_inner(&mut self) -> Result<(), SinkFailure> {
        let mut ended: Vec<SessionRecord> = Vec::new();
        loop {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                // The permit returns the batch's samples to the queue's budget once written.
                Ok((SinkMsg::Batch(batch), _written)) => self.write(batch, &mut ended)?,
                Ok((SinkMsg::Checkpoint(c), _)) => self.checkpoint(c)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.lake
                .roll_due(Instant::now())
                .map_err(SinkFailure::lake)?;
            self.status.set_lake_stats(self.lake.stats());
        }
        // The pipeline's last message is a checkpoint, which flushed the lake; anything still
        // open here belongs to no checkpoint and is replayed from the log on the next start.
        match self.lake.flush() {
            Ok(0) => {}
            Ok(files) => tracing::info!(files, "lake flushed"),
            Err(e) => return Err(SinkFailure::lake(e)),
        }
        Ok(())
    }

    fn checkpoint(&mut self, request: CheckpointRequest) -> Result<(), SinkFailure> {
        let CheckpointRequest {
            checkpoint: c,
            model,
            swap_done,
        } = request;
        if swap_done.is_some() {
            self.awaiting_swap = swap_done;
        }
        let started = Instant::now();
        self.lake.flush().map_err(SinkFailure::lake)?;
        if let Err(e) = self.checkpoints.write(&c) {
            // The lake files of this epoch stay; the next checkpoint covers them too.
            tracing::error!(error = %e, epoch = c.epoch, "writing a checkpoint failed; the next one retries");
            self.status
                .set_component("checkpoint", false, format!("write failed: {e}"));
            return Ok(());
        }
        // From here a restart runs this checkpoint's model: a swap is done.
        if !Arc::ptr_eq(&self.model_slot.committed(), &model) {
            self.model_slot.commit(model);
        }
        if let Some(done) = self.awaiting_swap.take() {
            let _ = done.send(Ok(()));
        }
        self.lake.set_epoch(c.epoch + 1);
        let took = started.elapsed();
        self.status
            .checkpoint_written(c.epoch, c.log_offset, c.snapshot.len(), took);
        if took > SLOW_CHECKPOINT {
            // The pipeline waits on the sink's bounded queue meanwhile: live latency suffers.
            tracing::warn!(
                epoch = c.epoch,
                took_ms = took.as_millis() as u64,
                "slow checkpoint (lake commit and checkpoint write)"
            );
        }
        self.status.set_component(
            "checkpoint",
            true,
            format!("epoch {} at log offset {}", c.epoch, c.log_offset),
        );
        match self.checkpoints.prune(self.keep_checkpoints) {
            Ok(Some(oldest)) => {
                if let Err(e) = self.log.trim(oldest.log_offset, &self.retention) {
                    tracing::warn!(error = %e, "trimming the log failed");
                }
                self.compact_closed_partitions(oldest.epoch, Utc::now().date_naive());
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "pruning old checkpoints failed"),
        }
        Ok(())
    }

    /// Merges the small files of one closed partition (a date before `today`, UTC), at most
    /// one merge per checkpoint so the work spreads out: files are committed at every
    /// checkpoint, so a small fleet leaves thousands of small files a day per table, which
    /// readers pay for on every query. Only files of epochs up to `through_epoch`, the oldest
    /// checkpoint kept, are merged, and the result is named for the newest of them: recovery
    /// from any kept checkpoint leaves it alone (see [`LakeWriter::compact`]). A partition is
    /// listed again only when a file lands in it (on S3 every listing is a request). Failures are logged and counted in the
    /// lake's error count and never stop the dataflow: a compaction that fails leaves the
    /// partition as it was, or leaves a journal that the retry a minute later finishes.
    fn compact_closed_partitions(&mut self, through_epoch: u64, today: NaiveDate) {
        for table in Table::ALL {
            let dates = match self.lake.partition_dates(table) {
                Ok(dates) => dates,
                Err(e) => {
                    tracing::warn!(error = %e, %table, "listing lake partitions failed");
                    continue;
                }
            };
            for date in dates.into_iter().filter(|d| *d < today) {
                let modified = |lake: &LakeWriter| lake.partition_stamp(table, date);
                match self.compacted.get(&(table, date)) {
                    Some(Compacted::Clean(at)) if modified(&self.lake) == Some(*at) => continue,
                    Some(Compacted::Failed(retry)) if Instant::now() < *retry => continue,
                    _ => {}
                }
                match self.lake.compact(table, date, Some(through_epoch)) {
                    Ok(report) if report.input_files > 0 => return,
                    // Files of epochs not yet past every kept checkpoint: look next time.
                    Ok(report) if report.pending_files > 0 => {}
                    Ok(_) => {
                        if let Some(at) = modified(&self.lake) {
                            self.compacted.insert((table, date), Compacted::Clean(at));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %table, %date, "lake compaction failed; retrying in a minute");
                        self.compacted.insert(
                            (table, date),
                            Compacted::Failed(Instant::now() + COMPACTION_RETRY),
                        );
                    }
                }
            }
        }
    }

    fn write(
        &mut self,
        batch: SinkBatch,
        ended: &mut Vec<SessionRecord>,
    ) -> Result<(), SinkFailure> {
        // Fault-injection tests slow the sink down here (see the `failpoints` feature).
        fail::fail_point!("sink-batch");
        self.store
            .apply(&batch.session_events, &batch.aggregates)
            .map_err(|e| SinkFailure {
                component: "sessions_store",
                detail: format!("sessions store write failed: {e}"),
                origin: None,
            })?;
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
            self.lake.write_late(&batch.late)?;
            self.lake.write_quarantine(&batch.quarantine)
        })();
        result.map_err(|e| {
            let origin = e.is_data_error().then(|| batch.origin.clone());
            SinkFailure {
                origin,
                ..SinkFailure::lake(e)
            }
        })?;
        self.status.set_component("lake", true, "ok".into());
        Ok(())
    }
}

/// A failed sink write, with the `/ready` component it concerns and, when the rows written
/// caused it, the log offsets they came from.
struct SinkFailure {
    component: &'static str,
    detail: String,
    origin: Option<std::ops::Range<u64>>,
}

impl SinkFailure {
    fn lake(e: impl std::fmt::Display) -> Self {
        SinkFailure {
            component: "lake",
            detail: format!("lake write failed: {e}"),
            origin: None,
        }
    }
}

impl std::fmt::Display for SinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}
