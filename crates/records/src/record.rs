//! Output records of the pipeline: the lake tables, the live feeds and the Kafka topics all carry
//! these, with the same snake_case field names everywhere (DESIGN.md, "Record schemas").
//!
//! Samples travel as columnar chunks ([`SampleChunk`]): one chunk holds the consecutive samples of
//! one sensor and one session (typically one device packet), column by column, so the lake writer
//! appends them to Arrow arrays without a per-sample conversion and the live hub hands a chunk to
//! WebSocket subscribers without copying it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Interned sensor id. Cloning is a reference-count increment.
pub type SensorId = Arc<str>;
/// Interned session id, `{sensor_id}_{first_timestamp_us}`.
pub type SessionId = Arc<str>;

/// Consecutive processed samples of one sensor within one session, stored column by column.
///
/// Every column has the same length. Units: acc in g, gyro in rad/s, mag in gauss,
/// `accl_mag` in g, `gyro_mag` in rad/s, `velocity_pred` and `velocity_raw` in m/s, times in µs
/// since the Unix epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleChunk {
    pub sensor_id: SensorId,
    pub session_id: SessionId,
    pub sample_index: Vec<u32>,
    pub timestamp_us: Vec<i64>,
    pub acc_x: Vec<f32>,
    pub acc_y: Vec<f32>,
    pub acc_z: Vec<f32>,
    pub gyro_x: Vec<f32>,
    pub gyro_y: Vec<f32>,
    pub gyro_z: Vec<f32>,
    pub mag_x: Vec<f32>,
    pub mag_y: Vec<f32>,
    pub mag_z: Vec<f32>,
    pub temp_raw: Vec<i16>,
    pub accl_mag: Vec<f32>,
    pub gyro_mag: Vec<f32>,
    /// The model's velocity masked as the reference job emits it: 0 where `movement_prob` is
    /// below the movement threshold (DESIGN stage 5). Aggregates use this one.
    pub velocity_pred: Vec<f32>,
    /// The model's own velocity output, unmasked.
    pub velocity_raw: Vec<f32>,
    pub movement_prob: Vec<f32>,
    /// Version of the model that predicted these samples (DESIGN "Model contract"); one model
    /// scores a whole chunk, so it is one value for all its rows.
    pub model_version: Arc<str>,
    /// When the platform received the packet these samples came in (µs since the epoch).
    pub ingest_us: Vec<i64>,
}

impl SampleChunk {
    /// An empty chunk for `sensor_id`/`session_id` with room for `capacity` samples.
    pub fn with_capacity(sensor_id: SensorId, session_id: SessionId, capacity: usize) -> Self {
        let v = || Vec::with_capacity(capacity);
        Self {
            sensor_id,
            session_id,
            sample_index: Vec::with_capacity(capacity),
            timestamp_us: Vec::with_capacity(capacity),
            acc_x: v(),
            acc_y: v(),
            acc_z: v(),
            gyro_x: v(),
            gyro_y: v(),
            gyro_z: v(),
            mag_x: v(),
            mag_y: v(),
            mag_z: v(),
            temp_raw: Vec::with_capacity(capacity),
            accl_mag: v(),
            gyro_mag: v(),
            velocity_pred: v(),
            velocity_raw: v(),
            movement_prob: v(),
            model_version: Arc::from(""),
            ingest_us: Vec::with_capacity(capacity),
        }
    }

    /// Names of the f32 columns, in the order of [`f32_columns`](Self::f32_columns) (which is
    /// also their order in the `samples` table).
    pub const F32_COLUMNS: [&'static str; 14] = [
        "acc_x",
        "acc_y",
        "acc_z",
        "gyro_x",
        "gyro_y",
        "gyro_z",
        "mag_x",
        "mag_y",
        "mag_z",
        "accl_mag",
        "gyro_mag",
        "velocity_pred",
        "velocity_raw",
        "movement_prob",
    ];

    /// The f32 columns in [`F32_COLUMNS`](Self::F32_COLUMNS) order, so writers and test builders
    /// go over every column without listing them (a new column cannot be forgotten).
    pub fn f32_columns(&self) -> [&[f32]; 14] {
        [
            &self.acc_x,
            &self.acc_y,
            &self.acc_z,
            &self.gyro_x,
            &self.gyro_y,
            &self.gyro_z,
            &self.mag_x,
            &self.mag_y,
            &self.mag_z,
            &self.accl_mag,
            &self.gyro_mag,
            &self.velocity_pred,
            &self.velocity_raw,
            &self.movement_prob,
        ]
    }

    /// The f32 columns, mutable, in [`F32_COLUMNS`](Self::F32_COLUMNS) order.
    pub fn f32_columns_mut(&mut self) -> [&mut Vec<f32>; 14] {
        [
            &mut self.acc_x,
            &mut self.acc_y,
            &mut self.acc_z,
            &mut self.gyro_x,
            &mut self.gyro_y,
            &mut self.gyro_z,
            &mut self.mag_x,
            &mut self.mag_y,
            &mut self.mag_z,
            &mut self.accl_mag,
            &mut self.gyro_mag,
            &mut self.velocity_pred,
            &mut self.velocity_raw,
            &mut self.movement_prob,
        ]
    }

    /// Number of samples in the chunk.
    pub fn len(&self) -> usize {
        self.sample_index.len()
    }

    /// True when the chunk holds no sample.
    pub fn is_empty(&self) -> bool {
        self.sample_index.is_empty()
    }

    /// Row `i` as a self-contained record (for JSON at the WebSocket edge). Panics if `i >= len()`.
    pub fn row(&self, i: usize) -> SampleRow {
        SampleRow {
            sensor_id: self.sensor_id.clone(),
            session_id: self.session_id.clone(),
            sample_index: self.sample_index[i],
            timestamp_us: self.timestamp_us[i],
            acc_x: self.acc_x[i],
            acc_y: self.acc_y[i],
            acc_z: self.acc_z[i],
            gyro_x: self.gyro_x[i],
            gyro_y: self.gyro_y[i],
            gyro_z: self.gyro_z[i],
            mag_x: self.mag_x[i],
            mag_y: self.mag_y[i],
            mag_z: self.mag_z[i],
            temp_raw: self.temp_raw[i],
            accl_mag: self.accl_mag[i],
            gyro_mag: self.gyro_mag[i],
            velocity_pred: self.velocity_pred[i],
            velocity_raw: self.velocity_raw[i],
            movement_prob: self.movement_prob[i],
            model_version: self.model_version.clone(),
            ingest_us: self.ingest_us[i],
        }
    }
}

/// One processed sample as a row: the `samples` table schema and the `/ws/raw` JSON message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRow {
    pub sensor_id: SensorId,
    pub session_id: SessionId,
    pub sample_index: u32,
    pub timestamp_us: i64,
    pub acc_x: f32,
    pub acc_y: f32,
    pub acc_z: f32,
    pub gyro_x: f32,
    pub gyro_y: f32,
    pub gyro_z: f32,
    pub mag_x: f32,
    pub mag_y: f32,
    pub mag_z: f32,
    pub temp_raw: i16,
    pub accl_mag: f32,
    pub gyro_mag: f32,
    /// 0 where `movement_prob` is below the movement threshold, else `velocity_raw`.
    pub velocity_pred: f32,
    /// The model's velocity output, unmasked.
    pub velocity_raw: f32,
    pub movement_prob: f32,
    /// Version of the model that predicted `velocity_*` and `movement_prob`.
    pub model_version: Arc<str>,
    pub ingest_us: i64,
}

/// Features of one tumbling event-time window of one sensor (`windows` table, `/ws/windows`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub sensor_id: SensorId,
    pub window_start_us: i64,
    pub window_end_us: i64,
    pub count: u64,
    pub accl_mag_mean: f64,
    pub accl_mag_std: f64,
    pub accl_mag_min: f64,
    pub accl_mag_max: f64,
    pub gyro_mag_mean: f64,
    pub gyro_mag_std: f64,
    pub gyro_mag_min: f64,
    pub gyro_mag_max: f64,
}

/// State of a session (`sessions` table, sessions store, `GET /sessions`). `end_us` is `None`
/// while the session is active.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: SessionId,
    pub sensor_id: SensorId,
    pub start_us: i64,
    pub end_us: Option<i64>,
    pub last_seen_us: i64,
    pub sample_count: u64,
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEndReason {
    /// The next sample came more than the session gap after the previous one (event time).
    Gap,
    /// The sensor went silent for the session gap in processing time.
    Idle,
    /// The device restarted (sample index went backwards while time moved on).
    DeviceRestart,
    /// The input ended: `sensorflow replay` reached the end of the log. (A running platform
    /// keeps its sessions across a clean stop in its final checkpoint; stores written by older
    /// versions name sessions they ended on a stop this way, and a later start reopens them.)
    Shutdown,
    /// The pipeline dropped the sensor's state to stay within `pipeline.max_sensors`: it was
    /// the least recently heard from when a new sensor arrived.
    Evicted,
}

impl SessionEndReason {
    /// Every reason, in declaration order.
    pub const ALL: [SessionEndReason; 5] = [
        SessionEndReason::Gap,
        SessionEndReason::Idle,
        SessionEndReason::DeviceRestart,
        SessionEndReason::Shutdown,
        SessionEndReason::Evicted,
    ];

    /// The serde name (`gap`, `idle`, `device_restart`, `shutdown`, `evicted`), also the sessions store's
    /// `end_reason` column value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEndReason::Gap => "gap",
            SessionEndReason::Idle => "idle",
            SessionEndReason::DeviceRestart => "device_restart",
            SessionEndReason::Shutdown => "shutdown",
            SessionEndReason::Evicted => "evicted",
        }
    }
}

impl std::str::FromStr for SessionEndReason {
    type Err = UnknownEndReason;

    /// The reason named by [`SessionEndReason::as_str`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionEndReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownEndReason(s.to_owned()))
    }
}

/// A string that names no [`SessionEndReason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown session end reason {0:?}")]
pub struct UnknownEndReason(pub String);

/// A session lifecycle event (`new-session-topic`, `/ws/session/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    Started {
        session: SessionRecord,
    },
    Ended {
        session: SessionRecord,
        reason: SessionEndReason,
    },
}

impl SessionEvent {
    /// The session the event is about.
    pub fn session(&self) -> &SessionRecord {
        match self {
            SessionEvent::Started { session } | SessionEvent::Ended { session, .. } => session,
        }
    }
}

/// Periodic aggregate of an active session (`session_aggregates` table, `/ws/aggregate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionAggregate {
    pub session_id: SessionId,
    pub sensor_id: SensorId,
    pub emitted_at_us: i64,
    pub max_velocity: f64,
    pub distance_m: f64,
    pub mean_velocity: f64,
    pub moving_time_s: f64,
    pub sample_count: u64,
    pub duration_s: f64,
}

/// A jump in a sensor's sample index (`gaps` table). `to_index` is exclusive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapRecord {
    pub sensor_id: SensorId,
    pub from_index: u32,
    pub to_index: u32,
    pub missing: u64,
    pub detected_at_us: i64,
}

/// A sample that arrived after its window was closed by the watermark (`late` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateRecord {
    pub sensor_id: SensorId,
    pub sample_index: u32,
    pub timestamp_us: i64,
    /// The sensor's watermark when the sample arrived.
    pub watermark_us: i64,
    pub detected_at_us: i64,
}

/// Why a record went to the `quarantine` table instead of the live tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineReason {
    /// The sample's event time lies outside the plausibility window around its receive time
    /// (`pipeline.event_time_max_past_secs` / `event_time_max_future_secs`).
    TimestampOutOfRange,
    /// The log record made a pipeline or sink stage fail (dead letter): `payload` holds the
    /// message as received.
    StageFailed,
}

impl QuarantineReason {
    /// The snake_case label used in the lake, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::TimestampOutOfRange => "timestamp_out_of_range",
            QuarantineReason::StageFailed => "stage_failed",
        }
    }
}

/// A record no stage may process (`quarantine` table), kept with its raw values so that an
/// acknowledged message is never lost from view: either one sample whose event time is not
/// plausible (the sample columns are set) or a whole log record that made a stage fail (the
/// `payload` is set). Readings are in the `samples` table's units (gyro in rad/s).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub sensor_id: SensorId,
    pub reason: QuarantineReason,
    /// Human-readable detail (e.g. the event time's distance from the receive time, or the
    /// failure of the stage).
    pub detail: String,
    /// When the platform received the message (µs since the epoch); the partition date.
    pub ingest_us: i64,
    pub detected_at_us: i64,
    pub sample_index: Option<u32>,
    /// The device time as sent (µs since the epoch, unsigned: it may not fit a signed column).
    pub timestamp_us: Option<u64>,
    pub acc_x: Option<f32>,
    pub acc_y: Option<f32>,
    pub acc_z: Option<f32>,
    pub gyro_x: Option<f32>,
    pub gyro_y: Option<f32>,
    pub gyro_z: Option<f32>,
    pub mag_x: Option<f32>,
    pub mag_y: Option<f32>,
    pub mag_z: Option<f32>,
    pub temp_raw: Option<i16>,
    /// The log record's payload as received (dead letters only).
    pub payload: Option<Vec<u8>>,
}

impl QuarantineRecord {
    /// The dead letter of a whole message that made a stage fail: its payload as received and
    /// what failed; no sample columns.
    pub fn stage_failed(
        sensor_id: &str,
        ingest_us: i64,
        payload: &[u8],
        failure: &str,
        detected_at_us: i64,
    ) -> Self {
        QuarantineRecord {
            sensor_id: Arc::from(sensor_id),
            reason: QuarantineReason::StageFailed,
            detail: failure.to_owned(),
            ingest_us,
            detected_at_us,
            sample_index: None,
            timestamp_us: None,
            acc_x: None,
            acc_y: None,
            acc_z: None,
            gyro_x: None,
            gyro_y: None,
            gyro_z: None,
            mag_x: None,
            mag_y: None,
            mag_z: None,
            temp_raw: None,
            payload: Some(payload.to_vec()),
        }
    }
}

/// Everything the pipeline produced in one step, in the order it was produced.
///
/// The runtime drains it after each step and hands each part to the sinks (lake, sessions
/// store, live hub). `clear()` keeps the allocations for the next step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs {
    pub samples: Vec<SampleChunk>,
    pub windows: Vec<WindowRecord>,
    pub session_events: Vec<SessionEvent>,
    pub aggregates: Vec<SessionAggregate>,
    pub gaps: Vec<GapRecord>,
    pub late: Vec<LateRecord>,
    pub quarantine: Vec<QuarantineRecord>,
}

impl Outputs {
    /// Empties every part, keeping capacity.
    pub fn clear(&mut self) {
        self.samples.clear();
        self.windows.clear();
        self.session_events.clear();
        self.aggregates.clear();
        self.gaps.clear();
        self.late.clear();
        self.quarantine.clear();
    }

    /// True when the step produced nothing.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
            && self.windows.is_empty()
            && self.session_events.is_empty()
            && self.aggregates.is_empty()
            && self.gaps.is_empty()
            && self.late.is_empty()
            && self.quarantine.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_are_named_by_their_serde_names_both_ways() {
        for r in SessionEndReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(r.as_str().parse::<SessionEndReason>(), Ok(r));
        }
        assert!("later".parse::<SessionEndReason>().is_err());
    }
}
