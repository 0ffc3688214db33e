//! The sink thread: writes pipeline results to the Parquet lake and the sessions store.
//!
//! Both sinks do blocking file I/O, so they get their own OS thread, fed by a bounded channel
//! from the pipeline thread. Lake files are closed by age even when no data flows, so data is
//! visible in the lake within `lake.max_file_age_secs`.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use sensorflow_lake::{LakeWriter, SessionsStore};
use sensorflow_pipeline::{SessionEvent, SessionRecord};

use super::SinkBatch;
use super::status::SharedStatus;

pub(crate) struct SinkTask {
    pub(crate) lake: LakeWriter,
    pub(crate) store: SessionsStore,
    pub(crate) rx: Receiver<SinkBatch>,
    pub(crate) status: Arc<SharedStatus>,
}

impl SinkTask {
    pub(crate) fn run(mut self) {
        let mut ended: Vec<SessionRecord> = Vec::new();
        loop {
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(batch) => self.write(batch, &mut ended),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Err(e) = self.lake.roll_due(Instant::now()) {
                self.lake_failed(&e);
            }
            self.status.set_lake_stats(self.lake.stats());
        }
        match self.lake.flush() {
            Ok(files) => tracing::info!(files, "lake flushed"),
            Err(e) => self.lake_failed(&e),
        }
        self.status.set_lake_stats(self.lake.stats());
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
            Ok(()) => self.status.set_component("lake", true, "ok".into()),
            Err(e) => self.lake_failed(&e),
        }
    }

    fn lake_failed(&self, e: &dyn std::fmt::Display) {
        tracing::error!(error = %e, "lake write failed");
        self.status.set_component("lake", false, e.to_string());
    }
}
