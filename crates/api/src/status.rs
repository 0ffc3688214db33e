//! What the API reads from the rest of the platform: sensor and readiness status, the sessions
//! store, and the runtime's own metrics. The runtime implements [`StatusSource`]; the API only
//! consumes it, so this crate knows nothing about MQTT, the log or SQLite.

use std::collections::BTreeMap;

use sensorflow_pipeline::SessionRecord;
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

/// The sessions store, read side. Methods may block (SQLite); the API calls them on the blocking
/// pool, never on the async executor.
pub trait SessionsQuery: Send + Sync {
    /// Sessions matching `q`, newest `start_us` first, `q.offset` skipped, at most `q.limit`.
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionRecord>, StoreError>;
    /// One session, `Ok(None)` when the store does not know the id.
    fn get(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError>;
}

/// Filter of [`SessionsQuery::list`]. Every filter present must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionQuery {
    /// Only sessions of this sensor.
    pub sensor_id: Option<String>,
    /// `Some(true)`: only active sessions (`end_us` is null); `Some(false)`: only ended ones;
    /// `None`: both.
    pub active: Option<bool>,
    /// Only sessions still going at or after this time: `end_us` is null or `end_us >= from_us`.
    pub from_us: Option<i64>,
    /// Only sessions that started before this time: `start_us < to_us`.
    pub to_us: Option<i64>,
    /// Maximum number of sessions returned (the API keeps it in 1..=1000).
    pub limit: usize,
    /// Number of matching sessions skipped first (paging).
    pub offset: usize,
}

impl Default for SessionQuery {
    fn default() -> Self {
        Self {
            sensor_id: None,
            active: None,
            from_us: None,
            to_us: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// A sessions store failure; the API answers 503 `unavailable` with the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sessions store: {0}")]
pub struct StoreError(pub String);
