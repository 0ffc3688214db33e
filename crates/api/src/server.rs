//! Router, shared state and the server loop.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
use crate::model::ModelControl;
use crate::status::StatusSource;
use crate::{assets, auth, model, openapi, rest, ws};

/// Configuration of the HTTP API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Address to listen on (the caller binds it and passes the listener to [`serve`]).
    pub listen: SocketAddr,
    /// A WebSocket client whose socket write takes longer than this is closed (it stopped
    /// reading). Default 5 s.
    pub ws_send_timeout: Duration,
    /// A connection that has not sent a request's complete header block this long after the
    /// request began (or after connecting) is closed. Default 10 s.
    pub header_read_timeout: Duration,
    /// Open connections from one source IP; more are closed right after accept. Default 256.
    pub max_connections_per_ip: usize,
    /// Open connections in total; more are closed right after accept. Default 10 000.
    pub max_connections: usize,
    /// API bearer tokens; when set, every route but `/health`, `/ready`, the dashboard and its
    /// assets (and `/docs`) needs one (see [`crate::auth`]). Default none.
    pub tokens: Option<std::sync::Arc<crate::auth::ApiTokens>>,
    /// Origins allowed by CORS (`*`: any). Default none: same origin only.
    pub cors_origins: Vec<String>,
    /// Serve HTTPS (and WSS) with this rustls configuration instead of plain HTTP; the
    /// handshake must finish within `header_read_timeout`. Default none.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest request head (request line with its query, and headers) read; a larger one is
    /// answered 431 and the connection closed. At least 8192. Default 64 KiB.
    pub max_request_head_bytes: usize,
    /// Open WebSockets per API token (when tokens are configured); more upgrades get 429.
    /// Default 100.
    pub max_websockets_per_token: usize,
}

impl PartialEq for ApiConfig {
    fn eq(&self, other: &Self) -> bool {
        self.listen == other.listen
            && self.ws_send_timeout == other.ws_send_timeout
            && self.header_read_timeout == other.header_read_timeout
            && self.max_connections_per_ip == other.max_connections_per_ip
            && self.max_connections == other.max_connections
            && self.tokens == other.tokens
            && self.cors_origins == other.cors_origins
            && self.max_websockets_per_token == other.max_websockets_per_token
            && self.max_request_head_bytes == other.max_request_head_bytes
            && match (&self.tls, &other.tls) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}

impl Eq for ApiConfig {}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            ws_send_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            max_connections: 10_000,
            tokens: None,
            cors_origins: Vec::new(),
            tls: None,
            max_websockets_per_token: 100,
            max_request_head_bytes: 64 * 1024,
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
    model: Option<Arc<dyn ModelControl>>,
    /// Why `/model` answers 503 when there is no model control.
    no_model: Arc<str>,
    pub(crate) ws_per_token: crate::auth::WsPerToken,
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
            model: None,
            no_model: Arc::from("this role runs no model"),
            ws_per_token: crate::auth::WsPerToken::default(),
        }
    }

    /// Serves `GET`/`POST /model` through `control` (without it they answer 503).
    #[must_use]
    pub fn with_model_control(mut self, control: Arc<dyn ModelControl>) -> Self {
        self.model = Some(control);
        self
    }

    /// Without model control, `GET`/`POST /model` answer 503 with `reason` (default: "this
    /// role runs no model").
    #[must_use]
    pub fn without_model(mut self, reason: &str) -> Self {
        self.model = None;
        self.no_model = Arc::from(reason);
        self
    }

    pub(crate) fn model_control(&self) -> Result<&Arc<dyn ModelControl>, ApiError> {
        self.model
            .as_ref()
            .ok_or_else(|| ApiError::Unavailable(self.no_model.to_string()))
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
    let protected = Router::new()
        .route("/sensors", get(rest::sensors))
        .route("/sensors/{sensor_id}", get(rest::sensor))
        .route("/sessions", get(rest::sessions))
        .route("/sessions/{session_id}", get(rest::session))
        .route("/metrics", get(rest::metrics))
        .route("/openapi.json", get(rest::openapi))
        .route("/model", get(model::get_model).post(model::post_model))
        .route("/ws/raw/{sensor_id}", get(ws::raw))
        .route("/ws/windows/{sensor_id}", get(ws::windows))
        .route("/ws/aggregate/{sensor_id}", get(ws::aggregate))
        .route("/ws/session/{session_id}", get(ws::session))
        .route("/ws/sessions", get(ws::all_sessions))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/", get(assets::dashboard))
        .route("/docs", get(assets::docs))
        .route("/assets/app.js", get(assets::app_js))
        .route("/assets/style.css", get(assets::style_css))
        .route("/assets/vendor/uPlot.iife.min.js", get(assets::uplot_js))
        .route("/assets/vendor/uPlot.min.css", get(assets::uplot_css))
        .route("/health", get(rest::health))
        .route("/ready", get(rest::ready))
        .merge(protected)
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), auth::cors))
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
///
/// Not `axum::serve`: it has no header read timeout (a client sending half a request held its
/// connection forever) and no connection limits. This is the same hyper-util connection
/// builder with `header_read_timeout`, and an accept loop that closes connections beyond
/// `max_connections_per_ip` / `max_connections` at once (counted on `/metrics`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let token = state.shutdown.clone();
    let config = state.config.clone();
    let metrics = Arc::clone(&state.metrics);
    let app = router(state);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_request_head_bytes.max(8192));
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let connections = Arc::new(ConnectionCounts::default());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %err, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match connections.acquire(peer.ip(), &config) {
            Ok(slot) => slot,
            Err(limit) => {
                let counter = match limit {
                    Limit::PerIp => &metrics.http_refused_per_ip,
                    Limit::Total => &metrics.http_refused_total_cap,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, ?limit, "http connection refused");
                drop(stream);
                continue;
            }
        };
        metrics.http_connections.fetch_add(1, Ordering::Relaxed);
        let service = TowerToHyperService::new(app.clone());
        let metrics = Arc::clone(&metrics);
        let Some(acceptor) = tls.clone() else {
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::trace!(%peer, error = %err, "http connection ended with an error");
                }
                metrics.http_connections.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
            continue;
        };
        // HTTPS: the handshake runs in the connection's task, bounded like a request's headers.
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let handshake_timeout = config.header_read_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(err) = watcher.watch(connection).await {
                        tracing::trace!(%peer, error = %err, "https connection ended with an error");
                    }
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "tls handshake failed"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
            metrics.http_connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    token.cancel();
    graceful.shutdown().await;
    Ok(())
}

/// Which connection limit refused a connection.
#[derive(Debug, Clone, Copy)]
enum Limit {
    PerIp,
    Total,
}

/// Open connections per source IP and in total. The map only holds IPs with an open
/// connection, so it is bounded by `max_connections`.
#[derive(Debug, Default)]
struct ConnectionCounts {
    inner: parking_lot::Mutex<(usize, std::collections::HashMap<IpAddr, usize>)>,
}

impl ConnectionCounts {
    fn acquire(self: &Arc<Self>, ip: IpAddr, config: &ApiConfig) -> Result<Slot, Limit> {
        let mut inner = self.inner.lock();
        if inner.0 >= config.max_connections {
            return Err(Limit::Total);
        }
        let per_ip = inner.1.entry(ip).or_default();
        if *per_ip >= config.max_connections_per_ip {
            return Err(Limit::PerIp);
        }
        *per_ip += 1;
        inner.0 += 1;
        Ok(Slot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

/// One open connection's place in [`ConnectionCounts`]; released on drop.
struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.counts.inner.lock();
        inner.0 = inner.0.saturating_sub(1);
        if let Some(n) = inner.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                inner.1.remove(&self.ip);
            }
        }
    }
}
