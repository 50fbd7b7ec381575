//! What the web app's jobs do, through the same library calls as the command line: photos are
//! framed as `align` and `learn` frame them ([`frame_photo`]) and their masks made as `masks` makes
//! them; learning is [`LearnRun`] with the `learn` command's settings and provenance; images are
//! [`generate_unless_stopped`] with `generate`'s defaults.
//!
//! Deviations from the command line: the photo analysis shown after an upload runs the face parser
//! on the CPU (next to a job that may hold the device); the learning run keeps no checkpoint
//! after it ends (a cancelled run is not resumed); the identity's preview images use
//! [`GenerateRequest::preview`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::identity::run::{LearnOutcome, LearnRun, LearnSettings, PreparedPhoto};
use crate::identity::step::Basis;
use crate::identity::Identity;
use crate::io::{write_png, RgbImage};
use crate::models::stable_diffusion::{SdConfigs, StableDiffusion};
use crate::pipelines::text_to_image::to_rgb_images;
use crate::pipelines::{generate_unless_stopped, GenerateRequest, Generated};
use crate::priors::align::{frame_photo, provenance_of, FaceDetector, FramedPhoto, Framing};
use crate::priors::celeb_basis::{CelebBasis, CelebNames};
use crate::priors::face_feature::{load_face_encoder, FaceEncoder};
use crate::priors::masks::FaceParser;
use crate::schedulers::Sampler;
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::{Jobs, Work};
use crate::server::store::{
    new_id, now, IdentityRecord, IdentityRef, ImageRecord, Kind, PhotoRecord, PreviewRecord, Store,
};
use crate::server::ModelChoice;
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The most images one generation job makes.
pub const MAX_IMAGES_PER_JOB: usize = 16;

/// The longest identity name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

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
    /// The library's request for the first image (identities not loaded), checked against the
    /// model's configs; fills in the seed when none was given.
    pub fn request(&mut self, configs: &SdConfigs) -> Result<GenerateRequest> {
        let sampler: Sampler = self.sampler.parse()?;
        if !(1..=MAX_IMAGES_PER_JOB).contains(&self.num_images) {
            return Err(Error::setting("num_images", self.num_images, format!("must be 1 to {MAX_IMAGES_PER_JOB}")));
        }
        let seed = *self.seed.get_or_insert_with(|| u64::from(rand::random::<u32>()));
        if seed.checked_add(self.num_images as u64).is_none() {
            return Err(Error::setting("seed", seed, "is too large for the seeds of every image (seed + i)"));
        }
        let (width, height) = configs.default_size();
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
        for id in &self.identities {
            if store.get::<IdentityRecord>(Kind::Identity, id).is_none() {
                return Err(ApiError::not_found("identity", id));
            }
        }
        let configs = SdConfigs::read(&ModelDir::resolve(&models.model, &models.hub, models.dtype)?)?;
        self.request(&configs)?;
        Ok(())
    }
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

/// The models a job needs, loaded on first use and kept for the next jobs.
#[derive(Default)]
struct Loaded {
    sd: Option<StableDiffusion>,
    learning: Option<LearningModels>,
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
                &ModelDir::resolve(&models.model, &models.hub, models.dtype)?,
                &models.device,
                models.dtype,
            )?);
        }
        Ok(self.sd.as_ref().expect("loaded above"))
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
        }
    }

    fn phase(&self, phase: &str) {
        self.jobs.update(self.id, |view| view.phase = phase.to_string());
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
        let names: Vec<IdentityRef> = job
            .identities
            .iter()
            .map(|id| {
                let record: IdentityRecord = self
                    .store
                    .get(Kind::Identity, id)
                    .ok_or_else(|| Error::Input(format!("identity {id} was deleted before the job started")))?;
                Ok(IdentityRef { id: id.clone(), name: record.name })
            })
            .collect::<Result<_>>()?;
        let identities = job
            .identities
            .iter()
            .map(|id| {
                let mut identity = Identity::load(&self.store.path(Kind::Identity, id, "safetensors"))?;
                // What the image's metadata names: the identity within the data folder.
                identity.source = PathBuf::from(format!("identities/{id}.safetensors"));
                Ok(identity)
            })
            .collect::<Result<Vec<_>>>()?;
        self.phase("loading the models");
        let sd = loaded.sd(self.models)?;
        let mut request = job.request(sd.configs())?;
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
            self.write_image(&self.store.path(Kind::Image, &id, "png"), &generated)?;
            job.seed = Some(request.seed);
            job.num_images = 1;
            let record = ImageRecord {
                id: id.clone(),
                created: now(),
                request: serde_json::to_value(&job).map_err(|e| Error::Internal(e.to_string()))?,
                identities: names.clone(),
                settings: generated.settings.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            };
            self.store.put(Kind::Image, &id, &record)?;
            self.jobs.update(self.id, |view| view.images.push(id));
            self.jobs.records_changed();
        }
        Ok(())
    }
}
