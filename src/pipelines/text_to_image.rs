//! Text-to-image with Stable Diffusion, as diffusers' `StableDiffusionPipeline` does it, with
//! identity placeholders: in a prompt, `v1* v2*` stand for the first identity, `v3* v4*` for the
//! second, and so on ([`encode_prompt`](crate::pipelines::encode_prompt)); ControlNets steer it
//! when the request has [`controls`](GenerateRequest::controls) ([`crate::pipelines::control`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::identity::Identity;
use crate::io::{read_safetensors, RgbImage, TensorFile, SMALL_FILE_LIMIT};
use crate::models::stable_diffusion::{SdConfigs, StableDiffusion};
use crate::pipelines::control::{Control, ControlInputs};
use crate::pipelines::{gaussian_noise, guidance_context, guide};
use crate::schedulers::Sampler;
use crate::{Error, Result};

/// The longest prompt (and negative prompt) taken, in characters: the text encoder reads only
/// the first 75 tokens of a prompt, a few hundred characters.
pub const MAX_PROMPT_CHARS: usize = 10_000;

/// What to generate. Defaults are the paper's sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (one UNet pass per step).
    pub guidance: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub sampler: Sampler,
    /// Starting noise (1, 4, height/8, width/8) instead of drawing it from `seed`, e.g. to replay
    /// a reference implementation's run.
    pub initial_latents: Option<Tensor>,
    /// ControlNets steering the image, their residuals summed (none: plain text-to-image).
    pub controls: Vec<Control>,
    /// ControlNet guess mode: with guidance the ControlNets see only the conditional half, and
    /// their residuals grow from 0.1x (shallow) to 1x (deep).
    pub guess_mode: bool,
}

impl GenerateRequest {
    pub fn new(prompt: &str, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 50,
            guidance: 8.5,
            seed: 42,
            width,
            height,
            sampler: Sampler::DpmSolverPlusPlus,
            initial_latents: None,
            controls: Vec::new(),
            guess_mode: false,
        }
    }

    /// Checks every setting against the model's configs, before anything is loaded or run.
    pub fn validate(&self, configs: &SdConfigs) -> Result<()> {
        for (name, prompt) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            let chars = prompt.chars().count();
            if chars > MAX_PROMPT_CHARS {
                let start: String = prompt.chars().take(20).collect();
                return Err(Error::setting(
                    name,
                    format!("{start:?}... ({chars} characters)"),
                    format!(
                        "longer than {MAX_PROMPT_CHARS} characters, while the text encoder reads only its first {} \
                         tokens (a few hundred characters): shorten it",
                        configs.text_encoder.max_position_embeddings.saturating_sub(2)
                    ),
                ));
            }
        }
        let factor = configs.latent_factor();
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || !value.is_multiple_of(factor) {
                return Err(Error::setting(name, value, format!("must be a positive multiple of {factor}")));
            }
        }
        if let Err(problem) = configs.check_image_size(self.width, self.height) {
            let (name, value) = if self.width >= self.height { ("width", self.width) } else { ("height", self.height) };
            return Err(Error::setting(name, value, problem));
        }
        if self.steps == 0 {
            return Err(Error::setting("steps", 0, "must be at least 1"));
        }
        if !self.guidance.is_finite() {
            return Err(Error::setting("guidance", self.guidance, "must be a finite number"));
        }
        if let Some(latents) = &self.initial_latents {
            let (b, c, h, w) = configs.latent_shape(self.width, self.height);
            if latents.dims() != [b, c, h, w] {
                return Err(Error::setting(
                    "initial_latents",
                    format!("{:?}", latents.dims()),
                    format!("{}x{} needs latents of shape {:?}", self.width, self.height, (b, c, h, w)),
                ));
            }
        }
        for control in &self.controls {
            control.validate(self.width, self.height)?;
        }
        Ok(())
    }

    /// The settings, as (key, value) text: enough to make the image again with `identities`.
    pub fn settings(&self, model: &str, identities: &[Identity]) -> Vec<(&'static str, String)> {
        let mut settings = vec![
            ("prompt", self.prompt.clone()),
            ("negative_prompt", self.negative_prompt.clone()),
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("guidance", self.guidance.to_string()),
            ("sampler", self.sampler.to_string()),
            ("size", format!("{}x{}", self.width, self.height)),
            ("model", model.to_string()),
            ("Software", format!("stableid {}", env!("CARGO_PKG_VERSION"))),
        ];
        for identity in identities {
            settings.push(("identity", identity.source.display().to_string()));
        }
        for control in &self.controls {
            settings.extend(control.settings());
        }
        if self.guess_mode && !self.controls.is_empty() {
            settings.push(("guess_mode", "true".into()));
        }
        settings
    }
}

/// An image and the settings that made it (prompt, seed, sampler, size, model, identities):
/// enough to make it again; written into the PNG's text chunks.
pub struct Generated {
    /// (1, 3, H, W) in [0, 1], f32.
    pub image: Tensor,
    pub settings: Vec<(&'static str, String)>,
}

/// Text-to-image: encodes the prompts (identities filled in), runs the denoising loop with
/// classifier-free guidance (and the ControlNets of the request) and decodes. `on_step(done, total)` is called after every
/// denoising step.
pub fn generate(
    sd: &StableDiffusion,
    request: &GenerateRequest,
    identities: &[Identity],
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Generated> {
    // 1. Check the request against the model.
    request.validate(sd.configs())?;
    let device = sd.device();

    // 2. Encode the prompts; the negative prompt is the unconditional branch of guidance.
    let guided = request.guidance > 1.0;
    let context = guidance_context(sd, &request.prompt, &request.negative_prompt, identities, guided)?;

    // 3. The starting noise.
    let latent_shape = sd.configs().latent_shape(request.width, request.height);
    let noise = match &request.initial_latents {
        Some(latents) => latents.to_device(device)?.to_dtype(DType::F32)?,
        None => gaussian_noise(latent_shape, request.seed, device)?,
    };

    // 4. Denoise.
    let mut scheduler = request.sampler.build(sd.scheduler_config(), request.steps)?;
    // Latents stay f32 through the scheduler; only the UNet runs in the model dtype.
    let mut latents = (noise * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    // What the UNet sees: Euler's timesteps are fractional in diffusers.
    let unet_timesteps = scheduler.unet_timesteps();
    let controls = ControlInputs::new(&request.controls, request.guess_mode, guided, device, sd.dtype())?;
    for (i, &t) in timesteps.iter().enumerate() {
        let model_input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let model_input = scheduler.scale_model_input(&model_input, t)?.to_dtype(sd.dtype())?;
        let batch = model_input.dim(0)?;
        let t_batch = Tensor::full(unet_timesteps[i] as f32, batch, device)?;
        let residuals = controls.residuals(i, timesteps.len(), &model_input, &t_batch, &context)?;
        let noise_pred = sd
            .unet()
            .forward_with_additional_residuals(&model_input, &t_batch, &context, residuals.as_ref())?
            .to_dtype(DType::F32)?;
        let noise_pred = guide(noise_pred, guided, request.guidance)?;
        latents = scheduler.step(&noise_pred, t, &latents)?;
        on_step(i + 1, timesteps.len());
    }

    // 5. Decode.
    let scaled = (latents / sd.vae().config().scaling_factor)?.to_dtype(sd.dtype())?;
    let image = sd.vae().decode(&scaled)?.to_dtype(DType::F32)?;
    let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(Generated { image, settings: request.settings(sd.model_name(), identities) })
}

/// Reads starting latents for [`GenerateRequest::initial_latents`] from a safetensors file of at
/// most 16 MiB: its tensor `latents`, or its only tensor, as f32 on the CPU.
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let bad = |msg: String| Error::Input(format!("initial latents {}: {msg}", path.display()));
    let TensorFile { tensors, .. } = read_safetensors(path, SMALL_FILE_LIMIT).map_err(|e| bad(e.to_string()))?;
    let latents = tensors.get("latents").or_else(|| tensors.values().next().filter(|_| tensors.len() == 1));
    let latents = latents.ok_or_else(|| bad("expected one tensor named `latents`".into()))?;
    Ok(latents.to_dtype(DType::F32)?)
}

/// Converts images (batch, 3, H, W) in [0, 1] to 8-bit RGB, rounding as diffusers does.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, _, height, width) = images.dims4()?;
    let bytes = (images.to_device(&Device::Cpu)?.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::U8)?;
    (0..batch)
        .map(|i| {
            Ok(RgbImage {
                width: width as u32,
                height: height as u32,
                pixels: bytes.get(i)?.flatten_all()?.to_vec1::<u8>()?,
            })
        })
        .collect()
}
