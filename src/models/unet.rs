//! The denoising UNet of Stable Diffusion 1.x / 2.x: diffusers' `UNet2DConditionModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py>),
//! loaded from a diffusers `unet/` folder (weight names kept as module names).
//!
//! Differences from diffusers are deliberate and invisible in the results: the SiLU of the time
//! embedding, which every resnet applies first, is computed once per forward; every block is
//! built from [`crate::nn`], so the output is differentiable w.r.t. the sample and the encoder
//! hidden states. Config features Stable Diffusion does not use are rejected by
//! [`UNet2DConditionConfig::validate`].

use std::fmt::Debug;

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::blocks::attention::TransformerSpec;
use crate::models::blocks::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::models::blocks::unet_2d::{DownBlock, MidBlock, StageSpec, UpBlock};
use crate::models::config::ConfigChecks;
use crate::nn::{silu, Conv2d, Conv2dConfig, GroupNorm};

/// Down blocks a UNet may have: each after the first halves the latents (Stable Diffusion has 4).
const MAX_BLOCKS: usize = 8;
/// Resnets or transformers one block may have (Stable Diffusion has 2 and 1, SDXL up to 10):
/// a bound for counts that size lists before any weight is read.
const MAX_LAYERS: usize = 100;

/// A config value given once for all blocks or as a list with one entry per down block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a value or a list with one value per block")]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + Debug> PerBlock<T> {
    /// The value of each of `n` blocks; `field` names the config key in the error.
    pub fn expand(&self, field: &str, n: usize) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Each(vs) if vs.len() == n => Ok(vs.clone()),
            Self::Each(vs) => Err(UNET.invalid(field, vs, format_args!("has {} entries for {n} blocks", vs.len()))),
        }
    }
}

/// `unet/config.json`, with diffusers' defaults for missing keys; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// The training latent size, an int or `[height, width]` (informative; any size runs).
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
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
    /// The number of heads per block, whatever the name (diffusers' historical naming), unless
    /// `num_attention_heads` is given.
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some(MID_BLOCK.to_string()),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".to_string(),
        }
    }
}

const MID_BLOCK: &str = "UNetMidBlock2DCrossAttn";

const UNET: ConfigChecks = ConfigChecks { name: "unet config", supported: "only Stable Diffusion 1.x/2.x UNets are" };

/// The per-block values of a validated config, down blocks in order.
struct Plan {
    /// Whether each down block, and each up block (in up order), has transformers.
    down_attention: Vec<bool>,
    up_attention: Vec<bool>,
    heads: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_attention_dim: Vec<usize>,
    norm_groups: usize,
}

impl UNet2DConditionConfig {
    /// Checks that the config describes a UNet this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan> {
        UNET.expect_eq("center_input_sample", &self.center_input_sample, &false)?;
        UNET.expect_eq("mid_block_type", &self.mid_block_type.as_deref(), &Some(MID_BLOCK))?;
        UNET.expect_eq("downsample_padding", &self.downsample_padding, &1)?;
        UNET.expect_eq("mid_block_scale_factor", &self.mid_block_scale_factor, &1.0)?;
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(UNET.unsupported("act_fn", &self.act_fn));
        }
        let Some(norm_groups) = self.norm_num_groups else {
            return Err(UNET.unsupported("norm_num_groups", &self.norm_num_groups));
        };
        UNET.expect_unset("encoder_hid_dim", &self.encoder_hid_dim)?;
        UNET.expect_unset("encoder_hid_dim_type", &self.encoder_hid_dim_type)?;
        // diffusers itself refuses this key for `UNet2DConditionModel`.
        UNET.expect_unset("num_attention_heads", &self.num_attention_heads)?;
        UNET.expect_eq("dual_cross_attention", &self.dual_cross_attention, &false)?;
        UNET.expect_unset("class_embed_type", &self.class_embed_type)?;
        UNET.expect_unset("addition_embed_type", &self.addition_embed_type)?;
        UNET.expect_unset("num_class_embeds", &self.num_class_embeds)?;
        UNET.expect_eq("resnet_time_scale_shift", &self.resnet_time_scale_shift.as_str(), &"default")?;
        UNET.expect_eq("time_embedding_type", &self.time_embedding_type.as_str(), &"positional")?;
        UNET.expect_unset("time_embedding_dim", &self.time_embedding_dim)?;
        UNET.expect_unset("time_embedding_act_fn", &self.time_embedding_act_fn)?;
        UNET.expect_unset("timestep_post_act", &self.timestep_post_act)?;
        UNET.expect_unset("time_cond_proj_dim", &self.time_cond_proj_dim)?;
        UNET.expect_eq("conv_in_kernel", &self.conv_in_kernel, &3)?;
        UNET.expect_eq("conv_out_kernel", &self.conv_out_kernel, &3)?;
        UNET.expect_eq("attention_type", &self.attention_type.as_str(), &"default")?;

        let n = self.block_out_channels.len();
        if n > MAX_BLOCKS {
            return Err(UNET.invalid(
                "block_out_channels",
                &format_args!("[{n} entries]"),
                format_args!("has more than {MAX_BLOCKS} blocks (each halves the latents; Stable Diffusion has 4)"),
            ));
        }
        UNET.expect_same_lengths(&[
            ("block_out_channels", self.block_out_channels.len()),
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ])?;
        let only_cross = self.only_cross_attention.expand("only_cross_attention", n)?;
        if only_cross.iter().any(|&b| b) {
            return Err(UNET.unsupported("only_cross_attention", &self.only_cross_attention));
        }
        let block_kinds = |field: &str, types: &[String], cross: &str, plain: &str| {
            types
                .iter()
                .map(|t| match t.as_str() {
                    t if t == cross => Ok(true),
                    t if t == plain => Ok(false),
                    _ => Err(UNET.unsupported(field, t)),
                })
                .collect::<Result<Vec<_>>>()
        };
        let down_attention =
            block_kinds("down_block_types", &self.down_block_types, "CrossAttnDownBlock2D", "DownBlock2D")?;
        let up_attention = block_kinds("up_block_types", &self.up_block_types, "CrossAttnUpBlock2D", "UpBlock2D")?;
        let heads = self.attention_head_dim.expand("attention_head_dim", n)?;
        for (&channels, &h) in self.block_out_channels.iter().zip(&heads) {
            if h == 0 || channels % h != 0 {
                bail!("unet config: {channels} channels do not split into `attention_head_dim` = {h} heads")
            }
        }
        let layers = self.layers_per_block.expand("layers_per_block", n)?;
        let transformer_layers = self.transformer_layers_per_block.expand("transformer_layers_per_block", n)?;
        for (field, counts) in [("layers_per_block", &layers), ("transformer_layers_per_block", &transformer_layers)] {
            if let Some(count) = counts.iter().find(|&&c| c > MAX_LAYERS) {
                bail!("unet config: `{field}` = {count}: at most {MAX_LAYERS} layers per block are supported")
            }
        }
        Ok(Plan {
            down_attention,
            up_attention,
            heads,
            layers,
            transformer_layers,
            cross_attention_dim: self.cross_attention_dim.expand("cross_attention_dim", n)?,
            norm_groups,
        })
    }
}

/// What a ControlNet adds to the UNet ([`UNet2DConditionModel::forward_with_additional_residuals`]).
#[derive(Debug, Clone)]
pub struct AdditionalResiduals {
    /// One per skip connection, in the order the down path makes them: `conv_in`'s output, then
    /// each down block's resnet (or transformer) outputs and its downsampler's output (12 for
    /// Stable Diffusion), each shaped like its skip connection.
    pub down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub mid: Tensor,
}

/// Noise-prediction UNet conditioned on a timestep and encoder hidden states.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` at the root of `diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let plan = cfg.plan()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let time_embed_dim = 4 * channels[0];
        let stage = StageSpec { temb_channels: time_embed_dim, norm_groups: plan.norm_groups, norm_eps: cfg.norm_eps };
        // The transformers of block `i` (down numbering).
        let attention = |i: usize| TransformerSpec {
            channels: channels[i],
            heads: plan.heads[i],
            cross_attention_dim: plan.cross_attention_dim[i],
            norm_groups: plan.norm_groups,
            use_linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        };

        let down_blocks = (0..n)
            .map(|i| {
                let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
                DownBlock::new(
                    vb.pp(format!("down_blocks.{i}")),
                    &stage,
                    in_channels,
                    channels[i],
                    &vec![plan.transformer_layers[i]; plan.layers[i]],
                    plan.down_attention[i].then(|| attention(i)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            &stage,
            channels[n - 1],
            plan.transformer_layers[n - 1],
            &attention(n - 1),
        )?;
        let up_blocks = (0..n)
            .map(|i| {
                let d = n - 1 - i; // the mirrored down block
                UpBlock::new(
                    vb.pp(format!("up_blocks.{i}")),
                    &stage,
                    channels[(d + 1).min(n - 1)],
                    channels[d.saturating_sub(1)],
                    channels[d],
                    &vec![plan.transformer_layers[d]; plan.layers[d] + 1],
                    plan.up_attention[i].then(|| attention(d)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(Self {
            config: cfg.clone(),
            conv_in: Conv2d::new(
                vb.pp("conv_in"),
                cfg.in_channels,
                channels[0],
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_embed_dim)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), plan.norm_groups, channels[0], cfg.norm_eps)?,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                channels[0],
                cfg.out_channels,
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Noise prediction for `sample` (batch, C, h, w) at `timesteps` (shape (batch,), one per
    /// sample, any dtype; a (1,) tensor broadcasts) with `encoder_hidden_states`
    /// (batch, seq, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward_with_additional_residuals(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward) with a ControlNet's residuals added to the skip connections
    /// and to the mid block's output (diffusers' `down_block_additional_residuals` and
    /// `mid_block_additional_residual`).
    pub fn forward_with_additional_residuals(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        residuals: Option<&AdditionalResiduals>,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.dims4()?;
        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?,
            [n] if *n == 1 || *n == batch => timesteps.clone(),
            dims => bail!("unet: timesteps of shape {dims:?} for a batch of {batch} (expected ({batch},) or (1,))"),
        };
        let t_emb = timestep_embedding(
            &timesteps.broadcast_as(batch)?,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(sample.dtype())?;
        let temb_act = self.time_embedding.forward(&t_emb)?.silu()?;

        // Sizes not divisible by the total downsampling make every upsampler resize to its skip
        // connection's size instead of doubling (diffusers' `forward_upsample_size`).
        let factor = 1 << (self.up_blocks.len() - 1);
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&x, &temb_act, encoder_hidden_states)?;
            x = out;
            skips.extend(states);
        }
        x = self.mid_block.forward(&x, &temb_act, encoder_hidden_states)?;
        if let Some(residuals) = residuals {
            if residuals.down.len() != skips.len() {
                bail!("unet: {} down-block residuals for {} skip connections", residuals.down.len(), skips.len())
            }
            for (skip, residual) in skips.iter_mut().zip(&residuals.down) {
                *skip = (&*skip + residual)?;
            }
            x = (x + &residuals.mid)?;
        }
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
            x = block.forward(&x, &block_skips, &temb_act, encoder_hidden_states, upsample_size)?;
        }
        self.conv_out.forward(&silu(&self.conv_norm_out.forward(&x)?)?)
    }
}
