//! The processor's state changelog: one compacted topic (`kafka.topics.changelog`) with a
//! partition per ingest partition, holding that partition's newest checkpoint.
//!
//! As in Kafka Streams, a partition's operator state travels with the partition through Kafka
//! itself: each processor transaction that consumed from ingest partition `p` also writes `p`'s
//! [`PartitionCheckpoint`] to changelog partition `p`, beside the outputs and the consumed
//! offsets. The record commits or aborts with them, so the newest committed checkpoint always
//! matches the outputs and offsets Kafka kept. Whoever owns `p` next reads changelog partition
//! `p` (`read_committed`) up to its end and resumes from the last checkpoint there. Compaction
//! (key = the partition number) keeps only that one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

/// First bytes of a checkpoint value: format 1.
const MAGIC: &[u8; 8] = b"SFPCKP01";
/// Magic, CRC-32, input offset, lake epoch, model version length.
const HEADER: usize = 8 + 4 + 8 + 8 + 2;

/// The state of one ingest partition at one offset: what a new owner resumes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionCheckpoint {
    /// The next ingest offset to process (everything before it is in the state).
    pub input_offset: i64,
    /// The partition's last lake epoch whose files are committed: files of later epochs are
    /// the output of an aborted transaction.
    pub lake_epoch: u64,
    /// The model version the state's recurrent part belongs to.
    pub model_version: String,
    /// The encoded `PipelineSnapshot` of the partition's sensors.
    pub pipeline: Vec<u8>,
}

/// Why a changelog value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Not a checkpoint of this format, cut short, or corrupted.
    #[error("not a partition checkpoint: {0}")]
    Malformed(&'static str),
}

impl PartitionCheckpoint {
    /// The changelog value.
    pub fn encode(&self) -> Vec<u8> {
        let version = self.model_version.as_bytes();
        let version = &version[..version.len().min(usize::from(u16::MAX))];
        let mut out = Vec::with_capacity(HEADER + version.len() + self.pipeline.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.input_offset.to_le_bytes());
        out.extend_from_slice(&self.lake_epoch.to_le_bytes());
        out.extend_from_slice(&(version.len() as u16).to_le_bytes());
        out.extend_from_slice(version);
        out.extend_from_slice(&self.pipeline);
        let crc = crc32fast::hash(&out[12..]);
        out[8..12].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a changelog value, checking its CRC.
    pub fn decode(value: &[u8]) -> Result<Self, CheckpointError> {
        let malformed = CheckpointError::Malformed;
        if value.len() < HEADER {
            return Err(malformed("shorter than its header"));
        }
        if &value[..8] != MAGIC {
            return Err(malformed("unknown format"));
        }
        let word = |at: usize| -> [u8; 8] {
            let mut b = [0; 8];
            b.copy_from_slice(&value[at..at + 8]);
            b
        };
        let crc = u32::from_le_bytes([value[8], value[9], value[10], value[11]]);
        if crc != crc32fast::hash(&value[12..]) {
            return Err(malformed("CRC mismatch"));
        }
        let input_offset = i64::from_le_bytes(word(12));
        let lake_epoch = u64::from_le_bytes(word(20));
        let len = usize::from(u16::from_le_bytes([value[28], value[29]]));
        let rest = &value[HEADER..];
        if rest.len() < len {
            return Err(malformed("model version cut short"));
        }
        let model_version = std::str::from_utf8(&rest[..len])
            .map_err(|_| malformed("model version is not UTF-8"))?
            .to_owned();
        Ok(Self {
            input_offset,
            lake_epoch,
            model_version,
            pipeline: rest[len..].to_vec(),
        })
    }
}

/// Reads the newest committed checkpoint of each of `partitions` from the changelog topic:
/// every partition from its beginning to its end (the last stable offset: a transaction left
/// open by a dead processor holds nothing committed). A partition without one is absent from
/// the map. A value that does not decode is skipped with a warning: the one before it stands.
pub fn read_checkpoints(
    config: &KafkaConfig,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, PartitionCheckpoint>> {
    let mut found = BTreeMap::new();
    if partitions.is_empty() {
        return Ok(found);
    }
    let mut client = ClientConfig::new();
    for (k, v) in config.client_properties(&[
        ("client.id", "sensorflow-restore"),
        ("group.id", "sensorflow-restore"),
        ("enable.auto.commit", "false"),
        ("isolation.level", "read_committed"),
        ("enable.partition.eof", "true"),
        ("fetch.max.bytes", "67108864"),
        ("max.partition.fetch.bytes", "67108864"),
        ("receive.message.max.bytes", "134217728"),
    ]) {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create().map_err(|source| Error::Client {
        what: "changelog consumer",
        source,
    })?;
    let deadline = Instant::now() + timeout;
    let mut pending: BTreeSet<i32> = BTreeSet::new();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|source| Error::Request {
                what: "changelog watermarks",
                source,
            })?;
        if high > low {
            pending.insert(p);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|source| Error::Request {
                    what: "changelog assignment",
                    source,
                })?;
        }
    }
    if pending.is_empty() {
        return Ok(found);
    }
    consumer.assign(&tpl).map_err(|source| Error::Request {
        what: "changelog assignment",
        source,
    })?;
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "reading the state changelog",
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let Some(value) = m.payload() else { continue };
                match PartitionCheckpoint::decode(value) {
                    Ok(c) => {
                        found.insert(m.partition(), c);
                    }
                    Err(e) => tracing::warn!(
                        partition = m.partition(),
                        offset = m.offset(),
                        error = %e,
                        "skipping an unreadable state checkpoint"
                    ),
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            // One broker unreachable (a dead one is still in the bootstrap list): librdkafka
            // reconnects and fetches from the partitions' new leaders by itself. Failing here
            // made a processor's every restart fail while one broker of a cluster was down.
            Some(Err(KafkaError::MessageConsumption(
                code
                @ (RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown),
            ))) => {
                tracing::debug!(error = %code, "changelog consumer: broker unreachable, retrying");
            }
            Some(Err(source)) => {
                return Err(Error::Request {
                    what: "reading the state changelog",
                    source,
                });
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    fn checkpoint() -> PartitionCheckpoint {
        PartitionCheckpoint {
            input_offset: 1234,
            lake_epoch: 7,
            model_version: "abc123".into(),
            pipeline: vec![1, 2, 3, 4, 5],
        }
    }

    #[test]
    fn a_checkpoint_round_trips() {
        let c = checkpoint();
        assert_eq!(PartitionCheckpoint::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused_without_a_panic() {
        let bytes = checkpoint().encode();
        for len in 0..bytes.len() {
            assert!(
                PartitionCheckpoint::decode(&bytes[..len]).is_err(),
                "cut at {len}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(PartitionCheckpoint::decode(&b).is_err(), "flipped {i}");
        }
    }
}
