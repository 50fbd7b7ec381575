//! Text-to-image with Stable Diffusion, as diffusers' `StableDiffusionPipeline` does it, with
//! identity placeholders: in a prompt, `v1* v2*` stand for the first identity, `v3* v4*` for the
//! second, and so on.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

use crate::identity::learner::FrozenModels;
use crate::identity::Identity;
use crate::io::RgbImage;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::random::standard_normal;
use crate::schedulers::{Ddpm, PredictionType, Sampler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::weights::ModelDir;
use crate::{Error, Result};

/// Identities one prompt can hold; each takes two placeholder tokens.
pub const MAX_IDENTITIES: usize = 4;

/// The placeholder token for word `index` (0-based): `v1*`, `v2*`, ...
pub fn placeholder_token(index: usize) -> String {
    format!("v{}*", index + 1)
}

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
        }
    }
}

/// The frozen Stable Diffusion models, loaded once and used for any number of images.
pub struct StableDiffusion {
    model_name: String,
    tokenizer: ClipTokenizer,
    /// Token ids of `v1*`, `v2*`, ... in the tokenizer.
    placeholder_ids: Vec<u32>,
    text_encoder: ClipTextModel,
    /// The text encoder's weights file, which identities are tied to.
    text_encoder_file: PathBuf,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    /// Loads tokenizer, text encoder, UNet, VAE and scheduler config from a diffusers folder, the
    /// frozen weights in `dtype` on `device`.
    pub fn load(model: &ModelDir, device: &Device, dtype: DType) -> Result<Self> {
        let scheduler_file = model.component("scheduler")?.join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_file)?;
        let prediction = match scheduler_config.prediction_type {
            PredictionType::Epsilon => None,
            PredictionType::VPrediction => Some("v_prediction"),
            PredictionType::Sample => Some("sample"),
        };
        if let Some(prediction) = prediction {
            return Err(Error::UnsupportedModel(format!(
                "{} predicts `{}` ({}); StableIdentity needs an epsilon-prediction model such as {} \
                 (SD 2.1-768 is a v-prediction model)",
                model.name(),
                prediction,
                scheduler_file.display(),
                crate::weights::DEFAULT_MODEL,
            )));
        }

        let mut tokenizer = ClipTokenizer::from_dir(&model.component("tokenizer")?)?;
        let placeholders: Vec<String> = (0..2 * MAX_IDENTITIES).map(placeholder_token).collect();
        let placeholder_refs: Vec<&str> = placeholders.iter().map(String::as_str).collect();
        let placeholder_ids = tokenizer.add_placeholder_tokens(&placeholder_refs)?;

        let text_config: ClipTextConfig = model.config("text_encoder", "config.json")?;
        let text_encoder_weights = model.weights("text_encoder", "model", dtype, device)?;
        let text_encoder_file = text_encoder_weights.path.clone();
        let text_encoder = text_encoder_weights.build(|vb| ClipTextModel::new(vb, &text_config))?;
        let unet_config: UNet2DConditionConfig = model.config("unet", "config.json")?;
        let unet = model
            .weights("unet", "diffusion_pytorch_model", dtype, device)?
            .build(|vb| UNet2DConditionModel::new(vb, &unet_config))?;
        let vae_config: AutoencoderKLConfig = model.config("vae", "config.json")?;
        let vae = model
            .weights("vae", "diffusion_pytorch_model", dtype, device)?
            .build(|vb| AutoencoderKL::new(vb, &vae_config))?;

        let blocks = unet_config.block_out_channels.len();
        let cross_dims = unet_config.cross_attention_dim.expand("cross_attention_dim", blocks)?;
        if let Some(&dim) = cross_dims.iter().find(|&&d| d != text_config.hidden_size) {
            return Err(Error::UnsupportedModel(format!(
                "{}: the UNet attends to {dim}-wide text features but the text encoder is {} wide",
                model.name(),
                text_config.hidden_size
            )));
        }
        Ok(Self {
            model_name: model.name().to_string(),
            tokenizer,
            placeholder_ids,
            text_encoder,
            text_encoder_file,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Precision of the frozen models.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The frozen networks and the training noise schedule, for the identity learner.
    pub fn frozen_models(&self) -> Result<FrozenModels<'_>> {
        Ok(FrozenModels {
            text_encoder: &self.text_encoder,
            unet: &self.unet,
            vae: &self.vae,
            schedule: Ddpm::new(&self.scheduler_config)?,
        })
    }

    /// The image size (width, height) the model was trained at (512 x 512 for SD 2.1-base).
    pub fn default_size(&self) -> (usize, usize) {
        let factor = self.vae.downscale_factor();
        match &self.unet.config().sample_size {
            Some(PerBlock::One(side)) => (side * factor, side * factor),
            Some(PerBlock::Each(sides)) if sides.len() == 2 => (sides[1] * factor, sides[0] * factor),
            // diffusers' UNet default sample size is 64 latents.
            _ => (64 * factor, 64 * factor),
        }
    }

    /// Width of the text encoder's embeddings: the width an identity must have.
    pub fn text_width(&self) -> usize {
        self.text_encoder.config().hidden_size
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    pub fn text_encoder_file(&self) -> &Path {
        &self.text_encoder_file
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// Token ids of `prompt` for the text encoder: placeholder tokens are mapped to the rows
    /// after the vocabulary, where the text encoder reads identity vectors. Also returns how many
    /// identities the prompt uses and whether it was truncated.
    pub fn prompt_ids(&self, prompt: &str) -> Result<PromptIds> {
        let encoding = self.tokenizer.encode(prompt);
        let vocab = self.text_encoder.config().vocab_size as u32;
        let mut words_used = 0;
        let ids = encoding
            .ids
            .iter()
            .map(|&id| match self.placeholder_ids.iter().position(|&p| p == id) {
                Some(word) => {
                    words_used = words_used.max(word + 1);
                    vocab + word as u32
                }
                None => id,
            })
            .collect::<Vec<_>>();
        let len = ids.len();
        Ok(PromptIds {
            ids: Tensor::from_vec(ids, (1, len), &self.device)?,
            identities_used: words_used.div_ceil(2),
            truncated: encoding.truncated,
        })
    }

    /// Text-encoder features (1, 77, hidden) of `prompt`, placeholders filled from `identities`.
    pub fn encode_prompt(&self, prompt: &str, identities: &[Identity]) -> Result<Tensor> {
        let prompt_ids = self.prompt_ids(prompt)?;
        if prompt_ids.identities_used > identities.len() {
            let needed = placeholder_token(2 * prompt_ids.identities_used - 1);
            return Err(Error::Input(if identities.is_empty() {
                format!("the prompt uses identity placeholders (up to {needed}) but no identity was given: pass --identity FILE")
            } else {
                format!(
                    "the prompt uses {needed}, which needs {} identities, but {} given: pass one --identity per v1* v2* pair",
                    prompt_ids.identities_used,
                    identities.len()
                )
            }));
        }
        let extra = self.identity_rows(identities)?;
        Ok(self.text_encoder.forward(&prompt_ids.ids, extra.as_ref())?)
    }

    /// The identities' vectors stacked (2 x n, hidden) in the model's dtype and device.
    fn identity_rows(&self, identities: &[Identity]) -> Result<Option<Tensor>> {
        if identities.is_empty() {
            return Ok(None);
        }
        for identity in identities {
            if identity.width() != self.text_width() {
                return Err(Error::Input(format!(
                    "identity {} has {}-wide vectors but this model's text encoder is {} wide: it was learned for another model",
                    identity.source.display(),
                    identity.width(),
                    self.text_width()
                )));
            }
        }
        let rows: Vec<&Tensor> = identities.iter().map(|i| &i.embeddings).collect();
        Ok(Some(Tensor::cat(&rows, 0)?.to_device(&self.device)?.to_dtype(self.dtype)?))
    }

    /// Runs the denoising loop and decodes: returns the image (1, 3, H, W) in [0, 1] as f32.
    /// `on_step(done, total)` is called after every denoising step.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        identities: &[Identity],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let factor = self.vae.downscale_factor();
        for (name, value) in [("width", request.width), ("height", request.height)] {
            if value == 0 || value % factor != 0 {
                return Err(Error::Input(format!("{name} {value} is not a positive multiple of {factor}")));
            }
        }
        if request.steps == 0 {
            return Err(Error::Input("--steps must be at least 1".into()));
        }
        let guided = request.guidance > 1.0;
        let cond = self.encode_prompt(&request.prompt, identities)?;
        let context = if guided {
            let uncond = self.encode_prompt(&request.negative_prompt, identities)?;
            Tensor::cat(&[uncond, cond], 0)?
        } else {
            cond
        };

        let latent_shape = (1, self.unet.config().in_channels, request.height / factor, request.width / factor);
        let noise = match &request.initial_latents {
            Some(latents) => {
                if latents.dims() != [latent_shape.0, latent_shape.1, latent_shape.2, latent_shape.3] {
                    return Err(Error::Input(format!(
                        "initial latents have shape {:?}; {}x{} needs {:?}",
                        latents.dims(),
                        request.width,
                        request.height,
                        latent_shape
                    )));
                }
                latents.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => gaussian_noise(latent_shape, request.seed, &self.device)?,
        };

        let mut scheduler = request.sampler.build(&self.scheduler_config, request.steps)?;
        // Latents stay f32 through the scheduler; only the UNet runs in the model dtype.
        let mut latents = (noise * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        // What the UNet sees: Euler's timesteps are fractional in diffusers.
        let unet_timesteps = scheduler.unet_timesteps();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let model_input = scheduler.scale_model_input(&model_input, t)?.to_dtype(self.dtype)?;
            let batch = model_input.dim(0)?;
            let t_batch = Tensor::full(unet_timesteps[i] as f32, batch, &self.device)?;
            let noise_pred = self.unet.forward(&model_input, &t_batch, &context)?.to_dtype(DType::F32)?;
            let noise_pred = if guided {
                let uncond = noise_pred.narrow(0, 0, 1)?;
                let text = noise_pred.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * request.guidance)?)?
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, t, &latents)?;
            on_step(i + 1, timesteps.len());
        }

        let scaled = (latents / self.vae.config().scaling_factor)?.to_dtype(self.dtype)?;
        let image = self.vae.decode(&scaled)?.to_dtype(DType::F32)?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// Token ids of one prompt, ready for the text encoder.
pub struct PromptIds {
    /// (1, 77) u32.
    pub ids: Tensor,
    /// How many identities (placeholder pairs) the prompt refers to.
    pub identities_used: usize,
    pub truncated: bool,
}

/// Standard normal noise of `shape` from `seed`: the same seed gives the same image on any machine.
pub fn gaussian_noise(shape: (usize, usize, usize, usize), seed: u64, device: &Device) -> Result<Tensor> {
    standard_normal(shape, &mut rand::rngs::StdRng::seed_from_u64(seed), device)
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
