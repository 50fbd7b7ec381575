//! `/api/photos`: upload a photo (its face found, aligned and parsed at once), list, show, delete,
//! and its aligned crop and mask overlay as PNG.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{blocking, file_response, image_upload, record, upload_name};
use crate::server::error::{ApiError, ApiResult};
use crate::server::store::{Kind, PhotoRecord};
use crate::server::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// The file's name, for the page to show.
    name: Option<String>,
    /// Which face to align (1 = the largest).
    face: Option<usize>,
    /// The photo is an aligned head crop already: no face detection.
    #[serde(default)]
    as_is: bool,
}

/// `POST /api/photos`: the body is the image file itself (`Content-Type: image/...`).
pub async fn upload(
    State(state): State<Arc<AppState>>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Query(query) = query?;
    let body = image_upload(&headers, body, "photo")?;
    if query.face == Some(0) {
        return Err(ApiError::bad_request("face = 0: faces are numbered from 1 (the largest)"));
    }
    let name = upload_name(query.name, "photo");
    let analysis = state.clone();
    let photo =
        blocking(move || analysis.analyzer.analyse(&analysis.store, &body, &name, query.face, query.as_is)).await?;
    state.jobs.records_changed();
    Ok((StatusCode::CREATED, Json(photo)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<PhotoRecord>> {
    Json(state.store.list(Kind::Photo))
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<PhotoRecord>> {
    Ok(Json(record(&state, Kind::Photo, "photo", &id)?))
}

/// `GET /api/photos/{id}/crop.png` or `overlay.png`.
pub async fn file(State(state): State<Arc<AppState>>, Path((id, file)): Path<(String, String)>) -> ApiResult<Response> {
    let _: PhotoRecord = record(&state, Kind::Photo, "photo", &id)?;
    let suffix = match file.as_str() {
        "crop.png" => "crop.png",
        "overlay.png" => "overlay.png",
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("photo {id} has crop.png and overlay.png, not {file:?}"),
            ))
        }
    };
    file_response(state.store.path(Kind::Photo, &id, suffix), "image/png", None).await
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let store = state.store.clone();
    let target = id.clone();
    if !blocking(move || Ok(store.delete(Kind::Photo, &target)?)).await? {
        return Err(ApiError::not_found("photo", &id));
    }
    state.jobs.records_changed();
    Ok(StatusCode::NO_CONTENT)
}
