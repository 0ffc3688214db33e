//! The OpenAPI document (`GET /openapi.json`), derived from the handlers' `#[utoipa::path]`
//! annotations.
//!
//! The pipeline's record types do not depend on utoipa (the pipeline knows nothing about HTTP),
//! so this module declares schema-only mirrors of the records served over HTTP and WebSocket.
//! A test serialises the real records and checks that every mirror has exactly their fields,
//! so the document cannot drift from the wire format unnoticed.

#![allow(dead_code)] // The mirrors exist only for their `ToSchema` derive.

use utoipa::{OpenApi, ToSchema};

use crate::error::{ErrorBody, ErrorDetail};
use crate::model::{ModelInfo, SwapRequest};
use crate::rest::{ActiveFilter, Health};
use crate::status::{ComponentStatus, ReadyStatus, SensorStatus};
use crate::{assets, model, rest, ws};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sensorflow",
        description = "Real-time IoT sensor streaming: live sensor status, sessions, metrics and WebSocket feeds of processed samples. Every error has the shape {\"error\":{\"code\":..,\"message\":..}}."
    ),
    paths(
        assets::dashboard, assets::docs, rest::health, rest::ready, rest::sensors, rest::sensor,
        rest::sessions, rest::session, rest::metrics, rest::openapi, ws::raw, ws::windows,
        ws::aggregate, ws::session, ws::all_sessions, model::get_model, model::post_model,
    ),
    components(schemas(
        Health, ReadyStatus, ComponentStatus, SensorStatus, SessionViewSchema, ActiveFilter, ErrorBody,
        ErrorDetail, SampleRowSchema, WindowRecordSchema, SessionAggregateSchema,
        SessionRecordSchema, SessionEventSchema, SessionEndReasonSchema, SessionMessageSchema,
        ModelInfo, SwapRequest,
    )),
    tags(
        (name = "ops", description = "Health, readiness and metrics"),
        (name = "sensors", description = "Sensor status and counters"),
        (name = "sessions", description = "Sessions from the sessions store"),
        (name = "live", description = "WebSocket feeds (GET with a WebSocket upgrade)"),
        (name = "model", description = "The active model; swapping it at run time"),
        (name = "docs", description = "Dashboard and documentation"),
    )
)]
pub struct ApiDoc;

/// One processed sample (`/ws/raw` messages are arrays of these). Units: acc in g, gyro in
/// rad/s, mag in gauss, `accl_mag` in g, `gyro_mag` in rad/s, velocities in m/s, times in µs
/// since the Unix epoch.
#[derive(ToSchema)]
#[schema(as = SampleRow)]
pub(crate) struct SampleRowSchema {
    sensor_id: String,
    session_id: String,
    sample_index: u32,
    timestamp_us: i64,
    acc_x: f32,
    acc_y: f32,
    acc_z: f32,
    gyro_x: f32,
    gyro_y: f32,
    gyro_z: f32,
    mag_x: f32,
    mag_y: f32,
    mag_z: f32,
    temp_raw: i16,
    accl_mag: f32,
    gyro_mag: f32,
    /// The model's velocity, 0 where `movement_prob` is below the movement threshold (as the
    /// reference job emits it; session aggregates use this one).
    velocity_pred: f32,
    /// The model's velocity output, unmasked.
    velocity_raw: f32,
    movement_prob: f32,
    /// Version of the model that predicted `velocity_*` and `movement_prob` (the sidecar's
    /// `version`, else the first 12 hex digits of the ONNX file's SHA-256).
    model_version: String,
    /// When the platform received the packet (µs since the epoch).
    ingest_us: i64,
}

/// Features of one tumbling event-time window of one sensor.
#[derive(ToSchema)]
#[schema(as = WindowRecord)]
pub(crate) struct WindowRecordSchema {
    sensor_id: String,
    window_start_us: i64,
    window_end_us: i64,
    count: u64,
    accl_mag_mean: f64,
    accl_mag_std: f64,
    accl_mag_min: f64,
    accl_mag_max: f64,
    gyro_mag_mean: f64,
    gyro_mag_std: f64,
    gyro_mag_min: f64,
    gyro_mag_max: f64,
}

/// Periodic aggregate of an active session.
#[derive(ToSchema)]
#[schema(as = SessionAggregate)]
pub(crate) struct SessionAggregateSchema {
    session_id: String,
    sensor_id: String,
    emitted_at_us: i64,
    /// m/s
    max_velocity: f64,
    distance_m: f64,
    /// m/s
    mean_velocity: f64,
    moving_time_s: f64,
    sample_count: u64,
    duration_s: f64,
}

/// A session as stored (`end_us` is null while active).
#[derive(ToSchema)]
#[schema(as = SessionRecord)]
pub(crate) struct SessionRecordSchema {
    session_id: String,
    sensor_id: String,
    start_us: i64,
    end_us: Option<i64>,
    last_seen_us: i64,
    sample_count: u64,
}

/// A session as `GET /sessions` serves it: the stored session, why it ended and its latest
/// aggregate (an ended session keeps its last one across restarts).
#[derive(ToSchema)]
#[schema(as = SessionView)]
pub(crate) struct SessionViewSchema {
    /// `{sensor_id}_{first_timestamp_us}`.
    session_id: String,
    sensor_id: String,
    /// Event time of the first sample (µs since the epoch).
    start_us: i64,
    /// Event time of the last sample once the session ended; null while active.
    end_us: Option<i64>,
    /// Event time of the latest sample (µs since the epoch).
    last_seen_us: i64,
    /// Samples in the session so far.
    sample_count: u64,
    /// Why the session ended; null while active.
    end_reason: Option<SessionEndReasonSchema>,
    /// True while the session is active (`end_us` is null).
    active: bool,
    /// The latest aggregate of the session, null until one was emitted.
    aggregate: Option<SessionAggregateSchema>,
}

/// Why a session ended.
#[derive(ToSchema)]
#[schema(as = SessionEndReason)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SessionEndReasonSchema {
    Gap,
    Idle,
    DeviceRestart,
    Shutdown,
    Evicted,
}

/// A session lifecycle event, tagged by `event`.
#[derive(ToSchema)]
#[schema(as = SessionEvent)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum SessionEventSchema {
    Started {
        session: SessionRecordSchema,
    },
    Ended {
        session: SessionRecordSchema,
        reason: SessionEndReasonSchema,
    },
}

/// A message of the session feeds, tagged by `type`: a session event (`session_event`, with the
/// event's fields) or an aggregate (`aggregate`, with the aggregate's fields).
#[derive(ToSchema)]
#[schema(as = SessionMessage)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum SessionMessageSchema {
    SessionEvent(SessionEventSchema),
    Aggregate(SessionAggregateSchema),
}

/// The OpenAPI document as JSON.
pub(crate) fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "openapi document does not serialise");
        "{}".to_owned()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use sensorflow_records::{
        SampleChunk, SessionAggregate, SessionRecord, SessionView, WindowRecord,
    };
    use serde_json::Value;

    use super::*;

    fn schema_fields(doc: &Value, name: &str) -> BTreeSet<String> {
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name} has no properties"))
            .keys()
            .cloned()
            .collect()
    }

    fn record_fields(record: impl serde::Serialize) -> BTreeSet<String> {
        serde_json::to_value(record)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn schema_mirrors_have_exactly_the_fields_of_the_records() {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let mut chunk = SampleChunk::default();
        chunk.sample_index.push(0);
        chunk.timestamp_us.push(0);
        for col in chunk.f32_columns_mut() {
            col.push(0.0);
        }
        chunk.temp_raw.push(0);
        chunk.ingest_us.push(0);
        assert_eq!(
            schema_fields(&doc, "SampleRow"),
            record_fields(chunk.row(0))
        );
        let window = WindowRecord {
            sensor_id: Arc::from("s"),
            window_start_us: 0,
            window_end_us: 0,
            count: 0,
            accl_mag_mean: 0.0,
            accl_mag_std: 0.0,
            accl_mag_min: 0.0,
            accl_mag_max: 0.0,
            gyro_mag_mean: 0.0,
            gyro_mag_std: 0.0,
            gyro_mag_min: 0.0,
            gyro_mag_max: 0.0,
        };
        assert_eq!(schema_fields(&doc, "WindowRecord"), record_fields(window));
        let aggregate = SessionAggregate {
            session_id: Arc::from("s_0"),
            sensor_id: Arc::from("s"),
            emitted_at_us: 0,
            max_velocity: 0.0,
            distance_m: 0.0,
            mean_velocity: 0.0,
            moving_time_s: 0.0,
            sample_count: 0,
            duration_s: 0.0,
        };
        assert_eq!(
            schema_fields(&doc, "SessionAggregate"),
            record_fields(aggregate)
        );
        let session = SessionRecord {
            session_id: Arc::from("s_0"),
            sensor_id: Arc::from("s"),
            start_us: 0,
            end_us: None,
            last_seen_us: 0,
            sample_count: 0,
        };
        let view = SessionView {
            session_id: "s_0".into(),
            sensor_id: "s".into(),
            start_us: 0,
            end_us: None,
            last_seen_us: 0,
            sample_count: 0,
            end_reason: None,
            active: true,
            aggregate: None,
        };
        assert_eq!(schema_fields(&doc, "SessionRecord"), record_fields(session));
        assert_eq!(schema_fields(&doc, "SessionView"), record_fields(view));
    }
}
