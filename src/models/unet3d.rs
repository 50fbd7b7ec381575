//! The video denoising UNet of ModelScope text-to-video (and Zeroscope): diffusers'
//! `UNet3DConditionModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_3d_condition.py>),
//! loaded from a diffusers `unet/` folder such as ali-vilab/text-to-video-ms-1.7b's, weight names
//! kept as module names.
//!
//! The frames are folded into the batch, `(batch * frames, c, h, w)`, so every 2-D layer (resnets,
//! spatial transformers, resamplers: the image UNet's, from [`crate::models::blocks`]) sees each
//! frame as an image; the temporal layers ([`crate::models::blocks::temporal`]) mix the frames.
//! As in the image UNet, the SiLU of the time embedding is computed once per forward. Features
//! diffusers rejects or ModelScope does not use (`num_attention_heads`, `time_cond_proj_dim`) are
//! rejected by [`UNet3DConditionConfig::validate`].

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::blocks::attention::TransformerSpec;
use crate::models::blocks::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::models::blocks::temporal::{TemporalTransformerSpec, TransformerTemporalModel};
use crate::models::blocks::unet_2d::StageSpec;
use crate::models::blocks::unet_3d::{DownBlock3D, MidBlock3D, UpBlock3D};
use crate::models::config::ConfigChecks;
use crate::models::unet::PerBlock;
use crate::nn::{silu, Conv2d, Conv2dConfig, GroupNorm};

/// The class name diffusers writes into a video UNet's `config.json`.
pub const CLASS_NAME: &str = "UNet3DConditionModel";

/// Down blocks a UNet may have (ModelScope has 4).
const MAX_BLOCKS: usize = 8;
/// Resnets per block (ModelScope has 2): a bound before any list is sized from the config.
const MAX_LAYERS: usize = 100;
/// The input temporal transformer's head count, fixed in diffusers (its head width is
/// `attention_head_dim`).
const TRANSFORMER_IN_HEADS: usize = 8;

const UNET3D: ConfigChecks =
    ConfigChecks { name: "unet config", supported: "only ModelScope-style UNet3DConditionModels are" };

/// `unet/config.json`, with diffusers' defaults for missing keys; unknown keys are ignored
/// (older ModelScope configs also list keys diffusers hard-codes, such as `flip_sin_to_cos`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet3DConditionConfig {
    /// The diffusers class; a folder holding another model is named in the error.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// The training latent size (informative; any size runs).
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// The width of each attention head (diffusers passes it as the 3-D blocks' "number of
    /// heads", which they use as the head width): heads = channels / this.
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub time_cond_proj_dim: Option<usize>,
}

impl Default for UNet3DConditionConfig {
    fn default() -> Self {
        let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Self {
            class_name: None,
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            down_block_types: strings(&[
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "DownBlock3D",
            ]),
            up_block_types: strings(&["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::One(64),
            num_attention_heads: None,
            time_cond_proj_dim: None,
        }
    }
}

/// The per-block values of a validated config.
struct Plan {
    norm_groups: usize,
    /// Head width of each down block.
    head_dims: Vec<usize>,
    down_attention: Vec<bool>,
    /// In up order.
    up_attention: Vec<bool>,
}

impl UNet3DConditionConfig {
    /// Checks that the config describes a UNet this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan> {
        if let Some(class) = &self.class_name {
            if class != CLASS_NAME {
                // Error::Msg, not `bail!`: the message stays one line (no backtrace).
                return Err(candle_core::Error::Msg(format!(
                    "unet config: `_class_name` = {class:?}: this folder holds a {class}, not a {CLASS_NAME} \
                     (a text-to-video model such as ali-vilab/text-to-video-ms-1.7b)"
                )));
            }
        }
        UNET3D.expect_eq("downsample_padding", &self.downsample_padding, &1)?;
        UNET3D.expect_eq("mid_block_scale_factor", &self.mid_block_scale_factor, &1.0)?;
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(UNET3D.unsupported("act_fn", &self.act_fn));
        }
        let Some(norm_groups) = self.norm_num_groups else {
            return Err(UNET3D.unsupported("norm_num_groups", &self.norm_num_groups));
        };
        // diffusers refuses both.
        UNET3D.expect_unset("num_attention_heads", &self.num_attention_heads)?;
        UNET3D.expect_unset("time_cond_proj_dim", &self.time_cond_proj_dim)?;
        let n = self.block_out_channels.len();
        if n > MAX_BLOCKS {
            return Err(UNET3D.invalid(
                "block_out_channels",
                &format_args!("[{n} entries]"),
                format_args!("has more than {MAX_BLOCKS} blocks"),
            ));
        }
        UNET3D.expect_same_lengths(&[
            ("block_out_channels", n),
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ])?;
        if self.layers_per_block == 0 || self.layers_per_block > MAX_LAYERS {
            return Err(UNET3D.invalid(
                "layers_per_block",
                &self.layers_per_block,
                format_args!("must be 1 to {MAX_LAYERS}"),
            ));
        }
        let head_dims = self.attention_head_dim.expand_checked(&UNET3D, "attention_head_dim", n)?;
        for (&channels, &d) in self.block_out_channels.iter().zip(&head_dims) {
            UNET3D.expect_divides("attention_head_dim", d, "block_out_channels", channels)?;
        }
        for &channels in &self.block_out_channels {
            UNET3D.expect_divides("norm_num_groups", norm_groups, "block_out_channels", channels)?;
        }
        let kinds = |field, types: &[String], cross: &str, plain: &str| -> Result<Vec<bool>> {
            types
                .iter()
                .map(|t| match t.as_str() {
                    t if t == cross => Ok(true),
                    t if t == plain => Ok(false),
                    _ => Err(UNET3D.unsupported(field, &t)),
                })
                .collect()
        };
        Ok(Plan {
            norm_groups,
            head_dims,
            down_attention: kinds("down_block_types", &self.down_block_types, "CrossAttnDownBlock3D", "DownBlock3D")?,
            up_attention: kinds("up_block_types", &self.up_block_types, "CrossAttnUpBlock3D", "UpBlock3D")?,
        })
    }
}

/// Video noise-prediction UNet conditioned on a timestep and encoder hidden states.
#[derive(Debug, Clone)]
pub struct UNet3DConditionModel {
    config: UNet3DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    transformer_in: TransformerTemporalModel,
    down_blocks: Vec<DownBlock3D>,
    mid_block: MidBlock3D,
    up_blocks: Vec<UpBlock3D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet3DConditionModel {
    /// Builds the model from `vb` at the root of `diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &UNet3DConditionConfig) -> Result<Self> {
        let Plan { norm_groups, head_dims, down_attention, up_attention } = cfg.plan()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let time_embed_dim = 4 * channels[0];
        let stage = StageSpec { temb_channels: time_embed_dim, norm_groups, norm_eps: cfg.norm_eps };
        let attention = |i: usize| TransformerSpec {
            channels: channels[i],
            heads: channels[i] / head_dims[i],
            cross_attention_dim: cfg.cross_attention_dim,
            norm_groups,
            use_linear_projection: true,
            upcast_attention: false,
        };
        let down_blocks = (0..n)
            .map(|i| {
                DownBlock3D::new(
                    vb.pp(format!("down_blocks.{i}")),
                    &stage,
                    channels[i.saturating_sub(1)],
                    channels[i],
                    cfg.layers_per_block,
                    down_attention[i].then(|| attention(i)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = (0..n)
            .map(|i| {
                let d = n - 1 - i; // the mirrored down block
                UpBlock3D::new(
                    vb.pp(format!("up_blocks.{i}")),
                    &stage,
                    channels[(d + 1).min(n - 1)],
                    channels[d.saturating_sub(1)],
                    channels[d],
                    cfg.layers_per_block + 1,
                    up_attention[i].then(|| attention(d)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let transformer_in = TemporalTransformerSpec {
            channels: channels[0],
            heads: TRANSFORMER_IN_HEADS,
            head_dim: head_dims[0],
            norm_groups,
        };
        let same = Conv2dConfig { padding: 1, stride: 1 };
        Ok(Self {
            config: cfg.clone(),
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, channels[0], 3, same)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_embed_dim)?,
            transformer_in: TransformerTemporalModel::new(vb.pp("transformer_in"), &transformer_in, 1)?,
            down_blocks,
            mid_block: MidBlock3D::new(vb.pp("mid_block"), &stage, &attention(n - 1))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), norm_groups, channels[0], cfg.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), channels[0], cfg.out_channels, 3, same)?,
        })
    }

    pub fn config(&self) -> &UNet3DConditionConfig {
        &self.config
    }

    /// Noise prediction (batch, C, frames, h, w) for `sample` (batch, C, frames, h, w) at
    /// `timesteps` (shape (batch,), (1,) or (), any dtype; one per video) with
    /// `encoder_hidden_states` (batch, seq, cross_attention_dim), shared by the frames of a video.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (batch, c, frames, height, width) = sample.dims5()?;
        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?,
            [n] if *n == 1 || *n == batch => timesteps.clone(),
            dims => bail!("unet3d: timesteps of shape {dims:?} for a batch of {batch} (expected ({batch},) or (1,))"),
        };
        let t_emb = timestep_embedding(&timesteps.broadcast_as(batch)?, self.config.block_out_channels[0], true, 0.0)?
            .to_dtype(sample.dtype())?;
        // Each video's embedding and text for each of its frames (`repeat_interleave`).
        let per_frame = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            let rest = dims.split_off(1);
            let expanded: Vec<usize> = [batch, frames].into_iter().chain(rest.iter().copied()).collect();
            let folded: Vec<usize> = [batch * frames].into_iter().chain(rest).collect();
            t.unsqueeze(1)?.broadcast_as(expanded)?.reshape(folded)
        };
        let temb_act = per_frame(&self.time_embedding.forward(&t_emb)?.silu()?)?;
        let context = per_frame(encoder_hidden_states)?;

        // Sizes not divisible by the total downsampling make every upsampler resize to its skip
        // connection's size instead of doubling (diffusers' `forward_upsample_size`).
        let factor = 1 << (self.up_blocks.len() - 1);
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        let x = sample.permute((0, 2, 1, 3, 4))?.reshape((batch * frames, c, height, width))?;
        let mut x = self.transformer_in.forward(&self.conv_in.forward(&x)?, frames)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&x, &temb_act, &context, frames)?;
            x = out;
            skips.extend(states);
        }
        x = self.mid_block.forward(&x, &temb_act, &context, frames)?;
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.num_skips());
            let upsample_size = match skips.last() {
                Some(next) if i < last && forward_upsample_size => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            x = block.forward(&x, &block_skips, &temb_act, &context, frames, upsample_size)?;
        }
        let out = self.conv_out.forward(&silu(&self.conv_norm_out.forward(&x)?)?)?;
        let (_, out_c, h, w) = out.dims4()?;
        out.reshape((batch, frames, out_c, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()
    }
}
