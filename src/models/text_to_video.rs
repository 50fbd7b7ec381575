//! The frozen components of a text-to-video model in diffusers' `TextToVideoSDPipeline` layout
//! (ali-vilab/text-to-video-ms-1.7b, cerspense/zeroscope_v2_576w): the same tokenizer, text
//! encoder and VAE as Stable Diffusion 2.1 ([`PromptEncoder`], [`AutoencoderKL`]) around a video
//! UNet ([`UNet3DConditionModel`]), and the noise schedule's config. Identities learned on SD 2.1
//! work in it because the text encoder is the same (ModelScope ships an fp16 copy of it).

use candle_core::{DType, Device};

use crate::models::clip_text::ClipTextConfig;
use crate::models::stable_diffusion::PromptEncoder;
use crate::models::unet::PerBlock;
use crate::models::unet3d::{UNet3DConditionConfig, UNet3DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::nn::Precision;
use crate::schedulers::{PredictionType, SchedulerConfig};
use crate::weights::ModelDir;
use crate::{Error, Result};

/// The text-to-video model `video` uses unless told otherwise (ModelScope T2V, the model of
/// StableIdentity's video results).
pub const DEFAULT_VIDEO_MODEL: &str = "ali-vilab/text-to-video-ms-1.7b";

/// The configs of a text-to-video model's components.
#[derive(Debug, Clone)]
pub struct VideoConfigs {
    pub text_encoder: ClipTextConfig,
    pub unet: UNet3DConditionConfig,
    pub vae: AutoencoderKLConfig,
    pub scheduler: SchedulerConfig,
}

impl VideoConfigs {
    /// Reads the configs of a diffusers text-to-video folder and checks that they fit together;
    /// a folder whose UNet is not a `UNet3DConditionModel` is named as what it is.
    pub fn read(model: &ModelDir) -> Result<Self> {
        let config_error = |component: &str, e: candle_core::Error| Error::Config {
            file: model.root().join(component).join("config.json"),
            msg: e.to_string(),
        };
        let unet: UNet3DConditionConfig = model.config("unet", "config.json")?;
        unet.validate().map_err(|e| config_error("unet", e))?;
        let vae: AutoencoderKLConfig = model.config("vae", "config.json")?;
        vae.validate().map_err(|e| config_error("vae", e))?;
        let configs = Self {
            text_encoder: model.config("text_encoder", "config.json")?,
            unet,
            vae,
            scheduler: SchedulerConfig::from_file(model.component("scheduler")?.join("scheduler_config.json"))?,
        };
        if configs.scheduler.prediction_type != PredictionType::Epsilon {
            return Err(Error::UnsupportedModel(format!(
                "{}: the scheduler's prediction_type is not `epsilon`; text-to-video supports epsilon-prediction \
                 models such as {DEFAULT_VIDEO_MODEL}",
                model.name()
            )));
        }
        if configs.unet.cross_attention_dim != configs.text_encoder.hidden_size {
            return Err(Error::UnsupportedModel(format!(
                "{}: the UNet attends to {}-wide text features but the text encoder is {} wide",
                model.name(),
                configs.unet.cross_attention_dim,
                configs.text_encoder.hidden_size
            )));
        }
        Ok(configs)
    }

    /// How many pixels one latent spans per side (8): the VAE halves the image once per block
    /// after the first.
    pub fn latent_factor(&self) -> usize {
        1 << self.vae.block_out_channels.len().saturating_sub(1)
    }

    /// The frame size (width, height) the model was trained at (256 x 256 for ModelScope).
    pub fn default_size(&self) -> (usize, usize) {
        let factor = self.latent_factor();
        let pixels = |side: usize| side.saturating_mul(factor);
        match &self.unet.sample_size {
            Some(PerBlock::One(side)) => (pixels(*side), pixels(*side)),
            Some(PerBlock::Each(sides)) if sides.len() == 2 => (pixels(sides[1]), pixels(sides[0])),
            _ => (256, 256),
        }
    }

    /// The latents' shape (1, channels, frames, height / factor, width / factor) of a video.
    pub fn latent_shape(&self, frames: usize, width: usize, height: usize) -> (usize, usize, usize, usize, usize) {
        let factor = self.latent_factor();
        (1, self.unet.in_channels, frames, height / factor, width / factor)
    }
}

/// The frozen text-to-video models, loaded once for any number of videos.
pub struct TextToVideoModel {
    model_name: String,
    configs: VideoConfigs,
    prompt_encoder: PromptEncoder,
    unet: UNet3DConditionModel,
    vae: AutoencoderKL,
    device: Device,
    dtype: DType,
}

impl AsRef<PromptEncoder> for TextToVideoModel {
    fn as_ref(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }
}

impl TextToVideoModel {
    /// Loads tokenizer, text encoder, video UNet and VAE from a diffusers folder whose configs
    /// [`VideoConfigs::read`] accepted, the weights in `precision` on `device` (fp16 files are
    /// converted as they are read).
    pub fn load(
        model: &ModelDir,
        configs: VideoConfigs,
        device: &Device,
        precision: impl Into<Precision>,
    ) -> Result<Self> {
        let precision = precision.into();
        let Precision { dtype, matrices } = precision;
        crate::nn::check_dtype(dtype, device)?;
        let prompt_encoder = PromptEncoder::load(model, configs.text_encoder.clone(), device, precision)?;
        let unet_weights = model.weights("unet", "diffusion_pytorch_model", dtype, device)?;
        let unet = super::build_packed(unet_weights, matrices, |vb| UNet3DConditionModel::new(vb, &configs.unet))?;
        let vae_weights = model.weights("vae", "diffusion_pytorch_model", dtype, device)?;
        let vae = super::build_packed(vae_weights, matrices, |vb| AutoencoderKL::new(vb, &configs.vae))?;
        Ok(Self {
            model_name: model.name().to_string(),
            configs,
            prompt_encoder,
            unet,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// What the user called the model (hub id or path), for metadata and messages.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn configs(&self) -> &VideoConfigs {
        &self.configs
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Precision of the frozen models.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn prompt_encoder(&self) -> &PromptEncoder {
        &self.prompt_encoder
    }

    pub fn unet(&self) -> &UNet3DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }
}
