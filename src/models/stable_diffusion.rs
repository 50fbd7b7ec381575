//! The frozen Stable Diffusion components every pipeline shares: tokenizer (with the identity
//! placeholders), CLIP text encoder, UNet, VAE and the noise schedule's config, as a diffusers
//! folder holds them (`tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`).
//!
//! The learner, text-to-image and the later pipelines take these components; none of them loads
//! models itself. [`SdConfigs`] are read first (cheap) so that a request can be checked against
//! the model before gigabytes of weights are read.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::nn::Precision;
use crate::schedulers::{PredictionType, SchedulerConfig};
use crate::tokenizer::{placeholder_token, ClipTokenizer};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// Identities one prompt can hold; each takes two placeholder tokens.
pub const MAX_IDENTITIES: usize = 4;

/// The most latents an image may have (2048 x 2048 pixels for Stable Diffusion, 16 times its
/// 512 x 512): the UNet's and the VAE's self-attention over them holds a (latents x latents)
/// matrix of scores per head, here at most 2^32 values, 16 GiB in f32.
pub const MAX_LATENT_POSITIONS: usize = 1 << 16;

/// `unet/config.json` of stabilityai/stable-diffusion-2-1-base.
pub const SD21_BASE_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "dual_cross_attention": false,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true
}"#;

/// `text_encoder/config.json` of stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H text tower).
pub const SD21_BASE_TEXT_ENCODER: &str = r#"{
  "architectures": ["CLIPTextModel"],
  "hidden_act": "gelu",
  "hidden_size": 1024,
  "intermediate_size": 4096,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 16,
  "num_hidden_layers": 23,
  "projection_dim": 512,
  "vocab_size": 49408
}"#;

/// `vae/config.json` of stabilityai/stable-diffusion-2-1-base.
pub const SD21_BASE_VAE: &str = r#"{
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// `scheduler/scheduler_config.json` of stabilityai/stable-diffusion-2-1-base.
pub const SD21_BASE_SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}"#;

/// The configs of the frozen models and the noise schedule.
#[derive(Debug, Clone)]
pub struct SdConfigs {
    pub text_encoder: ClipTextConfig,
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKLConfig,
    pub scheduler: SchedulerConfig,
}

impl SdConfigs {
    /// Stable Diffusion 2.1-base, from its published config files.
    pub fn sd21_base() -> Self {
        fn parse<T: serde::de::DeserializeOwned>(text: &str) -> T {
            serde_json::from_str(text).expect("the built-in SD 2.1-base configs are valid")
        }
        Self {
            text_encoder: parse(SD21_BASE_TEXT_ENCODER),
            unet: parse(SD21_BASE_UNET),
            vae: parse(SD21_BASE_VAE),
            scheduler: parse(SD21_BASE_SCHEDULER),
        }
    }

    /// Reads the configs of a diffusers folder and checks that they make a StableIdentity model
    /// ([`SdConfigs::validate`]).
    pub fn read(model: &ModelDir) -> Result<Self> {
        let config_error = |component: &str, e: candle_core::Error| Error::Config {
            file: model.root().join(component).join("config.json"),
            msg: e.to_string(),
        };
        let unet: UNet2DConditionConfig = model.config("unet", "config.json")?;
        unet.validate().map_err(|e| config_error("unet", e))?;
        let vae: AutoencoderKLConfig = model.config("vae", "config.json")?;
        vae.validate().map_err(|e| config_error("vae", e))?;
        let configs = Self {
            text_encoder: model.config("text_encoder", "config.json")?,
            unet,
            vae,
            scheduler: SchedulerConfig::from_file(model.component("scheduler")?.join("scheduler_config.json"))?,
        };
        configs.validate(model.name())?;
        Ok(configs)
    }

    /// Refuses models StableIdentity is not defined on (another prediction type) and components
    /// that do not fit together; `model` names the model in the message.
    pub fn validate(&self, model: &str) -> Result<()> {
        let prediction = match self.scheduler.prediction_type {
            PredictionType::Epsilon => None,
            PredictionType::VPrediction => Some("v_prediction"),
            PredictionType::Sample => Some("sample"),
        };
        if let Some(prediction) = prediction {
            return Err(Error::UnsupportedModel(format!(
                "{model} predicts `{prediction}` (scheduler/scheduler_config.json); StableIdentity needs an \
                 epsilon-prediction model such as {} (SD 2.1-768 is a v-prediction model)",
                crate::weights::DEFAULT_MODEL,
            )));
        }
        let blocks = self.unet.block_out_channels.len();
        let cross_dims = self.unet.cross_attention_dim.expand("cross_attention_dim", blocks)?;
        if let Some(&dim) = cross_dims.iter().find(|&&d| d != self.text_encoder.hidden_size) {
            return Err(Error::UnsupportedModel(format!(
                "{model}: the UNet attends to {dim}-wide text features but the text encoder is {} wide",
                self.text_encoder.hidden_size
            )));
        }
        let (width, height) = self.default_size();
        self.check_image_size(width, height).map_err(|problem| {
            Error::UnsupportedModel(format!(
                "{model}: sample_size in unet/config.json makes a default image of {width} x {height} pixels: {problem}"
            ))
        })
    }

    /// How many pixels one latent spans per side (8 for Stable Diffusion): the VAE halves the
    /// image once per block after the first.
    pub fn latent_factor(&self) -> usize {
        1 << self.vae.block_out_channels.len().saturating_sub(1)
    }

    /// Image sides must be multiples of this for the UNet's down and up blocks to meet: the VAE's
    /// factor times the UNet's (64 for Stable Diffusion). Other multiples of
    /// [`latent_factor`](Self::latent_factor) still run, resized as diffusers does.
    pub fn exact_size_multiple(&self) -> usize {
        self.latent_factor() << self.unet.block_out_channels.len().saturating_sub(1)
    }

    /// The image size (width, height) the model was trained at (512 x 512 for SD 2.1-base).
    pub fn default_size(&self) -> (usize, usize) {
        let factor = self.latent_factor();
        let pixels = |side: usize| side.saturating_mul(factor);
        match &self.unet.sample_size {
            Some(PerBlock::One(side)) => (pixels(*side), pixels(*side)),
            Some(PerBlock::Each(sides)) if sides.len() == 2 => (pixels(sides[1]), pixels(sides[0])),
            // diffusers' UNet default sample size is 64 latents.
            _ => (64 * factor, 64 * factor),
        }
    }

    /// Why an image of `width` x `height` pixels is too large to make, if it is: the self-attention
    /// of the UNet's first level and of the VAE's middle holds a (latents x latents) matrix of
    /// scores, which must stay within [`MAX_LATENT_POSITIONS`]² values (16 GiB in f32).
    pub fn check_image_size(&self, width: usize, height: usize) -> std::result::Result<(), String> {
        let factor = self.latent_factor();
        let latents = (width / factor) as u128 * (height / factor) as u128;
        if latents > MAX_LATENT_POSITIONS as u128 {
            let side = MAX_LATENT_POSITIONS.isqrt() * factor;
            return Err(format!(
                "{width} x {height} pixels are {latents} latents (one per {factor} x {factor} pixels); the attention \
                 over them holds latents² scores, so at most {MAX_LATENT_POSITIONS} latents fit its 16 GiB budget \
                 (e.g. {side} x {side} pixels): choose a smaller size"
            ));
        }
        Ok(())
    }

    /// The latents' shape (1, channels, height / factor, width / factor) of an image.
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        let factor = self.latent_factor();
        (1, self.unet.in_channels, height / factor, width / factor)
    }
}

/// The tokenizer, with the identity placeholders `v1*`, `v2*`, ..., and the text encoder that
/// reads identity vectors for them: what every pipeline (image or video) encodes prompts with.
pub struct PromptEncoder {
    config: ClipTextConfig,
    tokenizer: ClipTokenizer,
    /// Token ids of `v1*`, `v2*`, ... in the tokenizer.
    placeholder_ids: Vec<u32>,
    text_encoder: ClipTextModel,
    /// The text encoder's weights file, which identities are tied to.
    text_encoder_file: PathBuf,
    device: Device,
    dtype: DType,
}

impl PromptEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a diffusers folder, the text encoder in
    /// `precision` on `device`; `config` is its `text_encoder/config.json`.
    pub fn load(
        model: &ModelDir,
        config: ClipTextConfig,
        device: &Device,
        precision: impl Into<Precision>,
    ) -> Result<Self> {
        let Precision { dtype, matrices } = precision.into();
        let tokenizer_dir = model.component("tokenizer")?;
        let mut tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        let positions = config.max_position_embeddings;
        if tokenizer.max_length() > positions {
            return Err(Error::Config {
                file: tokenizer_dir.join("tokenizer_config.json"),
                msg: format!(
                    "model_max_length {} is more than the text encoder's {positions} positions \
                     (max_position_embeddings in text_encoder/config.json): set it to {positions}",
                    tokenizer.max_length()
                ),
            });
        }
        let placeholders: Vec<String> = (0..2 * MAX_IDENTITIES).map(placeholder_token).collect();
        let placeholder_refs: Vec<&str> = placeholders.iter().map(String::as_str).collect();
        let placeholder_ids = tokenizer.add_placeholder_tokens(&placeholder_refs)?;
        let text_encoder_weights = model.weights("text_encoder", "model", dtype, device)?;
        let text_encoder_file = text_encoder_weights.path.clone();
        let text_encoder = super::build_packed(text_encoder_weights, matrices, |vb| ClipTextModel::new(vb, &config))?;
        Ok(Self { config, tokenizer, placeholder_ids, text_encoder, text_encoder_file, device: device.clone(), dtype })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the text encoder's embeddings: the width an identity must have.
    pub fn text_width(&self) -> usize {
        self.config.hidden_size
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

    /// Token ids of `prompt` for the text encoder: placeholder tokens are mapped to the rows
    /// after the vocabulary, where the text encoder reads identity vectors. Also returns how many
    /// identities the prompt uses and whether it was truncated.
    pub fn prompt_ids(&self, prompt: &str) -> Result<PromptIds> {
        let encoding = self.tokenizer.encode(prompt);
        let vocab = self.config.vocab_size as u32;
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

    /// Text-encoder features (1, 77, hidden) of prompt ids, the placeholders reading
    /// `identity_rows` (2 per identity, hidden), which must cover every placeholder the ids use.
    pub fn encode_ids(&self, ids: &PromptIds, identity_rows: Option<&Tensor>) -> Result<Tensor> {
        let rows = identity_rows.map(|r| r.to_device(&self.device)?.to_dtype(self.dtype)).transpose()?;
        Ok(self.text_encoder.forward(&ids.ids, rows.as_ref())?)
    }
}

/// The frozen Stable Diffusion models, loaded once and used for any number of images, learning
/// runs or 3D scenes.
pub struct StableDiffusion {
    model_name: String,
    configs: SdConfigs,
    prompt_encoder: PromptEncoder,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    device: Device,
    precision: Precision,
}

impl AsRef<PromptEncoder> for StableDiffusion {
    fn as_ref(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }
}

impl StableDiffusion {
    /// Loads tokenizer, text encoder, UNet and VAE from a diffusers folder (its configs checked by
    /// [`SdConfigs::read`]), the frozen weights in `precision` (a dtype, or packed weight
    /// matrices: [`Precision`]) on `device`.
    pub fn load(model: &ModelDir, device: &Device, precision: impl Into<Precision>) -> Result<Self> {
        Self::load_with_configs(model, SdConfigs::read(model)?, device, precision)
    }

    /// [`load`](Self::load) with the folder's configs already read by [`SdConfigs::read`] (to
    /// check a request against them before the weights load).
    pub fn load_with_configs(
        model: &ModelDir,
        configs: SdConfigs,
        device: &Device,
        precision: impl Into<Precision>,
    ) -> Result<Self> {
        let precision = precision.into();
        let Precision { dtype, matrices } = precision;
        crate::nn::check_dtype(dtype, device)?;
        let prompt_encoder = PromptEncoder::load(model, configs.text_encoder.clone(), device, precision)?;
        let unet_weights = model.weights("unet", "diffusion_pytorch_model", dtype, device)?;
        let unet = super::build_packed(unet_weights, matrices, |vb| UNet2DConditionModel::new(vb, &configs.unet))?;
        let vae_weights = model.weights("vae", "diffusion_pytorch_model", dtype, device)?;
        let vae = super::build_packed(vae_weights, matrices, |vb| AutoencoderKL::new(vb, &configs.vae))?;
        Ok(Self {
            model_name: model.name().to_string(),
            configs,
            prompt_encoder,
            unet,
            vae,
            device: device.clone(),
            precision,
        })
    }

    /// What the user called the model (hub id or path), for metadata and messages.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn configs(&self) -> &SdConfigs {
        &self.configs
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the frozen models' activations (and of their weights kept as tensors).
    pub fn dtype(&self) -> DType {
        self.precision.dtype
    }

    /// How the frozen models were loaded (what a ControlNet that guides them loads as).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.configs.scheduler
    }

    pub fn prompt_encoder(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }

    /// Width of the text encoder's embeddings: the width an identity must have.
    pub fn text_width(&self) -> usize {
        self.prompt_encoder.text_width()
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        self.prompt_encoder.tokenizer()
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        self.prompt_encoder.text_encoder()
    }

    pub fn text_encoder_file(&self) -> &Path {
        self.prompt_encoder.text_encoder_file()
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// [`PromptEncoder::prompt_ids`].
    pub fn prompt_ids(&self, prompt: &str) -> Result<PromptIds> {
        self.prompt_encoder.prompt_ids(prompt)
    }

    /// [`PromptEncoder::encode_ids`].
    pub fn encode_ids(&self, ids: &PromptIds, identity_rows: Option<&Tensor>) -> Result<Tensor> {
        self.prompt_encoder.encode_ids(ids, identity_rows)
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
