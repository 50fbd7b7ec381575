//! `/api/poses`: upload a pose skeleton (an OpenPose map, or a photo of a person whose pose is
//! detected at once), list, show, delete, and the skeleton as PNG: what a posed image is steered
//! by.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{blocking, file_response, image_upload, record};
use crate::server::error::{ApiError, ApiResult};
use crate::server::store::{Kind, PoseRecord};
use crate::server::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// The file's name, for the page to show.
    name: Option<String>,
    /// The upload is a photo of a person: find the pose in it (else it is the skeleton itself).
    #[serde(default)]
    detect: bool,
}

/// `POST /api/poses`: the body is the image file itself (`Content-Type: image/...`).
pub async fn upload(
    State(state): State<Arc<AppState>>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Query(query) = query?;
    let body = image_upload(&headers, body, "pose image or photo")?;
    let name = super::upload_name(query.name, "pose");
    let reading = state.clone();
    let pose = blocking(move || reading.poses.add(&reading.store, &body, &name, query.detect)).await?;
    state.jobs.records_changed();
    Ok((StatusCode::CREATED, Json(pose)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<PoseRecord>> {
    Json(state.store.list(Kind::Pose))
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<PoseRecord>> {
    Ok(Json(record(&state, Kind::Pose, "pose", &id)?))
}

/// `GET /api/poses/{id}/pose.png`: the skeleton.
pub async fn png(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let _: PoseRecord = record(&state, Kind::Pose, "pose", &id)?;
    file_response(state.store.path(Kind::Pose, &id, "png"), "image/png", None).await
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let store = state.store.clone();
    let target = id.clone();
    if !blocking(move || Ok(store.delete(Kind::Pose, &target)?)).await? {
        return Err(ApiError::not_found("pose", &id));
    }
    state.jobs.records_changed();
    Ok(StatusCode::NO_CONTENT)
}
