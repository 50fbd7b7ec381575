//! `learn`: one photo (or a few of the same person) in, an identity out. Prepares the frozen
//! priors of each photo (face feature, masks), draws every step's photo, augmented sample,
//! caption, timestep and noise, runs the training loop with checkpoints, and lands the final
//! identity from the photos' mean feature.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::identity::augment::{augment, AugmentConfig, TrainingPhoto};
use crate::identity::checkpoint::Checkpoint;
use crate::identity::loss::LossConfig;
use crate::identity::mlp::{IdentityMlp, MlpShape};
use crate::identity::optim::AdamWConfig;
use crate::identity::step::{on_training_stack, Basis, FrozenModels, Learner, StepInputs, StepReport};
use crate::identity::templates::{caption, TEMPLATES};
use crate::identity::train_loop::{train, Outcome, StepSource, TrainOptions};
use crate::identity::{token_table_digest, Identity, TOKEN_TABLE_KEY};
use crate::models::stable_diffusion::StableDiffusion;
use crate::priors::face_feature::FaceEncoder;
use crate::priors::masks::FaceParser;
use crate::priors::photo::Photo;
use crate::random::standard_normal;
use crate::tokenizer::placeholder_token;
use crate::{Error, Result};

/// Everything that shapes a learning run; defaults are the paper's.
#[derive(Debug, Clone)]
pub struct LearnSettings {
    pub steps: usize,
    pub seed: u64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub loss: LossConfig,
    pub augment: AugmentConfig,
    /// Checkpoint every this many steps.
    pub save_every: Option<usize>,
}

impl Default for LearnSettings {
    fn default() -> Self {
        Self {
            steps: 450,
            seed: 42,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            loss: LossConfig::default(),
            augment: AugmentConfig::default(),
            save_every: Some(50),
        }
    }
}

impl LearnSettings {
    /// Checks every setting before anything is loaded or run; names the field and its value.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::setting("steps", 0, "must be at least 1"));
        }
        let positive = |name: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(Error::setting(name, value, "must be a positive number"))
            }
        };
        positive("lr", self.adamw.lr)?;
        positive("max_grad_norm", self.max_grad_norm)?;
        if !(self.loss.hair_weight.is_finite() && self.loss.hair_weight >= 0.0) {
            return Err(Error::setting("hair_weight", self.loss.hair_weight, "must be a number of at least 0"));
        }
        Ok(())
    }
}

/// The photo with its frozen priors: the training image and masks, and the face feature of the
/// photo and of its mirror image (the learner flips the ViT input with the image).
pub struct PreparedPhoto {
    pub training: TrainingPhoto,
    pub feature: Tensor,
    pub feature_flipped: Tensor,
    pub sha256: String,
    /// Share of face and hair pixels, for the user to see what the learner focuses on.
    pub face_fraction: f64,
    pub hair_fraction: f64,
}

impl PreparedPhoto {
    /// Runs the face encoder and the face parser on `photo`; fails when no face is found.
    pub fn new(photo: &Photo, encoder: &FaceEncoder, parser: &FaceParser, device: &Device) -> Result<Self> {
        let masks = parser.masks(photo.rgb().as_raw())?;
        let plane = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let (width, height) = photo.rgb().dimensions();
        let training = TrainingPhoto::new(
            height as usize,
            width as usize,
            photo.rgb().as_raw().clone(),
            plane(&masks.face)?,
            plane(&masks.hair)?,
        )?;
        let feature = encoder.feature(photo, false)?.unsqueeze(0)?.to_device(device)?;
        let feature_flipped = encoder.feature(photo, true)?.unsqueeze(0)?.to_device(device)?;
        Ok(Self {
            training,
            feature,
            feature_flipped,
            sha256: photo.sha256().to_string(),
            face_fraction: masks.face_fraction()?,
            hair_fraction: masks.hair_fraction()?,
        })
    }
}

/// Draws one step: with several photos, which one; then an augmented sample, a caption, a
/// timestep and the two noises, in this order.
struct AugmentedSteps<'a> {
    sd: &'a StableDiffusion,
    photos: &'a [PreparedPhoto],
    /// The MLP's input: the photos' mean feature, of the mirrored photos for flipped samples.
    feature: MeanFeatures,
    augment: AugmentConfig,
    subject: String,
}

/// The mean face feature (1, 768) of the photos, and of their mirror images.
struct MeanFeatures {
    feature: Tensor,
    flipped: Tensor,
}

impl MeanFeatures {
    fn of(photos: &[PreparedPhoto]) -> Result<Self> {
        let mean = |feature: fn(&PreparedPhoto) -> &Tensor| -> Result<Tensor> {
            match photos {
                [] => Err(Error::setting("photos", 0, "at least one photo is needed")),
                // One photo: its feature itself (the reference's case, bit for bit).
                [photo] => Ok(feature(photo).clone()),
                _ => Ok(Tensor::cat(&photos.iter().map(feature).collect::<Vec<_>>(), 0)?.mean_keepdim(0)?),
            }
        };
        Ok(Self { feature: mean(|p| &p.feature)?, flipped: mean(|p| &p.feature_flipped)? })
    }
}

impl StepSource for AugmentedSteps<'_> {
    fn draw(&self, rng: &mut StdRng) -> Result<StepInputs> {
        let device = self.sd.device();
        // With one photo nothing is drawn for it, so that the draws stay the reference's.
        let photo = match self.photos {
            [photo] => photo,
            photos => &photos[rng.random_range(0..photos.len())],
        };
        let sample = augment(&photo.training, &self.augment, rng, device)?;
        let caption = caption(rng.random_range(0..TEMPLATES.len()), &self.subject);
        let timestep = rng.random_range(0..self.sd.scheduler_config().num_train_timesteps);
        let (_, _, height, width) = sample.face_mask.dims4()?;
        let latent_shape = (1, self.sd.unet().config().in_channels, height, width);
        let noise = standard_normal(latent_shape, rng, device)?;
        let posterior_noise = standard_normal(latent_shape, rng, device)?;
        let feature = if sample.flipped { &self.feature.flipped } else { &self.feature.feature };
        Ok(StepInputs {
            feature: feature.clone(),
            image: sample.image,
            face_mask: sample.face_mask,
            hair_mask: sample.hair_mask,
            caption_ids: self.sd.prompt_ids(&caption)?.ids,
            timestep,
            noise,
            posterior_noise,
        })
    }
}

/// Where a run keeps its state and what it is tied to.
pub struct LearnRun<'a> {
    pub sd: &'a StableDiffusion,
    /// One photo or several of the same person: each step learns from one of them.
    pub photos: &'a [PreparedPhoto],
    pub basis: Basis,
    pub settings: LearnSettings,
    pub checkpoint: PathBuf,
    /// Continue from `checkpoint` if it exists (refusing one made with other settings).
    pub resume: bool,
    /// Metadata recorded in the identity file (face encoder, face parser, celebrity names, ...).
    pub provenance: HashMap<String, String>,
}

/// How a run ended: a finished identity, or a stop on request with its checkpoint.
pub enum LearnOutcome {
    Finished(Identity),
    Interrupted { step: usize, checkpoint: PathBuf },
}

impl LearnRun<'_> {
    /// The settings a checkpoint must share to be resumed (not the step count: a run can be extended).
    pub fn fingerprint(&self) -> Result<Value> {
        let s = &self.settings;
        Ok(json!({
            "model": self.sd.model_name(),
            "text_encoder_sha256": crate::priors::celeb_basis::text_encoder_fingerprint(self.sd.text_encoder_file())?,
            "photo_sha256": self.photos.iter().map(|p| p.sha256.as_str()).collect::<Vec<_>>().join(","),
            "seed": s.seed,
            "lr": s.adamw.lr,
            "betas": [s.adamw.beta1, s.adamw.beta2],
            "eps": s.adamw.eps,
            "weight_decay": s.adamw.weight_decay,
            "max_grad_norm": s.max_grad_norm,
            "loss": s.loss.kind.to_string(),
            "phase_threshold": s.loss.phase_threshold,
            "hair_weight": s.loss.hair_weight,
            "augment": format!("{:?}", s.augment),
            "provenance": self.provenance,
        }))
    }

    /// The checkpoint this run continues from: none unless `resume` is set and the file exists;
    /// an error when it was made with other settings or is past `steps`.
    pub fn resumable_checkpoint(&self, fingerprint: &Value) -> Result<Option<Checkpoint>> {
        if !(self.resume && self.checkpoint.exists()) {
            return Ok(None);
        }
        let checkpoint = Checkpoint::load(&self.checkpoint)?;
        checkpoint.check_compatible(fingerprint, &self.checkpoint)?;
        if checkpoint.step > self.settings.steps {
            return Err(Error::setting(
                "steps",
                self.settings.steps,
                format!("checkpoint {} is already at step {}", self.checkpoint.display(), checkpoint.step),
            ));
        }
        Ok(Some(checkpoint))
    }

    /// Learns the identity; `on_step(done, total, report)` after every step; `stop` ends the run
    /// early with a checkpoint. Runs on a thread of its own with a big enough stack
    /// ([`on_training_stack`]).
    pub fn run(
        &self,
        stop: &AtomicBool,
        on_step: &mut (dyn FnMut(usize, usize, &StepReport) + Send),
    ) -> Result<LearnOutcome> {
        self.run_with_previews(stop, None, on_step, &mut |_, _| {})
    }

    /// [`LearnRun::run`], handing the identity as learned so far to `on_preview(done, identity)`
    /// after every `preview_every` steps (on the learning thread, which waits for it: e.g. to
    /// generate a sample image with it). Previews change nothing of the run.
    pub fn run_with_previews(
        &self,
        stop: &AtomicBool,
        preview_every: Option<usize>,
        on_step: &mut (dyn FnMut(usize, usize, &StepReport) + Send),
        on_preview: &mut (dyn FnMut(usize, Identity) + Send),
    ) -> Result<LearnOutcome> {
        on_training_stack("learner", || self.run_here(stop, preview_every, on_step, on_preview))?
    }

    fn run_here(
        &self,
        stop: &AtomicBool,
        preview_every: Option<usize>,
        on_step: &mut (dyn FnMut(usize, usize, &StepReport) + Send),
        on_preview: &mut (dyn FnMut(usize, Identity) + Send),
    ) -> Result<LearnOutcome> {
        let s = &self.settings;
        s.validate()?;
        let fingerprint = self.fingerprint()?;
        let features = MeanFeatures::of(self.photos)?;
        let shape = MlpShape { feature_dim: features.feature.dim(1)?, token_dim: self.sd.text_width() };
        let mut init_rng = StdRng::seed_from_u64(s.seed);
        let mlp = IdentityMlp::new(shape, &mut init_rng, self.sd.device())?;
        let models = FrozenModels::of(self.sd)?;
        let mut learner = Learner::new(models, self.basis.clone(), mlp, s.adamw, s.loss, s.max_grad_norm)?;

        let mut start = 0;
        if let Some(checkpoint) = self.resumable_checkpoint(&fingerprint)? {
            checkpoint.restore(&mut learner)?;
            start = checkpoint.step;
        }

        let final_feature = features.feature.clone();
        let source = AugmentedSteps {
            sd: self.sd,
            photos: self.photos,
            feature: features,
            augment: s.augment.clone(),
            subject: format!("{} {}", placeholder_token(0), placeholder_token(1)),
        };
        let options = TrainOptions {
            steps: s.steps,
            seed: s.seed,
            save_every: s.save_every,
            checkpoint: self.checkpoint.clone(),
            fingerprint,
        };
        let total = s.steps;
        let mut preview_error = None;
        let outcome = train(&mut learner, &source, &options, start, stop, &mut |done, report, learner| {
            on_step(done, total, report);
            if preview_every.is_some_and(|every| every > 0 && done % every == 0) && preview_error.is_none() {
                match self.identity_of(learner, &final_feature, &options.fingerprint, done) {
                    Ok(identity) => on_preview(done, identity),
                    Err(e) => preview_error = Some(e),
                }
            }
        })?;
        if let Some(error) = preview_error {
            return Err(error);
        }
        match outcome {
            Outcome::Interrupted { step } => {
                Ok(LearnOutcome::Interrupted { step, checkpoint: self.checkpoint.clone() })
            }
            Outcome::Finished => {
                Ok(LearnOutcome::Finished(self.identity_of(&learner, &final_feature, &options.fingerprint, total)?))
            }
        }
    }

    /// The identity `learner` gives for `feature` after `steps` steps, with its metadata.
    fn identity_of(&self, learner: &Learner, feature: &Tensor, fingerprint: &Value, steps: usize) -> Result<Identity> {
        let embeddings = learner.identity(feature)?.squeeze(0)?.to_device(&Device::Cpu)?;
        let mut metadata = self.metadata(fingerprint, steps);
        let table = token_table_digest(self.sd.text_encoder().token_embedding())?;
        metadata.insert(TOKEN_TABLE_KEY.to_string(), table);
        Ok(Identity { embeddings, source: PathBuf::new(), metadata })
    }

    /// What the identity file records about how it was made, after `steps` steps.
    fn metadata(&self, fingerprint: &Value, steps: usize) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = self.provenance.clone();
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
        for key in
            ["model", "text_encoder_sha256", "photo_sha256", "seed", "lr", "loss", "phase_threshold", "hair_weight"]
        {
            m.insert(key.to_string(), text(&fingerprint[key]));
        }
        m.insert("steps".into(), steps.to_string());
        m.insert("tool_version".into(), env!("CARGO_PKG_VERSION").to_string());
        m
    }
}
