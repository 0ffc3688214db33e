//! The sensorflow pipeline: pure, deterministic operators keyed by sensor.
//!
//! Records in, records out: no sockets, files, threads or clocks in here (the caller passes the
//! processing time), so every operator is unit-testable and its state can be checkpointed.
//!
//! # Layout
//!
//! - [`record`]: the output records (lake tables, live feeds) and [`Outputs`].
//! - [`dedupe`]: stage 1, duplicates, gaps and device restarts from sample indices.
//! - [`window`]: stage 4, tumbling event-time windows with per-sensor watermarks.
//! - [`session`]: stages 3 and 6, gap-based sessions and their aggregates.
//! - [`stats`]: per-sensor counters for `/sensors` and `/metrics`.
//! - [`config`]: the `[pipeline]` settings.
//! - [`snapshot`]: checkpoints of the whole pipeline state ([`PipelineSnapshot`]) and their
//!   binary encoding.
//! - this file: [`Pipeline`], which decodes log records (framing, JSON), runs the stages in order
//!   per sensor (transform is stage 2) and batches inference (stage 5) across sensors.
//!
//! # One step
//!
//! [`Pipeline::process`] takes a batch of ingest records. Phase one walks them in order:
//! framing, dedupe, sessions, transform and windows, appending each sensor's accepted samples to
//! that sensor's pending chunk. Phase two runs the model once for all sensors with pending
//! samples (one sequence per sensor, its recurrent state carried in and out) and then adds the
//! predictions to the session aggregates and emits the chunks. When a session ends in the middle
//! of a step, that sensor's pending samples are inferred first, so an aggregate never misses
//! samples of its own session and a new session always starts from a zero model state.
//!
//! # Determinism
//!
//! Sensors are kept in first-seen order and every pass over them (batching, ticks, shutdown,
//! snapshots) walks that order. The same input therefore yields the same outputs in the same
//! order, with bit-identical predictions (the model's batch composition is identical too), and a
//! pipeline restored from a [`PipelineSnapshot`] continues exactly as the original would have.

pub mod config;
pub mod dedupe;
/// The output records, at home in `sensorflow-records` (the lake and the API use them without
/// the model); re-exported so `sensorflow_pipeline::record::*` keeps working.
pub mod record {
    pub use sensorflow_records::record::*;
}
pub mod session;
pub mod sharded;
pub mod snapshot;
pub mod stats;
pub mod window;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use sensorflow_model::{Model, SequenceMut};
use sensorflow_protocol::framing::{BadReason, Frame, FrameDecoder};
use sensorflow_protocol::imu::PhysSample;
use sensorflow_protocol::json::parse_json_packet;
use sensorflow_protocol::record::{IngestRecordRef, PayloadFormat};
use serde::{Deserialize, Serialize};

pub use config::PipelineConfig;
pub use record::*;
pub use sharded::{ShardedPipeline, shard_of};
pub use snapshot::{PipelineSnapshot, SNAPSHOT_VERSION, SensorSnapshot, SnapshotError};
pub use stats::SensorCounters;

use dedupe::{SequenceTracker, Verdict};
use session::ActiveSession;
use window::{Added, SensorWindows};

/// Errors building a pipeline, fresh ([`Pipeline::new`]) or from a snapshot ([`Pipeline::restore`]).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid pipeline configuration: {0}")]
    Config(String),
    #[error("model feature column {0:?} is not one the pipeline computes")]
    UnknownFeature(String),
    /// The snapshot was written in a format this build does not read.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    SnapshotVersion { found: u32, supported: u32 },
    /// A sensor's recurrent state in the snapshot does not fit the model: it was taken with a
    /// model of another shape.
    #[error(
        "snapshot model state of sensor {sensor_id:?} has {found} values, the model needs {expected}"
    )]
    ModelStateMismatch {
        sensor_id: String,
        expected: usize,
        found: usize,
    },
    /// The snapshot holds the same sensor twice (e.g. two partitions' snapshots merged badly).
    #[error("snapshot holds sensor {0:?} more than once")]
    DuplicateSensor(String),
}

/// A column the pipeline can feed to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feature {
    AcclMag,
    GyroMag,
    Acc(usize),
    Gyro(usize),
    Mag(usize),
}

impl Feature {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "accl_mag" => Feature::AcclMag,
            "gyro_mag" => Feature::GyroMag,
            "acc_x" => Feature::Acc(0),
            "acc_y" => Feature::Acc(1),
            "acc_z" => Feature::Acc(2),
            "gyro_x" => Feature::Gyro(0),
            "gyro_y" => Feature::Gyro(1),
            "gyro_z" => Feature::Gyro(2),
            "mag_x" => Feature::Mag(0),
            "mag_y" => Feature::Mag(1),
            "mag_z" => Feature::Mag(2),
            _ => return None,
        })
    }

    fn value(self, c: &SampleChunk, i: usize) -> f32 {
        match self {
            Feature::AcclMag => c.accl_mag[i],
            Feature::GyroMag => c.gyro_mag[i],
            Feature::Acc(0) => c.acc_x[i],
            Feature::Acc(1) => c.acc_y[i],
            Feature::Acc(_) => c.acc_z[i],
            Feature::Gyro(0) => c.gyro_x[i],
            Feature::Gyro(1) => c.gyro_y[i],
            Feature::Gyro(_) => c.gyro_z[i],
            Feature::Mag(0) => c.mag_x[i],
            Feature::Mag(1) => c.mag_y[i],
            Feature::Mag(_) => c.mag_z[i],
        }
    }
}

/// Settings resolved to the units the hot path uses.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    period_us: i64,
    dt_s: f64,
    gap_us: i64,
    window_us: i64,
    lateness_us: i64,
    aggregate_us: i64,
    threshold: f32,
    /// Plausibility window of event times around the receive time.
    max_past_us: i64,
    max_future_us: i64,
    evict_idle_us: i64,
    max_sensors: usize,
}

/// Everything the pipeline keeps for one sensor.
#[derive(Debug)]
struct SensorState {
    id: SensorId,
    framing: FrameDecoder,
    seq: SequenceTracker,
    session: Option<ActiveSession>,
    windows: SensorWindows,
    /// Recurrent model state carried across packets (`[L*D, H]` each), zeroed at session start.
    h: Vec<f32>,
    c: Vec<f32>,
    /// Accepted samples of this step waiting for inference (all of the current session).
    pending: Option<SampleChunk>,
    counters: SensorCounters,
}

/// Pipeline-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStats {
    pub records: u64,
    pub samples_out: u64,
    pub model_calls: u64,
    pub model_errors: u64,
    /// Sensors whose state was dropped: idle past `pipeline.sensor_idle_evict_secs`, or the
    /// least recently heard from when `pipeline.max_sensors` was reached.
    pub sensors_evicted: u64,
    /// Samples sent to the quarantine table for an implausible event time.
    pub samples_quarantined: u64,
}

/// A read-only view of one sensor for the API.
#[derive(Clone, Copy, Debug)]
pub struct SensorView<'a> {
    pub sensor_id: &'a SensorId,
    pub counters: &'a SensorCounters,
    pub active_session: Option<&'a SessionId>,
}

/// The keyed pipeline of DESIGN.md stages 1–6. See the crate docs for one step's phases.
pub struct Pipeline {
    ctx: Ctx,
    config: PipelineConfig,
    model: Arc<Model>,
    features: Vec<Feature>,
    /// (mean, std) per model feature.
    scaler: Vec<(f32, f32)>,
    /// Per-sensor state in first-seen order (see "Determinism" in the crate docs).
    sensors: Vec<SensorState>,
    /// Position of each sensor in `sensors`, rebuilt when sensors are evicted (which keeps the
    /// others' relative order).
    index: HashMap<SensorId, usize>,
    scratch: Scratch,
    stats: PipelineStats,
}

/// Buffers reused by every step, so the hot path does not allocate per packet.
#[derive(Default)]
struct Scratch {
    /// Time spent in model calls (ns) by this pipeline: a measurement, not state, so it is
    /// kept out of `PipelineStats` and snapshots.
    model_nanos: u64,
    phys: Vec<PhysSample>,
    features: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
    velocity: Vec<f32>,
    prob: Vec<f32>,
}

impl Pipeline {
    /// Builds a pipeline around `model`, checking that the model's feature columns are ones the
    /// pipeline computes.
    pub fn new(config: PipelineConfig, model: Arc<Model>) -> Result<Self, PipelineError> {
        let problems = config.validate();
        if !problems.is_empty() {
            let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(PipelineError::Config(text.join("; ")));
        }
        let ModelBinding {
            features,
            scaler,
            threshold,
        } = bind_model(&config, &model)?;
        let ctx = Ctx {
            period_us: config.period_us(),
            dt_s: 1.0 / config.sample_rate_hz,
            gap_us: PipelineConfig::secs_to_us(config.session_gap_secs),
            window_us: PipelineConfig::secs_to_us(config.window_secs),
            lateness_us: PipelineConfig::secs_to_us(config.allowed_lateness_secs),
            aggregate_us: PipelineConfig::secs_to_us(config.aggregate_interval_secs),
            threshold,
            max_past_us: PipelineConfig::secs_to_us(config.event_time_max_past_secs),
            max_future_us: PipelineConfig::secs_to_us(config.event_time_max_future_secs),
            evict_idle_us: PipelineConfig::secs_to_us(config.sensor_idle_evict_secs),
            max_sensors: config.max_sensors,
        };
        Ok(Self {
            ctx,
            config,
            model,
            features,
            scaler,
            sensors: Vec::new(),
            index: HashMap::new(),
            scratch: Scratch::default(),
            stats: PipelineStats::default(),
        })
    }

    /// Swaps in `model` between two steps (DESIGN "Model contract"): every later prediction
    /// comes from it and every sensor's recurrent state restarts from zeros (its shape may
    /// differ, and one model's state means nothing to another). Sessions, windows and dedupe
    /// positions carry on. Fails, leaving the pipeline as it was, when the model reads a
    /// feature column the pipeline does not compute.
    pub fn set_model(&mut self, model: Arc<Model>) -> Result<(), PipelineError> {
        let ModelBinding {
            features,
            scaler,
            threshold,
        } = bind_model(&self.config, &model)?;
        let state_len = model.state_len();
        for state in &mut self.sensors {
            // `process` infers before it returns: nothing is pending between steps.
            debug_assert!(state.pending.is_none());
            state.h.clear();
            state.h.resize(state_len, 0.0);
            state.c.clear();
            state.c.resize(state_len, 0.0);
        }
        self.features = features;
        self.scaler = scaler;
        self.ctx.threshold = threshold;
        self.model = model;
        Ok(())
    }

    /// The model this pipeline runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Time spent in model calls by this pipeline object (not restored from snapshots).
    pub fn model_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.scratch.model_nanos)
    }

    /// Processes ingest records in log order; `now_us` is the processing time (µs since the
    /// epoch) used for idle detection. Everything produced is appended to `out`.
    pub fn process<'a>(
        &mut self,
        records: impl IntoIterator<Item = IngestRecordRef<'a>>,
        now_us: i64,
        out: &mut Outputs,
    ) {
        for record in records {
            self.stats.records += 1;
            self.ingest(record, now_us, out);
        }
        self.infer_dirty(out);
    }

    /// Processing-time duties: closes sessions of sensors silent for the session gap, emits
    /// the periodic session aggregates and drops the state of sensors idle for
    /// `sensor_idle_evict_secs`. Call it regularly (e.g. every 100 ms).
    pub fn on_tick(&mut self, now_us: i64, out: &mut Outputs) {
        // Nothing is pending between steps: `process` always infers before returning.
        let ctx = self.ctx;
        // Positions of sensors silent past the eviction time, allocated only when there is one.
        let mut evict: Vec<bool> = Vec::new();
        for (i, state) in self.sensors.iter_mut().enumerate() {
            let Some(session) = &mut state.session else {
                let heard = state.counters.last_seen_us.unwrap_or(i64::MIN);
                if now_us.saturating_sub(heard) >= ctx.evict_idle_us {
                    evict.resize(i, false);
                    evict.push(true);
                }
                continue;
            };
            if now_us.saturating_sub(session.last_seen_proc_us) >= ctx.gap_us {
                end_session(&ctx, state, SessionEndReason::Idle, now_us, out);
                state
                    .windows
                    .emit_all(&state.id, ctx.window_us, &mut out.windows);
            } else if now_us.saturating_sub(session.last_emit_us) >= ctx.aggregate_us {
                session.last_emit_us = now_us;
                out.aggregates
                    .push(session.aggregate(&state.id, now_us, ctx.dt_s));
            }
        }
        if !evict.is_empty() {
            evict.resize(self.sensors.len(), false);
            self.remove_sensors(&evict, now_us, SessionEndReason::Idle, out);
        }
    }

    /// Ends every active session (reason [`SessionEndReason::Shutdown`]) and emits every open
    /// window: the last step over a finite input (`sensorflow replay`). A running platform does
    /// not call it on a clean stop: it checkpoints the open sessions and windows instead.
    pub fn close_all(&mut self, now_us: i64, out: &mut Outputs) {
        self.infer_dirty(out);
        let ctx = self.ctx;
        for state in &mut self.sensors {
            if state.session.is_some() {
                end_session(&ctx, state, SessionEndReason::Shutdown, now_us, out);
            }
            state
                .windows
                .emit_all(&state.id, ctx.window_us, &mut out.windows);
        }
    }

    /// Every sensor seen so far.
    pub fn sensors(&self) -> impl Iterator<Item = SensorView<'_>> {
        self.sensors.iter().map(|s| SensorView {
            sensor_id: &s.id,
            counters: &s.counters,
            active_session: s.session.as_ref().map(|s| &s.id),
        })
    }

    /// Pipeline-wide counters.
    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// The settings the pipeline runs with.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Phase one for one record: decode, then dedupe/sessions/transform/windows per packet.
    fn ingest(&mut self, record: IngestRecordRef<'_>, now_us: i64, out: &mut Outputs) {
        let at = match self.index.get(record.sensor_id) {
            Some(&at) => at,
            None => {
                if self.sensors.len() >= self.ctx.max_sensors {
                    self.evict_least_recent(now_us, out);
                }
                let id: SensorId = Arc::from(record.sensor_id);
                let state = SensorState {
                    id,
                    framing: FrameDecoder::new(
                        self.config.max_framing_buffer_bytes,
                        self.config.max_samples_per_packet,
                    ),
                    seq: SequenceTracker::default(),
                    session: None,
                    windows: SensorWindows::default(),
                    h: vec![0.0; self.model.state_len()],
                    c: vec![0.0; self.model.state_len()],
                    pending: None,
                    counters: SensorCounters::default(),
                };
                self.add_sensor(state)
            }
        };
        let state = &mut self.sensors[at];
        state.counters.seen(record.ingest_us);
        let phys = &mut self.scratch.phys;
        match record.format {
            PayloadFormat::Binary => {
                state.framing.push(record.payload);
                loop {
                    let (base, ts) = match state.framing.next_frame() {
                        None => break,
                        Some(Frame::Bad { reason, .. }) => {
                            state.counters.count_bad(reason);
                            continue;
                        }
                        Some(Frame::Packet(p)) => {
                            phys.clear();
                            phys.extend(p.samples().map(|s| s.to_physical()));
                            (p.base_sample_number(), p.timestamp_us())
                        }
                    };
                    accept_packet(
                        &self.ctx,
                        &self.model,
                        &self.features,
                        &self.scaler,
                        &mut self.stats,
                        state,
                        base,
                        ts,
                        phys,
                        record.ingest_us,
                        now_us,
                        out,
                    );
                }
            }
            PayloadFormat::Json => match parse_json_packet(record.payload) {
                Ok(packet) => {
                    accept_packet(
                        &self.ctx,
                        &self.model,
                        &self.features,
                        &self.scaler,
                        &mut self.stats,
                        state,
                        packet.base_sample_number,
                        packet.timestamp_us,
                        &packet.samples,
                        record.ingest_us,
                        now_us,
                        out,
                    );
                }
                Err(_) => state.counters.count_bad(BadReason::InvalidJson),
            },
        }
    }

    /// Makes room for a new sensor at `max_sensors`: evicts the least recently heard from
    /// sixteenth of the sensors at once, so a flood of new ids costs one scan per many
    /// sensors, not one per sensor.
    fn evict_least_recent(&mut self, now_us: i64, out: &mut Outputs) {
        if self.sensors.is_empty() {
            return;
        }
        let count = (self.ctx.max_sensors / 16).clamp(1, self.sensors.len());
        // (last heard, position): ties go by position, so the choice is deterministic.
        let mut order: Vec<(i64, usize)> = self
            .sensors
            .iter()
            .enumerate()
            .map(|(i, s)| (s.counters.last_seen_us.unwrap_or(i64::MIN), i))
            .collect();
        order.select_nth_unstable(count - 1);
        let mut evict = vec![false; self.sensors.len()];
        for &(_, i) in &order[..count] {
            evict[i] = true;
        }
        self.remove_sensors(&evict, now_us, SessionEndReason::Evicted, out);
    }

    /// Drops the sensors flagged in `evict` (one flag per position in `sensors`): their
    /// pending samples are inferred, their sessions end with `reason` and their windows are
    /// emitted first, so nothing they accepted is lost. The others keep their order.
    fn remove_sensors(
        &mut self,
        evict: &[bool],
        now_us: i64,
        reason: SessionEndReason,
        out: &mut Outputs,
    ) {
        let ctx = self.ctx;
        for (state, _) in self.sensors.iter_mut().zip(evict).filter(|(_, e)| **e) {
            flush_sensor(
                &ctx,
                &self.model,
                &self.features,
                &self.scaler,
                &mut self.stats,
                state,
                out,
            );
            if state.session.is_some() {
                end_session(&ctx, state, reason, now_us, out);
            }
            state
                .windows
                .emit_all(&state.id, ctx.window_us, &mut out.windows);
            self.stats.sensors_evicted += 1;
        }
        let mut flags = evict.iter();
        self.sensors
            .retain(|_| !flags.next().copied().unwrap_or(false));
        self.index.clear();
        for (i, s) in self.sensors.iter().enumerate() {
            self.index.insert(s.id.clone(), i);
        }
    }

    /// Appends a sensor not seen before and returns its position in `sensors`.
    fn add_sensor(&mut self, state: SensorState) -> usize {
        let at = self.sensors.len();
        self.index.insert(state.id.clone(), at);
        self.sensors.push(state);
        at
    }

    /// Phase two: one batched model call over every sensor with pending samples.
    fn infer_dirty(&mut self, out: &mut Outputs) {
        let mut states: Vec<&mut SensorState> = self
            .sensors
            .iter_mut()
            .filter(|s| s.pending.is_some())
            .collect();
        if states.is_empty() {
            return;
        }
        infer(
            &self.ctx,
            &self.model,
            &self.features,
            &self.scaler,
            &mut self.stats,
            &mut self.scratch,
            &mut states,
            out,
        );
    }
}

/// Stages 1–4 for one decoded packet of `state`'s sensor.
#[allow(clippy::too_many_arguments)]
fn accept_packet(
    ctx: &Ctx,
    model: &Model,
    features: &[Feature],
    scaler: &[(f32, f32)],
    stats: &mut PipelineStats,
    state: &mut SensorState,
    base: u32,
    timestamp_us: u64,
    samples: &[PhysSample],
    ingest_us: i64,
    now_us: i64,
    out: &mut Outputs,
) {
    let n = samples.len();
    state.counters.packets_decoded += 1;
    state.counters.samples_decoded += n as u64;
    if n == 0 {
        return;
    }
    // Event-time plausibility first: no stage after this point sees a time it cannot handle.
    let Some(ts0) = plausible_start(ctx, timestamp_us, n, ingest_us) else {
        stats.samples_quarantined += n as u64;
        quarantine_packet(
            ctx,
            state,
            base,
            timestamp_us,
            samples,
            ingest_us,
            now_us,
            out,
        );
        return;
    };
    // The positions of the packet's samples to keep: one run, or a late packet's pieces.
    let run: Range<usize>;
    let pieces: Vec<Range<usize>>;
    let keep: &[Range<usize>] = match state.seq.classify(base, n, ts0, ctx.period_us) {
        Verdict::Duplicate => {
            state.counters.duplicates += n as u64;
            return;
        }
        Verdict::Accept { skip, gap } => {
            if let Some((from, to)) = gap {
                let missing = u64::from(to.wrapping_sub(from));
                state.counters.gaps += 1;
                state.counters.missing_samples += missing;
                out.gaps.push(GapRecord {
                    sensor_id: state.id.clone(),
                    from_index: from,
                    to_index: to,
                    missing,
                    detected_at_us: now_us,
                });
            }
            run = skip..n;
            std::slice::from_ref(&run)
        }
        Verdict::Reordered {
            keep: ranges,
            filled,
        } => {
            state.counters.reordered_samples += filled as u64;
            pieces = ranges;
            &pieces
        }
        Verdict::Jump => {
            state.counters.index_jumps += 1;
            run = 0..n;
            std::slice::from_ref(&run)
        }
        Verdict::Restart => {
            state.counters.restarts += 1;
            if state.session.is_some() {
                flush_sensor(ctx, model, features, scaler, stats, state, out);
                end_session(ctx, state, SessionEndReason::DeviceRestart, now_us, out);
            }
            run = 0..n;
            std::slice::from_ref(&run)
        }
    };
    let kept: usize = keep.iter().map(ExactSizeIterator::len).sum();
    state.counters.duplicates += (n - kept) as u64;
    let Some(first) = keep.first().map(|r| r.start) else {
        return;
    };
    let first_ts = sample_time(ts0, first, ctx.period_us);
    if let Some(session) = &state.session
        && first_ts.saturating_sub(session.last_event_us) > ctx.gap_us
    {
        flush_sensor(ctx, model, features, scaler, stats, state, out);
        end_session(ctx, state, SessionEndReason::Gap, now_us, out);
    }
    if state.session.is_none() {
        let session = ActiveSession::start(&state.id, first_ts, now_us);
        out.session_events.push(SessionEvent::Started {
            session: session.record(&state.id, None),
        });
        state.counters.sessions_started += 1;
        state.session = Some(session);
        state.h.fill(0.0);
        state.c.fill(0.0);
    }
    let Some(session) = state.session.as_mut() else {
        return;
    };
    let chunk = match &mut state.pending {
        Some(chunk) => chunk,
        None => state.pending.insert(SampleChunk::with_capacity(
            state.id.clone(),
            session.id.clone(),
            kept,
        )),
    };
    let mut last_ts = first_ts;
    for i in keep.iter().flat_map(Clone::clone) {
        let s = &samples[i];
        let ts = sample_time(ts0, i, ctx.period_us);
        last_ts = ts;
        let gyro = s.gyro.map(|d| d.to_radians());
        let accl_mag = norm(s.acc);
        let gyro_mag = norm(gyro);
        chunk.sample_index.push(base.wrapping_add(i as u32));
        chunk.timestamp_us.push(ts);
        chunk.acc_x.push(s.acc[0]);
        chunk.acc_y.push(s.acc[1]);
        chunk.acc_z.push(s.acc[2]);
        chunk.gyro_x.push(gyro[0]);
        chunk.gyro_y.push(gyro[1]);
        chunk.gyro_z.push(gyro[2]);
        chunk.mag_x.push(s.mag[0]);
        chunk.mag_y.push(s.mag[1]);
        chunk.mag_z.push(s.mag[2]);
        chunk.temp_raw.push(s.temp_raw);
        chunk.accl_mag.push(accl_mag);
        chunk.gyro_mag.push(gyro_mag);
        chunk.ingest_us.push(ingest_us);
        if let Added::Late { watermark_us } =
            state
                .windows
                .add(ts, accl_mag, gyro_mag, ctx.window_us, ctx.lateness_us)
        {
            state.counters.late += 1;
            out.late.push(LateRecord {
                sensor_id: state.id.clone(),
                sample_index: base.wrapping_add(i as u32),
                timestamp_us: ts,
                watermark_us,
                detected_at_us: now_us,
            });
        }
    }
    session.last_event_us = session.last_event_us.max(last_ts);
    session.last_seen_proc_us = now_us;
    session.sample_count += kept as u64;
    state
        .windows
        .emit_ready(&state.id, ctx.window_us, ctx.lateness_us, &mut out.windows);
}

/// What a pipeline takes from its model: the feature columns it reads (each one the pipeline
/// must compute), their (mean, std) and the movement threshold (the configuration's, if set).
struct ModelBinding {
    features: Vec<Feature>,
    scaler: Vec<(f32, f32)>,
    threshold: f32,
}

fn bind_model(config: &PipelineConfig, model: &Model) -> Result<ModelBinding, PipelineError> {
    let sidecar = model.sidecar();
    let mut features = Vec::with_capacity(sidecar.feature_cols.len());
    let mut scaler = Vec::with_capacity(sidecar.feature_cols.len());
    for name in &sidecar.feature_cols {
        features
            .push(Feature::parse(name).ok_or_else(|| PipelineError::UnknownFeature(name.clone()))?);
        // The sidecar was validated at load: every feature has a mean and a positive std.
        let mean = sidecar.scaler.mean.get(name).copied().unwrap_or(0.0);
        let std = sidecar.scaler.std.get(name).copied().unwrap_or(1.0);
        scaler.push((mean, std));
    }
    let threshold = config
        .movement_threshold
        .unwrap_or(sidecar.movement_threshold);
    Ok(ModelBinding {
        features,
        scaler,
        threshold,
    })
}

/// Infers and emits one sensor's pending samples now (before its session ends).
fn flush_sensor(
    ctx: &Ctx,
    model: &Model,
    features: &[Feature],
    scaler: &[(f32, f32)],
    stats: &mut PipelineStats,
    state: &mut SensorState,
    out: &mut Outputs,
) {
    if state.pending.is_some() {
        let mut scratch = Scratch::default();
        infer(
            ctx,
            model,
            features,
            scaler,
            stats,
            &mut scratch,
            &mut [state],
            out,
        );
    }
}

/// Runs the model over the pending chunk of every state in one call, then adds predictions to
/// the session aggregates and moves the chunks to `out`.
#[allow(clippy::too_many_arguments)]
fn infer(
    ctx: &Ctx,
    model: &Model,
    features: &[Feature],
    scaler: &[(f32, f32)],
    stats: &mut PipelineStats,
    scratch: &mut Scratch,
    states: &mut [&mut SensorState],
    out: &mut Outputs,
) {
    let nf = features.len();
    let sl = model.state_len();
    let total: usize = states
        .iter()
        .map(|s| s.pending.as_ref().map_or(0, SampleChunk::len))
        .sum();
    scratch.features.clear();
    scratch.features.reserve(total * nf);
    scratch.h.clear();
    scratch.c.clear();
    for state in states.iter() {
        let Some(chunk) = &state.pending else {
            continue;
        };
        for i in 0..chunk.len() {
            for (f, &(mean, std)) in features.iter().zip(scaler) {
                scratch.features.push((f.value(chunk, i) - mean) / std);
            }
        }
        scratch.h.extend_from_slice(&state.h);
        scratch.c.extend_from_slice(&state.c);
    }
    scratch.velocity.clear();
    scratch.velocity.resize(total, f32::NAN);
    scratch.prob.clear();
    scratch.prob.resize(total, f32::NAN);

    {
        let mut seqs = Vec::with_capacity(states.len());
        let (mut feats, mut hs, mut cs) = (
            &scratch.features[..],
            &mut scratch.h[..],
            &mut scratch.c[..],
        );
        let (mut vel, mut prob) = (&mut scratch.velocity[..], &mut scratch.prob[..]);
        for state in states.iter() {
            let Some(chunk) = &state.pending else {
                continue;
            };
            let t = chunk.len();
            let (f, rest_f) = feats.split_at(t * nf);
            let (h, rest_h) = std::mem::take(&mut hs).split_at_mut(sl);
            let (c, rest_c) = std::mem::take(&mut cs).split_at_mut(sl);
            let (v, rest_v) = std::mem::take(&mut vel).split_at_mut(t);
            let (p, rest_p) = std::mem::take(&mut prob).split_at_mut(t);
            seqs.push(SequenceMut {
                features: f,
                h,
                c,
                velocity: v,
                movement_prob: p,
            });
            (feats, hs, cs, vel, prob) = (rest_f, rest_h, rest_c, rest_v, rest_p);
        }
        stats.model_calls += 1;
        let started = std::time::Instant::now();
        let result = model.run(&mut seqs);
        scratch.model_nanos += started.elapsed().as_nanos() as u64;
        if let Err(e) = result {
            stats.model_errors += 1;
            tracing::warn!(error = %e, sequences = seqs.len(), "model call failed; predictions of these samples are NaN");
            for s in seqs.iter_mut() {
                s.velocity.fill(f32::NAN);
                s.movement_prob.fill(f32::NAN);
            }
        }
    }

    let mut offset = 0;
    let mut state_offset = 0;
    for state in states.iter_mut() {
        let Some(mut chunk) = state.pending.take() else {
            continue;
        };
        let t = chunk.len();
        let (vel, prob) = (
            &scratch.velocity[offset..offset + t],
            &scratch.prob[offset..offset + t],
        );
        chunk.model_version = model.version().clone();
        chunk.velocity_raw.extend_from_slice(vel);
        chunk.velocity_pred.extend(
            vel.iter()
                .zip(prob)
                .map(|(&v, &p)| masked_velocity(v, p, ctx.threshold)),
        );
        chunk.movement_prob.extend_from_slice(prob);
        state
            .h
            .copy_from_slice(&scratch.h[state_offset..state_offset + sl]);
        state
            .c
            .copy_from_slice(&scratch.c[state_offset..state_offset + sl]);
        if let Some(session) = state.session.as_mut() {
            // Over the masked velocity (DESIGN stage 6); the accumulator applies the same
            // threshold for moving time, so this equals accumulating the raw output.
            for (&v, &p) in chunk.velocity_pred.iter().zip(prob) {
                session.agg.add(v, p, ctx.threshold, ctx.dt_s);
            }
        }
        offset += t;
        state_offset += sl;
        stats.samples_out += t as u64;
        out.samples.push(chunk);
    }
}

/// Ends `state`'s active session: final aggregate, then the ended event.
fn end_session(
    ctx: &Ctx,
    state: &mut SensorState,
    reason: SessionEndReason,
    now_us: i64,
    out: &mut Outputs,
) {
    let Some(session) = state.session.take() else {
        return;
    };
    out.aggregates
        .push(session.aggregate(&state.id, now_us, ctx.dt_s));
    out.session_events.push(SessionEvent::Ended {
        session: session.record(&state.id, Some(session.last_event_us)),
        reason,
    });
}

/// Time of sample `i` of a packet starting at `ts0`, saturating.
fn sample_time(ts0: i64, i: usize, period_us: i64) -> i64 {
    ts0.saturating_add(
        i64::try_from(i)
            .unwrap_or(i64::MAX)
            .saturating_mul(period_us),
    )
}

/// The packet's start time as `i64` if every one of its `n` samples lies within the
/// plausibility window around the receive time `ingest_us`, `None` otherwise.
fn plausible_start(ctx: &Ctx, timestamp_us: u64, n: usize, ingest_us: i64) -> Option<i64> {
    // i128 holds every operand here exactly, so no bound can wrap around.
    let first = i128::from(timestamp_us);
    let last = first + i128::try_from(n.saturating_sub(1)).ok()? * i128::from(ctx.period_us);
    let lo = i128::from(ingest_us) - i128::from(ctx.max_past_us);
    let hi = (i128::from(ingest_us) + i128::from(ctx.max_future_us)).min(i128::from(i64::MAX));
    (first >= lo && last <= hi)
        .then(|| i64::try_from(first).ok())
        .flatten()
}

/// Sends a packet with implausible event times to the quarantine table, one row per sample
/// with its raw values, and counts it: it never reaches dedupe, sessions, windows or the lake's
/// date partitions.
#[allow(clippy::too_many_arguments)]
fn quarantine_packet(
    ctx: &Ctx,
    state: &mut SensorState,
    base: u32,
    timestamp_us: u64,
    samples: &[PhysSample],
    ingest_us: i64,
    now_us: i64,
    out: &mut Outputs,
) {
    state.counters.count_bad(BadReason::TimestampOutOfRange);
    state.counters.quarantined_samples += samples.len() as u64;
    let offset_s = (i128::from(timestamp_us) - i128::from(ingest_us)) as f64 / 1e6;
    let detail = format!(
        "event time {timestamp_us} µs is {offset_s:+.0} s from the receive time {ingest_us} µs; allowed -{} s to +{} s",
        ctx.max_past_us / 1_000_000,
        ctx.max_future_us / 1_000_000
    );
    let period = u64::try_from(ctx.period_us).unwrap_or(0);
    for (i, s) in samples.iter().enumerate() {
        let gyro = s.gyro.map(|d| d.to_radians());
        out.quarantine.push(QuarantineRecord {
            sensor_id: state.id.clone(),
            reason: QuarantineReason::TimestampOutOfRange,
            detail: detail.clone(),
            ingest_us,
            detected_at_us: now_us,
            sample_index: Some(base.wrapping_add(i as u32)),
            timestamp_us: Some(timestamp_us.saturating_add((i as u64).saturating_mul(period))),
            acc_x: Some(s.acc[0]),
            acc_y: Some(s.acc[1]),
            acc_z: Some(s.acc[2]),
            gyro_x: Some(gyro[0]),
            gyro_y: Some(gyro[1]),
            gyro_z: Some(gyro[2]),
            mag_x: Some(s.mag[0]),
            mag_y: Some(s.mag[1]),
            mag_z: Some(s.mag[2]),
            temp_raw: Some(s.temp_raw),
            payload: None,
        });
    }
}

/// `velocity_pred` as the reference job emits it: 0 where the movement probability is below the
/// threshold. A NaN probability (failed model call) keeps the NaN velocity, so the failure stays
/// visible rather than reading as "not moving".
fn masked_velocity(velocity: f32, movement_prob: f32, threshold: f32) -> f32 {
    if movement_prob < threshold {
        0.0
    } else {
        velocity
    }
}

fn norm(v: [f32; 3]) -> f32 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}
