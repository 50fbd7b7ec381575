//! The HTTP API (`docs/api.md`) and the page: the router, the request guard (host and token),
//! and the answers every route shares (JSON errors, files, downloads).

mod assets;
mod identities;
mod images;
mod jobs;
mod photos;
mod poses;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::server::error::{ApiError, ApiResult};
use crate::server::store::Kind;
use crate::server::AppState;

/// The largest JSON body taken (a request is a few hundred bytes).
pub const MAX_JSON_BYTES: usize = 64 << 10;

/// The largest photo upload taken.
pub const MAX_UPLOAD_BYTES: usize = 50 << 20;

/// The longest file name kept for display.
const MAX_FILE_NAME_CHARS: usize = 200;

/// The cookie that carries the token for the page's own requests (the event stream cannot send a
/// header).
const TOKEN_COOKIE: &str = "stableid_token";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/api/info", get(info))
        .route("/api/events", get(jobs::events))
        .route("/api/jobs", get(jobs::list))
        .route("/api/jobs/{id}", get(jobs::show))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/photos", get(photos::list).post(photos::upload).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)))
        .route("/api/photos/{id}", get(photos::show).delete(photos::delete))
        .route("/api/photos/{id}/{file}", get(photos::file))
        .route("/api/identities", get(identities::list).post(identities::learn))
        .route("/api/identities/{id}", get(identities::show).delete(identities::delete))
        .route("/api/identities/{id}/file", get(identities::download))
        .route("/api/identities/{id}/export", get(identities::export))
        .route("/api/images", get(images::list).post(images::generate))
        .route("/api/images/{id}", get(images::show).delete(images::delete))
        .route("/api/images/{id}/{file}", get(images::file))
        .route("/api/previews/{id}/image.png", get(images::preview_png))
        .route("/api/poses", get(poses::list).post(poses::upload).layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)))
        .route("/api/poses/{id}", get(poses::show).delete(poses::delete))
        .route("/api/poses/{id}/pose.png", get(poses::png))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}: see docs/api.md", request.method(), request.uri().path()),
    )
}

/// What the page needs to know: the models, the defaults of each form, the limits.
async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    use crate::pipelines::text_to_3d as three_d;
    let models = &state.settings.models;
    let learn = crate::identity::run::LearnSettings::default();
    let generate = crate::pipelines::GenerateRequest::new("", 0, 0);
    let video = crate::pipelines::VideoRequest::new("", 0, 0);
    let head = three_d::Text3dSettings::new("");
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model": models.model,
        "device": format!("{:?}", models.device),
        "dtype": models.precision.name(),
        "face_encoder": models.face_encoder,
        "face_parser": models.face_parser.name(),
        "controlnet": models.controlnet,
        "video_model": models.video_model,
        "kinds": ["image", "video", "3d"],
        "samplers": crate::schedulers::Sampler::NAMES,
        "export_formats": ["a1111", "diffusers"],
        "learn_defaults": { "steps": learn.steps, "seed": learn.seed, "lr": learn.adamw.lr, "preview_every": 50 },
        "generate_defaults": {
            "negative_prompt": generate.negative_prompt,
            "steps": generate.steps,
            "guidance": generate.guidance,
            "sampler": generate.sampler.to_string(),
            "num_images": 1,
            "control_scale": crate::pipelines::control::DEFAULT_CONTROL_SCALE,
        },
        "video_defaults": {
            "frames": video.frames,
            "fps": crate::pipelines::text_to_video::DEFAULT_FPS,
            "steps": video.steps,
            "guidance": video.guidance,
        },
        "three_d_defaults": {
            "negative_prompt": head.negative_prompt,
            "iterations": head.iterations,
            "size": head.size,
            "guidance": head.ism.guidance_scale,
            "seed": head.seed,
            "points": three_d::DEFAULT_POINTS,
            "preview_every": three_d::DEFAULT_PREVIEW_EVERY,
            "turntable_views": three_d::DEFAULT_TURNTABLE_VIEWS,
            "fps": three_d::DEFAULT_TURNTABLE_FPS,
        },
        "limits": {
            "upload_bytes": MAX_UPLOAD_BYTES,
            "images_per_job": crate::server::work::MAX_IMAGES_PER_JOB,
            "name_chars": crate::server::work::MAX_NAME_CHARS,
        },
    }))
}

/// Refuses requests for another host name on a loopback address (DNS rebinding: a web page that
/// makes its own name point to 127.0.0.1) and, when the server has a token, requests without it.
/// A token given in the page's URL is kept in a cookie for the page's own requests.
async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.settings.bind.ip().is_loopback() && !loopback_host(request.headers()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this server answers only to 127.0.0.1, localhost or [::1]: open it by one of those names",
        )
        .into_response();
    }
    let Some(token) = state.settings.token.as_deref() else {
        return next.run(request).await;
    };
    let from_query = query_token(request.uri().query().unwrap_or_default());
    let given = bearer_token(request.headers()).or_else(|| cookie_token(request.headers())).or(from_query.clone());
    if !given.is_some_and(|given| same_secret(&given, token)) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs its token: open the URL it printed (with ?token=...), or send Authorization: Bearer TOKEN",
        )
        .into_response();
    }
    let mut response = next.run(request).await;
    if from_query.is_some() {
        let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

/// Whether the Host header names a loopback host (any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('=').map(str::to_string))
}

fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode)
}

/// `%XX` escapes and `+` of a query value decoded (a token is usually plain ASCII).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares secrets in a time that does not depend on where they differ.
fn same_secret(given: &str, secret: &str) -> bool {
    let (a, b) = (given.as_bytes(), secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body of an image upload (`what`, in messages): 415 unless it is sent as an image (or
/// octet stream), 400 when empty.
fn image_upload(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    what: &str,
) -> ApiResult<axum::body::Bytes> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !(content_type.starts_with("image/") || content_type == "application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type {content_type:?}: send the {what} file itself as the body, as image/jpeg, image/png, ..."
            ),
        ));
    }
    let body = body?;
    if body.is_empty() {
        return Err(ApiError::bad_request(format!("the body is empty: send the {what} file itself")));
    }
    Ok(body)
}

/// The name an upload is shown by: the browser's file name (cut short), or `default`.
fn upload_name(name: Option<String>, default: &str) -> String {
    name.unwrap_or_else(|| default.into()).chars().take(MAX_FILE_NAME_CHARS).collect()
}

/// A record of `kind`, or 404.
fn record<T: serde::de::DeserializeOwned>(state: &AppState, kind: Kind, what: &str, id: &str) -> ApiResult<T> {
    state.store.get(kind, id).ok_or_else(|| ApiError::not_found(what, id))
}

/// A file of the store as the answer, with its content type (and as a download named
/// `download`, when given).
async fn file_response(
    path: std::path::PathBuf,
    content_type: &'static str,
    download: Option<String>,
) -> ApiResult<Response> {
    let bytes = blocking(move || Ok(crate::io::read_bounded(&path, u64::MAX)?)).await?;
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], bytes).into_response();
    if let Some(name) = download {
        let disposition = format!("attachment; filename=\"{name}\"");
        if let Ok(value) = HeaderValue::from_str(&disposition) {
            response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// Runs file or model work off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("internal error: {e}")))?
}
