//! `stableid bench`: the speed and memory of the real Stable Diffusion 2.1-base architecture
//! (UNet 865M parameters, 23-layer OpenCLIP-H text encoder, VAE), built with random weights so
//! that nothing has to be downloaded.
//!
//! What is timed (median of `repeats` runs after `warmup` runs), each with its peak memory:
//! - `learn`: one StableIdentity learning step ([`Learner::step`]: MLP -> AdaIN -> text encoder ->
//!   UNet -> masked two-phase loss -> backward -> clipping -> AdamW), VAE encoding of the photo
//!   included, at a timestep of the reconstruction phase (t <= 600) so that both the UNet and the
//!   `z0` reconstruction run;
//! - `denoise`: one classifier-free-guidance denoising step: the UNet on a batch of 2, guidance;
//! - `controlnet`: the same step steered by a ControlNet (diffusers' `ControlNetModel.from_unet`
//!   of the UNet, as thibaud's SD 2.1 ControlNets are): the ControlNet on a batch of 2 with the
//!   control image, then the UNet with its residuals, guidance;
//! - `vae_encode`, `vae_decode`: the VAE at the benchmark resolution;
//! - `text`: one prompt through the text encoder, identity rows included;
//! - `video` (only when asked for): one guided denoising step of ModelScope's text-to-video UNet
//!   (`UNet3DConditionModel`, 1.4B parameters, random weights) on 16 frames at the resolution;
//! - `align` (with a photo): `photo_load` (decoding, EXIF orientation), `face_detect` (MTCNN) and
//!   `face_align` (the FFHQ crop of the largest face): how `learn` frames a photo;
//! - `splat` (on request): `splat_forward`, rendering [`BenchOptions::splats`] Gaussians at the
//!   benchmark resolution from [`BenchOptions::splat_views`] cameras, and `splat`, the same
//!   renders with the backward pass of an L1 loss, on LucidDreamer's starting point (Gaussians
//!   in a ball of radius 0.5, nearest-neighbour sized, opacity 0.1, cameras at 3.5 with a 0.55
//!   rad field of view).
//!
//! `tools/bench/pytorch_bench.py` does the same work with diffusers and transformers at the same
//! configs; `tools/bench/compare.sh` runs both (docs/benchmarks.md).
//!
//! [`Learner::step`]: crate::identity::step::Learner::step

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::models::unet3d::UNet3DConditionConfig;

use crate::identity::step::on_training_stack;
use crate::models::stable_diffusion::SdConfigs;
use crate::nn::Precision;
use crate::{Error, Result};

mod measure;
mod memory;
mod report;

pub use report::{BenchReport, BuiltModels, ParameterCounts, Timing};

/// The learning step's timestep: in the reconstruction phase (t <= 600), the costlier branch.
pub const LEARN_TIMESTEP: usize = 500;
/// The paper's guidance scale.
pub const GUIDANCE_SCALE: f64 = 8.5;
/// Frames of the `video` measurement: `TextToVideoSDPipeline`'s default.
pub const VIDEO_FRAMES: usize = 16;
/// Guidance scale of the `video` measurement: `TextToVideoSDPipeline`'s default.
pub const VIDEO_GUIDANCE_SCALE: f64 = 9.0;

/// A group of measurements, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// One learning step.
    Learn,
    /// One guided denoising step.
    Denoise,
    /// One guided denoising step steered by a ControlNet.
    Controlnet,
    /// VAE encode and decode.
    Vae,
    /// Text encoding.
    Text,
    /// Reading a photo, detecting its faces and aligning the largest ([`BenchOptions::photo`]).
    Align,
    /// One guided denoising step of ModelScope's text-to-video UNet ([`VIDEO_FRAMES`] frames).
    Video,
    /// Gaussian splatting: renders, and renders with their backward pass.
    Splat,
    /// Loading Stable Diffusion from the files of [`BenchOptions::model`] in the benchmark's
    /// precision: the time, and the peak memory of loading.
    Load,
}

impl Measure {
    /// The measurements of the Stable Diffusion models, run by default.
    pub const MODELS: [Measure; 5] =
        [Measure::Learn, Measure::Denoise, Measure::Controlnet, Measure::Vae, Measure::Text];

    /// Whether it needs the Stable Diffusion models built.
    pub fn uses_models(self) -> bool {
        Self::MODELS.contains(&self)
    }
}

/// What to run, where, and how often.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Image side in pixels; latents are `resolution / 8`.
    pub resolution: usize,
    pub warmup: usize,
    pub repeats: usize,
    pub measures: Vec<Measure>,
    pub device: Device,
    /// The frozen models' precision (the MLP and the loss stay f32).
    pub precision: Precision,
    pub seed: u64,
    /// After the timed runs, one more run of each measurement with op timing on
    /// ([`crate::nn::profile`]).
    pub profile: bool,
    /// The photo [`Measure::Align`] reads (a 12-megapixel phone photo is the case that matters).
    pub photo: Option<PathBuf>,
    /// The text-to-video UNet [`Measure::Video`] builds: ModelScope's by default.
    pub video_unet: UNet3DConditionConfig,
    /// The diffusers folder [`Measure::Load`] reads.
    pub model: Option<PathBuf>,
    /// Gaussians of [`Measure::Splat`].
    pub splats: usize,
    /// Views per [`Measure::Splat`] run.
    pub splat_views: usize,
}

impl BenchOptions {
    /// Every model measurement, once warmed up, 3 repeats, on the CPU in f32.
    pub fn new(resolution: usize) -> Self {
        Self {
            resolution,
            warmup: 1,
            repeats: 3,
            measures: Measure::MODELS.to_vec(),
            device: Device::Cpu,
            precision: DType::F32.into(),
            seed: 0,
            profile: false,
            photo: None,
            video_unet: UNet3DConditionConfig::default(),
            model: None,
            splats: 100_000,
            splat_views: 4,
        }
    }

    /// Checks every option against `configs` before anything is built.
    pub fn validate(&self, configs: &SdConfigs) -> Result<()> {
        // The UNet's up blocks must meet the skip connections' sizes exactly.
        let multiple = configs.exact_size_multiple();
        if self.resolution == 0 || !self.resolution.is_multiple_of(multiple) {
            return Err(Error::setting(
                "resolution",
                self.resolution,
                format!("must be a positive multiple of {multiple} (the VAE's and the UNet's downsampling together)"),
            ));
        }
        if self.repeats == 0 {
            return Err(Error::setting("repeats", 0, "must be at least 1"));
        }
        if self.measures.is_empty() {
            return Err(Error::setting(
                "measures",
                "none",
                "nothing to measure: give at least one of learn, denoise, controlnet, vae, text, align, video, splat, load",
            ));
        }
        if self.measures.contains(&Measure::Align) && self.photo.is_none() {
            return Err(Error::setting("photo", "none", "the align measurement needs a photo with a face"));
        }
        if self.measures.contains(&Measure::Load) && self.model.is_none() {
            return Err(Error::setting("model", "none", "the load measurement needs a diffusers folder to read"));
        }
        if self.measures.contains(&Measure::Splat) && (self.splats == 0 || self.splat_views == 0) {
            return Err(Error::setting("splats", self.splats, "the splat measurement needs Gaussians and views"));
        }
        crate::nn::check_dtype(self.precision.dtype, &self.device)?;
        Ok(())
    }
}

/// Builds the models with random weights and measures `options.measures`, on a thread with a
/// stack deep enough for the learning step's backward ([`on_training_stack`]).
pub fn run(configs: &SdConfigs, options: &BenchOptions) -> Result<BenchReport> {
    options.validate(configs)?;
    on_training_stack("bench", || measure::build_and_measure(configs, options))?
}
