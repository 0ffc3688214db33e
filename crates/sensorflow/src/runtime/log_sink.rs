//! [`LogSink`]: ingest's sink in the embedded platform, where the order of appends and the
//! moment of the PUBACK are decided. Ordering-critical: read its doc before changing it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use sensorflow_ingest::{IngestSink, SinkError};
use sensorflow_log::{Admission, Log, LogError, Pending};
use sensorflow_protocol::record::IngestRecord;
use tokio::sync::{mpsc, oneshot};

/// Ingest's sink: encodes each record and appends it to the log; the future resolves once the
/// record is durable, which is when ingest sends the PUBACK.
///
/// Order matters (dedupe relies on a sensor's packets staying in order): ingest calls `append`
/// in arrival order and polls the futures concurrently, so `append` fixes the record's place in
/// the log before it returns. Normally the log has room and the record is admitted right there,
/// on the ingest thread, and the future only waits for durability (the log writer wakes the
/// ingest thread directly). Under backpressure the log has no room: the record is queued to a
/// forwarder task that waits for room and admits records in queue order, and while anything is
/// queued there later records queue behind it, so order holds across both paths. The queue is
/// unbounded, but what can be in it is bounded by ingest's per-connection in-flight limit
/// (`mqtt.receive_maximum`).
pub(crate) struct LogSink {
    log: Log,
    /// Records handed to the forwarder and not yet admitted.
    forwarding: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<(Bytes, oneshot::Sender<Result<Pending, SinkError>>)>,
}

impl LogSink {
    pub(crate) fn spawn(log: Log) -> LogSink {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(Bytes, oneshot::Sender<Result<Pending, SinkError>>)>();
        let forwarding = Arc::new(AtomicUsize::new(0));
        let (forwarder_log, count) = (log.clone(), forwarding.clone());
        tokio::spawn(async move {
            while let Some((payload, done)) = rx.recv().await {
                let admitted = forwarder_log.admit(payload).await.map_err(unavailable);
                // Admitted (or failed) before the count drops: a record that then takes the
                // direct path lands behind this one.
                count.fetch_sub(1, Ordering::AcqRel);
                let _ = done.send(admitted);
            }
        });
        LogSink {
            log,
            forwarding,
            tx,
        }
    }
}

fn unavailable(e: LogError) -> SinkError {
    SinkError::Unavailable(e.to_string())
}

/// Waits until an admitted record is durable.
async fn durable(pending: Pending) -> Result<(), SinkError> {
    pending.await.map(|_| ()).map_err(unavailable)
}

impl IngestSink for LogSink {
    fn append(&self, record: IngestRecord) -> BoxFuture<'static, Result<(), SinkError>> {
        let mut buf = Vec::with_capacity(record.encoded_len());
        if let Err(e) = record.try_encode(&mut buf) {
            return futures::future::ready(Err(SinkError::Rejected(e.to_string()))).boxed();
        }
        let mut payload = Bytes::from(buf);
        if self.forwarding.load(Ordering::Acquire) == 0 {
            match self.log.try_admit(payload) {
                Ok(Admission::Admitted(pending)) => return durable(pending).boxed(),
                Ok(Admission::Full(back)) => payload = back,
                Err(e) => return futures::future::ready(Err(unavailable(e))).boxed(),
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        self.forwarding.fetch_add(1, Ordering::AcqRel);
        if self.tx.send((payload, done_tx)).is_err() {
            self.forwarding.fetch_sub(1, Ordering::AcqRel);
            return futures::future::ready(Err(SinkError::Unavailable("the log is closed".into())))
                .boxed();
        }
        async move {
            match done_rx.await {
                Ok(Ok(pending)) => durable(pending).await,
                Ok(Err(e)) => Err(e),
                Err(_) => Err(SinkError::Unavailable("the log is closed".into())),
            }
        }
        .boxed()
    }
}
