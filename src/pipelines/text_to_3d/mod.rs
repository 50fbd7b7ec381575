//! Text-to-3D with identities in the prompt, as LucidDreamer trains a head for StableIdentity
//! (`train.py::training` with `configs/stableid.yaml`): 3D Gaussians rendered from random head
//! cameras, four views per iteration, guided by Interval Score Matching
//! ([`crate::pipelines::ism`]) through the VAE encoder, plus total-variation and scale losses;
//! 3DGS's optimiser, densification, pruning and opacity reset with LucidDreamer's numbers.
//!
//! Every random draw of iteration `i` comes from `(seed, i)` alone, and a checkpoint holds the
//! Gaussians, Adam's moments, the densification statistics and the cameras left in the current
//! batch, so a resumed run continues exactly as an uninterrupted one.
//!
//! Deviations from LucidDreamer: the Adam step of a densification iteration is taken before
//! densifying (LucidDreamer densifies first, which drops that step's gradients); the start is a
//! head-shaped ellipsoid or a given PLY, not Point-E (see [`head_cloud`]).

pub mod cameras;
mod checkpoint;
pub mod views;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use serde_json::{json, Value};

use crate::identity::train_loop::step_rng;
use crate::identity::Identity;
use crate::models::stable_diffusion::StableDiffusion;
use crate::pipelines::ism::{IsmGuidance, IsmOptions};
use crate::splats::{init, Densifier, DensifyOptions, ExponentialSchedule, Gaussians, LearningRates, SplatAdam};
use crate::{Error, Result};

pub use cameras::{turntable, CameraRanges, TrainingView};
pub use checkpoint::Text3dCheckpoint;
pub use views::view_image;
use views::{draw_background, render_training_view, total_variation};

/// LucidDreamer's scene extent (`default_radius`): it scales the position learning rate and the
/// densification sizes.
pub const SCENE_EXTENT: f64 = 3.5;

/// Gaussians in the head-shaped start ([`head_cloud`]): as many as LucidDreamer's Point-E start.
pub const DEFAULT_POINTS: usize = 81_920;

/// A preview (the front view) every this many iterations.
pub const DEFAULT_PREVIEW_EVERY: usize = 100;

/// The views of the finished head's turntable video, and its frame rate: LucidDreamer's video
/// cameras (120 around the head) at 30 frames per second.
pub const DEFAULT_TURNTABLE_VIEWS: usize = 120;
pub const DEFAULT_TURNTABLE_FPS: u32 = 30;

/// Everything that shapes a text-to-3D run; [`Text3dSettings::new`] gives StableIdentity's
/// `configs/stableid.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Text3dSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub iterations: usize,
    /// Render and image size (square, a multiple of 8).
    pub size: usize,
    /// Views rendered per iteration (`C_batch_size`).
    pub views_per_iteration: usize,
    pub seed: u64,
    pub ism: IsmOptions,
    pub cameras: CameraRanges,
    /// The camera ranges widen at every multiple of `widen_every` from `widen_from` on.
    pub widen_from: usize,
    pub widen_every: usize,
    /// Probability that the disparity maps are encoded instead of the colours.
    pub as_latent_ratio: f64,
    /// Probability of a random or black background instead of white.
    pub background_augment: f64,
    pub tv_weight: f64,
    pub scale_weight: f64,
    pub rates: LearningRates,
    pub densify: DensifyOptions,
    pub densify_from: usize,
    pub densify_until: usize,
    pub densify_every: usize,
    pub opacity_reset_every: usize,
}

/// StableIdentity's negative prompt for 3D (`configs/stableid.yaml`).
pub const DEFAULT_NEGATIVE_PROMPT: &str =
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, oversaturation.";

impl Text3dSettings {
    /// `configs/stableid.yaml`: 5000 iterations of 4 views at 512, ISM with Perp-Neg, the head
    /// cameras, LucidDreamer's learning rates (over `iterations`), densification from 100 to
    /// 3000 every 100 at 0.00075, opacity reset every 300, pruning below 0.005.
    pub fn new(prompt: &str) -> Self {
        const ITERATIONS: usize = 5000;
        Self {
            prompt: prompt.to_string(),
            negative_prompt: DEFAULT_NEGATIVE_PROMPT.to_string(),
            iterations: ITERATIONS,
            size: 512,
            views_per_iteration: 4,
            seed: 0,
            ism: IsmOptions::default(),
            cameras: CameraRanges::default(),
            widen_from: 500,
            widen_every: 500,
            as_latent_ratio: 0.2,
            background_augment: 0.66,
            tv_weight: 1.0,
            scale_weight: 1.0,
            rates: lucid_dreamer_rates(ITERATIONS),
            densify: DensifyOptions {
                extent: SCENE_EXTENT,
                grad_threshold: 0.00075,
                percent_dense: 0.003,
                min_opacity: 0.005,
                max_screen_size: None,
            },
            densify_from: 100,
            densify_until: 3000,
            densify_every: 100,
            opacity_reset_every: 300,
        }
    }

    /// The settings with `iterations`, the learning-rate schedules stretched to match (as
    /// LucidDreamer's `max_steps = iterations`).
    pub fn with_iterations(mut self, iterations: usize) -> Self {
        self.iterations = iterations;
        self.rates = lucid_dreamer_rates(iterations);
        self
    }

    pub fn validate(&self) -> Result<()> {
        if self.size == 0 || !self.size.is_multiple_of(8) {
            return Err(Error::setting("size", self.size, "the image size must be a positive multiple of 8"));
        }
        if self.iterations == 0 {
            return Err(Error::setting("iterations", 0, "train at least one iteration"));
        }
        if self.views_per_iteration == 0 {
            return Err(Error::setting("views_per_iteration", 0, "render at least one view per iteration"));
        }
        Ok(())
    }

    /// The PLY header's metadata of a finished run on `model_name` with `identities`, which began
    /// from `start` (in words).
    pub fn ply_metadata(&self, model_name: &str, identities: &[Identity], start: &str) -> Vec<(&'static str, String)> {
        let sources: Vec<String> = identities.iter().map(|i| i.source.display().to_string()).collect();
        vec![
            ("software", format!("stableid {} 3d", env!("CARGO_PKG_VERSION"))),
            ("prompt", self.prompt.clone()),
            ("negative_prompt", self.negative_prompt.clone()),
            ("identities", sources.join(", ")),
            ("model", model_name.to_string()),
            ("iterations", self.iterations.to_string()),
            ("size", self.size.to_string()),
            ("guidance", self.ism.guidance_scale.to_string()),
            ("seed", self.seed.to_string()),
            ("start", start.to_string()),
        ]
    }

    /// What a checkpoint must agree with to be resumed.
    pub fn fingerprint(&self, sd: &StableDiffusion, identities: &[Identity]) -> Value {
        json!({
            "model": sd.model_name(),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "iterations": self.iterations,
            "size": self.size,
            "views_per_iteration": self.views_per_iteration,
            "seed": self.seed,
            "ism": format!("{:?}", self.ism),
            "cameras": format!("{:?}", self.cameras),
            "identities": identities.iter().map(|i| i.source.display().to_string()).collect::<Vec<_>>(),
        })
    }
}

/// LucidDreamer's learning rates (`arguments/__init__.py`, `GaussianModel.training_setup`):
/// positions 1.6e-4 to 1.6e-6 times the extent, colours 0.005 to 0.003, opacity 0.05, scales
/// 0.005 to 0.001, rotations 0.001 to 0.0002, over `iterations`.
pub fn lucid_dreamer_rates(iterations: usize) -> LearningRates {
    let decay = |start: f64, end: f64| ExponentialSchedule { start, end, steps: iterations };
    LearningRates {
        means: decay(1.6e-4 * SCENE_EXTENT, 1.6e-6 * SCENE_EXTENT),
        log_scales: decay(0.005, 0.001),
        rotations: decay(0.001, 0.0002),
        opacity_logits: ExponentialSchedule::constant(0.05),
        sh_dc: decay(0.005, 0.003),
        sh_rest: ExponentialSchedule::constant(0.005 / 20.0),
    }
}

/// The head-shaped start used when no cloud is given: `count` Gaussians uniform in an upright
/// ellipsoid 0.76 wide, 0.9 deep and 1.0 tall around the origin (about the head of Point-E's "a man
/// head." cloud that LucidDreamer starts from, at the scale its cameras frame), near-grey, set up
/// as 3DGS sets up points. LucidDreamer's Point-E start has 81,920 Gaussians.
pub fn head_cloud(count: usize, seed: u64, device: &Device) -> Result<Gaussians> {
    init::random_ellipsoid(count, [0.0; 3], [0.38, 0.45, 0.5], seed, device)
}

/// Where a run begins.
pub enum Start {
    Cloud(Gaussians),
    Resume(Box<Text3dCheckpoint>),
}

/// What one iteration did.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationReport {
    /// 1-based, as LucidDreamer counts.
    pub iteration: usize,
    /// Norm of the ISM gradient injected at the latents.
    pub ism_grad_norm: f64,
    pub tv_loss: f64,
    pub scale_loss: f64,
    /// The ISM timesteps of this iteration: `t` and the interval's start `s`.
    pub t: usize,
    pub s: usize,
    /// Whether the disparity maps were encoded instead of the colours.
    pub as_latent: bool,
    pub gaussians: usize,
}

/// How a run ended.
pub enum Text3dOutcome {
    Finished(Gaussians),
    /// Stopped on request after `iteration`; the checkpoint holds it.
    Interrupted {
        iteration: usize,
        checkpoint: PathBuf,
    },
}

/// A text-to-3D run on loaded models.
pub struct Text3dRun<'a> {
    pub sd: &'a StableDiffusion,
    pub identities: &'a [Identity],
    pub settings: Text3dSettings,
    /// Saved every `checkpoint_every` iterations (0: only when stopped) and when stopped.
    pub checkpoint: PathBuf,
    pub checkpoint_every: usize,
}

impl Text3dRun<'_> {
    /// Trains from `start` until the last iteration or until `stop` is set; `progress` sees each
    /// iteration's report and the Gaussians after it.
    pub fn run(
        &self,
        start: Start,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(&IterationReport, &Gaussians) -> Result<()>,
    ) -> Result<Text3dOutcome> {
        let settings = &self.settings;
        settings.validate()?;
        self.sd
            .configs()
            .check_image_size(settings.size, settings.size)
            .map_err(|problem| Error::setting("size", settings.size, problem))?;
        let fingerprint = settings.fingerprint(self.sd, self.identities);
        let guidance = IsmGuidance::new(
            self.sd,
            &settings.prompt,
            &settings.negative_prompt,
            self.identities,
            settings.ism.clone(),
        )?;
        let (mut adam, mut densifier, mut stack, first) = match start {
            Start::Cloud(cloud) => {
                let cloud = cloud.to(DType::F32, &Device::Cpu)?;
                let count = cloud.len()?;
                let adam = SplatAdam::new(&cloud, settings.rates)?;
                (adam, Densifier::new(settings.densify, count, settings.seed), Vec::new(), 1)
            }
            Start::Resume(checkpoint) => {
                checkpoint.check_compatible(&fingerprint)?;
                let Text3dCheckpoint { iteration, adam, densify_statistics, stack, .. } = *checkpoint;
                let adam = SplatAdam::from_state(adam, settings.rates)?;
                let mut densifier = Densifier::new(settings.densify, 0, settings.seed);
                densifier.restore_statistics(densify_statistics)?;
                (adam, densifier, stack, iteration + 1)
            }
        };
        let mut ranges = settings.cameras.at_iteration(first - 1, settings.widen_from, settings.widen_every);
        let latent = self.sd.configs().latent_factor();
        let latent_hw = (settings.size / latent, settings.size / latent);
        let save = |adam: &SplatAdam, densifier: &Densifier, stack: &[TrainingView], iteration: usize| {
            Text3dCheckpoint::capture(adam, densifier, stack, iteration, &fingerprint)?.save(&self.checkpoint)
        };
        for iteration in first..=settings.iterations {
            if stop.load(Ordering::SeqCst) {
                save(&adam, &densifier, &stack, iteration - 1)?;
                return Ok(Text3dOutcome::Interrupted {
                    iteration: iteration - 1,
                    checkpoint: self.checkpoint.clone(),
                });
            }
            if CameraRanges::widens_at(iteration, settings.widen_from, settings.widen_every) {
                ranges.widen();
            }
            let mut rng = step_rng(settings.seed, iteration);
            let gaussians = adam.gaussians()?;
            let mut renders = Vec::with_capacity(settings.views_per_iteration);
            let mut azimuths = Vec::with_capacity(settings.views_per_iteration);
            for _ in 0..settings.views_per_iteration {
                if stack.is_empty() {
                    stack = ranges.sample(settings.size, &mut rng)?;
                }
                let view = stack.remove(rng.random_range(0..stack.len()));
                let background = draw_background(settings.background_augment, &mut rng);
                renders.push(render_training_view(&gaussians, &view.camera()?, background, &mut rng)?);
                azimuths.push(view.azimuth);
            }
            let colors = Tensor::stack(&renders.iter().map(|r| &r.color).collect::<Vec<_>>(), 0)?;
            let disparities = Tensor::stack(&renders.iter().map(|r| &r.disparity).collect::<Vec<_>>(), 0)?;
            let as_latent = rng.random::<f64>() < settings.as_latent_ratio;
            let encoded = if as_latent { disparities.repeat((1, 3, 1, 1))? } else { colors.clone() };
            let draws = guidance.draw(settings.views_per_iteration, latent_hw, iteration, &mut rng)?;
            let ism = guidance.step(&encoded.to_device(self.sd.device())?, &azimuths, &draws)?;
            let tv = (total_variation(&colors)? + total_variation(&disparities)?)?;
            let scale = Tensor::stack(
                &renders.iter().map(|r| r.scales.mean_all()).collect::<candle_core::Result<Vec<_>>>()?,
                0,
            )?
            .mean_all()?;
            let tv_value = scalar(&tv)?;
            let scale_value = scalar(&scale)?;
            if !(ism.grad_norm.is_finite() && tv_value.is_finite() && scale_value.is_finite()) {
                return Err(self.not_finite("the loss", iteration));
            }
            let loss = ((ism.loss.to_device(&Device::Cpu)?.to_dtype(DType::F32)? + (tv * settings.tv_weight)?)?
                + (scale * settings.scale_weight)?)?;
            let grads = loss.backward()?;
            adam.step(&grads)?;
            if !all_finite(&adam.gaussians()?)? {
                return Err(self.not_finite("the Gaussians", iteration));
            }
            if iteration < settings.densify_until {
                let last = renders.last().expect("at least one view");
                densifier.record(&last.render.footprints(), settings.size, settings.size)?;
                if iteration > settings.densify_from && iteration % settings.densify_every.max(1) == 0 {
                    densifier.options.max_screen_size = (iteration > settings.opacity_reset_every).then_some(20.0);
                    densifier.reseed(settings.seed ^ (iteration as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    densifier.densify_and_prune(&mut adam)?;
                }
                if iteration % settings.opacity_reset_every.max(1) == 0 {
                    adam.reset_opacity(0.01)?;
                }
            }
            let current = adam.gaussians()?;
            let report = IterationReport {
                iteration,
                ism_grad_norm: ism.grad_norm,
                tv_loss: tv_value,
                scale_loss: scale_value,
                t: ism.t,
                s: ism.s,
                as_latent,
                gaussians: current.len()?,
            };
            progress(&report, &current)?;
            if self.checkpoint_every > 0 && iteration % self.checkpoint_every == 0 && iteration < settings.iterations {
                save(&adam, &densifier, &stack, iteration)?;
            }
        }
        let gaussians = adam.gaussians()?;
        Ok(Text3dOutcome::Finished(Gaussians::from_parts(gaussians.parts().into_iter().map(|t| t.detach()).collect())?))
    }
}

impl Text3dRun<'_> {
    /// The error that stops a run whose numbers broke; the last checkpoint stays as it was.
    fn not_finite(&self, what: &str, iteration: usize) -> Error {
        Error::Numeric(format!(
            "{what} became NaN or infinite at iteration {iteration}; the last checkpoint ({}) is kept: \
             resume from it with other settings (a smaller --guidance or another --seed)",
            self.checkpoint.display()
        ))
    }
}

/// Whether every parameter of `gaussians` is finite (a NaN or an infinity makes its sum so).
fn all_finite(gaussians: &Gaussians) -> Result<bool> {
    for part in gaussians.parts() {
        if !scalar(&part.sum_all()?)?.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
