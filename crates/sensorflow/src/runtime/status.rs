//! What the API shows about the running platform: sensor table, readiness, Prometheus metrics.
//!
//! Each component publishes snapshots here from its own thread (the pipeline every 500 ms, the
//! sink after each batch, ingest through its observer); API requests only read snapshots, so
//! a busy dashboard never contends with the hot path.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use sensorflow_api::{ComponentStatus, ReadyStatus, SensorStatus, StatusSource};
use sensorflow_records::SessionsQuery;
use std::net::SocketAddr;

use super::model_control::ModelSlot;
use sensorflow_ingest::{IngestObserver, IngestStats};
use sensorflow_lake::LakeStats;
use sensorflow_log::Log;
use sensorflow_pipeline::{PipelineStats, ShardedPipeline};
use sensorflow_protocol::framing::BadReason;

/// Time constant of the per-sensor rate averages. Packets arrive a few times a second, so a
/// rate over one refresh interval would jump between multiples of the packet rate.
const RATE_TAU_SECS: f64 = 5.0;

/// Exponentially weighted samples/s and packets/s of one sensor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RateState {
    samples: u64,
    packets: u64,
    pub(crate) samples_per_s: f64,
    pub(crate) packets_per_s: f64,
}

impl RateState {
    /// The rates after a refresh that found `samples` and `packets` counted in total,
    /// `elapsed` seconds after `prev`'s refresh (`None`: the first refresh, rates start at 0).
    pub(crate) fn next(
        prev: Option<RateState>,
        samples: u64,
        packets: u64,
        elapsed: Option<f64>,
    ) -> RateState {
        match (prev, elapsed) {
            (Some(p), Some(dt)) => {
                let alpha = 1.0 - (-dt / RATE_TAU_SECS).exp();
                let inst_s = samples.saturating_sub(p.samples) as f64 / dt;
                let inst_p = packets.saturating_sub(p.packets) as f64 / dt;
                RateState {
                    samples,
                    packets,
                    samples_per_s: p.samples_per_s + alpha * (inst_s - p.samples_per_s),
                    packets_per_s: p.packets_per_s + alpha * (inst_p - p.packets_per_s),
                }
            }
            _ => RateState {
                samples,
                packets,
                ..RateState::default()
            },
        }
    }
}

/// Snapshot store shared by the runtime's threads and the API.
pub(crate) struct SharedStatus {
    sensors: RwLock<Arc<Vec<SensorStatus>>>,
    /// Time of the previous refresh and, per sensor, the counts then and the smoothed rates.
    previous: Mutex<(Option<Instant>, HashMap<String, RateState>)>,
    pipeline: Mutex<PipelineStats>,
    components: RwLock<BTreeMap<String, ComponentStatus>>,
    /// Bad input rejected by ingest (unknown topic, oversize): sensor ("" if unknown) → reason → count.
    ingest_bad: Mutex<HashMap<String, BTreeMap<BadReason, u64>>>,
    /// Bad input of sensors beyond [`MAX_INGEST_BAD_SENSORS`] tracked ids.
    ingest_bad_untracked: AtomicU64,
    lake: Mutex<Option<LakeStats>>,
    corrupt_records: AtomicU64,
    /// Last checkpoint written: (epoch, log offset, snapshot bytes, ms it took the sink to
    /// commit the lake and write it), and how many were written.
    checkpoint: Mutex<Option<(u64, u64, usize, u64)>>,
    /// Longest checkpoint commit so far, ms.
    checkpoint_max_ms: AtomicU64,
    checkpoints_written: AtomicU64,
    /// Checkpoint files found corrupt by recoveries (the previous one was used).
    pub(crate) checkpoints_corrupt: AtomicU64,
    /// Lake files of incomplete epochs deleted by the last recovery, and log records replayed.
    pub(crate) recovery: Mutex<(usize, u64)>,
    pub(crate) sessions_ended: AtomicU64,
    /// Times the dataflow was restarted from a checkpoint after a sink failure.
    pub(crate) dataflow_restarts: AtomicU64,
    /// Log records set aside into the quarantine table because they made a stage fail.
    dead_letters: AtomicU64,
    /// Bytes of a torn log tail cut off when the log was opened.
    pub(crate) log_truncated_bytes: AtomicU64,
    log: Log,
    ingest: RwLock<Option<(SocketAddr, Arc<IngestStats>)>>,
    sessions: Box<dyn SessionsQuery>,
    model: RwLock<Option<Arc<ModelSlot>>>,
    /// Time in model calls of finished pipeline runs and of the current one (at its last
    /// status refresh), ns.
    model_nanos_finished: AtomicU64,
    model_nanos_current: AtomicU64,
}

impl SharedStatus {
    /// The model slot whose swaps, failures and active version `/metrics` shows.
    pub(crate) fn set_model_slot(&self, slot: Arc<ModelSlot>) {
        *self.model.write() = Some(slot);
    }

    pub(crate) fn new(log: Log, sessions: Box<dyn SessionsQuery>) -> Self {
        Self {
            sensors: RwLock::new(Arc::new(Vec::new())),
            previous: Mutex::new((None, HashMap::new())),
            pipeline: Mutex::new(PipelineStats::default()),
            components: RwLock::new(BTreeMap::new()),
            ingest_bad: Mutex::new(HashMap::new()),
            ingest_bad_untracked: AtomicU64::new(0),
            lake: Mutex::new(None),
            corrupt_records: AtomicU64::new(0),
            checkpoint: Mutex::new(None),
            checkpoints_written: AtomicU64::new(0),
            checkpoint_max_ms: AtomicU64::new(0),
            checkpoints_corrupt: AtomicU64::new(0),
            recovery: Mutex::new((0, 0)),
            sessions_ended: AtomicU64::new(0),
            dataflow_restarts: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            log_truncated_bytes: AtomicU64::new(0),
            log,
            ingest: RwLock::new(None),
            sessions,
            model: RwLock::new(None),
            model_nanos_finished: AtomicU64::new(0),
            model_nanos_current: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_ingest(&self, addr: SocketAddr, stats: Arc<IngestStats>) {
        *self.ingest.write() = Some((addr, stats));
    }

    pub(crate) fn set_component(&self, name: &str, ok: bool, detail: String) {
        let mut components = self.components.write();
        match components.get_mut(name) {
            Some(c) if c.ok == ok && c.detail == detail => {}
            _ => {
                components.insert(name.to_owned(), ComponentStatus { ok, detail });
            }
        }
    }

    pub(crate) fn checkpoint_written(
        &self,
        epoch: u64,
        log_offset: u64,
        bytes: usize,
        took: std::time::Duration,
    ) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        *self.checkpoint.lock() = Some((epoch, log_offset, bytes, ms));
        self.checkpoint_max_ms.fetch_max(ms, Ordering::Relaxed);
        self.checkpoints_written.fetch_add(1, Ordering::Relaxed);
    }

    /// Epoch and log offset of the last checkpoint written by this process, if any.
    pub(crate) fn last_checkpoint(&self) -> Option<(u64, u64)> {
        self.checkpoint
            .lock()
            .map(|(epoch, offset, _, _)| (epoch, offset))
    }

    pub(crate) fn count_corrupt_record(&self) {
        self.corrupt_records.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_lake_stats(&self, stats: LakeStats) {
        *self.lake.lock() = Some(stats);
    }

    /// Rebuilds the sensor table from the pipeline's counters (pipeline thread).
    pub(crate) fn refresh_sensors(&self, pipeline: &ShardedPipeline, now: Instant) {
        let mut previous = self.previous.lock();
        let elapsed = previous
            .0
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|s| *s > 0.0);
        let ingest_bad = self.ingest_bad.lock();
        let mut next_rates = HashMap::new();
        let mut table: Vec<SensorStatus> = pipeline
            .sensors()
            .map(|view| {
                let c = view.counters;
                let id: &str = view.sensor_id;
                let prev = previous.1.get(id).copied();
                let rates = RateState::next(prev, c.samples_decoded, c.packets_decoded, elapsed);
                let mut bad: BTreeMap<String, u64> = c
                    .bad
                    .iter()
                    .map(|(r, n)| (r.as_str().to_owned(), *n))
                    .collect();
                if let Some(extra) = ingest_bad.get(id) {
                    for (r, n) in extra {
                        *bad.entry(r.as_str().to_owned()).or_default() += n;
                    }
                }
                next_rates.insert(id.to_owned(), rates);
                SensorStatus {
                    sensor_id: id.to_owned(),
                    last_seen_us: c.last_seen_us,
                    first_seen_us: c.first_seen_us,
                    samples_per_s: rates.samples_per_s,
                    packets_per_s: rates.packets_per_s,
                    packets_decoded: c.packets_decoded,
                    samples_decoded: c.samples_decoded,
                    duplicates: c.duplicates,
                    gaps: c.gaps,
                    missing_samples: c.missing_samples,
                    reordered_samples: c.reordered_samples,
                    late: c.late,
                    restarts: c.restarts,
                    bad_total: bad.values().sum(),
                    bad,
                    active_session_id: view.active_session.map(|s| s.to_string()),
                }
            })
            .collect();
        // Sensors whose every message ingest refused (e.g. all oversize) never reach the
        // pipeline; list them too so their bad input is visible per sensor.
        let known: std::collections::HashSet<String> =
            table.iter().map(|s| s.sensor_id.clone()).collect();
        for (id, reasons) in ingest_bad.iter() {
            if id.is_empty() || known.contains(id) {
                continue;
            }
            let bad: BTreeMap<String, u64> = reasons
                .iter()
                .map(|(r, n)| (r.as_str().to_owned(), *n))
                .collect();
            table.push(SensorStatus {
                sensor_id: id.clone(),
                bad_total: bad.values().sum(),
                bad,
                ..SensorStatus::default()
            });
        }
        table.sort_by(|a, b| a.sensor_id.cmp(&b.sensor_id));
        previous.0 = Some(now);
        previous.1 = next_rates;
        *self.sensors.write() = Arc::new(table);
        *self.pipeline.lock() = pipeline.stats();
        self.model_nanos_current
            .store(pipeline.model_time().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Called when a run of the pipeline ends: its model time joins the total, so
    /// `sensorflow_model_inference_seconds_total` never goes down across dataflow restarts.
    pub(crate) fn pipeline_finished(&self, pipeline: &ShardedPipeline) {
        self.model_nanos_finished
            .fetch_add(pipeline.model_time().as_nanos() as u64, Ordering::Relaxed);
        self.model_nanos_current.store(0, Ordering::Relaxed);
    }
}

/// Distinct sensor ids whose ingest-refused input is tracked per sensor.
const MAX_INGEST_BAD_SENSORS: usize = 10_000;
/// Longer sensor ids are not tracked per sensor (topics may be 64 KiB long).
const MAX_TRACKED_ID_BYTES: usize = 256;

/// Counts bad input of `sensor_id` ("" when unknown); false if the id is not tracked. Bounded:
/// sensor ids come from clients, so beyond [`MAX_INGEST_BAD_SENSORS`] ids (or for ids longer
/// than [`MAX_TRACKED_ID_BYTES`]) the caller counts the input in an aggregate instead.
pub(crate) fn record_bad(
    bad: &mut HashMap<String, BTreeMap<BadReason, u64>>,
    sensor_id: &str,
    reason: BadReason,
) -> bool {
    if !sensor_id.is_empty()
        && !bad.contains_key(sensor_id)
        && (bad.len() >= MAX_INGEST_BAD_SENSORS || sensor_id.len() > MAX_TRACKED_ID_BYTES)
    {
        return false;
    }
    *bad.entry(sensor_id.to_owned())
        .or_default()
        .entry(reason)
        .or_default() += 1;
    true
}

impl SharedStatus {
    /// Counts a log record set aside as a dead letter (`stage_failed`) for its sensor.
    pub(crate) fn dead_letter(&self, sensor_id: &str) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.count_bad(Some(sensor_id), BadReason::StageFailed);
    }

    /// Counts input refused before or outside the pipeline per sensor, within the bound of
    /// [`record_bad`]; beyond it in `sensorflow_ingest_bad_input_untracked_total`.
    fn count_bad(&self, sensor_id: Option<&str>, reason: BadReason) {
        if !record_bad(&mut self.ingest_bad.lock(), sensor_id.unwrap_or(""), reason) {
            self.ingest_bad_untracked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl IngestObserver for SharedStatus {
    fn bad_input(&self, sensor_id: Option<&str>, reason: BadReason, detail: &str) {
        tracing::debug!(
            sensor_id,
            reason = reason.as_str(),
            detail,
            "bad input rejected by ingest"
        );
        self.count_bad(sensor_id, reason);
    }
}

impl StatusSource for SharedStatus {
    fn sensors(&self) -> Vec<SensorStatus> {
        self.sensors.read().as_ref().clone()
    }

    fn sensor(&self, sensor_id: &str) -> Option<SensorStatus> {
        self.sensors
            .read()
            .iter()
            .find(|s| s.sensor_id == sensor_id)
            .cloned()
    }

    fn ready(&self) -> ReadyStatus {
        let mut components = self.components.read().clone();
        let log = self.log.stats();
        components.insert(
            "log".into(),
            match &log.last_error {
                Some(e) => ComponentStatus {
                    ok: false,
                    detail: e.clone(),
                },
                None => ComponentStatus {
                    ok: true,
                    detail: format!("end offset {}", log.end_offset),
                },
            },
        );
        components.insert(
            "mqtt".into(),
            match self.ingest.read().as_ref() {
                Some((addr, _)) => ComponentStatus {
                    ok: true,
                    detail: format!("listening on {addr}"),
                },
                None => ComponentStatus {
                    ok: false,
                    detail: "not started".into(),
                },
            },
        );
        ReadyStatus {
            ready: components.values().all(|c| c.ok),
            components,
        }
    }

    fn render_metrics(&self, out: &mut String) {
        // Hand-written exposition: every value here is a snapshot another thread already keeps,
        // so a metrics registry would only duplicate the bookkeeping on the hot path.
        let sensors = self.sensors.read().clone();
        family(
            out,
            "sensorflow_sensor_samples_total",
            "counter",
            "Samples decoded per sensor.",
        );
        for s in sensors.iter() {
            sample(
                out,
                "sensorflow_sensor_samples_total",
                &[("sensor_id", &s.sensor_id)],
                s.samples_decoded,
            );
        }
        family(
            out,
            "sensorflow_sensor_packets_total",
            "counter",
            "Packets decoded per sensor.",
        );
        for s in sensors.iter() {
            sample(
                out,
                "sensorflow_sensor_packets_total",
                &[("sensor_id", &s.sensor_id)],
                s.packets_decoded,
            );
        }
        family(
            out,
            "sensorflow_sensor_bad_input_total",
            "counter",
            "Bad input per sensor and reason.",
        );
        for s in sensors.iter() {
            for (reason, n) in &s.bad {
                sample(
                    out,
                    "sensorflow_sensor_bad_input_total",
                    &[("sensor_id", &s.sensor_id), ("reason", reason)],
                    *n,
                );
            }
        }
        for (name, help, get) in [
            (
                "sensorflow_sensor_duplicate_samples_total",
                "Samples dropped as already processed.",
                (|s: &SensorStatus| s.duplicates) as fn(&SensorStatus) -> u64,
            ),
            (
                "sensorflow_sensor_gaps_total",
                "Gaps in sample indices.",
                |s| s.gaps,
            ),
            (
                "sensorflow_sensor_missing_samples_total",
                "Samples missing in gaps.",
                |s| s.missing_samples,
            ),
            (
                "sensorflow_sensor_reordered_samples_total",
                "Samples that arrived after later ones and filled a gap.",
                |s| s.reordered_samples,
            ),
            (
                "sensorflow_sensor_late_samples_total",
                "Samples later than their window.",
                |s| s.late,
            ),
            (
                "sensorflow_sensor_restarts_total",
                "Device restarts detected.",
                |s| s.restarts,
            ),
        ] {
            family(out, name, "counter", help);
            for s in sensors.iter() {
                sample(out, name, &[("sensor_id", &s.sensor_id)], get(s));
            }
        }
        gauge_like(
            out,
            "sensorflow_ingest_bad_input_untracked_total",
            "counter",
            "Bad input of sensors not tracked per sensor (too many distinct ids, or an id too long).",
            self.ingest_bad_untracked.load(Ordering::Relaxed),
        );
        let unknown = self.ingest_bad.lock().get("").cloned().unwrap_or_default();
        family(
            out,
            "sensorflow_ingest_rejected_total",
            "counter",
            "Messages rejected by ingest with no known sensor, by reason.",
        );
        for (reason, n) in unknown {
            sample(
                out,
                "sensorflow_ingest_rejected_total",
                &[("reason", reason.as_str())],
                n,
            );
        }
        let p = self.pipeline.lock().clone();
        gauge_like(
            out,
            "sensorflow_pipeline_records_total",
            "counter",
            "Log records processed.",
            p.records,
        );
        gauge_like(
            out,
            "sensorflow_pipeline_samples_total",
            "counter",
            "Samples emitted by the pipeline.",
            p.samples_out,
        );
        gauge_like(
            out,
            "sensorflow_model_calls_total",
            "counter",
            "Batched model calls.",
            p.model_calls,
        );
        gauge_like(
            out,
            "sensorflow_model_errors_total",
            "counter",
            "Failed model calls.",
            p.model_errors,
        );
        family(
            out,
            "sensorflow_model_inference_seconds_total",
            "counter",
            "Time spent in model calls (with sensorflow_model_calls_total: the mean per call).",
        );
        let _ = writeln!(
            out,
            "sensorflow_model_inference_seconds_total {}",
            (self.model_nanos_finished.load(Ordering::Relaxed)
                + self.model_nanos_current.load(Ordering::Relaxed)) as f64
                / 1e9
        );
        if let Some(slot) = self.model.read().clone() {
            gauge_like(
                out,
                "sensorflow_model_swaps_total",
                "counter",
                "Models swapped in at run time (POST /model, SIGHUP).",
                slot.swaps.load(Ordering::Relaxed),
            );
            gauge_like(
                out,
                "sensorflow_model_load_failures_total",
                "counter",
                "Models refused: fetch or validation failed, the running model stayed.",
                slot.load_failures.load(Ordering::Relaxed),
            );
            let active = slot.committed();
            family(
                out,
                "sensorflow_model_info",
                "gauge",
                "The active model: 1, with its version, location and engine as labels.",
            );
            let _ = writeln!(
                out,
                "sensorflow_model_info{{version=\"{}\",location=\"{}\",engine=\"{}\"}} 1",
                label_value(&active.version),
                label_value(active.location.as_deref().unwrap_or("")),
                active.models.first().map_or("none", |m| m.engine_name()),
            );
        }
        gauge_like(
            out,
            "sensorflow_pipeline_sensors",
            "gauge",
            "Sensors whose state the pipeline keeps.",
            sensors.len() as u64,
        );
        gauge_like(
            out,
            "sensorflow_pipeline_sensors_evicted_total",
            "counter",
            "Sensor states dropped: idle, or beyond pipeline.max_sensors.",
            p.sensors_evicted,
        );
        gauge_like(
            out,
            "sensorflow_quarantined_samples_total",
            "counter",
            "Samples sent to the quarantine table for an implausible event time.",
            p.samples_quarantined,
        );
        gauge_like(
            out,
            "sensorflow_dead_letters_total",
            "counter",
            "Log records sent to the quarantine table because they made a stage fail.",
            self.dead_letters.load(Ordering::Relaxed),
        );
        gauge_like(
            out,
            "sensorflow_log_corrupt_records_total",
            "counter",
            "Log records that could not be decoded.",
            self.corrupt_records.load(Ordering::Relaxed),
        );
        gauge_like(
            out,
            "sensorflow_sessions_ended_total",
            "counter",
            "Sessions ended.",
            self.sessions_ended.load(Ordering::Relaxed),
        );
        gauge_like(
            out,
            "sensorflow_checkpoints_total",
            "counter",
            "Checkpoints written.",
            self.checkpoints_written.load(Ordering::Relaxed),
        );
        gauge_like(
            out,
            "sensorflow_checkpoints_corrupt_total",
            "counter",
            "Checkpoint files that failed verification during recovery.",
            self.checkpoints_corrupt.load(Ordering::Relaxed),
        );
        if let Some((epoch, offset, bytes, ms)) = *self.checkpoint.lock() {
            gauge_like(
                out,
                "sensorflow_checkpoint_epoch",
                "gauge",
                "Epoch of the last checkpoint.",
                epoch,
            );
            gauge_like(
                out,
                "sensorflow_checkpoint_log_offset",
                "gauge",
                "Log offset of the last checkpoint.",
                offset,
            );
            gauge_like(
                out,
                "sensorflow_checkpoint_bytes",
                "gauge",
                "Size of the last pipeline snapshot.",
                bytes as u64,
            );
            gauge_like(
                out,
                "sensorflow_checkpoint_last_duration_ms",
                "gauge",
                "Time the sink took to commit the lake files and write the last checkpoint.",
                ms,
            );
            gauge_like(
                out,
                "sensorflow_checkpoint_max_duration_ms",
                "gauge",
                "Longest such checkpoint commit since start.",
                self.checkpoint_max_ms.load(Ordering::Relaxed),
            );
        }
        gauge_like(
            out,
            "sensorflow_dataflow_restarts_total",
            "counter",
            "Restarts of the dataflow from the last checkpoint after a sink failure.",
            self.dataflow_restarts.load(Ordering::Relaxed),
        );
        let (files_removed, replayed) = *self.recovery.lock();
        gauge_like(
            out,
            "sensorflow_recovery_lake_files_removed",
            "gauge",
            "Lake files of incomplete epochs deleted by the last recovery.",
            files_removed as u64,
        );
        gauge_like(
            out,
            "sensorflow_recovery_log_records",
            "gauge",
            "Log records after the restored checkpoint, replayed by the last recovery.",
            replayed,
        );
        let log = self.log.stats();
        gauge_like(
            out,
            "sensorflow_log_end_offset",
            "gauge",
            "Next log offset.",
            log.end_offset,
        );
        gauge_like(
            out,
            "sensorflow_log_appended_bytes_total",
            "counter",
            "Bytes appended to the log.",
            log.appended_bytes,
        );
        gauge_like(
            out,
            "sensorflow_log_fsyncs_total",
            "counter",
            "fsync calls of the log.",
            log.fsyncs,
        );
        gauge_like(
            out,
            "sensorflow_log_unconsumed_bytes",
            "gauge",
            "Log bytes not yet processed.",
            log.unconsumed_bytes,
        );
        gauge_like(
            out,
            "sensorflow_log_truncated_bytes",
            "gauge",
            "Bytes of a torn log tail truncated when the log was opened.",
            self.log_truncated_bytes.load(Ordering::Relaxed),
        );
        gauge_like(
            out,
            "sensorflow_log_write_errors_total",
            "counter",
            "Failed log writes.",
            log.write_errors,
        );
        if let Some(lake) = self.lake.lock().as_ref() {
            gauge_like(
                out,
                "sensorflow_lake_files_total",
                "counter",
                "Parquet files committed to the lake.",
                lake.files_committed(),
            );
            gauge_like(
                out,
                "sensorflow_lake_errors_total",
                "counter",
                "Lake write and compaction errors.",
                lake.errors,
            );
            gauge_like(
                out,
                "sensorflow_lake_compactions_total",
                "counter",
                "Merges of small files in closed lake partitions.",
                lake.compactions,
            );
            gauge_like(
                out,
                "sensorflow_lake_early_syncs_total",
                "counter",
                "Syncs of lake files while they were written (one per lake.sync_every_bytes).",
                lake.early_syncs,
            );
            gauge_like(
                out,
                "sensorflow_lake_partitions_evicted_total",
                "counter",
                "Lake partitions committed early to stay within lake.max_open_partitions.",
                lake.partitions_evicted,
            );
            gauge_like(
                out,
                "sensorflow_lake_quarantine_rows_total",
                "counter",
                "Rows written to the lake's quarantine table.",
                lake.table(sensorflow_lake::Table::Quarantine).rows_written,
            );
        }
        if let Some((_, stats)) = self.ingest.read().as_ref() {
            let i = stats.snapshot();
            gauge_like(
                out,
                "sensorflow_mqtt_connections",
                "gauge",
                "Open MQTT connections.",
                i.connections_current,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_connections_total",
                "counter",
                "MQTT connections accepted.",
                i.connections_total,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_connections_refused_total",
                "counter",
                "MQTT connections refused.",
                i.connections_refused,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_connections_refused_per_ip_total",
                "counter",
                "MQTT connections refused because mqtt.max_connections_per_ip were open from that address.",
                i.connections_refused_per_ip,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_sensor_ids",
                "gauge",
                "Distinct sensor ids known to ingest (capped by mqtt.max_sensor_ids).",
                i.sensor_ids,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_sensor_ids_refused_total",
                "counter",
                "Messages refused because their sensor id was new and mqtt.max_sensor_ids were known.",
                i.sensor_ids_refused,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_publishes_throttled_total",
                "counter",
                "Publishes delayed by the per-connection rate limit (mqtt.max_publishes_per_sec).",
                i.publishes_throttled,
            );
            family(
                out,
                "sensorflow_auth_failures_total",
                "counter",
                "Refused MQTT CONNECTs and publishes by reason.",
            );
            for (reason, n) in sensorflow_ingest::AuthFailure::ALL
                .iter()
                .zip(i.auth_failures)
            {
                sample(
                    out,
                    "sensorflow_auth_failures_total",
                    &[("reason", reason.as_str())],
                    n,
                );
            }
            family(
                out,
                "sensorflow_auth_acl_denied_total",
                "counter",
                "Publishes refused by the ACL, per user.",
            );
            for (user, n) in stats.acl_denied_by_user() {
                sample(
                    out,
                    "sensorflow_auth_acl_denied_total",
                    &[("user", &user)],
                    n,
                );
            }
            family(
                out,
                "sensorflow_mqtt_publishes_total",
                "counter",
                "PUBLISH packets received by QoS.",
            );
            for (qos, n) in i.received_by_qos.iter().enumerate() {
                sample(
                    out,
                    "sensorflow_mqtt_publishes_total",
                    &[("qos", &qos.to_string())],
                    *n,
                );
            }
            gauge_like(
                out,
                "sensorflow_mqtt_received_bytes_total",
                "counter",
                "Payload bytes received.",
                i.received_bytes,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_stored_total",
                "counter",
                "Messages durably stored in the log.",
                i.stored,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_acked_total",
                "counter",
                "QoS 1/2 publishes acknowledged.",
                i.acked,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_nacked_total",
                "counter",
                "MQTT 5 publishes answered with an error code.",
                i.nacked,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_sink_rejected_total",
                "counter",
                "Appends the log failed.",
                i.rejected_by_sink,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_dropped_on_shutdown_total",
                "counter",
                "Publishes refused while stopping.",
                i.dropped_on_shutdown,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_packets_too_large_total",
                "counter",
                "Connections closed for a packet above the maximum packet size (never buffered).",
                i.packets_too_large,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_client_id_too_long_total",
                "counter",
                "CONNECTs refused for a client id above mqtt.max_client_id_bytes.",
                i.client_id_too_long,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_sessions_evicted_total",
                "counter",
                "Persistent sessions forgotten at mqtt.max_persistent_sessions.",
                i.sessions_evicted,
            );
            gauge_like(
                out,
                "sensorflow_mqtt_oversize_total",
                "counter",
                "Publishes above mqtt.max_message_bytes (read and discarded).",
                i.oversize,
            );
        }
    }

    fn sessions(&self) -> &dyn SessionsQuery {
        self.sessions.as_ref()
    }
}

pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub(crate) fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"");
        for ch in v.chars() {
            match ch {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    let _ = writeln!(out, "}} {value}");
}

/// A Prometheus label value, escaped (backslash, double quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) fn gauge_like(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_tracked_per_sensor_up_to_the_cap_and_known_ids_keep_counting() {
        let mut bad = HashMap::new();
        for i in 0..MAX_INGEST_BAD_SENSORS {
            assert!(record_bad(&mut bad, &format!("s{i}"), BadReason::Oversize));
        }
        assert!(!record_bad(&mut bad, "one-too-many", BadReason::Oversize));
        assert!(
            record_bad(&mut bad, "s0", BadReason::Oversize),
            "a tracked id keeps counting"
        );
        assert_eq!(bad["s0"][&BadReason::Oversize], 2);
        assert!(!bad.contains_key("one-too-many"));
        assert_eq!(bad.len(), MAX_INGEST_BAD_SENSORS);
    }

    #[test]
    fn an_absurdly_long_sensor_id_is_not_tracked() {
        let mut bad = HashMap::new();
        assert!(!record_bad(
            &mut bad,
            &"x".repeat(MAX_TRACKED_ID_BYTES + 1),
            BadReason::Oversize
        ));
        assert!(record_bad(
            &mut bad,
            &"x".repeat(MAX_TRACKED_ID_BYTES),
            BadReason::Oversize
        ));
    }
}
