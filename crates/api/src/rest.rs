//! REST endpoints: health, readiness, sensors, sessions, metrics and the OpenAPI document.
//! Handlers are thin: they validate input, ask the [`StatusSource`](crate::StatusSource) (the
//! blocking sessions store on the blocking pool) and map failures to [`ApiError`].

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sensorflow_records::{SessionQuery, SessionView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::server::ApiState;
use crate::status::{ReadyStatus, SensorStatus};

/// Largest `limit` accepted by `GET /sessions`.
pub const MAX_SESSIONS_LIMIT: usize = 1000;
/// `limit` of `GET /sessions` when the client gives none.
pub const DEFAULT_SESSIONS_LIMIT: usize = 100;
/// The Prometheus text exposition content type.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Body of `GET /health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Which sessions `GET /sessions` lists by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActiveFilter {
    /// Only active sessions (the default).
    True,
    /// Only ended sessions.
    False,
    /// Both.
    Any,
}

/// Query parameters of `GET /sessions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionsParams {
    /// Only sessions of this sensor.
    pub sensor_id: Option<String>,
    /// `true` (default): active sessions; `false`: ended sessions; `any`: both.
    pub active: Option<ActiveFilter>,
    /// Only sessions still going at or after this time (µs since the epoch).
    pub from_us: Option<i64>,
    /// Only sessions started before this time (µs since the epoch).
    pub to_us: Option<i64>,
    /// Maximum number of sessions, 1..=1000 (default 100). Newest first.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Number of sessions skipped (paging).
    pub offset: Option<usize>,
}

impl SessionsParams {
    /// The store query, or what is wrong with the parameters.
    pub fn to_query(&self) -> Result<SessionQuery, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_SESSIONS_LIMIT);
        if !(1..=MAX_SESSIONS_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_SESSIONS_LIMIT}, got {limit}"
            )));
        }
        if let (Some(from), Some(to)) = (self.from_us, self.to_us)
            && from > to
        {
            return Err(ApiError::BadRequest(format!(
                "from_us ({from}) must not be after to_us ({to})"
            )));
        }
        if self.sensor_id.as_deref() == Some("") {
            return Err(ApiError::BadRequest("sensor_id must not be empty".into()));
        }
        Ok(SessionQuery {
            sensor_id: self.sensor_id.clone(),
            active: match self.active.unwrap_or(ActiveFilter::True) {
                ActiveFilter::True => Some(true),
                ActiveFilter::False => Some(false),
                ActiveFilter::Any => None,
            },
            from_us: self.from_us,
            to_us: self.to_us,
            limit,
            offset: self.offset.unwrap_or(0),
        })
    }
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: every component is up.
#[utoipa::path(get, path = "/ready", tag = "ops", responses(
    (status = 200, description = "Ready to serve", body = ReadyStatus),
    (status = 503, description = "A component is not ready", body = ReadyStatus)))]
pub(crate) async fn ready(State(state): State<ApiState>) -> Response {
    let ready = state.status.ready();
    let code = if ready.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(ready)).into_response()
}

/// Default and largest page size of `GET /sensors`.
const DEFAULT_SENSORS_LIMIT: usize = 100;
const MAX_SENSORS_LIMIT: usize = 1000;

/// Query parameters of `GET /sensors` (a page of the sensors sorted by id).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SensorsParams {
    /// Maximum number of sensors, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Number of sensors skipped (paging).
    pub offset: Option<usize>,
    /// Only sensors whose id starts with this.
    pub prefix: Option<String>,
}

/// A page of the sensors seen since start, sorted by id. The `X-Total-Count` header holds the
/// number of sensors matching `prefix` (all pages).
#[utoipa::path(get, path = "/sensors", tag = "sensors", params(SensorsParams),
    responses(
        (status = 200, description = "One page of sensors; header X-Total-Count: all matching",
            body = [SensorStatus],
            headers(("X-Total-Count" = u64, description = "Sensors matching prefix, all pages"))),
        (status = 400, description = "Invalid parameter", body = ErrorBody)))]
pub(crate) async fn sensors(
    State(state): State<ApiState>,
    params: Result<Query<SensorsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_SENSORS_LIMIT);
    if !(1..=MAX_SENSORS_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_SENSORS_LIMIT}, got {limit}"
        )));
    }
    let mut sensors = state.status.sensors();
    if let Some(prefix) = params.prefix.as_deref() {
        sensors.retain(|s| s.sensor_id.starts_with(prefix));
    }
    sensors.sort_by(|a, b| a.sensor_id.cmp(&b.sensor_id));
    let total = sensors.len();
    let page: Vec<SensorStatus> = sensors
        .into_iter()
        .skip(params.offset.unwrap_or(0))
        .take(limit)
        .collect();
    Ok(([("x-total-count", total.to_string())], Json(page)).into_response())
}

/// One sensor's status and counters.
#[utoipa::path(get, path = "/sensors/{sensor_id}", tag = "sensors",
    params(("sensor_id" = String, Path, description = "Sensor id")),
    responses(
        (status = 200, description = "The sensor", body = SensorStatus),
        (status = 404, description = "Unknown sensor", body = ErrorBody)))]
pub(crate) async fn sensor(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SensorStatus>, ApiError> {
    let Path(sensor_id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    state
        .status
        .sensor(&sensor_id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("unknown sensor {sensor_id:?}")))
}

/// Sessions from the sessions store, newest first (active ones by default).
#[utoipa::path(get, path = "/sessions", tag = "sessions", params(SessionsParams),
    responses(
        (status = 200, description = "Matching sessions", body = [crate::openapi::SessionViewSchema]),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 503, description = "Sessions store unavailable", body = ErrorBody)))]
pub(crate) async fn sessions(
    State(state): State<ApiState>,
    params: Result<Query<SessionsParams>, QueryRejection>,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = params.to_query()?;
    let status = state.status.clone();
    let views = tokio::task::spawn_blocking(move || status.sessions().list(&query))
        .await
        .map_err(|e| ApiError::Internal(format!("sessions query task failed: {e}")))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(
        views
            .into_iter()
            .map(|v| with_live_aggregate(&state, v))
            .collect(),
    ))
}

/// One session, active or ended.
#[utoipa::path(get, path = "/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path, description = "Session id, `{sensor_id}_{first_timestamp_us}`")),
    responses(
        (status = 200, description = "The session", body = crate::openapi::SessionViewSchema),
        (status = 404, description = "Unknown session", body = ErrorBody),
        (status = 503, description = "Sessions store unavailable", body = ErrorBody)))]
pub(crate) async fn session(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SessionView>, ApiError> {
    let Path(session_id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let status = state.status.clone();
    let id = session_id.clone();
    let view = tokio::task::spawn_blocking(move || status.sessions().get(&id))
        .await
        .map_err(|e| ApiError::Internal(format!("sessions query task failed: {e}")))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("unknown session {session_id:?}")))?;
    Ok(Json(with_live_aggregate(&state, view)))
}

/// The store's session with the hub's latest aggregate when that is newer: the hub publishes an
/// aggregate as soon as the pipeline emits it, the store only once the sink commits it.
fn with_live_aggregate(state: &ApiState, view: SessionView) -> SessionView {
    let live = state.hub.latest_aggregate(&view.session_id);
    view.with_newer_aggregate(live.as_deref())
}

/// Prometheus metrics: the runtime's, then the API's (`sensorflow_ws_*`, `sensorflow_hub_*`,
/// `sensorflow_http_*`).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "Prometheus text format 0.0.4", body = String,
        content_type = "text/plain; version=0.0.4")))]
pub(crate) async fn metrics(State(state): State<ApiState>) -> Response {
    let mut out = String::with_capacity(16 * 1024);
    state.status.render_metrics(&mut out);
    state.metrics().render(&state.hub, &mut out);
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], out).into_response()
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "docs",
    responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json(),
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sessions_params_default_to_active_sessions_newest_hundred() {
        let q = SessionsParams::default().to_query().unwrap();
        assert_eq!(
            q,
            SessionQuery {
                active: Some(true),
                limit: 100,
                ..SessionQuery::default()
            }
        );
    }

    #[test]
    fn sessions_params_reject_out_of_range_limit_and_inverted_range() {
        let limit = SessionsParams {
            limit: Some(0),
            ..Default::default()
        };
        assert!(matches!(limit.to_query(), Err(ApiError::BadRequest(_))));
        let limit = SessionsParams {
            limit: Some(1001),
            ..Default::default()
        };
        assert!(matches!(limit.to_query(), Err(ApiError::BadRequest(_))));
        let range = SessionsParams {
            from_us: Some(5),
            to_us: Some(4),
            ..Default::default()
        };
        assert!(matches!(range.to_query(), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn active_any_lists_both_states() {
        let q = SessionsParams {
            active: Some(ActiveFilter::Any),
            ..Default::default()
        };
        assert_eq!(q.to_query().unwrap().active, None);
    }
}
