//! Text-to-video, as diffusers' `TextToVideoSDPipeline`
//! (`pipelines/text_to_video_synthesis/pipeline_text_to_video_synth.py`) does it with ModelScope
//! T2V, with identity placeholders in the prompt as for images
//! ([`encode_prompt`](crate::pipelines::encode_prompt)): StableIdentity's claim is that an identity
//! learned on SD 2.1 works unchanged in this model, whose text encoder is SD 2.1's.
//!
//! Deviation: the VAE decodes the frames a few at a time rather than all at once (the same values,
//! less memory).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

use crate::identity::Identity;
use crate::models::text_to_video::{TextToVideoModel, VideoConfigs};
use crate::pipelines::text_to_image::MAX_PROMPT_CHARS;
use crate::pipelines::{gaussian_noise, guidance_context, guide};
use crate::schedulers::Sampler;
use crate::{Error, Result};

/// Frames the VAE decodes at once: bounds the decoder's memory at a few images' worth.
const DECODE_CHUNK: usize = 4;

/// The most memory the attention scores of one UNet pass may take: the spatial self-attention of
/// the first level holds (latents x latents) scores per head and frame (16 GiB in f32).
const MAX_ATTENTION_BYTES: u128 = 16 << 30;

/// The frame rate videos are written at unless asked otherwise (ModelScope's 16 frames make two
/// seconds).
pub const DEFAULT_FPS: u32 = 8;

/// The highest frame rate taken.
pub const MAX_FPS: u32 = 120;

/// Checks a frame rate to write a video at: 1 to [`MAX_FPS`].
pub fn check_fps(fps: u32) -> Result<()> {
    if fps == 0 || fps > MAX_FPS {
        return Err(Error::setting("fps", fps, format!("is out of range: give 1 to {MAX_FPS} frames per second")));
    }
    Ok(())
}

/// What to make. Defaults are diffusers' `TextToVideoSDPipeline` ones.
#[derive(Debug, Clone)]
pub struct VideoRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    pub guidance: f64,
    pub seed: u64,
    /// `None`: the sampler of the model's own scheduler config (DDIM for ModelScope).
    pub sampler: Option<Sampler>,
    /// Starting noise (1, 4, frames, height/8, width/8) instead of drawing it from `seed`.
    pub initial_latents: Option<Tensor>,
}

impl VideoRequest {
    /// 16 frames, 50 steps, guidance 9; `width` x `height` is the model's own size (256 x 256 for
    /// ModelScope, [`VideoConfigs::default_size`]).
    pub fn new(prompt: &str, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            frames: 16,
            width,
            height,
            steps: 50,
            guidance: 9.0,
            seed: 42,
            sampler: None,
            initial_latents: None,
        }
    }

    /// The sampler that runs: the requested one, else the one the model ships with, else DDIM
    /// (what ModelScope ships).
    pub fn sampler(&self, configs: &VideoConfigs) -> Sampler {
        self.sampler
            .or_else(|| configs.scheduler.class_name.as_deref().and_then(Sampler::from_class_name))
            .unwrap_or(Sampler::Ddim)
    }

    /// The attention scores' memory (bytes) of one UNet pass: (latents)² f32 scores per head of the
    /// first level, per frame, twice with guidance.
    pub fn attention_bytes(&self, configs: &VideoConfigs) -> u128 {
        let factor = configs.latent_factor();
        let latents = (self.width / factor) as u128 * (self.height / factor) as u128;
        let head_dim = match &configs.unet.attention_head_dim {
            crate::models::unet::PerBlock::One(d) => *d,
            crate::models::unet::PerBlock::Each(d) => d.first().copied().unwrap_or(1),
        };
        let heads = (configs.unet.block_out_channels.first().copied().unwrap_or(0) / head_dim.max(1)) as u128;
        let passes = if self.guidance > 1.0 { 2 } else { 1 };
        latents * latents * 4 * heads * self.frames as u128 * passes
    }

    /// Checks every setting against the model's configs, before anything is loaded or run.
    pub fn validate(&self, configs: &VideoConfigs) -> Result<()> {
        for (name, prompt) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            let chars = prompt.chars().count();
            if chars > MAX_PROMPT_CHARS {
                return Err(Error::setting(
                    name,
                    format!("{chars} characters"),
                    format!("longer than {MAX_PROMPT_CHARS} characters: shorten it"),
                ));
            }
        }
        if self.frames == 0 {
            return Err(Error::setting("frames", 0, "must be at least 1"));
        }
        let factor = configs.latent_factor();
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || !value.is_multiple_of(factor) {
                return Err(Error::setting(name, value, format!("must be a positive multiple of {factor}")));
            }
        }
        let bytes = self.attention_bytes(configs);
        if bytes > MAX_ATTENTION_BYTES {
            return Err(Error::setting(
                "frames",
                self.frames,
                format!(
                    "at {} x {} the attention of one denoising step would hold about {} GiB (more than {} GiB): \
                     make fewer frames or smaller ones",
                    self.width,
                    self.height,
                    bytes >> 30,
                    MAX_ATTENTION_BYTES >> 30
                ),
            ));
        }
        if self.steps == 0 {
            return Err(Error::setting("steps", 0, "must be at least 1"));
        }
        if !self.guidance.is_finite() {
            return Err(Error::setting("guidance", self.guidance, "must be a finite number"));
        }
        if let Some(latents) = &self.initial_latents {
            let (b, c, f, h, w) = configs.latent_shape(self.frames, self.width, self.height);
            if latents.dims() != [b, c, f, h, w] {
                return Err(Error::setting(
                    "initial_latents",
                    format!("{:?}", latents.dims()),
                    format!(
                        "{} frames of {}x{} need latents of shape {:?}",
                        self.frames,
                        self.width,
                        self.height,
                        (b, c, f, h, w)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The settings, as (key, value) text: enough to make the video again with `identities`.
    pub fn settings(
        &self,
        model: &str,
        configs: &VideoConfigs,
        identities: &[Identity],
    ) -> Vec<(&'static str, String)> {
        let mut settings = vec![
            ("prompt", self.prompt.clone()),
            ("negative_prompt", self.negative_prompt.clone()),
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("guidance", self.guidance.to_string()),
            ("sampler", self.sampler(configs).to_string()),
            ("frames", self.frames.to_string()),
            ("size", format!("{}x{}", self.width, self.height)),
            ("model", model.to_string()),
            ("Software", format!("stableid {}", env!("CARGO_PKG_VERSION"))),
        ];
        for identity in identities {
            settings.push(("identity", identity.source.display().to_string()));
        }
        settings
    }
}

/// A video and the settings that made it.
pub struct GeneratedVideo {
    /// (frames, 3, H, W) in [0, 1], f32.
    pub frames: Tensor,
    pub settings: Vec<(&'static str, String)>,
}

/// Text-to-video: encodes the prompts (identities filled in), denoises all frames together with
/// classifier-free guidance and decodes frame by frame. `on_step(done, total)` is called after
/// every denoising step.
pub fn generate_video(
    model: &TextToVideoModel,
    request: &VideoRequest,
    identities: &[Identity],
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<GeneratedVideo> {
    let never = AtomicBool::new(false);
    Ok(generate_video_unless_stopped(model, request, identities, &never, on_step)?.expect("never stopped"))
}

/// [`generate_video`], stopping between two denoising steps once `stop` is set (a server's cancel
/// button): `Ok(None)` then.
pub fn generate_video_unless_stopped(
    model: &TextToVideoModel,
    request: &VideoRequest,
    identities: &[Identity],
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Option<GeneratedVideo>> {
    // 1. Check the request against the model.
    let configs = model.configs();
    request.validate(configs)?;
    let device = model.device();

    // 2. Encode the prompts; the negative prompt is the unconditional branch of guidance.
    let guided = request.guidance > 1.0;
    let context = guidance_context(model, &request.prompt, &request.negative_prompt, identities, guided)?;

    // 3. The starting noise.
    let noise = match &request.initial_latents {
        Some(latents) => latents.to_device(device)?.to_dtype(DType::F32)?,
        None => {
            gaussian_noise(configs.latent_shape(request.frames, request.width, request.height), request.seed, device)?
        }
    };

    // 4. Denoise; latents stay f32 through the scheduler, only the UNet runs in the model dtype.
    let mut scheduler = request.sampler(configs).build(&configs.scheduler, request.steps)?;
    let mut latents = (noise * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    let unet_timesteps = scheduler.unet_timesteps();
    for (i, &t) in timesteps.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let model_input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let model_input = scheduler.scale_model_input(&model_input, t)?.to_dtype(model.dtype())?;
        let t_batch = Tensor::full(unet_timesteps[i] as f32, model_input.dim(0)?, device)?;
        let noise_pred = model.unet().forward(&model_input, &t_batch, &context)?.to_dtype(DType::F32)?;
        let noise_pred = guide(noise_pred, guided, request.guidance)?;
        latents = scheduler.step(&noise_pred, t, &latents)?;
        on_step(i + 1, timesteps.len());
    }

    // 5. Decode frame by frame, a few at a time: (1, 4, F, h, w) -> (F, 3, H, W).
    let scaled = (latents / model.vae().config().scaling_factor)?.squeeze(0)?.permute((1, 0, 2, 3))?;
    let mut frames = Vec::new();
    for start in (0..request.frames).step_by(DECODE_CHUNK) {
        let chunk = scaled.narrow(0, start, DECODE_CHUNK.min(request.frames - start))?.to_dtype(model.dtype())?;
        frames.push(model.vae().decode(&chunk.contiguous()?)?.to_dtype(DType::F32)?);
    }
    let frames = Tensor::cat(&frames, 0)?;
    let frames = ((frames / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(Some(GeneratedVideo { frames, settings: request.settings(model.model_name(), configs, identities) }))
}
