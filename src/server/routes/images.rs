//! `/api/images`: the gallery. Make an image, a video or a 3D head (a job), list the gallery,
//! each item's record and files, delete; and the preview images drawn while learning or training
//! a 3D head.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{blocking, file_response, record};
use crate::server::error::{ApiError, ApiResult};
use crate::server::store::{GalleryRecord, Kind, PreviewRecord};
use crate::server::work::MediaJob;
use crate::server::AppState;

/// `POST /api/images`: checks the request (its `kind`: `image`, `video` or `3d`) against the
/// store and the models' configs and queues the job; answers 202 with the job.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    request: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(request) = request?;
    let mut job = MediaJob::from_json(request)?;
    let checking = state.clone();
    let job = blocking(move || {
        job.check(&checking.store, &checking.settings.models)?;
        Ok(job)
    })
    .await?;
    let title = job.title();
    let view = state.jobs.submit(job.into_work(), title);
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<GalleryRecord>> {
    Json(state.store.list(Kind::Gallery))
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<GalleryRecord>> {
    Ok(Json(record(&state, Kind::Gallery, "image", &id)?))
}

/// `GET /api/images/{id}/image.png`, `video.mp4` or `splats.ply`: the files its kind has
/// (the PLY as a download).
pub async fn file(State(state): State<Arc<AppState>>, Path((id, file)): Path<(String, String)>) -> ApiResult<Response> {
    let item: GalleryRecord = record(&state, Kind::Gallery, "image", &id)?;
    let files = item.kind.files();
    let Some((_, suffix)) = files.iter().find(|(name, _)| *name == file) else {
        let names: Vec<&str> = files.iter().map(|(name, _)| *name).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("item {id} has {}, not {file:?}", names.join(" and ")),
        ));
    };
    let (content_type, download) = match *suffix {
        "png" => ("image/png", None),
        "mp4" => ("video/mp4", None),
        _ => ("application/octet-stream", Some(format!("stableid-{id}.ply"))),
    };
    file_response(state.store.path(Kind::Gallery, &id, suffix), content_type, download).await
}

pub async fn preview_png(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let _: PreviewRecord = record(&state, Kind::Preview, "preview", &id)?;
    file_response(state.store.path(Kind::Preview, &id, "png"), "image/png", None).await
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let store = state.store.clone();
    let target = id.clone();
    if !blocking(move || Ok(store.delete(Kind::Gallery, &target)?)).await? {
        return Err(ApiError::not_found("image", &id));
    }
    state.jobs.records_changed();
    Ok(StatusCode::NO_CONTENT)
}
