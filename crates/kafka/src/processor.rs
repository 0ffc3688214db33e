//! The processor role's engine: a consumer group on the ingest topic running the embedded
//! pipeline for each partition it owns, with exactly-once outputs through Kafka transactions.
//!
//! # One transaction per commit interval
//!
//! Every `kafka.processor.commit_interval_ms` (and before partitions are revoked, and at a
//! clean stop) one transaction commits, atomically:
//! - the output records produced since the last one (samples, windows, aggregates, session
//!   events, gaps, late rows; JSON, see [`crate::rows`]);
//! - for each partition that moved, its [`PartitionCheckpoint`] in the changelog topic: the
//!   pipeline's state (framing, dedupe, sessions, windows, model state), the next input offset
//!   and the partition's lake epoch (see [`crate::changelog`]);
//! - the consumed offsets (`send_offsets_to_transaction` with the group's metadata, so a
//!   processor that lost its partitions to a rebalance is fenced: KIP-447).
//!
//! The lake follows the same checkpoints, one epoch per partition: the files a partition
//! writes between two commits are named for its next epoch (`p{partition}e{epoch}`, see
//! `sensorflow_lake::partition_epoch_writer_id`) and uploaded before the transaction that
//! records that epoch commits. Whoever resumes the partition from a checkpoint of epoch `E`
//! deletes its files of epochs after `E` and processes again from the checkpoint's offset, so a
//! lake row is never both kept and written again, nor lost.
//!
//! # Rebalances and failures
//!
//! The group uses the eager `roundrobin` assignor. Before partitions are revoked the running
//! transaction commits (inside the rebalance callback) and their state is dropped; on an
//! assignment the group's committed offsets are fetched as stable offsets (this waits while a
//! previous owner's transaction holds them), then each new partition's newest committed
//! checkpoint is read from the changelog until it matches them, and consumption starts at its
//! offset (set in the assignment itself). A dead processor's partitions move after
//! `kafka.processor.session_timeout_ms`; its open transaction is aborted by the broker after
//! `kafka.processor.transaction_timeout_ms`, which is how long the new owner and
//! `read_committed` readers of the outputs wait for the partitions it wrote.
//!
//! A failed commit (or lake write) aborts the transaction and rewinds every owned partition to
//! its last committed checkpoint. A pipeline step that panics does the same, and the records
//! of that step are then processed one at a time; a record that fails alone is set aside into
//! the lake's `quarantine` table as a dead letter, and processing moves on.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sensorflow_lake::{LakeConfig, LakeWriter, partition_epoch_writer_id};
use sensorflow_model::Model;
use sensorflow_pipeline::{
    Outputs, PipelineConfig, PipelineSnapshot, QuarantineRecord, SessionEvent, ShardedPipeline,
};
use sensorflow_protocol::record::IngestRecordRef;

use crate::changelog::{PartitionCheckpoint, read_checkpoints};
use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::rows;

/// The consumer's and producer's own defaults; `[kafka.client]` properties override them.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("isolation.level", "read_committed"),
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "roundrobin"),
    // Records are waited for at most this long on the broker (librdkafka's default 500 ms adds
    // to every record's latency whenever the gateway's producer is not the one waking it).
    ("fetch.wait.max.ms", "20"),
    ("client.id", "sensorflow-processor"),
];
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("partitioner", "murmur2_random"),
    // librdkafka 2.12 does not look up a new transaction/group coordinator while the cached one
    // is dead, and `send_offsets_to_transaction` then waits without end (upstream issues 5456,
    // 5511). Closing idle connections makes it re-run the lookup: with it, no hang in 8 runs of
    // test_kafka_cluster that hung in ~40% without.
    ("connections.max.idle.ms", "10000"),
    // Bounded (librdkafka's default is 1 GiB); a full queue makes the processor wait.
    ("queue.buffering.max.kbytes", "131072"),
    // A partition's checkpoint is one record; large fleets make large ones.
    ("message.max.bytes", "67108864"),
    ("client.id", "sensorflow-processor"),
];
/// The changelog topic's configs: compacted (key = partition), large records allowed.
pub const CHANGELOG_TOPIC_CONFIGS: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("max.message.bytes", "67108864"),
    ("min.compaction.lag.ms", "0"),
];
/// How long a transaction call (init, commit, abort, offsets) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading the changelog on an assignment may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the dead letters remembered per partition.
const MAX_DEAD_LETTERS: usize = 10_000;

/// What the processor needs.
#[derive(Clone)]
pub struct ProcessorParams {
    /// The cluster, topics and `[kafka.processor]` settings.
    pub kafka: KafkaConfig,
    /// The pipeline's settings.
    pub pipeline: PipelineConfig,
    /// The model, one handle per pipeline shard.
    pub models: Vec<Arc<Model>>,
    /// The lake (root and file settings; the writer id is set per partition).
    pub lake: LakeConfig,
    /// How often processing-time duties run (idle sessions, aggregates).
    pub tick: Duration,
    /// Records taken from the consumer per step at most.
    pub batch_records: usize,
}

/// Counters of a running processor, for `/metrics` and `/ready`.
#[derive(Debug, Default)]
pub struct ProcessorStats {
    /// Ingest records processed (a record processed again after a rewind counts again).
    pub records: AtomicU64,
    /// Sample rows produced.
    pub samples: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Time spent committing (lake files, checkpoints, offsets, the commit itself), µs.
    pub commit_micros: AtomicU64,
    /// Of which committing lake files, µs.
    pub lake_commit_micros: AtomicU64,
    /// Transactions aborted (each followed by a rewind to the last checkpoint).
    pub aborts: AtomicU64,
    /// Rewinds of every owned partition to its last checkpoint (after an abort, a failed
    /// write or a panicking step).
    pub rewinds: AtomicU64,
    /// Partitions owned now.
    pub partitions: AtomicU64,
    /// Partitions restored from the changelog.
    pub restores: AtomicU64,
    /// Rebalances (assignments and revocations).
    pub rebalances: AtomicU64,
    /// Ingest records that did not decode.
    pub corrupt_records: AtomicU64,
    /// Records set aside as dead letters.
    pub dead_letters: AtomicU64,
    /// Restarts of the whole processor after a failure.
    pub restarts: AtomicU64,
    /// Lake files deleted because their epoch was never committed.
    pub lake_files_discarded: AtomicU64,
    /// Set while the processor is a member of the group and has committed or has nothing to
    /// commit; cleared by a failure until the restart.
    pub ready: AtomicBool,
    /// The last failure, for `/ready`.
    pub last_error: Mutex<Option<String>>,
    /// The step the processor's loop is in and since when: the stall watchdog's input.
    pub heartbeat: Heartbeat,
}

/// What the processor's loop is doing, and since when.
///
/// Every step of the loop marks its start here: a poll (which runs the rebalance callbacks),
/// processing, timers, a commit, a restore, a wait before a restart. A step that lasts far
/// longer than its own timeouts means the loop is stuck, e.g. in librdkafka waiting on a dead
/// coordinator (`send_offsets_to_transaction` can wait without end, upstream issues 5456 and
/// 5511), where no timeout of ours can interrupt it. The processor command's watchdog reads
/// [`Heartbeat::current`] and exits the process when a step exceeds
/// `kafka.processor.stall_timeout_ms`. Before [`run`] starts and after it returns there is no
/// step.
#[derive(Debug, Default)]
pub struct Heartbeat(Mutex<Option<(Instant, &'static str)>>);

impl Heartbeat {
    /// Marks the start of `step`.
    pub fn beat(&self, step: &'static str) {
        *self.0.lock() = Some((Instant::now(), step));
    }

    /// The loop has ended: no step any more.
    fn end(&self) {
        *self.0.lock() = None;
    }

    /// The current step and how long it has lasted; `None` while the loop is not running.
    pub fn current(&self) -> Option<(&'static str, Duration)> {
        self.0.lock().map(|(since, step)| (step, since.elapsed()))
    }
}

/// Runs the processor until `stop` is set, restarting it (new clients, state from the
/// changelog) after a failure, with a backoff. Blocking: call it on a thread of its own.
pub fn run(params: &ProcessorParams, stats: &Arc<ProcessorStats>, stop: &AtomicBool) {
    stats.heartbeat.beat("starting");
    run_until_stopped(params, stats, stop);
    stats.heartbeat.end();
}

/// [`run`]'s restart loop.
fn run_until_stopped(params: &ProcessorParams, stats: &Arc<ProcessorStats>, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::Acquire) {
        let began = Instant::now();
        match run_once(params, stats, stop) {
            Ok(()) => return,
            Err(e) => {
                stats.ready.store(false, Ordering::Release);
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "processor failed; restarting from the changelog in {:.1} s", backoff.as_secs_f64());
                *stats.last_error.lock() = Some(e.to_string());
                if began.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                let until = Instant::now() + backoff;
                stats.heartbeat.beat("waiting to restart");
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The transactional id: `sensorflow-processor-{id}`. A stable id per replica (a StatefulSet's
/// pod name) lets a restarted processor abort its predecessor's open transaction at once; the
/// default, random per start, leaves that to the transaction timeout.
fn transactional_id(configured: &str) -> String {
    if configured.is_empty() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("sensorflow-processor-{}-{nanos:x}", std::process::id())
    } else {
        format!("sensorflow-processor-{configured}")
    }
}

fn run_once(
    params: &ProcessorParams,
    stats: &Arc<ProcessorStats>,
    stop: &AtomicBool,
) -> Result<()> {
    let k = &params.kafka;
    let settings = &k.processor;
    let txn_timeout = settings.transaction_timeout_ms.to_string();
    let txn_id = transactional_id(&settings.instance_id);
    let mut producer_config = ClientConfig::new();
    for (key, v) in k.client_properties(PRODUCER_DEFAULTS) {
        producer_config.set(key, v);
    }
    producer_config
        .set("transactional.id", &txn_id)
        .set("transaction.timeout.ms", &txn_timeout);
    stats.heartbeat.beat("initialising transactions");
    let producer: ThreadedProducer<DefaultProducerContext> =
        producer_config.create().map_err(|source| Error::Client {
            what: "transactional producer",
            source,
        })?;
    producer
        .init_transactions(TXN_TIMEOUT)
        .map_err(|source| Error::Transaction {
            what: "init",
            source,
        })?;
    let state = Arc::new(Mutex::new(State {
        params: params.clone(),
        stats: stats.clone(),
        producer,
        txn_open: false,
        parts: BTreeMap::new(),
        dead: HashMap::new(),
        generation: 0,
        failure: None,
        model_version: params
            .models
            .first()
            .map_or_else(String::new, |m| m.version().to_string()),
    }));
    let session_timeout = settings.session_timeout_ms.to_string();
    let heartbeat = (settings.session_timeout_ms / 3).max(100).to_string();
    let mut consumer_config = ClientConfig::new();
    for (key, v) in k.client_properties(CONSUMER_DEFAULTS) {
        consumer_config.set(key, v);
    }
    consumer_config
        .set("group.id", &settings.group_id)
        .set("session.timeout.ms", &session_timeout)
        .set("heartbeat.interval.ms", &heartbeat);
    let consumer: BaseConsumer<GroupContext> = consumer_config
        .create_with_context(GroupContext {
            state: state.clone(),
        })
        .map_err(|source| Error::Client {
            what: "consumer",
            source,
        })?;
    consumer
        .subscribe(&[&k.topics.ingest])
        .map_err(|source| Error::Request {
            what: "subscribe",
            source,
        })?;
    tracing::info!(
        group = %settings.group_id,
        transactional_id = %txn_id,
        topic = %k.topics.ingest,
        "processor joined the consumer group"
    );
    *stats.last_error.lock() = None;
    let commit_interval = Duration::from_millis(settings.commit_interval_ms.max(1));
    let mut next_commit = Instant::now() + commit_interval;
    let mut next_tick = Instant::now() + params.tick;
    let mut batch: Vec<(i32, i64, Bytes)> = Vec::with_capacity(params.batch_records);
    while !stop.load(Ordering::Acquire) {
        stats.heartbeat.beat("polling");
        let generation = state.lock().generation;
        batch.clear();
        let mut wait =
            Duration::from_millis(50).min(next_tick.saturating_duration_since(Instant::now()));
        // The lock is not held while polling: rebalance callbacks run inside `poll`.
        while batch.len() < params.batch_records {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
                    batch.push((m.partition(), m.offset(), payload));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        stats.heartbeat.beat("processing");
        let mut st = state.lock();
        if let Some(e) = st.failure.take() {
            return Err(e);
        }
        // A rebalance or rewind during the poll reset the positions: what was fetched before
        // it comes again.
        if st.generation == generation {
            st.process(&consumer, &batch)?;
        }
        let now = Instant::now();
        if now >= next_tick {
            stats.heartbeat.beat("running timers");
            st.tick(&consumer)?;
            next_tick = now + params.tick;
        }
        if now >= next_commit {
            stats.heartbeat.beat("committing");
            st.commit(&consumer)?;
            st.stats.ready.store(true, Ordering::Release);
            next_commit = Instant::now() + commit_interval;
        }
    }
    // A clean stop: commit what is done, then leave the group (the revocation commits nothing
    // more); the partitions move to the other processors with their state.
    stats.heartbeat.beat("committing before stopping");
    state.lock().commit(&consumer)?;
    consumer.unsubscribe();
    drop(consumer);
    let st = state.lock();
    st.producer
        .flush(TXN_TIMEOUT)
        .map_err(|source| Error::Request {
            what: "flush",
            source,
        })?;
    tracing::info!("processor stopped");
    Ok(())
}

/// The consumer's context: assignments and revocations act on the shared [`State`].
struct GroupContext {
    state: Arc<Mutex<State>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let mut st = self.state.lock();
        st.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        st.generation += 1;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                st.stats.heartbeat.beat("restoring assigned partitions");
                match st.assign(consumer, &partitions) {
                    Ok(offsets) => {
                        let topic = st.params.kafka.topics.ingest.clone();
                        for (p, offset) in offsets {
                            if let Err(e) = tpl.set_partition_offset(&topic, p, offset) {
                                tracing::warn!(partition = p, error = %e, "cannot set a start offset");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "restoring assigned partitions failed");
                        st.failure = Some(e);
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    st.failure.get_or_insert(Error::Request {
                        what: "assign",
                        source: e,
                    });
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                st.stats.heartbeat.beat("committing before a revocation");
                if let Err(e) = st.commit_before_revoke(consumer) {
                    st.failure = Some(e);
                }
                st.parts.clear();
                st.stats.partitions.store(0, Ordering::Relaxed);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                st.parts.clear();
                st.stats.partitions.store(0, Ordering::Relaxed);
                let _ = consumer.unassign();
            }
        }
    }
}

/// One owned ingest partition.
struct Part {
    pipeline: ShardedPipeline,
    lake: LakeWriter,
    /// The last checkpoint committed for this partition (`None`: none yet, start of the log).
    committed: Option<PartitionCheckpoint>,
    /// The next offset to process (`None`: take whatever comes first).
    next_offset: Option<i64>,
    /// The lake epoch of the files being written now (committed epoch + 1).
    epoch: u64,
    /// Processed something since the last commit.
    dirty: bool,
}

/// Records of a partition known or suspected to make a stage fail.
#[derive(Default)]
struct DeadLetters {
    /// Offsets of a step that failed: processed one record at a time.
    suspect: Vec<Range<i64>>,
    /// Single records that failed alone, with the failure: quarantined, not processed.
    poisoned: HashMap<i64, String>,
}

struct State {
    params: ProcessorParams,
    stats: Arc<ProcessorStats>,
    producer: ThreadedProducer<DefaultProducerContext>,
    txn_open: bool,
    parts: BTreeMap<i32, Part>,
    dead: HashMap<i32, DeadLetters>,
    /// Bumped by every rebalance and rewind: records polled before it are stale.
    generation: u64,
    /// A failure inside a rebalance callback, raised by the main loop.
    failure: Option<Error>,
    model_version: String,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl State {
    /// Restores `partitions` from the changelog and returns where to start consuming each.
    ///
    /// The previous owner may still have a transaction open (it was evicted, not dead, or it
    /// died with one open). Its offsets and its checkpoint commit or abort together, so the
    /// group's committed offsets are read first, as *stable* offsets (a `read_committed`
    /// consumer's offset fetch waits while a transaction holds them: KIP-447); the changelog
    /// is then read until every checkpoint matches them. Reading the changelog first could
    /// miss a checkpoint that commits just after, and both owners' outputs would survive.
    fn assign(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        partitions: &[i32],
    ) -> Result<Vec<(i32, Offset)>> {
        let k = &self.params.kafka;
        let started = Instant::now();
        let deadline = started + RESTORE_TIMEOUT;
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&k.topics.ingest, p);
        }
        let committed = consumer
            .committed_offsets(tpl, RESTORE_TIMEOUT)
            .map_err(|source| Error::Request {
                what: "fetching the group's committed offsets",
                source,
            })?;
        let stable: BTreeMap<i32, i64> = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        let mut checkpoints = loop {
            let checkpoints =
                read_checkpoints(k, &k.topics.changelog, partitions, RESTORE_TIMEOUT)?;
            let behind: Vec<i32> = stable
                .iter()
                .filter(|(p, o)| checkpoints.get(p).map(|c| c.input_offset) != Some(**o))
                .map(|(p, _)| *p)
                .collect();
            if behind.is_empty() {
                break checkpoints;
            }
            if Instant::now() >= deadline {
                return Err(Error::Processor(format!(
                    "the state changelog does not reach the group's committed offsets of partitions {behind:?}"
                )));
            }
            tracing::info!(partitions = ?behind, "the changelog is behind the committed offsets; reading it again");
            self.stats
                .heartbeat
                .beat("restoring assigned partitions (re-reading the changelog)");
            std::thread::sleep(Duration::from_millis(200));
        };
        self.discard_uncommitted_lake_files(partitions, &checkpoints)?;
        let mut offsets = Vec::new();
        for &p in partitions {
            let checkpoint = checkpoints.remove(&p);
            offsets.push((
                p,
                checkpoint
                    .as_ref()
                    .map_or(Offset::Beginning, |c| Offset::Offset(c.input_offset)),
            ));
            let part = self.build_part(p, checkpoint)?;
            self.parts.insert(p, part);
        }
        self.stats
            .restores
            .fetch_add(partitions.len() as u64, Ordering::Relaxed);
        self.stats
            .partitions
            .store(self.parts.len() as u64, Ordering::Relaxed);
        tracing::info!(
            partitions = ?partitions,
            took_ms = started.elapsed().as_millis() as u64,
            "partitions assigned and restored from the changelog"
        );
        Ok(offsets)
    }

    /// Deletes the lake files of `partitions` from epochs after their checkpoints (one listing
    /// of the lake for all of them).
    fn discard_uncommitted_lake_files(
        &self,
        partitions: &[i32],
        checkpoints: &BTreeMap<i32, PartitionCheckpoint>,
    ) -> Result<()> {
        let committed: BTreeMap<u32, u64> = partitions
            .iter()
            .filter_map(|&p| {
                let epoch = checkpoints.get(&p).map_or(0, |c| c.lake_epoch);
                u32::try_from(p).ok().map(|p| (p, epoch))
            })
            .collect();
        let removed = self
            .params
            .lake
            .root
            .remove_stream_files_after(&|p| committed.get(&p).copied())
            .map_err(|e| Error::Processor(format!("lake: {e}")))?;
        if removed > 0 {
            tracing::info!(
                files = removed,
                "deleted lake files of transactions that never committed"
            );
            self.stats
                .lake_files_discarded
                .fetch_add(removed as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A partition's pipeline and lake writer from its checkpoint (or empty).
    fn build_part(&self, p: i32, checkpoint: Option<PartitionCheckpoint>) -> Result<Part> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Processor(format!("partition {p}: {what}: {e}"))
        };
        let config = self.params.pipeline.clone();
        let models = &self.params.models;
        let pipeline = match &checkpoint {
            Some(c) => {
                let snapshot = PipelineSnapshot::decode(&c.pipeline)
                    .map_err(|e| fail("decoding the checkpoint", &e))?;
                let mut pipeline = ShardedPipeline::restore(config, models, snapshot)
                    .map_err(|e| fail("restoring the pipeline", &e))?;
                // Recurrent state belongs to the model that produced it.
                if c.model_version != self.model_version {
                    pipeline
                        .set_models(models)
                        .map_err(|e| fail("setting the model", &e))?;
                }
                pipeline
            }
            None => ShardedPipeline::new(config, models)
                .map_err(|e| fail("building the pipeline", &e))?,
        };
        let epoch = checkpoint.as_ref().map_or(0, |c| c.lake_epoch) + 1;
        let lake = LakeWriter::open(LakeConfig {
            writer_id: partition_epoch_writer_id(partition_number(p), epoch),
            recover_on_open: false,
            ..self.params.lake.clone()
        })
        .map_err(|e| fail("opening the lake", &e))?;
        Ok(Part {
            pipeline,
            lake,
            next_offset: checkpoint.as_ref().map(|c| c.input_offset),
            committed: checkpoint,
            epoch,
            dirty: false,
        })
    }

    /// Processes polled records, each partition's in order.
    fn process(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        batch: &[(i32, i64, Bytes)],
    ) -> Result<()> {
        let generation = self.generation;
        let mut start = 0;
        while start < batch.len() {
            let p = batch[start].0;
            let end = batch[start..]
                .iter()
                .position(|r| r.0 != p)
                .map_or(batch.len(), |n| start + n);
            self.process_run(consumer, p, &batch[start..end])?;
            if self.generation != generation {
                // Rewound: the rest comes again from the checkpoints' offsets.
                return Ok(());
            }
            start = end;
        }
        Ok(())
    }

    fn process_run(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        p: i32,
        records: &[(i32, i64, Bytes)],
    ) -> Result<()> {
        let Some(part) = self.parts.get(&p) else {
            return Ok(());
        };
        // Skip what a seek brought again.
        let from = part.next_offset.unwrap_or(i64::MIN);
        let records: Vec<&(i32, i64, Bytes)> = records.iter().filter(|r| r.1 >= from).collect();
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let range = first.1..last.1 + 1;
        let suspect = self.dead.get(&p).is_some_and(|d| {
            d.suspect
                .iter()
                .any(|s| s.start < range.end && range.start < s.end)
        });
        if suspect {
            let generation = self.generation;
            for r in records {
                self.step(consumer, p, &[r])?;
                if self.generation != generation {
                    return Ok(());
                }
            }
            Ok(())
        } else {
            self.step(consumer, p, &records)
        }
    }

    /// One pipeline step of partition `p`; a panic rewinds every partition (see the module
    /// docs) and marks the records for the next attempt.
    fn step(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        p: i32,
        records: &[&(i32, i64, Bytes)],
    ) -> Result<()> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let range = first.1..last.1 + 1;
        let now = now_us();
        let mut out = Outputs::default();
        let poisoned: Vec<(i64, String)> = self
            .dead
            .get(&p)
            .map(|d| {
                records
                    .iter()
                    .filter_map(|r| d.poisoned.get(&r.1).map(|f| (r.1, f.clone())))
                    .collect()
            })
            .unwrap_or_default();
        for (offset, failure) in &poisoned {
            if let Some(r) = records.iter().find(|r| r.1 == *offset)
                && let Ok(record) = IngestRecordRef::decode(&r.2)
            {
                out.quarantine.push(dead_letter(&record, failure, now));
            }
        }
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        let stats = &self.stats;
        let pipeline = &mut part.pipeline;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let decoded = records
                .iter()
                .filter(|r| !poisoned.iter().any(|(o, _)| *o == r.1))
                .filter_map(|r| match IngestRecordRef::decode(&r.2) {
                    Ok(record) => {
                        poison_failpoint(record.sensor_id);
                        Some(record)
                    }
                    Err(e) => {
                        stats.corrupt_records.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(partition = p, offset = r.1, error = %e, "skipping an undecodable ingest record");
                        None
                    }
                });
            pipeline.process(decoded, now, &mut out);
        }));
        if let Err(panic) = result {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
                .to_owned();
            tracing::error!(partition = p, offsets = ?range, failure = %what, "a pipeline stage failed; rewinding to the last checkpoint");
            let dead = self.dead.entry(p).or_default();
            if records.len() == 1 {
                if dead.poisoned.len() < MAX_DEAD_LETTERS {
                    dead.poisoned
                        .insert(range.start, format!("a pipeline stage failed: {what}"));
                }
            } else if dead.suspect.len() < MAX_DEAD_LETTERS {
                dead.suspect.push(range);
            }
            return self.rewind(consumer);
        }
        self.stats
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if !poisoned.is_empty() {
            self.stats
                .dead_letters
                .fetch_add(poisoned.len() as u64, Ordering::Relaxed);
        }
        if let Some(part) = self.parts.get_mut(&p) {
            part.next_offset = Some(range.end);
            part.dirty = true;
        }
        self.emit(consumer, p, &mut out)
    }

    /// Processing-time duties of every partition.
    fn tick(&mut self, consumer: &BaseConsumer<GroupContext>) -> Result<()> {
        let now = now_us();
        let generation = self.generation;
        let owned: Vec<i32> = self.parts.keys().copied().collect();
        for p in owned {
            let mut out = Outputs::default();
            if let Some(part) = self.parts.get_mut(&p) {
                part.pipeline.on_tick(now, &mut out);
                if !out.is_empty() {
                    part.dirty = true;
                }
            }
            self.emit(consumer, p, &mut out)?;
            if self.generation != generation {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Produces `out` in the open transaction and writes it to `p`'s lake files; a failure
    /// rewinds.
    fn emit(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        p: i32,
        out: &mut Outputs,
    ) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.emit_outputs(p, out) {
            tracing::error!(partition = p, error = %e, "writing outputs failed; rewinding to the last checkpoint");
            return self.rewind(consumer);
        }
        Ok(())
    }

    fn emit_outputs(&mut self, p: i32, out: &mut Outputs) -> std::result::Result<(), String> {
        self.begin()?;
        let topics = &self.params.kafka.topics;
        let producer = &self.producer;
        for chunk in &out.samples {
            send(
                producer,
                &topics.transformed,
                &chunk.sensor_id,
                &rows::encode_samples(chunk),
            )?;
            self.stats
                .samples
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        for w in &out.windows {
            send(
                producer,
                &topics.windows,
                &w.sensor_id,
                &rows::encode_row(w),
            )?;
        }
        for a in &out.aggregates {
            send(
                producer,
                &topics.aggregated,
                &a.sensor_id,
                &rows::encode_row(a),
            )?;
        }
        for e in &out.session_events {
            let s = e.session();
            send(
                producer,
                &topics.sessions,
                &s.sensor_id,
                &rows::encode_session_event(e),
            )?;
        }
        for g in &out.gaps {
            send(producer, &topics.gaps, &g.sensor_id, &rows::encode_row(g))?;
        }
        for l in &out.late {
            send(producer, &topics.late, &l.sensor_id, &rows::encode_row(l))?;
        }
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        let ended: Vec<_> = out
            .session_events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Ended { session, .. } => Some(session.clone()),
                SessionEvent::Started { .. } => None,
            })
            .collect();
        let lake = &mut part.lake;
        (|| {
            lake.write_samples(&out.samples)?;
            lake.write_windows(&out.windows)?;
            lake.write_aggregates(&out.aggregates)?;
            lake.write_sessions(&ended)?;
            lake.write_gaps(&out.gaps)?;
            lake.write_late(&out.late)?;
            lake.write_quarantine(&out.quarantine)?;
            lake.roll_due(Instant::now()).map(|_| ())
        })()
        .map_err(|e| format!("lake: {e}"))?;
        out.clear();
        Ok(())
    }

    fn begin(&mut self) -> std::result::Result<(), String> {
        if !self.txn_open {
            self.producer
                .begin_transaction()
                .map_err(|e| format!("begin transaction: {e}"))?;
            self.txn_open = true;
        }
        Ok(())
    }

    /// Commits the open transaction: lake files of the moved partitions, their checkpoints,
    /// the consumed offsets (see the module docs). A failure aborts and rewinds.
    fn commit(&mut self, consumer: &BaseConsumer<GroupContext>) -> Result<()> {
        if !self.txn_open {
            return Ok(());
        }
        let started = Instant::now();
        match self.try_commit(consumer) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .commit_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; aborting and rewinding to the last checkpoint");
                self.rewind(consumer)
            }
        }
    }

    /// [`State::commit`] before partitions are revoked. A failure only aborts: the partitions'
    /// state is dropped anyway and their next owners (maybe this processor again) resume from
    /// the last checkpoints. No rewind: its seeks cannot complete inside the rebalance
    /// callback (each would wait out its timeout, holding the processor out of the group).
    fn commit_before_revoke(&mut self, consumer: &BaseConsumer<GroupContext>) -> Result<()> {
        if !self.txn_open {
            return Ok(());
        }
        match self.try_commit(consumer) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "committing before a revocation failed; the next owners resume from the last checkpoints");
                self.generation += 1;
                self.txn_open = false;
                self.stats.aborts.fetch_add(1, Ordering::Relaxed);
                self.producer
                    .abort_transaction(TXN_TIMEOUT)
                    .map_err(|source| Error::Transaction {
                        what: "abort",
                        source,
                    })
            }
        }
    }

    fn try_commit(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
    ) -> std::result::Result<(), String> {
        let topics = self.params.kafka.topics.clone();
        let mut offsets = TopicPartitionList::new();
        let mut written = Vec::new();
        for (&p, part) in &mut self.parts {
            if !part.dirty {
                continue;
            }
            let Some(next_offset) = part.next_offset else {
                continue;
            };
            let flushing = Instant::now();
            part.lake.flush().map_err(|e| format!("lake: {e}"))?;
            self.stats
                .lake_commit_micros
                .fetch_add(flushing.elapsed().as_micros() as u64, Ordering::Relaxed);
            let checkpoint = PartitionCheckpoint {
                input_offset: next_offset,
                lake_epoch: part.epoch,
                model_version: self.model_version.clone(),
                pipeline: part.pipeline.snapshot().encode(),
            };
            let value = checkpoint.encode();
            let key = p.to_string();
            send_to(&self.producer, &topics.changelog, Some(p), &key, &value)?;
            offsets
                .add_partition_offset(&topics.ingest, p, Offset::Offset(next_offset))
                .map_err(|e| format!("offsets: {e}"))?;
            written.push((p, checkpoint));
        }
        if offsets.count() > 0 {
            let metadata = consumer
                .group_metadata()
                .ok_or_else(|| "no consumer group metadata".to_owned())?;
            // The stall watchdog's test: `processor-commit-stall=N*off->1*sleep(MS)` stalls the
            // Nth commit where librdkafka's coordinator hang does.
            fail::fail_point!("processor-commit-stall");
            self.producer
                .send_offsets_to_transaction(&offsets, &metadata, TXN_TIMEOUT)
                .map_err(|e| format!("send offsets: {e}"))?;
        }
        self.producer
            .commit_transaction(TXN_TIMEOUT)
            .map_err(|e| format!("commit: {e}"))?;
        self.txn_open = false;
        for (p, checkpoint) in written {
            if let Some(part) = self.parts.get_mut(&p) {
                part.epoch = checkpoint.lake_epoch + 1;
                part.lake
                    .set_writer_id(partition_epoch_writer_id(partition_number(p), part.epoch));
                part.committed = Some(checkpoint);
                part.dirty = false;
            }
        }
        Ok(())
    }

    /// Aborts the open transaction and puts every owned partition back at its last committed
    /// checkpoint: state, lake files, consumer position.
    fn rewind(&mut self, consumer: &BaseConsumer<GroupContext>) -> Result<()> {
        self.generation += 1;
        self.stats.rewinds.fetch_add(1, Ordering::Relaxed);
        if self.txn_open {
            self.producer
                .abort_transaction(TXN_TIMEOUT)
                .map_err(|source| Error::Transaction {
                    what: "abort",
                    source,
                })?;
            self.txn_open = false;
            self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        }
        let owned: Vec<(i32, Option<PartitionCheckpoint>)> = std::mem::take(&mut self.parts)
            .into_iter()
            .map(|(p, part)| (p, part.committed))
            .collect();
        let partitions: Vec<i32> = owned.iter().map(|(p, _)| *p).collect();
        let checkpoints: BTreeMap<i32, PartitionCheckpoint> = owned
            .iter()
            .filter_map(|(p, c)| c.clone().map(|c| (*p, c)))
            .collect();
        self.discard_uncommitted_lake_files(&partitions, &checkpoints)?;
        let topic = self.params.kafka.topics.ingest.clone();
        for (p, checkpoint) in owned {
            let offset = checkpoint
                .as_ref()
                .map_or(Offset::Beginning, |c| Offset::Offset(c.input_offset));
            let part = self.build_part(p, checkpoint)?;
            self.parts.insert(p, part);
            consumer
                .seek(&topic, p, offset, TXN_TIMEOUT)
                .map_err(|source| Error::Request {
                    what: "seek",
                    source,
                })?;
        }
        Ok(())
    }
}

/// Lake partition numbers are the Kafka partition's (never negative).
fn partition_number(p: i32) -> u32 {
    u32::try_from(p).unwrap_or(0)
}

/// Produces one record (to `partition`, or where the key hashes), waiting while librdkafka's
/// queue is full.
fn send_to(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    value: &[u8],
) -> std::result::Result<(), String> {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(format!("producing to {topic}: {e}")),
        }
    }
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    value: &[u8],
) -> std::result::Result<(), String> {
    send_to(producer, topic, None, key, value)
}

/// A dead letter: the whole ingest record, as received, in the quarantine table.
fn dead_letter(record: &IngestRecordRef<'_>, failure: &str, now: i64) -> QuarantineRecord {
    QuarantineRecord::stage_failed(
        record.sensor_id,
        record.ingest_us,
        record.payload,
        failure,
        now,
    )
}

/// Fault injection for the dead-letter test: with the `failpoints` feature and
/// `FAILPOINTS=pipeline-poison=return(SENSOR)`, a step panics on a record of sensor `SENSOR`,
/// as an operator bug triggered by one record's data would (the embedded runtime has the same
/// fail point). Compiled to nothing otherwise.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn poison_failpoint(sensor_id: &str) {
    fail::fail_point!("pipeline-poison", |target: Option<String>| {
        if target.as_deref() == Some(sensor_id) {
            panic!("fail point pipeline-poison hit by a record of sensor {sensor_id}");
        }
    });
}
