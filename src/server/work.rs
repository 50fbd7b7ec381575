//! What the web app's jobs do, through the same library calls as the command line: photos are
//! framed as `align` and `learn` frame them ([`frame_photo`]) and their masks made as `masks` makes
//! them; learning is [`LearnRun`] with the `learn` command's settings and provenance; images are
//! [`generate_unless_stopped`] with `generate`'s defaults, steered by a pose skeleton through the
//! pose ControlNet as `generate --controlnet ... --control-image` / `--pose-from` do it (poses
//! detected with [`pose_map`], as `stableid pose` draws them); videos are
//! [`generate_video_unless_stopped`] with `stableid video`'s defaults; 3D heads are
//! [`Text3dRun`] with `stableid 3d`'s defaults.
//!
//! Deviations from the command line: the photo analysis and pose detection shown after an upload
//! run on the CPU (next to a job that may hold the device); the learning and 3D runs keep no
//! checkpoint after they end (a cancelled run is not resumed); the identity's preview images use
//! [`GenerateRequest::preview`]; a video model that is not on this machine yet is fetched, and the
//! request checked against it, when its job runs; the models a job loaded stay loaded for the
//! next jobs (Stable Diffusion, the ControlNet and the video model together).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::identity::run::{LearnOutcome, LearnRun, LearnSettings, PreparedPhoto};
use crate::identity::step::Basis;
use crate::identity::Identity;
use crate::io::video::{write_video, VideoFormat};
use crate::io::{write_png, RgbImage};
use crate::models::controlnet::{ControlNetDir, ControlNetModel};
use crate::models::stable_diffusion::{SdConfigs, StableDiffusion};
use crate::models::text_to_video::{TextToVideoModel, VideoConfigs};
use crate::pipelines::control::{check_control_settings, Control, ControlImage, DEFAULT_CONTROL_SCALE};
use crate::pipelines::text_to_3d::{
    head_cloud, turntable, view_image, Start, Text3dOutcome, Text3dRun, Text3dSettings, DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_POINTS, DEFAULT_PREVIEW_EVERY, DEFAULT_TURNTABLE_FPS, DEFAULT_TURNTABLE_VIEWS,
};
use crate::pipelines::text_to_image::to_rgb_images;
use crate::pipelines::text_to_video::{check_fps, DEFAULT_FPS};
use crate::pipelines::{
    check_identity_widths, generate_unless_stopped, generate_video_unless_stopped, other_encoder_warnings,
    GenerateRequest, Generated, VideoRequest,
};
use crate::priors::align::{frame_photo, provenance_of, FaceDetector, FramedPhoto, Framing};
use crate::priors::celeb_basis::{CelebBasis, CelebNames};
use crate::priors::face_feature::{load_face_encoder, FaceEncoder};
use crate::priors::masks::FaceParser;
use crate::priors::photo::{load_image_with_digest, load_upright_with_digest};
use crate::priors::pose::{pose_map, PoseEstimator, PoseSettings};
use crate::schedulers::Sampler;
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::{Jobs, Work};
use crate::server::store::{
    new_id, now, GalleryRecord, IdentityRecord, IdentityRef, Kind, MediaKind, PhotoRecord, PoseRecord, PreviewRecord,
    Store,
};
use crate::server::ModelChoice;
use crate::splats::write_ply;
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The most images one generation job makes.
pub const MAX_IMAGES_PER_JOB: usize = 16;

/// The longest identity name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// The most Gaussians a 3D head starts from (LucidDreamer's start has 81,920).
pub const MAX_3D_POINTS: usize = 1_000_000;

/// The most views of a 3D head's turntable video.
pub const MAX_TURNTABLE_VIEWS: usize = 1_000;

/// A gallery job, as `POST /api/images` asks for it: its `kind` says what it makes (an `image`
/// when not given).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum MediaJob {
    #[serde(rename = "image")]
    Image(GenerateJob),
    #[serde(rename = "video")]
    Video(VideoJob),
    #[serde(rename = "3d")]
    ThreeD(Text3dJob),
}

impl MediaJob {
    /// The job a request's JSON asks for; a field of the wrong type, an unknown field or kind is
    /// a 422 saying which.
    pub fn from_json(mut request: serde_json::Value) -> ApiResult<Self> {
        if let Some(fields) = request.as_object_mut() {
            match fields.entry("kind").or_insert_with(|| "image".into()) {
                serde_json::Value::String(_) => {}
                other => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        format!("kind = {other}: give \"image\", \"video\" or \"3d\""),
                    ))
                }
            }
        }
        serde_json::from_value(request).map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                format!("{e}: send a request as docs/api.md describes"),
            )
        })
    }

    /// Checks the request against the store and the models (their configs only: nothing loads);
    /// fills in the seed when none was given.
    pub fn check(&mut self, store: &Store, models: &ModelChoice) -> ApiResult<()> {
        match self {
            MediaJob::Image(job) => job.check(store, models),
            MediaJob::Video(job) => job.check(store, models),
            MediaJob::ThreeD(job) => job.check(store, models),
        }
    }

    /// What the job list calls it.
    pub fn title(&self) -> String {
        let short = |prompt: &str| prompt.chars().take(60).collect::<String>();
        match self {
            MediaJob::Image(job) => {
                let plural = if job.num_images == 1 { "" } else { "s" };
                format!("{} image{plural} of \"{}\"", job.num_images, short(&job.prompt))
            }
            MediaJob::Video(job) => format!("a {}-frame video of \"{}\"", job.frames, short(&job.prompt)),
            MediaJob::ThreeD(job) => format!("a 3D head of \"{}\", {} iterations", short(&job.prompt), job.iterations),
        }
    }

    pub fn into_work(self) -> Work {
        match self {
            MediaJob::Image(job) => Work::Generate(job),
            MediaJob::Video(job) => Work::Video(job),
            MediaJob::ThreeD(job) => Work::ThreeD(job),
        }
    }
}

/// 404 unless every identity of `ids` is in the store.
fn check_identities_exist(store: &Store, ids: &[String]) -> ApiResult<()> {
    for id in ids {
        if store.get::<IdentityRecord>(Kind::Identity, id).is_none() {
            return Err(ApiError::not_found("identity", id));
        }
    }
    Ok(())
}

/// The folder of model `spec` when it is on this machine already (a folder, or complete in the
/// hub cache); `None` when it is still to be downloaded (its job does that).
fn model_here(spec: &str, models: &ModelChoice) -> Option<ModelDir> {
    ModelDir::resolve(spec, &models.hub.clone().offline(true), models.precision.file_dtype()).ok()
}

/// A learning job, as `POST /api/identities` asks for it; defaults are `stableid learn`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnJob {
    /// What the identity is called on the page.
    pub name: String,
    /// Uploaded photos of one person (their ids).
    pub photos: Vec<String>,
    #[serde(default = "default_learn_steps")]
    pub steps: usize,
    #[serde(default = "default_learn_seed")]
    pub seed: u64,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Draw a preview image every this many steps (0: none).
    #[serde(default = "default_preview_every")]
    pub preview_every: usize,
}

fn default_learn_steps() -> usize {
    LearnSettings::default().steps
}
fn default_learn_seed() -> u64 {
    LearnSettings::default().seed
}
fn default_lr() -> f64 {
    LearnSettings::default().adamw.lr
}
fn default_preview_every() -> usize {
    50
}

impl LearnJob {
    /// The library's settings of this run, checked.
    pub fn settings(&self) -> Result<LearnSettings> {
        let mut settings = LearnSettings { steps: self.steps, seed: self.seed, save_every: None, ..Default::default() };
        settings.adamw.lr = self.lr;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the request against the store: a name, photos that exist.
    pub fn check(&self, store: &Store) -> ApiResult<()> {
        let chars = self.name.trim().chars().count();
        if chars == 0 || chars > MAX_NAME_CHARS {
            return Err(ApiError::bad_request(format!(
                "name: give the identity a name of 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        if self.photos.is_empty() {
            return Err(ApiError::bad_request(
                "photos: give at least one uploaded photo's id (POST /api/photos first)",
            ));
        }
        for id in &self.photos {
            if store.get::<PhotoRecord>(Kind::Photo, id).is_none() {
                return Err(ApiError::not_found("photo", id));
            }
        }
        self.settings()?;
        Ok(())
    }
}

/// A generation job, as `POST /api/images` asks for it; defaults are `stableid generate`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateJob {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// Seed of the first image; image i uses seed + i (random when not given).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_generate_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default = "default_sampler")]
    pub sampler: String,
    #[serde(default = "default_num_images")]
    pub num_images: usize,
    /// Image size [default: the model's].
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    /// Identities (their ids) for `v1* v2*`, `v3* v4*`, ... in the prompt.
    #[serde(default)]
    pub identities: Vec<String>,
    /// A pose (its id: `POST /api/poses`) whose skeleton steers the image through the pose
    /// ControlNet; the image then takes the skeleton's size unless one is given.
    #[serde(default)]
    pub pose: Option<String>,
    /// How strongly the pose steers (diffusers' `controlnet_conditioning_scale`).
    #[serde(default = "default_control_scale")]
    pub control_scale: f64,
}

fn default_control_scale() -> f64 {
    DEFAULT_CONTROL_SCALE
}

fn default_generate_steps() -> usize {
    GenerateRequest::new("", 8, 8).steps
}
fn default_guidance() -> f64 {
    GenerateRequest::new("", 8, 8).guidance
}
fn default_sampler() -> String {
    GenerateRequest::new("", 8, 8).sampler.to_string()
}
fn default_num_images() -> usize {
    1
}

impl GenerateJob {
    /// The library's request for the first image (identities not loaded, no ControlNet yet),
    /// checked against the model's configs; `pose` is the job's pose skeleton. Fills in the seed
    /// when none was given.
    pub fn request(&mut self, configs: &SdConfigs, pose: Option<&ControlImage>) -> Result<GenerateRequest> {
        let sampler: Sampler = self.sampler.parse()?;
        if self.pose.is_some() {
            check_control_settings(self.control_scale, 0.0, 1.0)?;
        } else if self.control_scale != DEFAULT_CONTROL_SCALE {
            return Err(Error::setting("control_scale", self.control_scale, "steers with a pose only: choose a pose"));
        }
        if !(1..=MAX_IMAGES_PER_JOB).contains(&self.num_images) {
            return Err(Error::setting("num_images", self.num_images, format!("must be 1 to {MAX_IMAGES_PER_JOB}")));
        }
        let seed = *self.seed.get_or_insert_with(|| u64::from(rand::random::<u32>()));
        if seed.checked_add(self.num_images as u64).is_none() {
            return Err(Error::setting("seed", seed, "is too large for the seeds of every image (seed + i)"));
        }
        // As `generate`: without a size, the control image's (rounded down to the latent grid).
        let (width, height) = match pose {
            Some(image) => image.default_size(configs.latent_factor()),
            None => configs.default_size(),
        };
        let request = GenerateRequest {
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            seed,
            sampler,
            ..GenerateRequest::new(&self.prompt, self.width.unwrap_or(width), self.height.unwrap_or(height))
        };
        request.validate(configs)?;
        Ok(request)
    }

    /// Checks the request against the store and the model (its configs only: nothing loads).
    pub fn check(&mut self, store: &Store, models: &ModelChoice) -> ApiResult<()> {
        check_identities_exist(store, &self.identities)?;
        let pose = match &self.pose {
            Some(id) if store.get::<PoseRecord>(Kind::Pose, id).is_none() => {
                return Err(ApiError::not_found("pose", id))
            }
            Some(id) => Some(pose_image(store, id)?),
            None => None,
        };
        let configs = SdConfigs::read(&ModelDir::resolve(&models.model, &models.hub, models.precision.file_dtype())?)?;
        self.request(&configs, pose.as_ref())?;
        Ok(())
    }
}

/// The skeleton of pose `id` as a control image, named as the data folder holds it.
fn pose_image(store: &Store, id: &str) -> Result<ControlImage> {
    let mut image = ControlImage::read(&store.path(Kind::Pose, id, "png"))
        .map_err(|e| Error::Input(format!("pose {id} was deleted before the job started ({e})")))?;
    image.source = format!("poses/{id}.png");
    Ok(image)
}

/// A video job, as `POST /api/images` with `"kind": "video"` asks for it; defaults are
/// `stableid video`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoJob {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// Random when not given.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "default_frames")]
    pub frames: usize,
    /// Frames per second of the MP4.
    #[serde(default = "default_fps")]
    pub fps: u32,
    /// Frame size [default: the video model's].
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default = "default_video_steps")]
    pub steps: usize,
    #[serde(default = "default_video_guidance")]
    pub guidance: f64,
    /// [default: the video model's own scheduler, DDIM for ModelScope]
    #[serde(default)]
    pub sampler: Option<String>,
    /// Identities (their ids) for `v1* v2*`, `v3* v4*`, ... in the prompt.
    #[serde(default)]
    pub identities: Vec<String>,
}

fn default_frames() -> usize {
    VideoRequest::new("", 8, 8).frames
}
fn default_fps() -> u32 {
    DEFAULT_FPS
}
fn default_video_steps() -> usize {
    VideoRequest::new("", 8, 8).steps
}
fn default_video_guidance() -> f64 {
    VideoRequest::new("", 8, 8).guidance
}

impl VideoJob {
    /// The library's request (identities not loaded), checked against the video model's configs;
    /// fills in the seed when none was given.
    pub fn request(&mut self, configs: &VideoConfigs) -> Result<VideoRequest> {
        check_fps(self.fps)?;
        let sampler = self.sampler.as_deref().map(str::parse::<Sampler>).transpose()?;
        let seed = *self.seed.get_or_insert_with(|| u64::from(rand::random::<u32>()));
        let (width, height) = configs.default_size();
        let request = VideoRequest {
            negative_prompt: self.negative_prompt.clone(),
            frames: self.frames,
            steps: self.steps,
            guidance: self.guidance,
            seed,
            sampler,
            ..VideoRequest::new(&self.prompt, self.width.unwrap_or(width), self.height.unwrap_or(height))
        };
        request.validate(configs)?;
        Ok(request)
    }

    /// Checks the request against the store and, when it is here already, the video model:
    /// identities learned for another text-encoder width are refused, as `stableid video` does.
    pub fn check(&mut self, store: &Store, models: &ModelChoice) -> ApiResult<()> {
        check_identities_exist(store, &self.identities)?;
        check_fps(self.fps)?;
        if let Some(model) = model_here(&models.video_model, models) {
            let configs = VideoConfigs::read(&model)?;
            let identities = load_identities(store, &self.identities)?.1;
            check_identity_widths(&identities, configs.text_encoder.hidden_size, model.name())?;
            self.request(&configs)?;
        }
        Ok(())
    }
}

/// A 3D job, as `POST /api/images` with `"kind": "3d"` asks for it; defaults are `stableid 3d`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text3dJob {
    pub prompt: String,
    #[serde(default = "default_3d_negative_prompt")]
    pub negative_prompt: String,
    /// Identities (their ids) for `v1* v2*`, `v3* v4*`, ... in the prompt.
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    /// Render size (square, a multiple of 8).
    #[serde(default = "default_3d_size")]
    pub size: usize,
    #[serde(default = "default_3d_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub seed: u64,
    /// Gaussians of the head-shaped start.
    #[serde(default = "default_points")]
    pub points: usize,
    /// A preview (front view) every this many iterations (0: none).
    #[serde(default = "default_3d_preview_every")]
    pub preview_every: usize,
    /// Views of the turntable video, and its frame rate.
    #[serde(default = "default_turntable_views")]
    pub turntable_views: usize,
    #[serde(default = "default_turntable_fps")]
    pub fps: u32,
}

fn default_3d_negative_prompt() -> String {
    DEFAULT_NEGATIVE_PROMPT.to_string()
}
fn default_iterations() -> usize {
    Text3dSettings::new("").iterations
}
fn default_3d_size() -> usize {
    Text3dSettings::new("").size
}
fn default_3d_guidance() -> f64 {
    Text3dSettings::new("").ism.guidance_scale
}
fn default_points() -> usize {
    DEFAULT_POINTS
}
fn default_3d_preview_every() -> usize {
    DEFAULT_PREVIEW_EVERY
}
fn default_turntable_views() -> usize {
    DEFAULT_TURNTABLE_VIEWS
}
fn default_turntable_fps() -> u32 {
    DEFAULT_TURNTABLE_FPS
}

impl Text3dJob {
    /// The library's settings of this run, checked (the turntable's too).
    pub fn settings(&self) -> Result<Text3dSettings> {
        let mut settings = Text3dSettings::new(&self.prompt).with_iterations(self.iterations);
        settings.negative_prompt = self.negative_prompt.clone();
        settings.size = self.size;
        settings.seed = self.seed;
        settings.ism.guidance_scale = self.guidance;
        settings.validate()?;
        if !self.guidance.is_finite() {
            return Err(Error::setting("guidance", self.guidance, "must be a finite number"));
        }
        if !(1..=MAX_3D_POINTS).contains(&self.points) {
            return Err(Error::setting("points", self.points, format!("must be 1 to {MAX_3D_POINTS}")));
        }
        if !(1..=MAX_TURNTABLE_VIEWS).contains(&self.turntable_views) {
            return Err(Error::setting(
                "turntable_views",
                self.turntable_views,
                format!("must be 1 to {MAX_TURNTABLE_VIEWS}"),
            ));
        }
        check_fps(self.fps)?;
        Ok(settings)
    }

    /// Checks the request against the store and the model's configs (nothing loads).
    pub fn check(&self, store: &Store, models: &ModelChoice) -> ApiResult<()> {
        check_identities_exist(store, &self.identities)?;
        self.settings()?;
        let configs = SdConfigs::read(&ModelDir::resolve(&models.model, &models.hub, models.precision.file_dtype())?)?;
        configs.check_image_size(self.size, self.size).map_err(|problem| Error::setting("size", self.size, problem))?;
        Ok(())
    }
}

/// The identities `ids` as a job uses them: their names for the record, and the identities
/// loaded, their source named as the data folder holds them (what the outputs' metadata shows).
fn load_identities(store: &Store, ids: &[String]) -> Result<(Vec<IdentityRef>, Vec<Identity>)> {
    let mut names = Vec::with_capacity(ids.len());
    let mut identities = Vec::with_capacity(ids.len());
    for id in ids {
        let record: IdentityRecord = store
            .get(Kind::Identity, id)
            .ok_or_else(|| Error::Input(format!("identity {id} was deleted before the job started")))?;
        names.push(IdentityRef { id: id.clone(), name: record.name });
        let mut identity = Identity::load(&store.path(Kind::Identity, id, "safetensors"))?;
        identity.source = PathBuf::from(format!("identities/{id}.safetensors"));
        identities.push(identity);
    }
    Ok((names, identities))
}

/// Detects, aligns and parses uploaded photos, one at a time, with models loaded on first use.
pub struct PhotoAnalyzer {
    models: ModelChoice,
    loaded: Mutex<Option<(FaceDetector, FaceParser)>>,
}

impl PhotoAnalyzer {
    pub fn new(models: ModelChoice) -> Self {
        Self { models, loaded: Mutex::new(None) }
    }

    /// Stores an uploaded photo under a new id, frames it (face `face` of it, or `as_is`) and
    /// makes its masks; on any failure nothing of it is kept. `name` (the browser's file name)
    /// stands for the photo in messages.
    pub fn analyse(
        &self,
        store: &Store,
        bytes: &[u8],
        name: &str,
        face: Option<usize>,
        as_is: bool,
    ) -> ApiResult<PhotoRecord> {
        let id = new_id();
        let upload = store.path(Kind::Photo, &id, "upload");
        let analysed =
            crate::io::write_bytes(&upload, bytes).and_then(|()| self.analyse_stored(store, &id, name, face, as_is));
        analysed.map_err(|error| {
            let _ = store.remove_files(Kind::Photo, &id);
            let mut api = ApiError::from(error);
            // Say "photo me.jpg", not the stored file's path.
            api.message = api.message.replace(&upload.display().to_string(), &format!("{name:?}"));
            api
        })
    }

    fn analyse_stored(
        &self,
        store: &Store,
        id: &str,
        name: &str,
        face: Option<usize>,
        as_is: bool,
    ) -> Result<PhotoRecord> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.is_none() {
            let parser = FaceParser::load(
                self.models.face_parser,
                self.models.face_parser_weights.as_deref(),
                &self.models.hub,
                &Device::Cpu,
            )?;
            *loaded = Some((FaceDetector::shipped(&Device::Cpu)?, parser));
        }
        let (detector, parser) = loaded.as_ref().expect("loaded above");
        let framing = if as_is { Framing::AsIs } else { Framing::Align { face } };
        let framed = frame_photo(&store.path(Kind::Photo, id, "upload"), framing, detector)?;
        let rgb = framed.photo.rgb();
        let masks = parser.masks(rgb.as_raw())?;
        let crop = RgbImage::from(rgb);
        write_png(&store.path(Kind::Photo, id, "crop.png"), &crop, &framed.provenance())?;
        write_png(&store.path(Kind::Photo, id, "overlay.png"), &masks.overlay(rgb.as_raw())?, &[])?;
        let alignment = framed.alignment.as_ref();
        let record = PhotoRecord {
            id: id.to_string(),
            name: name.to_string(),
            created: now(),
            sha256: framed.photo.sha256().to_string(),
            aligned: alignment.is_some(),
            face: alignment.map_or(1, |a| a.face),
            faces_found: alignment.map_or(1, |a| a.faces_found),
            padded: alignment.is_some_and(|a| a.crop.padded),
            face_fraction: masks.face_fraction()?,
            hair_fraction: masks.hair_fraction()?,
        };
        store.put(Kind::Photo, id, &record)?;
        Ok(record)
    }
}

/// Reads uploaded pose skeletons, or detects the pose of the person in an uploaded photo with
/// OpenPose (loaded on first use, on the CPU), one at a time.
pub struct PoseReader {
    models: ModelChoice,
    estimator: Mutex<Option<PoseEstimator>>,
}

impl PoseReader {
    pub fn new(models: ModelChoice) -> Self {
        Self { models, estimator: Mutex::new(None) }
    }

    /// Stores the skeleton of an upload under a new id: the upload itself (`detect` false: an
    /// OpenPose map already), or the map of the person found in it (`detect`: a photo, drawn as
    /// `stableid pose` draws it). On any failure nothing of it is kept; `name` (the browser's file
    /// name) stands for the upload in messages.
    pub fn add(&self, store: &Store, bytes: &[u8], name: &str, detect: bool) -> ApiResult<PoseRecord> {
        let id = new_id();
        let upload = store.path(Kind::Pose, &id, "upload");
        let made = crate::io::write_bytes(&upload, bytes).and_then(|()| self.make(store, &id, name, detect));
        // Only the skeleton is kept.
        let _ = std::fs::remove_file(&upload);
        made.map_err(|error| {
            let _ = store.remove_files(Kind::Pose, &id);
            let mut api = ApiError::from(error);
            api.message = api.message.replace(&upload.display().to_string(), &format!("{name:?}"));
            api
        })
    }

    fn make(&self, store: &Store, id: &str, name: &str, detect: bool) -> Result<PoseRecord> {
        let upload = store.path(Kind::Pose, id, "upload");
        let (skeleton, sha256, people) = if detect {
            let (photo, sha256) = load_upright_with_digest(&upload)?;
            let mut estimator = self.estimator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if estimator.is_none() {
                let weights = match &self.models.pose_model {
                    Some(path) => path.clone(),
                    None => PoseEstimator::hub_weights(&self.models.hub)?,
                };
                *estimator = Some(PoseEstimator::load(&weights, &Device::Cpu)?);
            }
            let map = pose_map(&photo, estimator.as_ref().expect("loaded above"), PoseSettings::default())?;
            (map.image, sha256, Some(map.people.len()))
        } else {
            let (skeleton, sha256) = load_image_with_digest(&upload, "pose image")?;
            (skeleton, sha256, None)
        };
        let text = [("pose_of", name.to_string()), ("detected", detect.to_string())];
        write_png(&store.path(Kind::Pose, id, "png"), &(&skeleton).into(), &text)?;
        let record = PoseRecord {
            id: id.to_string(),
            name: name.to_string(),
            created: now(),
            sha256,
            detected: detect,
            people,
            width: skeleton.width(),
            height: skeleton.height(),
        };
        store.put(Kind::Pose, id, &record)?;
        Ok(record)
    }
}

/// The models a job needs, loaded on first use and kept for the next jobs.
#[derive(Default)]
struct Loaded {
    sd: Option<StableDiffusion>,
    learning: Option<LearningModels>,
    /// The pose ControlNet and its name.
    controlnet: Option<(Arc<ControlNetModel>, String)>,
    video: Option<TextToVideoModel>,
}

/// What learning needs besides Stable Diffusion.
struct LearningModels {
    detector: FaceDetector,
    encoder: FaceEncoder,
    parser: FaceParser,
    names: CelebNames,
}

impl Loaded {
    fn sd(&mut self, models: &ModelChoice) -> Result<&StableDiffusion> {
        if self.sd.is_none() {
            self.sd = Some(StableDiffusion::load(
                &ModelDir::resolve(&models.model, &models.hub, models.precision.file_dtype())?,
                &models.device,
                models.precision,
            )?);
        }
        Ok(self.sd.as_ref().expect("loaded above"))
    }

    /// The pose ControlNet (with Stable Diffusion, which it must fit), and its name.
    fn controlnet(&mut self, models: &ModelChoice) -> Result<(Arc<ControlNetModel>, String)> {
        self.sd(models)?;
        if self.controlnet.is_none() {
            let sd = self.sd.as_ref().expect("loaded above");
            let dir = ControlNetDir::resolve(&models.controlnet, &models.hub, models.precision.file_dtype())?;
            let config = dir.config()?;
            dir.check_fits(&config, sd.configs(), sd.model_name())?;
            let controlnet = Arc::new(dir.load(&config, sd.precision(), sd.device())?);
            self.controlnet = Some((controlnet, dir.name().to_string()));
        }
        Ok(self.controlnet.clone().expect("loaded above"))
    }

    fn video(&mut self, models: &ModelChoice) -> Result<&TextToVideoModel> {
        if self.video.is_none() {
            let dir = ModelDir::resolve(&models.video_model, &models.hub, models.precision.file_dtype())?;
            let configs = VideoConfigs::read(&dir)?;
            self.video = Some(TextToVideoModel::load(&dir, configs, &models.device, models.precision)?);
        }
        Ok(self.video.as_ref().expect("loaded above"))
    }

    /// Stable Diffusion and the learning models.
    fn learning(&mut self, models: &ModelChoice) -> Result<(&StableDiffusion, &LearningModels)> {
        self.sd(models)?;
        if self.learning.is_none() {
            self.learning = Some(LearningModels {
                detector: FaceDetector::shipped(&Device::Cpu)?,
                encoder: load_face_encoder(&models.face_encoder, &models.hub, &models.device)?,
                parser: FaceParser::load(
                    models.face_parser,
                    models.face_parser_weights.as_deref(),
                    &models.hub,
                    &models.device,
                )?,
                names: CelebNames::load(models.celeb_names.as_deref())?,
            });
        }
        Ok((self.sd.as_ref().expect("loaded above"), self.learning.as_ref().expect("loaded above")))
    }
}

/// Starts the worker thread that runs the queued jobs one at a time. A job that fails or panics
/// is marked failed with its reason, and the worker goes on with the next.
pub fn start_worker(jobs: Arc<Jobs>, store: Store, models: ModelChoice) -> Result<()> {
    std::thread::Builder::new().name("stableid-jobs".into()).spawn(move || {
        let mut loaded = Loaded::default();
        loop {
            let (id, work, stop) = jobs.next();
            let context = JobContext { id: &id, jobs: &jobs, store: &store, models: &models, stop: &stop };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| context.run(work, &mut loaded)));
            let outcome = match outcome {
                Ok(result) => result.map_err(|error| error.to_string()),
                Err(panic) => {
                    // The models may be half-updated: load them afresh for the next job.
                    loaded = Loaded::default();
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!("internal error: the job panicked ({what}); the server goes on"))
                }
            };
            jobs.finish(&id, outcome);
        }
    })?;
    Ok(())
}

/// The running job's id and what it reports to.
struct JobContext<'a> {
    id: &'a str,
    jobs: &'a Jobs,
    store: &'a Store,
    models: &'a ModelChoice,
    stop: &'a AtomicBool,
}

impl JobContext<'_> {
    fn run(&self, work: Work, loaded: &mut Loaded) -> Result<()> {
        match work {
            Work::Learn(job) => self.learn(&job, loaded),
            Work::Generate(job) => self.generate(job, loaded),
            Work::Video(job) => self.video(job, loaded),
            Work::ThreeD(job) => self.three_d(job, loaded),
        }
    }

    fn phase(&self, phase: &str) {
        self.jobs.update(self.id, |view| view.phase = phase.to_string());
    }

    fn warn(&self, warnings: Vec<String>) {
        if !warnings.is_empty() {
            self.jobs.update(self.id, |view| view.warnings.extend(warnings));
        }
    }

    /// Stores a finished gallery item (its files are written before) and shows it.
    fn add_to_gallery(
        &self,
        id: String,
        kind: MediaKind,
        request: MediaJob,
        identities: &[IdentityRef],
        settings: &[(&'static str, String)],
    ) -> Result<()> {
        let record = GalleryRecord {
            id: id.clone(),
            kind,
            created: now(),
            request: serde_json::to_value(&request).map_err(|e| Error::Internal(e.to_string()))?,
            identities: identities.to_vec(),
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            warnings: self.jobs.get(self.id).map(|view| view.warnings).unwrap_or_default(),
        };
        self.store.put(Kind::Gallery, &id, &record)?;
        self.jobs.update(self.id, |view| view.images.push(id));
        self.jobs.records_changed();
        Ok(())
    }

    /// Learns an identity as `stableid learn` does, with previews; stores it when finished.
    fn learn(&self, job: &LearnJob, loaded: &mut Loaded) -> Result<()> {
        let settings = job.settings()?;
        self.phase("loading the models");
        let (sd, learning) = loaded.learning(self.models)?;

        self.phase("preparing the photos");
        let framed = job
            .photos
            .iter()
            .map(|id| self.framed_photo(id, &learning.detector))
            .collect::<Result<Vec<FramedPhoto>>>()?;
        let device = sd.device();
        let prepared = framed
            .iter()
            .map(|framed| PreparedPhoto::new(&framed.photo, &learning.encoder, &learning.parser, device))
            .collect::<Result<Vec<_>>>()?;
        let basis = CelebBasis::load_or_compute(
            &self.store.work_dir().join("celeb-basis"),
            sd.text_encoder_file(),
            &learning.names,
            sd.tokenizer(),
            sd.text_encoder().token_embedding(),
        )?;
        let mut provenance: HashMap<String, String> = [
            ("face_encoder".to_string(), self.models.face_encoder.clone()),
            ("face_parser".to_string(), learning.parser.kind().name().to_string()),
            ("celeb_names".to_string(), learning.names.len().to_string()),
        ]
        .into();
        provenance.extend(provenance_of(&framed).into_iter().map(|(key, value)| (key.to_string(), value)));
        let checkpoint = self.store.work_dir().join(format!("{}.ckpt.safetensors", self.id));
        let run = LearnRun {
            sd,
            photos: &prepared,
            basis: Basis { mean: basis.mean.to_device(device)?, std: basis.std.to_device(device)? },
            settings,
            checkpoint: checkpoint.clone(),
            resume: false,
            provenance,
        };

        self.jobs.phase(self.id, "learning", 0, job.steps);
        let losses = Mutex::new(Vec::with_capacity(job.steps));
        let (width, height) = sd.configs().default_size();
        let preview_request = GenerateRequest::preview(width, height);
        // A preview that fails stops the run, which then fails with its error.
        let preview_error = Mutex::new(None);
        let outcome = run.run_with_previews(
            self.stop,
            (job.preview_every > 0).then_some(job.preview_every),
            &mut |done, _total, report| {
                losses.lock().expect("losses lock").push(report.loss);
                self.jobs.update(self.id, |view| view.losses.push(report.loss));
                self.jobs.step(self.id, done);
            },
            &mut |done, identity| {
                // After the last step the identity itself is the result: no preview of it.
                if done == job.steps {
                    return;
                }
                if let Err(error) = self.preview(sd, &preview_request, identity, done) {
                    *preview_error.lock().expect("preview error lock") = Some(error);
                    self.stop.store(true, Ordering::SeqCst);
                }
            },
        );
        let _ = std::fs::remove_file(&checkpoint);
        if let Some(error) = preview_error.into_inner().expect("preview error lock") {
            return Err(error);
        }
        let identity = match outcome? {
            LearnOutcome::Finished(identity) => identity,
            LearnOutcome::Interrupted { .. } => return Ok(()),
        };
        let id = new_id();
        identity.save(&self.store.path(Kind::Identity, &id, "safetensors"))?;
        let record = IdentityRecord {
            id: id.clone(),
            name: job.name.trim().to_string(),
            created: now(),
            photos: job.photos.clone(),
            steps: job.steps,
            seed: job.seed,
            losses: losses.into_inner().expect("losses lock"),
            metadata: identity.metadata,
        };
        self.store.put(Kind::Identity, &id, &record)?;
        self.jobs.update(self.id, |view| view.identity = Some(id));
        Ok(())
    }

    /// An uploaded photo framed again as its analysis framed it (the same crop, and the
    /// provenance `learn` records).
    fn framed_photo(&self, id: &str, detector: &FaceDetector) -> Result<FramedPhoto> {
        let record: PhotoRecord = self
            .store
            .get(Kind::Photo, id)
            .ok_or_else(|| Error::Input(format!("photo {id} was deleted before the job started")))?;
        let framing = if record.aligned { Framing::Align { face: Some(record.face) } } else { Framing::AsIs };
        frame_photo(&self.store.path(Kind::Photo, id, "upload"), framing, detector)
            .map_err(|e| Error::Input(format!("photo {:?}: {e}", record.name)))
    }

    /// Draws and stores the preview image of the identity after `step` steps.
    fn preview(&self, sd: &StableDiffusion, request: &GenerateRequest, identity: Identity, step: usize) -> Result<()> {
        self.phase(&format!("drawing the preview of step {step}"));
        let identities = [identity];
        let Some(generated) = generate_unless_stopped(sd, request, &identities, self.stop, &mut |_, _| {})? else {
            return Ok(());
        };
        let id = new_id();
        self.write_image(&self.store.path(Kind::Preview, &id, "png"), &generated)?;
        let record = PreviewRecord {
            id: id.clone(),
            created: now(),
            job: self.id.to_string(),
            step,
            prompt: request.prompt.clone(),
            seed: request.seed,
        };
        self.store.put(Kind::Preview, &id, &record)?;
        self.jobs.update(self.id, |view| {
            view.previews.push(id);
            view.phase = "learning".into();
        });
        Ok(())
    }

    fn write_image(&self, path: &Path, generated: &Generated) -> Result<()> {
        let rgb = to_rgb_images(&generated.image)?.remove(0);
        write_png(path, &rgb, &generated.settings)
    }

    /// Generates the job's images one by one, storing each as it comes.
    fn generate(&self, mut job: GenerateJob, loaded: &mut Loaded) -> Result<()> {
        let (names, identities) = load_identities(self.store, &job.identities)?;
        let pose = job.pose.as_deref().map(|id| pose_image(self.store, id)).transpose()?;
        self.phase("loading the models");
        let controlnet = match pose {
            Some(_) => Some(loaded.controlnet(self.models)?),
            None => None,
        };
        let sd = loaded.sd(self.models)?;
        self.warn(other_encoder_warnings(sd, &identities, sd.model_name())?);
        let mut request = job.request(sd.configs(), pose.as_ref())?;
        if let (Some(image), Some((controlnet, name))) = (&pose, controlnet) {
            let mut control = Control::new(controlnet, &name, image, request.width, request.height)?;
            control.scale = job.control_scale;
            request.controls.push(control);
        }
        let first_seed = request.seed;
        let (count, steps) = (job.num_images, request.steps);
        self.jobs.phase(self.id, "image 1", 0, count * steps);
        for i in 0..count {
            request.seed = first_seed + i as u64;
            self.phase(&format!("image {} of {count}", i + 1));
            let done_before = i * steps;
            let on_step = &mut |done: usize, _total: usize| self.jobs.step(self.id, done_before + done);
            let Some(generated) = generate_unless_stopped(sd, &request, &identities, self.stop, on_step)? else {
                return Ok(());
            };
            let id = new_id();
            self.write_image(&self.store.path(Kind::Gallery, &id, "png"), &generated)?;
            job.seed = Some(request.seed);
            job.num_images = 1;
            self.add_to_gallery(id, MediaKind::Image, MediaJob::Image(job.clone()), &names, &generated.settings)?;
        }
        Ok(())
    }

    /// Makes the job's video as `stableid video` does, an MP4.
    fn video(&self, mut job: VideoJob, loaded: &mut Loaded) -> Result<()> {
        let (names, identities) = load_identities(self.store, &job.identities)?;
        self.phase("loading the video model");
        let model = loaded.video(self.models)?;
        check_identity_widths(&identities, model.configs().text_encoder.hidden_size, model.model_name())?;
        self.warn(other_encoder_warnings(model, &identities, model.model_name())?);
        let request = job.request(model.configs())?;
        self.jobs.phase(self.id, "denoising the frames", 0, request.steps);
        let on_step = &mut |done: usize, _total: usize| self.jobs.step(self.id, done);
        let Some(video) = generate_video_unless_stopped(model, &request, &identities, self.stop, on_step)? else {
            return Ok(());
        };
        self.phase("encoding the video");
        let frames = to_rgb_images(&video.frames)?;
        let id = new_id();
        write_video(&self.store.path(Kind::Gallery, &id, "mp4"), &frames, job.fps, VideoFormat::Mp4, &[])?;
        let mut settings = video.settings;
        settings.push(("fps", job.fps.to_string()));
        self.add_to_gallery(id, MediaKind::Video, MediaJob::Video(job), &names, &settings)
    }

    /// Trains a 3D head as `stableid 3d` does, with previews of its front view; stores the PLY,
    /// the turntable video and the front view when finished.
    fn three_d(&self, job: Text3dJob, loaded: &mut Loaded) -> Result<()> {
        let settings = job.settings()?;
        let (names, identities) = load_identities(self.store, &job.identities)?;
        self.phase("loading the models");
        let sd = loaded.sd(self.models)?;
        let mut warnings = other_encoder_warnings(sd, &identities, sd.model_name())?;
        if !identities.is_empty() && sd.prompt_ids(&job.prompt)?.identities_used == 0 {
            warnings.push("identities are ticked but the prompt has no v1* v2*: they are not used".into());
        }
        self.warn(warnings);
        let start = Start::Cloud(head_cloud(job.points, job.seed, &Device::Cpu)?);
        let checkpoint = self.store.work_dir().join(format!("{}.3d.ckpt.safetensors", self.id));
        let run =
            Text3dRun { sd, identities: &identities, settings, checkpoint: checkpoint.clone(), checkpoint_every: 0 };
        let preview_camera = turntable(1, job.size)?.remove(0);
        self.jobs.phase(self.id, "training the Gaussians", 0, job.iterations);
        let outcome = run.run(start, self.stop, &mut |report, gaussians| {
            self.jobs.step(self.id, report.iteration);
            if job.preview_every > 0 && report.iteration % job.preview_every == 0 {
                self.preview_3d(&view_image(gaussians, &preview_camera)?, &job, report.iteration)?;
            }
            Ok(())
        });
        let _ = std::fs::remove_file(&checkpoint);
        let gaussians = match outcome? {
            Text3dOutcome::Finished(gaussians) => gaussians,
            Text3dOutcome::Interrupted { .. } => return Ok(()),
        };

        let cameras = turntable(job.turntable_views, job.size)?;
        self.jobs.phase(self.id, "rendering the turntable", 0, cameras.len());
        let mut frames = Vec::with_capacity(cameras.len());
        for camera in &cameras {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            frames.push(view_image(&gaussians, camera)?);
            self.jobs.step(self.id, frames.len());
        }
        let id = new_id();
        let start = format!("head ellipsoid of {} Gaussians", job.points);
        let metadata = run.settings.ply_metadata(sd.model_name(), &identities, &start);
        write_ply(&self.store.path(Kind::Gallery, &id, "ply"), &gaussians, &metadata)?;
        write_video(&self.store.path(Kind::Gallery, &id, "mp4"), &frames, job.fps, VideoFormat::Mp4, &[])?;
        write_png(&self.store.path(Kind::Gallery, &id, "png"), &frames[0], &metadata)?;
        let mut settings = metadata;
        settings.push(("gaussians", gaussians.len()?.to_string()));
        settings.push(("turntable", format!("{} views at {} fps", job.turntable_views, job.fps)));
        self.add_to_gallery(id, MediaKind::ThreeD, MediaJob::ThreeD(job), &names, &settings)
    }

    /// Stores a preview of the 3D head after `iteration`.
    fn preview_3d(&self, image: &RgbImage, job: &Text3dJob, iteration: usize) -> Result<()> {
        let id = new_id();
        write_png(&self.store.path(Kind::Preview, &id, "png"), image, &[("iteration", iteration.to_string())])?;
        let record = PreviewRecord {
            id: id.clone(),
            created: now(),
            job: self.id.to_string(),
            step: iteration,
            prompt: job.prompt.clone(),
            seed: job.seed,
        };
        self.store.put(Kind::Preview, &id, &record)?;
        self.jobs.update(self.id, |view| view.previews.push(id));
        Ok(())
    }
}
