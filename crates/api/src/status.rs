//! What the API reads from the rest of the platform: sensor and readiness status, the sessions
//! store, and the runtime's own metrics. The runtime implements [`StatusSource`]; the API only
//! consumes it, so this crate knows nothing about MQTT, the log or SQLite. The sessions store's
//! read contract ([`SessionsQuery`] and its types) lives in `sensorflow-records`, shared with the
//! store that implements it.

use std::collections::BTreeMap;

use sensorflow_records::SessionsQuery;
use serde::Serialize;
use utoipa::ToSchema;

/// The API's view of the running platform. Implemented by the runtime (embedded or distributed).
///
/// The `sensors`, `sensor`, `ready` and `render_metrics` methods are called on the async
/// executor and must be cheap and non-blocking (read in-memory counters). Sessions queries may
/// block; the API calls them on the blocking pool.
pub trait StatusSource: Send + Sync + 'static {
    /// Status of every sensor the platform has seen, in any order (the API sorts by id).
    fn sensors(&self) -> Vec<SensorStatus>;
    /// Status of one sensor, `None` when the platform has never seen it.
    fn sensor(&self, sensor_id: &str) -> Option<SensorStatus>;
    /// Readiness: `ready` is true when every component needed to serve traffic is up.
    fn ready(&self) -> ReadyStatus;
    /// Appends the runtime's metrics to `out` in the Prometheus text format (0.0.4). The API
    /// appends its own (`sensorflow_ws_*`, `sensorflow_hub_*`, `sensorflow_http_*`) after it,
    /// so the runtime must not use those prefixes.
    fn render_metrics(&self, out: &mut String);
    /// The sessions store.
    fn sessions(&self) -> &dyn SessionsQuery;
}

/// Status and counters of one sensor (`GET /sensors`, `GET /sensors/{sensor_id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct SensorStatus {
    /// The sensor id (from the MQTT topic).
    pub sensor_id: String,
    /// Processing time (µs since the epoch) of the sensor's last packet, if any.
    pub last_seen_us: Option<i64>,
    /// Processing time (µs since the epoch) of the sensor's first packet since start, if any.
    pub first_seen_us: Option<i64>,
    /// Recent decoded sample rate (samples per second).
    pub samples_per_s: f64,
    /// Recent packet rate (packets per second).
    pub packets_per_s: f64,
    /// Packets decoded since start.
    pub packets_decoded: u64,
    /// Samples decoded since start.
    pub samples_decoded: u64,
    /// Samples dropped as already processed (redelivery).
    pub duplicates: u64,
    /// Jumps in the sample index.
    pub gaps: u64,
    /// Samples missing in those gaps when they were detected.
    pub missing_samples: u64,
    /// Samples that arrived after later ones and filled a gap: kept, processed late.
    pub reordered_samples: u64,
    /// Samples that arrived after their window closed.
    pub late: u64,
    /// Device restarts detected.
    pub restarts: u64,
    /// Bad input by reason (`bad_crc`, `garbage`, `invalid_json`, `truncated`, ...).
    pub bad: BTreeMap<String, u64>,
    /// Sum of `bad`.
    pub bad_total: u64,
    /// The sensor's active session, if any.
    pub active_session_id: Option<String>,
}

/// Readiness of the platform (`GET /ready`: 200 when `ready`, 503 otherwise).
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct ReadyStatus {
    /// True when every component is ok.
    pub ready: bool,
    /// Status by component name (`log`, `pipeline`, `lake`, `mqtt`, ...).
    pub components: BTreeMap<String, ComponentStatus>,
}

/// Status of one component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct ComponentStatus {
    /// True when the component works.
    pub ok: bool,
    /// Human-readable detail (why it is not ok, or what it is doing).
    pub detail: String,
}
