//! The one JSON error shape of the API: `{"error":{"code":"not_found","message":"..."}}`, used by
//! every endpoint, including rejected paths, queries and WebSocket upgrades.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error answered to an HTTP client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_request`: invalid path, query or body.
    #[error("{0}")]
    BadRequest(String),
    /// 404 `not_found`: unknown id or route.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 `conflict`: the request conflicts with one in progress.
    #[error("{0}")]
    Conflict(String),
    /// 422 `unprocessable`: well-formed, but what it names cannot be used (e.g. a model that
    /// fails validation).
    #[error("{0}")]
    Unprocessable(String),
    /// 426 `upgrade_required`: a WebSocket endpoint was called without a WebSocket upgrade.
    #[error("{0}")]
    UpgradeRequired(String),
    /// 503 `unavailable`: a backing store failed; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `internal`: a bug.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::UpgradeRequired(_) => "upgrade_required",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        };
        (self.status(), Json(body)).into_response()
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `bad_request`, `not_found`, `method_not_allowed`, `conflict`, `unprocessable`,
    /// `upgrade_required`, `unavailable` or `internal`.
    #[schema(example = "not_found")]
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}
