//! The two seams between ingest and the rest of sensorflow: where records go
//! ([`IngestSink`]) and where bad input is reported ([`IngestObserver`]).

use futures::future::BoxFuture;
use sensorflow_protocol::IngestRecord;
use sensorflow_protocol::framing::BadReason;

/// Why a sink did not store a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Transient: the log is full, down or too slow. The client should retry later.
    /// MQTT 5 answers with PUBACK 0x80 (unspecified error); MQTT 3.1.1 closes the connection.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// Permanent for this record: the sink refuses it (e.g. policy or validation).
    /// MQTT 5 answers with PUBACK 0x83 (implementation specific error); MQTT 3.1.1 closes the
    /// connection.
    #[error("record rejected by sink: {0}")]
    Rejected(String),
}

/// Where accepted messages go.
pub trait IngestSink: Send + Sync + 'static {
    /// Stores one record. `Ok` means durably stored: only then is a QoS 1 publish acknowledged
    /// (QoS 2: PUBREC sent). `Err` means not stored; see [`SinkError`] for what the client sees.
    ///
    /// `append` is called in the order a connection's publishes arrived, but the returned
    /// futures run concurrently (up to `receive_maximum` per connection): a sink that must keep
    /// arrival order takes the record's position synchronously inside `append` (e.g. admits it
    /// to a log or sends it to a channel) rather than inside the future. Acknowledgements are
    /// always sent in arrival order.
    ///
    /// The future is polled on the connection's ntex worker thread, a tokio current-thread
    /// runtime (tokio channels, semaphores and timers work; it must not block), and is dropped
    /// unpolled-to-the-end if the connection goes away first. A sink whose store must finish
    /// regardless therefore starts it inside `append`, as the log does: an admitted record is
    /// written whether or not anyone awaits it.
    fn append(&self, record: IngestRecord) -> BoxFuture<'static, Result<(), SinkError>>;
}

/// Receives input that is not stored: unknown topics and oversize messages.
pub trait IngestObserver: Send + Sync + 'static {
    /// Called once per bad message on the connection's worker thread; must not block.
    /// `sensor_id` is known for oversize messages on a data topic, `None` for unknown topics
    /// (then `detail` holds the topic).
    fn bad_input(&self, sensor_id: Option<&str>, reason: BadReason, detail: &str);
}

/// An observer that ignores everything (for tests and tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl IngestObserver for NoopObserver {
    fn bad_input(&self, _: Option<&str>, _: BadReason, _: &str) {}
}
