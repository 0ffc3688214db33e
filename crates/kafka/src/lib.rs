//! sensorflow-kafka: distributed mode's link to Apache Kafka (DESIGN.md, "Distributed mode").
//!
//! # Layout
//!
//! - [`config`] — [`KafkaConfig`], the `[kafka]` section: brokers, topic names, partitions,
//!   replication factor and pass-through librdkafka properties.
//! - [`admin`] — [`ensure_topics`]: creates missing topics.
//! - [`producer`] — [`KafkaSink`], ingest's sink in the gateway role.
//! - [`rows`] — the JSON values of the output topics, written by the processor, read by the
//!   api role.
//! - [`api_feed`] — the api role's readers of the output topics (`read_committed`, partitions
//!   assigned, no group joined) and its in-memory sessions table.
//! - [`error`] — [`Error`].
//!
//! # Architecture invariants
//!
//! - The gateway acknowledges a QoS 1 publish only after Kafka acknowledged its record with
//!   `acks=all` (the sink's future resolves on the delivery report).
//! - A Kafka outage withholds PUBACKs and then stops reading MQTT sockets; it never makes the
//!   gateway buffer without bound nor acknowledge what Kafka has not (see [`producer`]).
//! - The ingest topic's record value is exactly the embedded log's record
//!   ([`sensorflow_protocol::IngestRecord`]), key = sensor id, so the pipeline reads the same
//!   bytes from either.
//!
//! librdkafka is built from source without OpenSSL, SASL, zstd or zlib: plaintext connections,
//! lz4/snappy compression. The `ssl-vendored` feature adds TLS (and SASL SCRAM/OAUTHBEARER).

pub mod admin;
pub mod api_feed;
pub mod changelog;
pub mod config;
pub mod error;
pub mod processor;
pub mod producer;
pub mod rows;

pub use admin::{TopicSpec, ensure_topic_specs, ensure_topics};
pub use config::{ClientValue, KafkaConfig, ProcessorSettings, TopicNames};
pub use error::{Error, Result};
pub use processor::{ProcessorParams, ProcessorStats};
pub use producer::{KafkaSink, ProducerStats};

/// Routes a librdkafka log line to `tracing` at the matching level (every client context of
/// this crate logs through it).
pub(crate) fn log_to_tracing(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(facility = fac, "librdkafka: {message}")
        }
        L::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
        L::Notice | L::Info => tracing::info!(facility = fac, "librdkafka: {message}"),
        L::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
    }
}
