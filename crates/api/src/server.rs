//! Router, shared state and the server loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::ApiMetrics;
use crate::status::StatusSource;
use crate::{assets, openapi, rest, ws};

/// Configuration of the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address to listen on (the caller binds it and passes the listener to [`serve`]).
    pub listen: SocketAddr,
    /// A WebSocket client whose socket write takes longer than this is closed (it stopped
    /// reading). Default 5 s.
    pub ws_send_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            ws_send_timeout: Duration::from_secs(5),
        }
    }
}

/// State shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// The live hub the pipeline publishes into.
    pub hub: Hub,
    /// The platform's status, implemented by the runtime.
    pub status: Arc<dyn StatusSource>,
    /// API configuration.
    pub config: ApiConfig,
    metrics: Arc<ApiMetrics>,
    shutdown: CancellationToken,
    openapi: Arc<str>,
}

impl ApiState {
    /// State for a router serving `hub` and `status`.
    pub fn new(hub: Hub, status: Arc<dyn StatusSource>, config: ApiConfig) -> Self {
        Self {
            hub,
            status,
            config,
            metrics: Arc::new(ApiMetrics::default()),
            shutdown: CancellationToken::new(),
            openapi: Arc::from(openapi::document()),
        }
    }

    /// The API's counters (also rendered on `/metrics`).
    pub fn metrics(&self) -> &ApiMetrics {
        &self.metrics
    }

    /// Cancelled when [`serve`]'s shutdown future completes; WebSocket connections watch it and
    /// close with code 1001 (going away). Cancel it yourself when not using [`serve`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(crate) fn openapi_json(&self) -> String {
        self.openapi.to_string()
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("hub", &self.hub)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The API router: dashboard, REST, metrics, docs and WebSocket feeds (see DESIGN.md, "Output
/// contract"). Unknown routes answer 404 and wrong methods 405, in the JSON error shape.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(assets::dashboard))
        .route("/docs", get(assets::docs))
        .route("/assets/app.js", get(assets::app_js))
        .route("/assets/style.css", get(assets::style_css))
        .route("/assets/vendor/uPlot.iife.min.js", get(assets::uplot_js))
        .route("/assets/vendor/uPlot.min.css", get(assets::uplot_css))
        .route("/health", get(rest::health))
        .route("/ready", get(rest::ready))
        .route("/sensors", get(rest::sensors))
        .route("/sensors/{sensor_id}", get(rest::sensor))
        .route("/sessions", get(rest::sessions))
        .route("/sessions/{session_id}", get(rest::session))
        .route("/metrics", get(rest::metrics))
        .route("/openapi.json", get(rest::openapi))
        .route("/ws/raw/{sensor_id}", get(ws::raw))
        .route("/ws/windows/{sensor_id}", get(ws::windows))
        .route("/ws/aggregate/{sensor_id}", get(ws::aggregate))
        .route("/ws/session/{session_id}", get(ws::session))
        .route("/ws/sessions", get(ws::all_sessions))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

/// Counts requests by matched route and status (`sensorflow_http_requests_total`).
async fn count_request(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    if let Some(route) = route {
        state
            .metrics
            .http_request(&route, response.status().as_u16());
    }
    response
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, closes the
/// WebSocket feeds and waits for in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = state.shutdown.clone();
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            token.cancel();
        })
        .await
}
