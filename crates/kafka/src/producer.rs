//! [`KafkaSink`]: ingest's sink in the gateway. Each accepted MQTT message becomes one record
//! of the ingest topic, and the publish's future (hence its PUBACK) resolves on that record's
//! delivery report: Kafka acknowledged it with `acks=all`.
//!
//! # Order and backpressure
//!
//! Ingest calls [`IngestSink::append`] in a connection's arrival order and polls the futures
//! concurrently, so the record's place is fixed inside `append`: it is handed to librdkafka's
//! queue right there (`send_result`, non-blocking), and librdkafka keeps a partition's records in
//! that order (the idempotent producer also keeps them in order across retries).
//!
//! The queue is bounded (`queue.buffering.max.messages` / `.kbytes`). When it is full (the
//! broker is slow or down) the record is not refused: it goes to a forwarder task that retries
//! it until librdkafka takes it, and while anything waits there later records queue behind it,
//! so order holds across both paths. What can wait there is bounded by ingest's per-connection
//! in-flight limit (`mqtt.receive_maximum`): a publish whose future has not resolved is not
//! acknowledged, and a connection with that many unacknowledged publishes is not read further.
//! So a Kafka outage stops PUBACKs and then stops reading sockets; nothing is acknowledged that
//! Kafka has not acknowledged, and nothing is buffered beyond those two bounds.
//!
//! A delivery failure (`message.timeout.ms` passed, a fatal producer error) resolves the future
//! with [`SinkError::Unavailable`]: MQTT 5 clients get a negative PUBACK, MQTT 3.1.1 clients are
//! disconnected, and both re-send.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sensorflow_ingest::{IngestSink, SinkError};
use sensorflow_protocol::IngestRecord;
use tokio::sync::{mpsc, oneshot};

use crate::config::{KafkaConfig, is_secret_property};
use crate::error::{Error, Result};

/// The producer's own defaults; `[kafka.client]` properties override them.
///
/// - Idempotence: no duplicates or reordering from the producer's retries; implies `acks=all`
///   (set anyway, so an override of one is visible next to the other).
/// - The queue bounds: 100,000 records or 64 MiB (librdkafka's default of 1 GiB is more than a
///   gateway should hold before it slows publishers down).
/// - `murmur2_random`: the Java client's partitioner, so a key lands on the same partition
///   whichever client wrote it.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("queue.buffering.max.messages", "100000"),
    ("queue.buffering.max.kbytes", "65536"),
    ("partitioner", "murmur2_random"),
    ("client.id", "sensorflow-gateway"),
];

/// How long the forwarder waits before offering a record to a full queue again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(5);

/// Counters of a [`KafkaSink`], shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Records Kafka acknowledged.
    pub produced: AtomicU64,
    /// Records whose delivery failed (or that librdkafka refused outright).
    pub errors: AtomicU64,
    /// Records handed to the sink and not yet acknowledged or failed (in librdkafka's queue, in
    /// flight to the broker, or waiting for room in the queue).
    pub in_flight: AtomicU64,
    /// Records waiting in the forwarder for room in librdkafka's queue.
    pub waiting_for_queue: AtomicU64,
    /// Times a record found librdkafka's queue full.
    pub queue_full: AtomicU64,
    /// Set once librdkafka reported a fatal error: the producer can no longer deliver.
    pub fatal: AtomicBool,
}

/// Client context: routes librdkafka's logs and errors to tracing, and remembers a fatal error.
pub struct GatewayContext {
    stats: Arc<ProducerStats>,
}

impl ClientContext for GatewayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.stats.fatal.store(true, Ordering::Release);
            tracing::error!(%error, reason, "kafka producer: fatal error, records can no longer be delivered");
        } else {
            // Transient (a broker down, all brokers down): librdkafka reconnects by itself.
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

/// A record waiting for room in librdkafka's queue, and where to send its delivery future.
type Waiting = (
    String,
    Bytes,
    i64,
    oneshot::Sender<Result<DeliveryFuture, SinkError>>,
);

/// Ingest's sink in the gateway: produces each record to the ingest topic (key = sensor_id,
/// value = the encoded [`IngestRecord`], timestamp = its receive time) and resolves when Kafka
/// acknowledged it. See the module doc for order and backpressure.
pub struct KafkaSink {
    producer: FutureProducer<GatewayContext>,
    topic: Arc<str>,
    stats: Arc<ProducerStats>,
    tx: mpsc::UnboundedSender<Waiting>,
}

impl KafkaSink {
    /// Creates the producer (it connects in the background) and spawns the forwarder on the
    /// current tokio runtime.
    pub fn start(config: &KafkaConfig) -> Result<KafkaSink> {
        let stats = Arc::new(ProducerStats::default());
        let props = config.client_properties(PRODUCER_DEFAULTS);
        let mut client = ClientConfig::new();
        for (k, v) in &props {
            client.set(k, v);
        }
        let shown: Vec<String> = props
            .iter()
            .map(|(k, v)| {
                if is_secret_property(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        tracing::debug!(properties = %shown.join(" "), "kafka producer configuration");
        let producer: FutureProducer<GatewayContext> = client
            .create_with_context(GatewayContext {
                stats: Arc::clone(&stats),
            })
            .map_err(|source| Error::Client {
                what: "producer",
                source,
            })?;
        let topic: Arc<str> = Arc::from(config.topics.ingest.as_str());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward(
            producer.clone(),
            Arc::clone(&topic),
            Arc::clone(&stats),
            rx,
        ));
        Ok(KafkaSink {
            producer,
            topic,
            stats,
            tx,
        })
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<ProducerStats> {
        Arc::clone(&self.stats)
    }

    /// The producer's client, for readiness checks (metadata requests).
    pub fn producer(&self) -> &FutureProducer<GatewayContext> {
        &self.producer
    }

    /// Waits up to `timeout` for every queued record to be delivered (or to fail).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer
            .flush(timeout)
            .map_err(|source| Error::Client {
                what: "flush",
                source,
            })
    }
}

/// Kafka's record timestamp for a receive time: milliseconds since the Unix epoch.
pub fn record_timestamp_ms(ingest_us: i64) -> i64 {
    ingest_us.div_euclid(1000)
}

/// The value of a record: the ingest record as the embedded log stores it.
pub fn record_value(record: &IngestRecord) -> std::result::Result<Bytes, SinkError> {
    let mut buf = Vec::with_capacity(record.encoded_len());
    record
        .try_encode(&mut buf)
        .map_err(|e| SinkError::Rejected(e.to_string()))?;
    Ok(Bytes::from(buf))
}

fn enqueue_error(e: &KafkaError) -> SinkError {
    SinkError::Unavailable(format!("kafka producer refused the record: {e}"))
}

fn is_queue_full(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    )
}

/// One record counted in [`ProducerStats::in_flight`] until it is dropped: when its outcome is
/// known, or when ingest drops the publish's future (the client went away; librdkafka still
/// delivers the record, but nobody waits for the report), so the gauge cannot drift.
struct InFlight(Arc<ProducerStats>);

impl InFlight {
    fn new(stats: &Arc<ProducerStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(stats))
    }

    /// Counts a record that failed before it reached librdkafka.
    fn failed(self, e: SinkError) -> std::result::Result<(), SinkError> {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
        Err(e)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits for the delivery report of a queued record and keeps the counters.
async fn delivered(
    delivery: DeliveryFuture,
    in_flight: InFlight,
) -> std::result::Result<(), SinkError> {
    let outcome = match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(SinkError::Unavailable(format!(
            "kafka did not acknowledge the record: {e}"
        ))),
        Err(_) => Err(SinkError::Unavailable(
            "the kafka producer was closed".into(),
        )),
    };
    let stats = &in_flight.0;
    match &outcome {
        Ok(()) => stats.produced.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            tracing::debug!(error = %e, "kafka delivery failed");
            stats.errors.fetch_add(1, Ordering::Relaxed)
        }
    };
    outcome
}

impl IngestSink for KafkaSink {
    fn append(
        &self,
        record: IngestRecord,
    ) -> BoxFuture<'static, std::result::Result<(), SinkError>> {
        let in_flight = InFlight::new(&self.stats);
        let value = match record_value(&record) {
            Ok(v) => v,
            Err(e) => return futures::future::ready(in_flight.failed(e)).boxed(),
        };
        let timestamp = record_timestamp_ms(record.ingest_us);
        if self.stats.waiting_for_queue.load(Ordering::Acquire) == 0 {
            let sent = self.producer.send_result(
                FutureRecord::to(&self.topic)
                    .key(record.sensor_id.as_bytes())
                    .payload(value.as_ref())
                    .timestamp(timestamp),
            );
            match sent {
                Ok(delivery) => return delivered(delivery, in_flight).boxed(),
                Err((e, _)) if is_queue_full(&e) => {
                    self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err((e, _)) => {
                    return futures::future::ready(in_flight.failed(enqueue_error(&e))).boxed();
                }
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        self.stats.waiting_for_queue.fetch_add(1, Ordering::AcqRel);
        if self
            .tx
            .send((record.sensor_id, value, timestamp, done_tx))
            .is_err()
        {
            self.stats.waiting_for_queue.fetch_sub(1, Ordering::AcqRel);
            let closed = SinkError::Unavailable("the kafka producer is closed".into());
            return futures::future::ready(in_flight.failed(closed)).boxed();
        }
        async move {
            match done_rx.await {
                Ok(Ok(delivery)) => delivered(delivery, in_flight).await,
                Ok(Err(e)) => in_flight.failed(e),
                Err(_) => in_flight.failed(SinkError::Unavailable(
                    "the kafka producer is closed".into(),
                )),
            }
        }
        .boxed()
    }
}

/// The forwarder: offers waiting records to librdkafka's queue in order, each until it is taken.
async fn forward(
    producer: FutureProducer<GatewayContext>,
    topic: Arc<str>,
    stats: Arc<ProducerStats>,
    mut rx: mpsc::UnboundedReceiver<Waiting>,
) {
    while let Some((key, value, timestamp, done)) = rx.recv().await {
        let outcome = loop {
            let sent = producer.send_result(
                FutureRecord::to(&topic)
                    .key(key.as_bytes())
                    .payload(value.as_ref())
                    .timestamp(timestamp),
            );
            match sent {
                Ok(delivery) => break Ok(delivery),
                Err((e, _)) if is_queue_full(&e) => {
                    stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err((e, _)) => break Err(enqueue_error(&e)),
            }
        };
        // Queued (or failed) before the count drops: a record that then takes the direct path
        // lands behind this one.
        stats.waiting_for_queue.fetch_sub(1, Ordering::AcqRel);
        let _ = done.send(outcome);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;
    use sensorflow_protocol::record::{IngestRecordRef, PayloadFormat};

    #[test]
    fn the_value_is_the_encoded_ingest_record_and_decodes_back() {
        let record = IngestRecord {
            sensor_id: "dev-7".into(),
            format: PayloadFormat::Json,
            ingest_us: 1_700_000_000_123_456,
            payload: Bytes::from_static(b"{\"samples\":[]}"),
        };
        let value = record_value(&record).unwrap();
        // Header: version 1, format 1 (JSON), ingest_us LE, sensor id length LE, id, payload.
        assert_eq!(value[0], 1);
        assert_eq!(value[1], 1);
        assert_eq!(&value[2..10], &1_700_000_000_123_456i64.to_le_bytes());
        assert_eq!(&value[10..12], &5u16.to_le_bytes());
        assert_eq!(&value[12..17], b"dev-7");
        assert_eq!(&value[17..], b"{\"samples\":[]}");
        let back = IngestRecordRef::decode(&value).unwrap();
        assert_eq!(back.sensor_id, "dev-7");
        assert_eq!(back.payload, b"{\"samples\":[]}");
    }

    #[test]
    fn the_record_timestamp_is_the_receive_time_in_milliseconds() {
        assert_eq!(
            record_timestamp_ms(1_700_000_000_123_456),
            1_700_000_000_123
        );
        assert_eq!(record_timestamp_ms(-1), -1);
    }

    #[test]
    fn producer_defaults_make_an_idempotent_acks_all_producer() {
        let d: std::collections::BTreeMap<_, _> = PRODUCER_DEFAULTS.iter().copied().collect();
        assert_eq!(d["enable.idempotence"], "true");
        assert_eq!(d["acks"], "all");
    }
}
