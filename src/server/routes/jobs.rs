//! `/api/jobs` and `/api/events`: the queue, one job, cancelling, and the event stream that
//! sends the whole board on every change (so a reload or a second tab sees the running job).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;

use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::{Board, JobView};
use crate::server::AppState;

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Board> {
    Json(state.jobs.board())
}

pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    state.jobs.get(&id).map(Json).ok_or_else(|| ApiError::not_found("job", &id))
}

/// `POST /api/jobs/{id}/cancel`: a queued job is dropped, a running one stops at its next step.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<JobView>> {
    state.jobs.cancel(&id).map(Json).ok_or_else(|| ApiError::not_found("job", &id))
}

/// `GET /api/events`: server-sent events named `board`, each the whole [`Board`] as JSON: one at
/// once, then one after every change.
pub async fn events(State(state): State<Arc<AppState>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = state.jobs.subscribe();
    let stream = futures_util::stream::unfold((changes, true), move |(mut changes, first)| {
        let jobs = state.jobs.clone();
        async move {
            if !first {
                changes.changed().await.ok()?;
            }
            changes.borrow_and_update();
            let board = serde_json::to_string(&jobs.board()).unwrap_or_default();
            Some((Ok(Event::default().event("board").data(board)), (changes, false)))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
