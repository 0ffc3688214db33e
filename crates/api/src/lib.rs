//! The HTTP API of sensorflow: the dashboard, REST endpoints, Prometheus metrics, OpenAPI docs
//! and the live WebSocket feeds (DESIGN.md, "Output contract").
//!
//! The runtime owns a [`Hub`] and publishes pipeline outputs into it; the API subscribes
//! WebSocket clients to it. Everything else the API shows comes from a [`StatusSource`] the
//! runtime implements. The API never writes to the platform.
//!
//! # Layout
//! - [`hub`]: fan-out of pipeline outputs to live clients; publishing never blocks.
//! - [`status`]: the [`StatusSource`] trait the runtime implements and the status types it
//!   returns; its sessions store is a `sensorflow_records::SessionsQuery`.
//! - `server`: [`ApiState`], [`router`], [`serve`].
//! - `rest`: health, readiness, sensors, sessions, metrics and OpenAPI handlers.
//! - `ws`: the WebSocket feeds and their slow-client policy.
//! - [`metrics`]: WebSocket and HTTP counters rendered on `/metrics`.
//! - `openapi`: the OpenAPI document and schema mirrors of the pipeline records.
//! - `error`: the one JSON error shape, [`ApiError`].
//! - `assets`: the embedded dashboard (`assets/`, uPlot vendored) and docs page.
//!
//! # Invariants
//! - A slow or stalled WebSocket client never slows a publisher: publishing is a map lookup and
//!   a non-blocking broadcast send; laggards lose messages (counted), stalled clients are closed.
//! - Every error response is `{"error":{"code":..,"message":..}}`.
//! - Blocking sessions-store queries run on the blocking pool.

mod assets;
mod error;
pub mod hub;
pub mod metrics;
mod model;
mod openapi;
mod rest;
mod server;
pub mod status;
mod ws;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use hub::{Hub, HubConfig, RawFrame, SessionMessage, Subscription};
pub use metrics::{ApiMetrics, WsKind};
pub use model::{ModelControl, ModelInfo, SwapFuture, SwapRequest};
pub use openapi::ApiDoc;
pub use rest::{
    ActiveFilter, DEFAULT_SESSIONS_LIMIT, Health, MAX_SESSIONS_LIMIT, PROMETHEUS_CONTENT_TYPE,
    SensorsParams, SessionsParams,
};
pub use server::{ApiConfig, ApiState, router, serve};
pub use status::{ComponentStatus, ReadyStatus, SensorStatus, StatusSource};
pub use ws::{MAX_EVERY, RawParams};
