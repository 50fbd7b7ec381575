//! The API's error answer: a status and `{"error": "one line saying what is wrong and what to do"}`.
//! Library errors are sorted by [`crate::error::ErrorKind`]: what the request can fix is a 4xx,
//! the server's own trouble a 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ErrorKind;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// No `what` (photo, identity, image, preview, pose, job) of id `id`.
    pub fn not_found(what: &str, id: &str) -> Self {
        let list = match what {
            "identity" => "GET /api/identities",
            "preview" => "the previews of GET /api/jobs",
            "photo" => "GET /api/photos",
            "image" => "GET /api/images",
            "pose" => "GET /api/poses",
            _ => "GET /api/jobs",
        };
        Self::new(StatusCode::NOT_FOUND, format!("no {what} {id:?} here: see {list}"))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        let status = match error.kind() {
            ErrorKind::Input | ErrorKind::Numeric => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Model => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Storage | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        Self::new(rejection.status(), format!("{}: send a JSON object as docs/api.md describes", rejection.body_text()))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<std::io::Error> for ApiError {
    fn from(error: std::io::Error) -> Self {
        ApiError::internal(format!("cannot read a file of the data folder: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;
