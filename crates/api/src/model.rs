//! `GET /model` and `POST /model`: which model scores the samples, and swapping in another at
//! run time (DESIGN "Model contract"). The runtime implements [`ModelControl`]: it fetches and
//! validates the new model, swaps it between two pipeline steps and answers once the swap is
//! part of a checkpoint, so a crash cannot revert it.

use std::future::Future;
use std::pin::Pin;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::server::ApiState;

/// The active model (`GET /model`, and the answer of a successful `POST /model`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ModelInfo {
    /// Stamped on every sample row as `model_version`: the sidecar's `version`, else the first
    /// 12 hex digits of the ONNX file's SHA-256.
    #[schema(example = "3f2a9c01d4e7")]
    pub version: String,
    /// Where the model came from (a path, an HTTP(S) URL or `s3://`); null for the bundled
    /// demo model.
    pub location: Option<String>,
    /// When this process loaded it (µs since the epoch).
    pub loaded_at_us: i64,
    /// The inference engine running it: `native`, `onnxruntime` or `tract`.
    pub engine: String,
    /// The model's JSON sidecar as loaded.
    #[schema(value_type = Object)]
    pub sidecar: serde_json::Value,
}

/// Body of `POST /model`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    /// The new model: a path on the server, an `http(s)://` URL or `s3://bucket/key`; its
    /// sidecar is the same location with the extension `.json`.
    #[schema(example = "s3://models/velocity/2026-12-05.onnx")]
    pub location: String,
}

/// A boxed future of [`ModelControl::swap`].
pub type SwapFuture = Pin<Box<dyn Future<Output = Result<ModelInfo, ApiError>> + Send>>;

/// The model lifecycle as the runtime implements it.
pub trait ModelControl: Send + Sync + 'static {
    /// The active model.
    fn current(&self) -> ModelInfo;
    /// Fetches, validates and swaps in the model at `location`. Errors: 422
    /// ([`ApiError::Unprocessable`]) when it cannot be fetched or fails validation (the running
    /// model stays), 409 when another swap is in progress, 503 when the swap was interrupted.
    fn swap(&self, location: String) -> SwapFuture;
}

/// The active model.
#[utoipa::path(get, path = "/model", tag = "model", responses(
    (status = 200, description = "The model scoring the samples", body = ModelInfo),
    (status = 503, description = "This role runs no model", body = ErrorBody)))]
pub(crate) async fn get_model(State(state): State<ApiState>) -> Result<Json<ModelInfo>, ApiError> {
    let control = state.model_control()?;
    Ok(Json(control.current()))
}

/// Swaps in another model between two pipeline steps: no sample is lost or doubled, those
/// processed before the swap carry the old `model_version` and those after the new one, and
/// recurrent state restarts from zeros. Answers once the swap is checkpointed.
#[utoipa::path(post, path = "/model", tag = "model", request_body = SwapRequest, responses(
    (status = 200, description = "Swapped: the new active model", body = ModelInfo),
    (status = 400, description = "Malformed body", body = ErrorBody),
    (status = 409, description = "Another swap is in progress", body = ErrorBody),
    (status = 422, description = "The model could not be fetched or failed validation; the running model stays", body = ErrorBody),
    (status = 503, description = "The swap was interrupted (the previous model stays), or this role runs no model", body = ErrorBody)))]
pub(crate) async fn post_model(
    State(state): State<ApiState>,
    body: Result<Json<SwapRequest>, JsonRejection>,
) -> Result<Json<ModelInfo>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let control = state.model_control()?;
    Ok(Json(control.swap(request.location).await?))
}
