//! The crate's error type.

use rdkafka::error::KafkaError;

/// Why a Kafka operation of this crate failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// librdkafka refused the configuration or could not create a client.
    #[error("cannot create the kafka {what}: {source}")]
    Client {
        /// Which client: "producer", "admin client", ….
        what: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A request to the cluster failed (unreachable, timed out, not authorised, …).
    #[error("kafka {what} failed: {source}")]
    Request {
        /// What was asked: "create topics", "metadata", ….
        what: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A wait for the cluster ran out of time.
    #[error("timed out {what}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
    },
    /// A transaction could not be committed or aborted.
    #[error("kafka transaction: {what}: {source}")]
    Transaction {
        /// The step that failed.
        what: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The processor's lake or pipeline failed in a way a retry from the last checkpoint may
    /// not cure by itself.
    #[error("{0}")]
    Processor(String),
    /// The cluster refused to create a topic.
    #[error("cannot create kafka topic {topic}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        reason: String,
    },
}

impl Error {
    /// Whether retrying later can succeed (the cluster is unreachable or busy) rather than the
    /// configuration or the cluster's policy being at fault.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Client { .. } => false,
            Error::Request { .. }
            | Error::Timeout { .. }
            | Error::Transaction { .. }
            | Error::Processor(_) => true,
            Error::CreateTopic { reason, .. } => {
                !reason.contains("Policy")
                    && !reason.contains("Authorization")
                    && !reason.contains("InvalidReplicationFactor")
                    && !reason.contains("InvalidPartitions")
            }
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
