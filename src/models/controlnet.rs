//! ControlNet: diffusers' `ControlNetModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/controlnets/controlnet.py>),
//! loaded from a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model.*`, as
//! `thibaud/controlnet-sd21-openpose-diffusers` ships it), weight names kept as module names.
//!
//! A ControlNet is a trainable copy of the UNet's first half ([`UNetEncoder`]: `conv_in`,
//! `time_embedding`, `down_blocks`, `mid_block`) whose input convolution's output receives the
//! control image through `controlnet_cond_embedding`; each skip connection and the mid block's
//! output go through a 1x1 convolution (`controlnet_down_blocks.N`, `controlnet_mid_block`,
//! zero-initialised in training) and become the residuals the UNet adds
//! ([`UNet2DConditionModel::forward_with_additional_residuals`](crate::models::unet::UNet2DConditionModel::forward_with_additional_residuals)):
//! 12 + 1 for Stable Diffusion 2.1.
//!
//! As in the UNet, config features Stable Diffusion's ControlNets do not use (class and
//! addition embeddings, `encoder_hid_dim`, a mid block without attention) are rejected by
//! [`ControlNetConfig::validate`].

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::blocks::unet_2d::{EncoderSpec, UNetEncoder};
use crate::models::config::ConfigChecks;
use crate::models::stable_diffusion::SdConfigs;
use crate::models::unet::{AdditionalResiduals, PerBlock, UNet2DConditionConfig};
use crate::nn::{silu, Conv2d, Conv2dConfig};
use crate::weights::{folder_weights, weights_file_names, Hub, ModelFiles};

/// The SD 2.1 OpenPose ControlNet StableIdentity's notebook uses: the default of `generate --pose-from`
/// and `serve --controlnet`, and the example in messages.
pub const OPENPOSE_SD21: &str = "thibaud/controlnet-sd21-openpose-diffusers";

const CONTROLNET: ConfigChecks =
    ConfigChecks { name: "controlnet config", supported: "only Stable Diffusion 1.x/2.x ControlNets are" };

/// The order of the control image's channels the ControlNet was trained on
/// (`controlnet_conditioning_channel_order`): with `bgr` the model reverses the RGB image first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

impl ChannelOrder {
    pub const NAMES: [&'static str; 2] = ["rgb", "bgr"];
}

impl std::str::FromStr for ChannelOrder {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "rgb" => Ok(Self::Rgb),
            "bgr" => Ok(Self::Bgr),
            _ => Err(format!("unknown channel order {s:?}: expected one of {}", Self::NAMES.join(", "))),
        }
    }
}

impl std::fmt::Display for ChannelOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rgb => "rgb",
            Self::Bgr => "bgr",
        })
    }
}

/// A ControlNet's `config.json`, with diffusers' defaults for missing keys; unknown keys are
/// ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub in_channels: usize,
    /// Channels of the control image.
    pub conditioning_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads per block (diffusers' historical naming), unless `num_attention_heads`
    /// is given.
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub controlnet_conditioning_channel_order: ChannelOrder,
    /// Channels of `controlnet_cond_embedding`'s convolutions; each after the first halves the
    /// image, so the embedding meets the latents when there are as many halvings as in the VAE.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// The residuals are averaged over the image (the "shuffle" ControlNets); implies guess mode.
    pub global_pool_conditions: bool,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let unet = UNet2DConditionConfig::default();
        Self {
            in_channels: unet.in_channels,
            conditioning_channels: 3,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types,
            mid_block_type: unet.mid_block_type,
            only_cross_attention: unet.only_cross_attention,
            block_out_channels: unet.block_out_channels,
            layers_per_block: unet.layers_per_block,
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn,
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: unet.cross_attention_dim,
            transformer_layers_per_block: unet.transformer_layers_per_block,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: unet.attention_head_dim,
            num_attention_heads: None,
            use_linear_projection: unet.use_linear_projection,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            upcast_attention: unet.upcast_attention,
            resnet_time_scale_shift: unet.resnet_time_scale_shift,
            controlnet_conditioning_channel_order: ChannelOrder::Rgb,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
        }
    }
}

impl ControlNetConfig {
    /// The ControlNet diffusers' `ControlNetModel.from_unet` makes of a UNet: its first half's
    /// keys, RGB order and the default conditioning embedding (16, 32, 96, 256) (as
    /// thibaud/controlnet-sd21-openpose-diffusers has for SD 2.1).
    pub fn from_unet(unet: &UNet2DConditionConfig) -> Self {
        Self {
            in_channels: unet.in_channels,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types.clone(),
            mid_block_type: unet.mid_block_type.clone(),
            only_cross_attention: unet.only_cross_attention.clone(),
            block_out_channels: unet.block_out_channels.clone(),
            layers_per_block: unet.layers_per_block.clone(),
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn.clone(),
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: unet.cross_attention_dim.clone(),
            transformer_layers_per_block: unet.transformer_layers_per_block.clone(),
            encoder_hid_dim: unet.encoder_hid_dim,
            encoder_hid_dim_type: unet.encoder_hid_dim_type.clone(),
            attention_head_dim: unet.attention_head_dim.clone(),
            num_attention_heads: unet.num_attention_heads.clone(),
            use_linear_projection: unet.use_linear_projection,
            class_embed_type: unet.class_embed_type.clone(),
            addition_embed_type: unet.addition_embed_type.clone(),
            num_class_embeds: unet.num_class_embeds,
            upcast_attention: unet.upcast_attention,
            resnet_time_scale_shift: unet.resnet_time_scale_shift.clone(),
            ..Self::default()
        }
    }

    /// Checks that the config describes a ControlNet this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        self.encoder_spec().map(|_| ())
    }

    /// The encoder half, checked with the UNet's rules (the same keys mean the same there).
    fn encoder_spec(&self) -> Result<EncoderSpec> {
        if self.conditioning_channels == 0 {
            return Err(CONTROLNET.invalid("conditioning_channels", &0, "must be at least 1"));
        }
        let embedding = &self.conditioning_embedding_out_channels;
        if embedding.is_empty() || embedding.contains(&0) {
            return Err(CONTROLNET.invalid(
                "conditioning_embedding_out_channels",
                embedding,
                "must list at least one non-zero channel count",
            ));
        }
        let unet_half = UNet2DConditionConfig {
            in_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block.clone(),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim.clone(),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            // ControlNetModel takes the head count from either key (the UNet only from the first).
            attention_head_dim: self.num_attention_heads.clone().unwrap_or_else(|| self.attention_head_dim.clone()),
            num_attention_heads: None,
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type.clone(),
            addition_embed_type: self.addition_embed_type.clone(),
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            ..UNet2DConditionConfig::default()
        };
        unet_half.encoder_spec(&CONTROLNET)
    }

    /// Why this ControlNet cannot steer the base model of `sd` (its residuals would not fit the
    /// UNet's skip connections, or it reads text features of another width), if it cannot.
    pub fn mismatch(&self, sd: &SdConfigs) -> Option<String> {
        let (ours, theirs) = match (self.encoder_spec(), sd.unet.encoder()) {
            (Ok(ours), Ok(theirs)) => (ours, theirs),
            (Err(e), _) | (_, Err(e)) => return Some(e.to_string()),
        };
        if ours.cross_attention_dim != theirs.cross_attention_dim {
            return Some(format!(
                "its cross-attention width is {:?} but the base model's UNet attends to {:?}-wide text features \
                 (a ControlNet made for another Stable Diffusion version)",
                dedup(&ours.cross_attention_dim),
                dedup(&theirs.cross_attention_dim)
            ));
        }
        let layout = |spec: &EncoderSpec| {
            format!(
                "{} latent channels, blocks of {:?} channels with {:?} resnets",
                spec.in_channels, spec.block_out_channels, spec.layers
            )
        };
        if (ours.in_channels, &ours.block_out_channels, &ours.layers)
            != (theirs.in_channels, &theirs.block_out_channels, &theirs.layers)
        {
            return Some(format!(
                "its block layout ({}) differs from the base model's UNet ({})",
                layout(&ours),
                layout(&theirs)
            ));
        }
        let halvings = self.conditioning_embedding_out_channels.len() - 1;
        if 1 << halvings != sd.latent_factor() {
            return Some(format!(
                "its conditioning embedding reduces the control image {} times but the base model's latents are \
                 {} times smaller than the image",
                1 << halvings,
                sd.latent_factor()
            ));
        }
        None
    }
}

/// `values` with repeats removed (a per-block list that is one value, shown as that value).
fn dedup(values: &[usize]) -> Vec<usize> {
    let mut out = values.to_vec();
    out.dedup();
    out
}

/// `ControlNetConditioningEmbedding`: the control image (batch, 3, H, W) in [0, 1] to features
/// (batch, block_out_channels[0], H / 8, W / 8): `conv_in`, then (3x3, 3x3 stride 2) pairs,
/// each convolution followed by SiLU, then `conv_out`.
#[derive(Debug, Clone)]
struct ControlNetConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    fn new(vb: VarBuilder, in_channels: usize, channels: &[usize], out_channels: usize) -> Result<Self> {
        let same = Conv2dConfig { padding: 1, stride: 1 };
        let halving = Conv2dConfig { padding: 1, stride: 2 };
        let mut blocks = Vec::with_capacity(2 * channels.len());
        for (i, pair) in channels.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(Conv2d::new(vb.pp(format!("blocks.{}", 2 * i)), c_in, c_in, 3, same)?);
            blocks.push(Conv2d::new(vb.pp(format!("blocks.{}", 2 * i + 1)), c_in, c_out, 3, halving)?);
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), in_channels, channels[0], 3, same)?,
            blocks,
            conv_out: Conv2d::new(vb.pp("conv_out"), channels[channels.len() - 1], out_channels, 3, same)?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = silu(&self.conv_in.forward(image)?)?;
        for block in &self.blocks {
            x = silu(&block.forward(&x)?)?;
        }
        self.conv_out.forward(&x)
    }
}

/// How strongly a ControlNet's residuals enter the UNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlScale {
    /// Multiplies every residual (diffusers' `conditioning_scale`).
    pub conditioning_scale: f64,
    /// Guess mode: the residuals grow from 0.1 x (the first skip connection) to 1 x (the mid
    /// block) on a log scale, as the ControlNet is meant to steer without a prompt.
    pub guess_mode: bool,
}

/// A ControlNet, ready to give residuals for the UNet.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    config: ControlNetConfig,
    /// `conv_in`, `time_embedding`, `down_blocks`, `mid_block`, as in the UNet.
    encoder: UNetEncoder,
    controlnet_cond_embedding: ControlNetConditioningEmbedding,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
}

impl ControlNetModel {
    /// Builds the model from `vb` at the root of `diffusion_pytorch_model.*`.
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        let spec = cfg.encoder_spec()?;
        let channels = &spec.block_out_channels;
        let encoder = UNetEncoder::new(&vb, &spec)?;
        // One 1x1 convolution per skip connection: conv_in's output, each resnet's, and each
        // downsampler's (all blocks but the last have one).
        let skip_channels = std::iter::once(channels[0]).chain(channels.iter().enumerate().flat_map(|(i, &c)| {
            let downsampler = usize::from(i + 1 < channels.len());
            std::iter::repeat_n(c, spec.layers[i] + downsampler)
        }));
        let zero_conv = |name: String, c: usize| Conv2d::new(vb.pp(name), c, c, 1, Conv2dConfig::default());
        let controlnet_down_blocks = skip_channels
            .enumerate()
            .map(|(i, c)| zero_conv(format!("controlnet_down_blocks.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let last = channels[channels.len() - 1];
        Ok(Self {
            config: cfg.clone(),
            controlnet_cond_embedding: ControlNetConditioningEmbedding::new(
                vb.pp("controlnet_cond_embedding"),
                cfg.conditioning_channels,
                &cfg.conditioning_embedding_out_channels,
                channels[0],
            )?,
            encoder,
            controlnet_down_blocks,
            controlnet_mid_block: zero_conv("controlnet_mid_block".into(), last)?,
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The residuals for `sample` (batch, 4, h, w) at `timesteps` ((batch,), (1,) or ()) with
    /// `encoder_hidden_states` (batch, seq, cross_attention_dim), steered by `control_image`
    /// (batch, 3, 8h, 8w) RGB in [0, 1] (reversed first when the config says `bgr`).
    ///
    /// `down[i] = s_i * controlnet_down_blocks[i](skip_i)`, `mid = s_mid * controlnet_mid_block(mid)`
    /// with `s = conditioning_scale`, or in guess mode `s_i = conditioning_scale * 10^(-1 + i / n)`
    /// for the n + 1 residuals (mid last); with `global_pool_conditions` each residual is then
    /// averaged over its height and width.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        control_image: &Tensor,
        scale: ControlScale,
    ) -> Result<AdditionalResiduals> {
        let batch = sample.dim(0)?;
        let control_image = match self.config.controlnet_conditioning_channel_order {
            ChannelOrder::Rgb => control_image.clone(),
            ChannelOrder::Bgr => reverse_channels(control_image)?,
        };
        let temb_act = self.encoder.time_embedding(timesteps, batch, sample.dtype())?;
        let x = (self.encoder.conv_in(sample)? + self.controlnet_cond_embedding.forward(&control_image)?)?;
        let (mid, skips) = self.encoder.forward_down(&x, &temb_act, encoder_hidden_states)?;

        let n = skips.len();
        let scales: Vec<f64> = if scale.guess_mode && !self.config.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1) in f32, times the scale.
            (0..=n).map(|i| 10f32.powf(-1.0 + i as f32 / n as f32) as f64 * scale.conditioning_scale).collect()
        } else {
            vec![scale.conditioning_scale; n + 1]
        };
        let finish = |conv: &Conv2d, x: &Tensor, s: f64| -> Result<Tensor> {
            let residual = (conv.forward(x)? * s)?;
            if self.config.global_pool_conditions {
                residual.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(residual)
            }
        };
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .zip(&scales)
            .map(|((skip, conv), &s)| finish(conv, skip, s))
            .collect::<Result<Vec<_>>>()?;
        let mid = finish(&self.controlnet_mid_block, &mid, scales[n])?;
        Ok(AdditionalResiduals { down, mid })
    }
}

/// The channels of (batch, c, h, w) in reverse order (RGB to BGR).
fn reverse_channels(image: &Tensor) -> Result<Tensor> {
    let c = image.dim(1)?;
    let reversed: Vec<u32> = (0..c as u32).rev().collect();
    image.index_select(&Tensor::new(reversed, image.device())?, 1)
}

/// A ControlNet found on disk: a local folder or a hub id in the hub cache, holding
/// `config.json` and `diffusion_pytorch_model.safetensors` (or `.fp16.safetensors`, or the
/// PyTorch `diffusion_pytorch_model.bin`, fp16 or fp32).
#[derive(Debug, Clone)]
pub struct ControlNetDir {
    root: std::path::PathBuf,
    name: String,
}

impl ControlNetDir {
    /// Resolves `spec`, a folder or a hub id (found in the hub cache or fetched into it, the
    /// weights in the form [`ControlNetDir::load`] prefers for `dtype`).
    pub fn resolve(spec: &str, hub: &Hub, dtype: DType) -> crate::Result<Self> {
        let root = hub.resolve(spec, &Self::files(dtype))?;
        Ok(Self { root, name: spec.to_string() })
    }

    /// What [`ControlNetDir::config`] and [`ControlNetDir::load`] read.
    pub fn files(dtype: DType) -> ModelFiles {
        ModelFiles::new("ControlNet", OPENPOSE_SD21)
            .file("config.json")
            .weights(weights_file_names("diffusion_pytorch_model", dtype))
    }

    /// What the user called it (hub id or path), for metadata and messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads and checks `config.json`.
    pub fn config(&self) -> crate::Result<ControlNetConfig> {
        let file = self.root.join("config.json");
        let config: ControlNetConfig = crate::io::read_json(&file)?;
        config.validate().map_err(|e| crate::Error::Config { file, msg: e.to_string() })?;
        Ok(config)
    }

    /// Checks that `config` (this folder's) fits the base model of `sd`, named `model`: the error
    /// names both.
    pub fn check_fits(&self, config: &ControlNetConfig, sd: &SdConfigs, model: &str) -> crate::Result<()> {
        match config.mismatch(sd) {
            None => Ok(()),
            Some(problem) => Err(crate::Error::UnsupportedModel(format!(
                "ControlNet {} does not fit base model {model}: {problem}; use a ControlNet trained for {model}",
                self.name
            ))),
        }
    }

    /// Loads the weights in `precision` (that of the Stable Diffusion it guides) on `device`.
    pub fn load(
        &self,
        config: &ControlNetConfig,
        precision: impl Into<crate::nn::Precision>,
        device: &Device,
    ) -> crate::Result<ControlNetModel> {
        let crate::nn::Precision { dtype, matrices } = precision.into();
        let weights = folder_weights(&self.root, "diffusion_pytorch_model", dtype, device, "ControlNet weights")?;
        super::build_packed(weights, matrices, |vb| ControlNetModel::new(vb, config))
    }
}
