//! `/api/images`: generate images (a job), the gallery's list, each image's record and PNG,
//! delete; and the preview images drawn while learning.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{blocking, file_response, record};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::Work;
use crate::server::store::{ImageRecord, Kind, PreviewRecord};
use crate::server::work::GenerateJob;
use crate::server::AppState;

/// `POST /api/images`: checks the request against the model's configs and queues a generation
/// job; answers 202 with the job.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    job: Result<Json<GenerateJob>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(mut job) = job?;
    let checking = state.clone();
    let job = blocking(move || {
        job.check(&checking.store, &checking.settings.models)?;
        Ok(job)
    })
    .await?;
    let prompt: String = job.prompt.chars().take(60).collect();
    let title = format!("{} image{} of \"{prompt}\"", job.num_images, if job.num_images == 1 { "" } else { "s" });
    let view = state.jobs.submit(Work::Generate(job), title);
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<ImageRecord>> {
    Json(state.store.list(Kind::Image))
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<ImageRecord>> {
    Ok(Json(record(&state, Kind::Image, "image", &id)?))
}

pub async fn png(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let _: ImageRecord = record(&state, Kind::Image, "image", &id)?;
    file_response(state.store.path(Kind::Image, &id, "png"), "image/png", None).await
}

pub async fn preview_png(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let _: PreviewRecord = record(&state, Kind::Preview, "preview", &id)?;
    file_response(state.store.path(Kind::Preview, &id, "png"), "image/png", None).await
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let store = state.store.clone();
    let target = id.clone();
    if !blocking(move || Ok(store.delete(Kind::Image, &target)?)).await? {
        return Err(ApiError::not_found("image", &id));
    }
    state.jobs.records_changed();
    Ok(StatusCode::NO_CONTENT)
}
