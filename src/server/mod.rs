//! `stableid serve`: a local web app on the library, in the spirit of AUTOMATIC1111's and
//! Fooocus' pages. Upload photos (their aligned crops and face/hair masks are shown), learn an
//! identity while its loss curve, ETA and preview images come in, download or export identities,
//! generate images (posed by a ControlNet or not), videos and 3D heads with them into a gallery
//! that keeps every item's settings.
//!
//! - [`routes`]: the JSON HTTP API (documented in `docs/api.md`), progress as server-sent events,
//!   the page itself (plain HTML, JS and CSS embedded in the binary: no Node build step).
//! - [`jobs`]: the queue. Model work runs one job at a time on a thread of its own (the library is
//!   synchronous); the others wait in order; a job is cancelled through the stop flag the learning
//!   loop and the denoising loop check between steps.
//! - [`work`]: what a job does, calling the same library functions as the command line (`align`,
//!   `masks`, `learn`, `generate`), with the models loaded once and kept.
//! - [`store`]: the data folder: uploads, identities and images under generated names, with a JSON
//!   record each, read back at start so that everything survives a restart.
//!
//! Security: a request's path never reaches the file system (ids are checked to be generated ones
//! and looked up in the records); uploads are size-limited and decoded with the photo reader's
//! limits; bodies over their limit, malformed JSON and unknown routes get 4xx answers. Bound to a
//! loopback address, requests must name a loopback host (no DNS rebinding); on any other address a
//! token is required on every request (header, cookie, or `?token=` on the page's URL).

pub mod error;
pub mod jobs;
pub mod routes;
pub mod store;
pub mod work;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;

use crate::nn::Precision;
use crate::priors::masks::FaceParserKind;
use crate::weights::Hub;
use crate::{Error, Result};

/// The address `stableid serve` binds to unless told otherwise.
pub const DEFAULT_BIND: &str = "127.0.0.1:7860";

/// Which models the server's jobs use: the same choices as the command line's flags.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    /// Stable Diffusion: a diffusers folder or a hub id.
    pub model: String,
    pub device: Device,
    /// What the diffusion models load as (`--dtype`).
    pub precision: Precision,
    /// The face-recognition ViT: a transformers folder or hub id.
    pub face_encoder: String,
    pub face_parser: FaceParserKind,
    /// The face parser's weights (`None`: the default SegFormer).
    pub face_parser_weights: Option<String>,
    /// Celebrity names of the basis (`None`: the shipped list).
    pub celeb_names: Option<PathBuf>,
    /// The pose ControlNet: a diffusers folder or a hub id (loaded when a posed image is made).
    pub controlnet: String,
    /// The OpenPose body weights (`None`: those of the hub, fetched when a pose is detected).
    pub pose_model: Option<PathBuf>,
    /// The text-to-video model: a diffusers folder or a hub id (loaded when a video is made).
    pub video_model: String,
    /// Where models missing from the hub cache are fetched from (or not, offline).
    pub hub: Hub,
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    /// Required on every request when set; must be set to bind to a non-loopback address.
    pub token: Option<String>,
    /// The data folder (created if missing).
    pub data: PathBuf,
    pub models: ModelChoice,
}

impl ServerSettings {
    /// Refuses a non-loopback address without a token, and an empty token.
    pub fn validate(&self) -> Result<()> {
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::setting("token", "\"\"", "must not be empty"));
        }
        if !self.bind.ip().is_loopback() && self.token.is_none() {
            return Err(Error::setting(
                "bind",
                self.bind,
                "is reachable from other machines: give a token that every request must carry, or bind to 127.0.0.1",
            ));
        }
        Ok(())
    }
}

/// What every request handler shares.
pub struct AppState {
    pub settings: ServerSettings,
    pub store: store::Store,
    pub jobs: Arc<jobs::Jobs>,
    pub analyzer: work::PhotoAnalyzer,
    pub poses: work::PoseReader,
}

/// A server bound to its address, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
}

impl Server {
    /// Checks the settings, opens the data folder, starts the job worker and binds the address
    /// (port 0 picks a free one: see [`Server::url`]).
    pub fn bind(settings: ServerSettings) -> Result<Self> {
        settings.validate()?;
        let store = store::Store::open(&settings.data)?;
        let jobs = jobs::Jobs::new();
        work::start_worker(jobs.clone(), store.clone(), settings.models.clone())?;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(settings.bind)).map_err(|e| {
            Error::Input(format!(
                "cannot listen on {}: {e} (is another server using the port? pick another)",
                settings.bind
            ))
        })?;
        let analyzer = work::PhotoAnalyzer::new(settings.models.clone());
        let poses = work::PoseReader::new(settings.models.clone());
        Ok(Self { listener, runtime, state: Arc::new(AppState { settings, store, jobs, analyzer, poses }) })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The page's URL, with the token when there is one (so that the URL printed opens the page).
    pub fn url(&self) -> Result<String> {
        let addr = self.local_addr()?;
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if addr.is_ipv6() && !addr.ip().is_unspecified() { format!("[{host}]") } else { host };
        Ok(match &self.state.settings.token {
            Some(token) => format!("http://{host}:{}/?token={token}", addr.port()),
            None => format!("http://{host}:{}/", addr.port()),
        })
    }

    /// Serves until Ctrl-C. A job running then is stopped (outputs are only ever written whole,
    /// so nothing half-written is left). Open event streams do not hold the exit back.
    pub fn run(self) -> Result<()> {
        let Self { listener, runtime, state } = self;
        let app = routes::router(state.clone());
        runtime.block_on(async move {
            tokio::select! {
                served = axum::serve(listener, app) => served,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        })?;
        state.jobs.cancel_all();
        Ok(())
    }
}
