//! The api role's reading of the output topics (DESIGN.md, "Distributed mode"): consumers with
//! `isolation.level=read_committed`, so rows of an aborted processor transaction are never
//! seen, that decode each message into a [`FeedRecord`].
//!
//! Two ways to read:
//! - [`FeedReader::from_beginning`] reads one topic from its first offset and tells when it
//!   reached the end offsets it found at start ([`FeedEvent::CaughtUp`]): the sessions and
//!   aggregates topics, which every replica materialises whole ([`sessions::SessionTable`]).
//! - [`FeedReader::live`] reads topics from their end on: samples, windows, gaps, late rows,
//!   which only feed live clients.
//!
//! Both `assign` every partition themselves: no consumer group membership, no committed
//! offsets, so any number of replicas read everything and leave nothing behind in the cluster.
//! The caller polls [`FeedReader::next`]; nothing here spawns a task.
//!
//! A message that does not decode (or has no value) is counted in [`FeedStats`] by topic and
//! skipped; Kafka errors are counted, logged and outlived (librdkafka reconnects by itself).
//! Neither stops or stalls a reader.

pub mod sessions;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sensorflow_records::{
    GapRecord, LateRecord, SampleChunk, SessionAggregate, SessionEvent, WindowRecord,
};

use crate::config::{KafkaConfig, TopicNames};
use crate::error::{Error, Result};
use crate::rows;

/// The consumers' own defaults; `[kafka.client]` properties override them.
///
/// - `read_committed`: only rows of committed processor transactions.
/// - `enable.partition.eof`: the end of a partition is an event, so a reader knows it caught up
///   even when the last offsets are transaction markers, which are never delivered.
/// - A group id is needed to `assign`, but no group is joined and nothing is committed.
/// - Statistics every second: the consumer lag on `/metrics`.
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("isolation.level", "read_committed"),
    // Committed records become readable when the processor's transaction commits, which does
    // not wake a waiting fetch on the broker: a short wait keeps them from sitting there for
    // librdkafka's default 500 ms (BENCHMARKS §6: p50 publish → WebSocket 0.9 s with it).
    ("fetch.wait.max.ms", "20"),
    ("enable.partition.eof", "true"),
    ("group.id", "sensorflow-api"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("statistics.interval.ms", "1000"),
    ("client.id", "sensorflow-api"),
];

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a consumer error, so a persistent one cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An output topic the api role reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutputTopic {
    /// `sensor-data-transformed`: sample rows.
    Samples,
    /// `sensor-data-aggregated`: session aggregates.
    Aggregates,
    /// `new-session-topic`: session events.
    Sessions,
    /// `sensor-windows`: window features.
    Windows,
    /// `sensor-gaps`: gaps in sample indexes.
    Gaps,
    /// `sensor-late`: samples that arrived after their window closed.
    Late,
}

impl OutputTopic {
    /// Every output topic.
    pub const ALL: [OutputTopic; 6] = [
        OutputTopic::Samples,
        OutputTopic::Aggregates,
        OutputTopic::Sessions,
        OutputTopic::Windows,
        OutputTopic::Gaps,
        OutputTopic::Late,
    ];

    /// The topic's configured name.
    pub fn name(self, topics: &TopicNames) -> &str {
        match self {
            OutputTopic::Samples => &topics.transformed,
            OutputTopic::Aggregates => &topics.aggregated,
            OutputTopic::Sessions => &topics.sessions,
            OutputTopic::Windows => &topics.windows,
            OutputTopic::Gaps => &topics.gaps,
            OutputTopic::Late => &topics.late,
        }
    }

    /// Its key in `[kafka.topics]`, used as the `topic` label on `/metrics`.
    pub fn key(self) -> &'static str {
        match self {
            OutputTopic::Samples => "transformed",
            OutputTopic::Aggregates => "aggregated",
            OutputTopic::Sessions => "sessions",
            OutputTopic::Windows => "windows",
            OutputTopic::Gaps => "gaps",
            OutputTopic::Late => "late",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One decoded message of an output topic.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedRecord {
    /// The rows of one message of `sensor-data-transformed`, as chunks (see
    /// [`rows::chunks_from_rows`]).
    Samples(Vec<SampleChunk>),
    /// A session aggregate.
    Aggregate(SessionAggregate),
    /// A session started or ended.
    Session(SessionEvent),
    /// A window's features.
    Window(WindowRecord),
    /// A gap.
    Gap(GapRecord),
    /// A late sample.
    Late(LateRecord),
}

/// Decodes a message value of `topic` (the formats of [`rows`]).
pub fn decode(topic: OutputTopic, value: &[u8]) -> Result<FeedRecord, serde_json::Error> {
    Ok(match topic {
        OutputTopic::Samples => {
            FeedRecord::Samples(rows::chunks_from_rows(rows::decode_samples(value)?))
        }
        OutputTopic::Aggregates => FeedRecord::Aggregate(serde_json::from_slice(value)?),
        OutputTopic::Sessions => FeedRecord::Session(rows::decode_session_event(value)?),
        OutputTopic::Windows => FeedRecord::Window(serde_json::from_slice(value)?),
        OutputTopic::Gaps => FeedRecord::Gap(serde_json::from_slice(value)?),
        OutputTopic::Late => FeedRecord::Late(serde_json::from_slice(value)?),
    })
}

/// What [`FeedReader::next`] yields.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedEvent {
    /// A record. `live` is false while a from-beginning reader replays what was in its topic
    /// at start (its offset is below the end captured then): history, not news for live clients.
    Record {
        /// The record.
        record: FeedRecord,
        /// Whether it was written after the reader started.
        live: bool,
    },
    /// Every partition reached the end offset captured at start (once per reader; a live
    /// reader yields it first).
    CaughtUp,
}

/// Counters of the readers of one process, shared with `/metrics`.
#[derive(Debug, Default)]
pub struct FeedStats {
    consumed: [AtomicU64; 6],
    malformed: [AtomicU64; 6],
    errors: AtomicU64,
    /// Records between each partition's position and its last stable offset, from librdkafka's
    /// statistics.
    lag: Mutex<HashMap<(OutputTopic, i32), u64>>,
}

impl FeedStats {
    /// Messages of `topic` decoded and handed out.
    pub fn consumed(&self, topic: OutputTopic) -> u64 {
        self.consumed[topic.index()].load(Ordering::Relaxed)
    }

    /// Messages of `topic` skipped because they did not decode.
    pub fn malformed(&self, topic: OutputTopic) -> u64 {
        self.malformed[topic.index()].load(Ordering::Relaxed)
    }

    /// Consumer errors (broker unreachable and the like) so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Records of `topic` committed and not yet read, over its partitions (as of librdkafka's
    /// last statistics, at most a second old).
    pub fn lag(&self, topic: OutputTopic) -> u64 {
        self.lag
            .lock()
            .iter()
            .filter(|((t, _), _)| *t == topic)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Client context: librdkafka's logs to tracing, statistics to [`FeedStats`].
pub struct FeedContext {
    stats: Arc<FeedStats>,
    topics: HashMap<String, OutputTopic>,
}

impl ClientContext for FeedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports a partition's end here too; the reader handles it from `recv`.
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::trace!(reason, "partition end");
            return;
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, reason, "kafka consumer error");
    }

    fn stats(&self, statistics: Statistics) {
        let mut lag = self.stats.lag.lock();
        for (name, topic) in &statistics.topics {
            let Some(kind) = self.topics.get(name) else {
                continue;
            };
            for p in topic.partitions.values().filter(|p| p.partition >= 0) {
                lag.insert((*kind, p.partition), partition_lag(p));
            }
        }
    }
}

/// A partition's lag from its statistics: 0 at the end (EOF signalled at the last stable
/// offset and nothing queued), else the last stable offset minus the position handed to the
/// application. (Transaction markers make the latter over-count by one per transaction read
/// last, hence the EOF check first.)
fn partition_lag(p: &rdkafka::statistics::Partition) -> u64 {
    if p.ls_offset < 0 || (p.eof_offset == p.ls_offset && p.fetchq_cnt == 0) {
        return 0;
    }
    let position = p.app_offset.max(p.lo_offset).max(0);
    u64::try_from(p.ls_offset - position).unwrap_or(0)
}

impl ConsumerContext for FeedContext {}

/// Which partitions of a from-beginning reader have yet to reach the end offsets captured at
/// start. Pure bookkeeping, unit-tested below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// End offset (the next offset to be written, under `read_committed` the last stable
    /// offset) of each partition at start.
    ends: HashMap<i32, i64>,
    /// Partitions not at their end yet.
    remaining: HashSet<i32>,
}

impl CatchUp {
    /// From each partition's `(partition, low, high)` watermarks at start: an empty partition is
    /// at its end already.
    pub fn new(watermarks: impl IntoIterator<Item = (i32, i64, i64)>) -> CatchUp {
        let mut c = CatchUp::default();
        for (partition, low, high) in watermarks {
            c.ends.insert(partition, high);
            if high > low {
                c.remaining.insert(partition);
            }
        }
        c
    }

    /// A reader that starts at the end: nothing to catch up, everything live.
    pub fn none() -> CatchUp {
        CatchUp::default()
    }

    /// Notes the record at `offset` of `partition` was read; true when that completed the
    /// catch-up.
    pub fn consumed(&mut self, partition: i32, offset: i64) -> bool {
        let reached = self
            .ends
            .get(&partition)
            .is_none_or(|end| offset + 1 >= *end);
        reached && self.reached(partition)
    }

    /// Notes `partition` is at its end (librdkafka's partition EOF); true when that completed
    /// the catch-up.
    pub fn eof(&mut self, partition: i32) -> bool {
        self.reached(partition)
    }

    fn reached(&mut self, partition: i32) -> bool {
        self.remaining.remove(&partition) && self.remaining.is_empty()
    }

    /// Whether the record at `offset` of `partition` was written after the start.
    pub fn is_live(&self, partition: i32, offset: i64) -> bool {
        self.ends.get(&partition).is_none_or(|end| offset >= *end)
    }

    /// True once every partition reached its end offset.
    pub fn done(&self) -> bool {
        self.remaining.is_empty()
    }

    /// `(partitions at their end, partitions)`.
    pub fn progress(&self) -> (usize, usize) {
        (self.ends.len() - self.remaining.len(), self.ends.len())
    }
}

/// A consumer of one or more output topics; see the module docs.
pub struct FeedReader {
    consumer: StreamConsumer<FeedContext>,
    /// Topic names to their kind.
    topics: HashMap<String, OutputTopic>,
    /// Only for a from-beginning reader, which reads one topic: librdkafka's partition EOF
    /// names the partition but not the topic.
    catch_up: CatchUp,
    /// `CaughtUp` is still to be yielded.
    announce: bool,
    stats: Arc<FeedStats>,
}

impl FeedReader {
    /// A reader of `topic` from its first offset, which yields [`FeedEvent::CaughtUp`] once it
    /// read up to the end offsets the topic had when it opened. Blocking (metadata and
    /// watermark requests): call it off the async executor.
    pub fn from_beginning(
        config: &KafkaConfig,
        topic: OutputTopic,
        stats: Arc<FeedStats>,
    ) -> Result<FeedReader> {
        let mut reader = FeedReader::create(config, &[topic], stats)?;
        let name = topic.name(&config.topics).to_owned();
        let partitions = reader.partitions(&name)?;
        let mut watermarks = Vec::with_capacity(partitions.len());
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            let (low, high) = reader
                .consumer
                .fetch_watermarks(&name, p, REQUEST_TIMEOUT)
                .map_err(|source| Error::Request {
                    what: "watermarks",
                    source,
                })?;
            watermarks.push((p, low, high));
            assignment
                .add_partition_offset(&name, p, Offset::Beginning)
                .map_err(|source| Error::Client {
                    what: "consumer assignment",
                    source,
                })?;
        }
        reader.catch_up = CatchUp::new(watermarks);
        reader.announce = true;
        reader.assign(&assignment)?;
        let (at_end, total) = reader.catch_up.progress();
        tracing::info!(topic = %name, partitions = total, empty = at_end, "reading from the beginning");
        Ok(reader)
    }

    /// A reader of `topics` from their current end on (the last stable offset): only records
    /// written after it opened. Blocking, like [`FeedReader::from_beginning`].
    pub fn live(
        config: &KafkaConfig,
        topics: &[OutputTopic],
        stats: Arc<FeedStats>,
    ) -> Result<FeedReader> {
        let reader = FeedReader::create(config, topics, stats)?;
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            let name = topic.name(&config.topics);
            for p in reader.partitions(name)? {
                assignment
                    .add_partition_offset(name, p, Offset::End)
                    .map_err(|source| Error::Client {
                        what: "consumer assignment",
                        source,
                    })?;
            }
        }
        reader.assign(&assignment)?;
        Ok(reader)
    }

    fn create(
        config: &KafkaConfig,
        topics: &[OutputTopic],
        stats: Arc<FeedStats>,
    ) -> Result<FeedReader> {
        let mut client = ClientConfig::new();
        for (k, v) in config.client_properties(CONSUMER_DEFAULTS) {
            client.set(k, v);
        }
        let names: HashMap<String, OutputTopic> = topics
            .iter()
            .map(|t| (t.name(&config.topics).to_owned(), *t))
            .collect();
        let consumer: StreamConsumer<FeedContext> = client
            .create_with_context(FeedContext {
                stats: Arc::clone(&stats),
                topics: names.clone(),
            })
            .map_err(|source| Error::Client {
                what: "consumer",
                source,
            })?;
        Ok(FeedReader {
            consumer,
            topics: names,
            catch_up: CatchUp::none(),
            announce: false,
            stats,
        })
    }

    /// The partitions of `topic` (an error while the cluster does not know it).
    fn partitions(&self, topic: &str) -> Result<Vec<i32>> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|source| Error::Request {
                what: "metadata",
                source,
            })?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(Error::Request {
                what: "metadata",
                source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopic),
            });
        }
        Ok(partitions)
    }

    fn assign(&self, assignment: &TopicPartitionList) -> Result<()> {
        self.consumer
            .assign(assignment)
            .map_err(|source| Error::Client {
                what: "consumer assignment",
                source,
            })
    }

    /// `(partitions at the end offset captured at start, partitions)`.
    pub fn progress(&self) -> (usize, usize) {
        self.catch_up.progress()
    }

    /// The next record, or the catch-up event. Waits for one; malformed messages and errors
    /// are counted and skipped. Cancel-safe (drop the future to stop waiting).
    pub async fn next(&mut self) -> FeedEvent {
        loop {
            if self.announce && self.catch_up.done() {
                self.announce = false;
                return FeedEvent::CaughtUp;
            }
            let message = match self.consumer.recv().await {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(partition)) => {
                    self.catch_up.eof(partition);
                    continue;
                }
                Err(error) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "kafka consumer error");
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let live = self.catch_up.is_live(partition, offset);
            self.catch_up.consumed(partition, offset);
            let Some(topic) = self.topics.get(message.topic()).copied() else {
                continue;
            };
            let decoded = match message.payload() {
                Some(value) => decode(topic, value).map_err(|e| e.to_string()),
                None => Err("no value".to_owned()),
            };
            match decoded {
                Ok(record) => {
                    self.stats.consumed[topic.index()].fetch_add(1, Ordering::Relaxed);
                    return FeedEvent::Record { record, live };
                }
                Err(error) => {
                    let n = self.stats.malformed[topic.index()].fetch_add(1, Ordering::Relaxed);
                    // The first one is worth a warning; a flood of them is on /metrics.
                    if n == 0 {
                        tracing::warn!(topic = message.topic(), partition, offset, %error, "malformed record skipped");
                    } else {
                        tracing::debug!(topic = message.topic(), partition, offset, %error, "malformed record skipped");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    #[test]
    fn catch_up_completes_when_every_partition_reached_its_start_end() {
        // Partition 2 is empty; 0 ends at 5, 1 at 3.
        let mut c = CatchUp::new([(0, 0, 5), (1, 0, 3), (2, 4, 4)]);
        assert!(!c.done());
        assert_eq!(c.progress(), (1, 3));
        assert!(!c.consumed(0, 3));
        assert!(!c.is_live(0, 3));
        assert!(!c.consumed(0, 4), "partition 0 done, 1 still reading");
        assert!(c.is_live(0, 5), "written after the start");
        assert!(c.consumed(1, 2));
        assert!(c.done());
        assert!(!c.consumed(1, 7), "completes once");
    }

    #[test]
    fn an_eof_completes_a_partition_whose_last_offsets_are_transaction_markers() {
        // The end captured at start (4) is past the last record (offset 2; 3 is a commit
        // marker, never delivered): only the partition EOF tells the reader it is at the end.
        let mut c = CatchUp::new([(0, 0, 4)]);
        assert!(!c.consumed(0, 2));
        assert!(c.eof(0));
        assert!(c.done());
    }

    #[test]
    fn a_reader_from_the_end_has_nothing_to_catch_up_and_everything_is_live() {
        let c = CatchUp::none();
        assert!(c.done());
        assert!(c.is_live(3, 0));
        assert_eq!(CatchUp::new([]).progress(), (0, 0));
    }

    #[test]
    fn every_output_topic_decodes_its_rows_and_rejects_garbage() {
        let session = br#"{"event":"ended","session_id":"s_1","sensor_id":"s","start_us":1,"end_us":5,"last_seen_us":5,"sample_count":3,"end_reason":"idle"}"#;
        assert!(matches!(
            decode(OutputTopic::Sessions, session).unwrap(),
            FeedRecord::Session(SessionEvent::Ended { .. })
        ));
        let gap =
            br#"{"sensor_id":"s","from_index":3,"to_index":7,"missing":4,"detected_at_us":9}"#;
        assert_eq!(
            decode(OutputTopic::Gaps, gap).unwrap(),
            FeedRecord::Gap(GapRecord {
                sensor_id: "s".into(),
                from_index: 3,
                to_index: 7,
                missing: 4,
                detected_at_us: 9
            })
        );
        for topic in OutputTopic::ALL {
            assert!(decode(topic, b"not json").is_err(), "{topic:?}");
            assert!(decode(topic, b"{}").is_err(), "{topic:?}");
        }
        assert_eq!(
            decode(OutputTopic::Samples, b"[]").unwrap(),
            FeedRecord::Samples(Vec::new())
        );
    }

    #[test]
    fn topic_names_and_labels_follow_the_config() {
        let names = TopicNames {
            ingest: "i".into(),
            transformed: "t".into(),
            aggregated: "a".into(),
            sessions: "s".into(),
            windows: "w".into(),
            gaps: "g".into(),
            late: "l".into(),
            changelog: "c".into(),
        };
        let got: Vec<_> = OutputTopic::ALL.iter().map(|t| t.name(&names)).collect();
        assert_eq!(got, ["t", "a", "s", "w", "g", "l"]);
        assert_eq!(OutputTopic::Aggregates.key(), "aggregated");
    }
}
