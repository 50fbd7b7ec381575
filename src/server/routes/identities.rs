//! `/api/identities`: start learning one (a job), list, show, delete, download the identity file
//! or an export of it for other tools.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{blocking, file_response, record};
use crate::identity::{ExportFormat, Identity};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::Work;
use crate::server::store::{IdentityRecord, Kind};
use crate::server::work::LearnJob;
use crate::server::AppState;

/// `POST /api/identities`: queues a learning job; answers 202 with the job.
pub async fn learn(
    State(state): State<Arc<AppState>>,
    job: Result<Json<LearnJob>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(job) = job?;
    job.check(&state.store)?;
    let title = format!("learn {}, {} steps", job.name.trim(), job.steps);
    let view = state.jobs.submit(Work::Learn(job), title);
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<IdentityRecord>> {
    Json(state.store.list(Kind::Identity))
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<IdentityRecord>> {
    Ok(Json(record(&state, Kind::Identity, "identity", &id)?))
}

/// `GET /api/identities/{id}/file`: the identity file, named after the identity.
pub async fn download(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let identity: IdentityRecord = record(&state, Kind::Identity, "identity", &id)?;
    let name = format!("{}.safetensors", file_name(&identity.name));
    file_response(state.store.path(Kind::Identity, &id, "safetensors"), "application/octet-stream", Some(name)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    format: String,
}

/// `GET /api/identities/{id}/export?format=a1111|diffusers`: the textual-inversion embedding of
/// `stableid export`, made once and kept.
pub async fn export(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let identity: IdentityRecord = record(&state, Kind::Identity, "identity", &id)?;
    let Query(query) = query?;
    let format: ExportFormat =
        query.format.parse().map_err(|e: String| ApiError::bad_request(format!("format: {e}")))?;
    let tag = match format {
        ExportFormat::A1111 => "a1111",
        ExportFormat::Diffusers => "diffusers",
    };
    let source = state.store.path(Kind::Identity, &id, "safetensors");
    let exported = state.store.path(Kind::Identity, &id, &format!("{tag}.safetensors"));
    let target = exported.clone();
    blocking(move || {
        if !target.exists() {
            Identity::load(&source)?.export(&target, format)?;
        }
        Ok(())
    })
    .await?;
    let name = format!("{}-{tag}.safetensors", file_name(&identity.name));
    file_response(exported, "application/octet-stream", Some(name)).await
}

pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let store = state.store.clone();
    let target = id.clone();
    if !blocking(move || Ok(store.delete(Kind::Identity, &target)?)).await? {
        return Err(ApiError::not_found("identity", &id));
    }
    state.jobs.records_changed();
    Ok(StatusCode::NO_CONTENT)
}

/// A download's file name from an identity's name: letters, digits, `-` and `_` kept, the rest `_`.
fn file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .take(60)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if safe.trim_matches('_').is_empty() {
        "identity".into()
    } else {
        safe
    }
}
