//! WebSocket feeds: each connection subscribes to one hub topic and pumps its messages to the
//! client as JSON text messages.
//!
//! Slow clients are handled in two stages, and neither ever reaches the publisher:
//! 1. A client that reads slower than the feed falls behind its topic buffer
//!    ([`HubConfig::topic_capacity`](crate::HubConfig)); it then skips the messages it lost and
//!    goes on with the oldest one still buffered. The lost messages are counted in
//!    `sensorflow_ws_messages_dropped_total`.
//! 2. A client that stops reading altogether makes a socket write wait once the TCP buffers are
//!    full. A write that takes longer than [`ApiConfig::ws_send_timeout`](crate::ApiConfig)
//!    (default 5 s) closes the connection (`sensorflow_ws_clients_closed_slow_total`); the
//!    messages still queued for it count as dropped.
//!
//! Message formats (all JSON text):
//! - `/ws/raw/{sensor_id}?every=N`: one message per chunk of processed samples (typically one
//!   device packet, 64 samples; a larger chunk, as when catching up on a backlog, is split into
//!   messages of at most [`RAW_ROWS_PER_MESSAGE`](crate::hub::RAW_ROWS_PER_MESSAGE) rows): an
//!   array of `SampleRow` objects. With `every=N` only samples
//!   whose `sample_index` is a multiple of N are kept (stable across chunks), and a chunk left
//!   empty sends nothing.
//! - `/ws/windows/{sensor_id}`: one `WindowRecord` per closed window.
//! - `/ws/aggregate/{sensor_id}`: one `SessionAggregate` per emission, any session of the sensor.
//! - `/ws/session/{session_id}` and `/ws/sessions` (all sessions): `SessionMessage`s tagged by
//!   `type`: `session_event` (with `event` = `started`/`ended` and `session`) or `aggregate`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code,
    rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use utoipa::IntoParams;

use crate::auth::WsPermit;
use crate::error::{ApiError, ErrorBody};
use crate::hub::{RawFrame, RecvError, Subscription};
use crate::metrics::{ApiMetrics, WsKind};
use crate::server::ApiState;

/// Largest accepted `every`.
pub const MAX_EVERY: u32 = 10_000;
/// Largest message a client may send (clients have nothing to say; this only bounds memory).
const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;

/// Query parameters of `/ws/raw/{sensor_id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RawParams {
    /// Keep only samples whose `sample_index` is a multiple of `every` (1..=10000, default 1).
    #[param(minimum = 1, maximum = 10000)]
    pub every: Option<u32>,
}

fn upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiError> {
    ws.map(|ws| ws.max_message_size(MAX_CLIENT_MESSAGE_BYTES))
        .map_err(|e| {
            ApiError::UpgradeRequired(format!("this endpoint speaks WebSocket: {}", e.body_text()))
        })
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn json<T: Serialize + ?Sized>(value: &T) -> Option<Utf8Bytes> {
    serde_json::to_string(value).ok().map(Utf8Bytes::from)
}

/// Processed samples of one sensor, one JSON array of `SampleRow` per chunk.
#[utoipa::path(get, path = "/ws/raw/{sensor_id}", tag = "live",
    params(("sensor_id" = String, Path, description = "Sensor id"), RawParams),
    responses(
        (status = 101, description = "WebSocket; each text message is a JSON array of samples of one chunk (at most 256)",
            body = [crate::openapi::SampleRowSchema]),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn raw(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<RawParams>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    permit: Option<Extension<WsPermit>>,
) -> Result<Response, ApiError> {
    let sensor_id = path_id(path)?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let every = params.every.unwrap_or(1);
    if !(1..=MAX_EVERY).contains(&every) {
        return Err(ApiError::BadRequest(format!(
            "every must be between 1 and {MAX_EVERY}, got {every}"
        )));
    }
    let ws = upgrade(ws)?;
    Ok(ws.on_upgrade(move |socket| async move {
        // Held while the socket is open: counts against its token's WebSocket limit.
        let _permit = permit;
        let sub = state.hub.subscribe_raw(&sensor_id);
        pump(socket, sub, WsKind::Raw, state, move |f: &Arc<RawFrame>| {
            f.json(every)
        })
        .await;
    }))
}

/// Window features of one sensor, one `WindowRecord` per message.
#[utoipa::path(get, path = "/ws/windows/{sensor_id}", tag = "live",
    params(("sensor_id" = String, Path, description = "Sensor id")),
    responses(
        (status = 101, description = "WebSocket; each text message is one window", body = crate::openapi::WindowRecordSchema),
        (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn windows(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    permit: Option<Extension<WsPermit>>,
) -> Result<Response, ApiError> {
    let sensor_id = path_id(path)?;
    Ok(upgrade(ws)?.on_upgrade(move |socket| async move {
        // Held while the socket is open: counts against its token's WebSocket limit.
        let _permit = permit;
        let sub = state.hub.subscribe_windows(&sensor_id);
        pump(socket, sub, WsKind::Windows, state, |w| json(&**w)).await;
    }))
}

/// Session aggregates of one sensor's sessions, one `SessionAggregate` per message.
#[utoipa::path(get, path = "/ws/aggregate/{sensor_id}", tag = "live",
    params(("sensor_id" = String, Path, description = "Sensor id")),
    responses(
        (status = 101, description = "WebSocket; each text message is one aggregate", body = crate::openapi::SessionAggregateSchema),
        (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn aggregate(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    permit: Option<Extension<WsPermit>>,
) -> Result<Response, ApiError> {
    let sensor_id = path_id(path)?;
    Ok(upgrade(ws)?.on_upgrade(move |socket| async move {
        // Held while the socket is open: counts against its token's WebSocket limit.
        let _permit = permit;
        let sub = state.hub.subscribe_aggregate(&sensor_id);
        pump(socket, sub, WsKind::Aggregate, state, |a| json(&**a)).await;
    }))
}

/// Events and aggregates of one session, tagged by `type`.
#[utoipa::path(get, path = "/ws/session/{session_id}", tag = "live",
    params(("session_id" = String, Path, description = "Session id")),
    responses(
        (status = 101, description = "WebSocket; each text message is a session event or aggregate", body = crate::openapi::SessionMessageSchema),
        (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn session(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    permit: Option<Extension<WsPermit>>,
) -> Result<Response, ApiError> {
    let session_id = path_id(path)?;
    Ok(upgrade(ws)?.on_upgrade(move |socket| async move {
        // Held while the socket is open: counts against its token's WebSocket limit.
        let _permit = permit;
        let sub = state.hub.subscribe_session(&session_id);
        pump(socket, sub, WsKind::Session, state, json).await;
    }))
}

/// Events and aggregates of every session, tagged by `type` (the dashboard's sessions table).
#[utoipa::path(get, path = "/ws/sessions", tag = "live",
    responses(
        (status = 101, description = "WebSocket; each text message is a session event or aggregate", body = crate::openapi::SessionMessageSchema),
        (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn all_sessions(
    State(state): State<ApiState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    permit: Option<Extension<WsPermit>>,
) -> Result<Response, ApiError> {
    Ok(upgrade(ws)?.on_upgrade(move |socket| async move {
        // Held while the socket is open: counts against its token's WebSocket limit.
        let _permit = permit;
        let sub = state.hub.subscribe_sessions();
        pump(socket, sub, WsKind::Sessions, state, json).await;
    }))
}

/// Why a connection ended.
enum Ending {
    ClientGone,
    Slow,
    Shutdown,
}

/// Forwards `sub` to `socket` until the client leaves, is too slow, or the server shuts down.
async fn pump<T: Clone>(
    mut socket: WebSocket,
    mut sub: Subscription<T>,
    kind: WsKind,
    state: ApiState,
    encode: impl Fn(&T) -> Option<Utf8Bytes>,
) {
    let metrics = state.metrics();
    let send_timeout = state.config.ws_send_timeout;
    let shutdown = state.shutdown_token();
    let _client = ClientGuard::new(metrics, kind);
    let ending = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ending::Shutdown,
            incoming = socket.recv() => match incoming {
                // Pings are answered by the protocol layer; anything else from the client is
                // ignored.
                Some(Ok(Message::Close(_)) | Err(_)) | None => break Ending::ClientGone,
                Some(Ok(_)) => {}
            },
            next = sub.recv() => match next {
                Ok(message) => {
                    let Some(text) = encode(&message) else { continue };
                    match timeout(send_timeout, socket.send(Message::Text(text))).await {
                        Ok(Ok(())) => metrics.ws_sent(kind),
                        Ok(Err(_)) => break Ending::ClientGone,
                        Err(_) => break Ending::Slow,
                    }
                }
                Err(RecvError::Lagged(n)) => metrics.ws_dropped(kind, n),
                Err(RecvError::Closed) => break Ending::Shutdown,
            },
        }
    };
    match ending {
        Ending::ClientGone => {}
        Ending::Slow => {
            // No close frame: writing it would wait on the same full socket.
            metrics.ws_closed_slow(kind);
            metrics.ws_dropped(kind, sub.pending() as u64);
            tracing::debug!(kind = kind.as_str(), "closed slow websocket client");
        }
        Ending::Shutdown => {
            let close = Message::Close(Some(CloseFrame {
                code: close_code::AWAY,
                reason: Utf8Bytes::from_static("server shutting down"),
            }));
            let _ = timeout(send_timeout, socket.send(close)).await;
        }
    }
}

/// Counts a client as connected for its lifetime, even if its task is cancelled.
struct ClientGuard<'a> {
    metrics: &'a ApiMetrics,
    kind: WsKind,
}

impl<'a> ClientGuard<'a> {
    fn new(metrics: &'a ApiMetrics, kind: WsKind) -> Self {
        metrics.ws_connected(kind);
        Self { metrics, kind }
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.metrics.ws_disconnected(self.kind);
    }
}
