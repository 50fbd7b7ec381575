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

use crate::models::blocks::unet_2d::{EncoderSpec, UNetEncoder, UpBlock};
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
        self.expand_checked(&UNET, field, n)
    }

    /// [`expand`](Self::expand) for the config that `checks` names.
    pub(crate) fn expand_checked(&self, checks: &ConfigChecks, field: &str, n: usize) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Each(vs) if vs.len() == n => Ok(vs.clone()),
            Self::Each(vs) => Err(checks.invalid(field, vs, format_args!("has {} entries for {n} blocks", vs.len()))),
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

/// The per-block values of a validated config.
struct Plan {
    encoder: EncoderSpec,
    /// Whether each up block (in up order) has transformers.
    up_attention: Vec<bool>,
}

impl UNet2DConditionConfig {
    /// Checks that the config describes a UNet this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan> {
        UNET.expect_eq("center_input_sample", &self.center_input_sample, &false)?;
        UNET.expect_eq("conv_out_kernel", &self.conv_out_kernel, &3)?;
        self.block_count(&UNET)?;
        UNET.expect_same_lengths(&[
            ("block_out_channels", self.block_out_channels.len()),
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ])?;
        let encoder = self.encoder_spec(&UNET)?;
        let up_attention =
            block_kinds(&UNET, "up_block_types", &self.up_block_types, "CrossAttnUpBlock2D", "UpBlock2D")?;
        Ok(Plan { encoder, up_attention })
    }

    /// The number of blocks, refused beyond [`MAX_BLOCKS`] before any per-block list is read.
    fn block_count(&self, checks: &ConfigChecks) -> Result<usize> {
        let n = self.block_out_channels.len();
        if n > MAX_BLOCKS {
            return Err(checks.invalid(
                "block_out_channels",
                &format_args!("[{n} entries]"),
                format_args!("has more than {MAX_BLOCKS} blocks (each halves the latents; Stable Diffusion has 4)"),
            ));
        }
        Ok(n)
    }

    /// The shape of the UNet's first half (what a ControlNet copies), checked.
    pub(crate) fn encoder(&self) -> Result<EncoderSpec> {
        self.encoder_spec(&UNET)
    }

    /// Checks the keys that shape the UNet's first half (what a ControlNet copies) and returns
    /// that shape; `checks` names the config in errors.
    pub(crate) fn encoder_spec(&self, checks: &ConfigChecks) -> Result<EncoderSpec> {
        checks.expect_eq("mid_block_type", &self.mid_block_type.as_deref(), &Some(MID_BLOCK))?;
        checks.expect_eq("downsample_padding", &self.downsample_padding, &1)?;
        checks.expect_eq("mid_block_scale_factor", &self.mid_block_scale_factor, &1.0)?;
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(checks.unsupported("act_fn", &self.act_fn));
        }
        let Some(norm_groups) = self.norm_num_groups else {
            return Err(checks.unsupported("norm_num_groups", &self.norm_num_groups));
        };
        checks.expect_unset("encoder_hid_dim", &self.encoder_hid_dim)?;
        checks.expect_unset("encoder_hid_dim_type", &self.encoder_hid_dim_type)?;
        // diffusers itself refuses this key for `UNet2DConditionModel`.
        checks.expect_unset("num_attention_heads", &self.num_attention_heads)?;
        checks.expect_eq("dual_cross_attention", &self.dual_cross_attention, &false)?;
        checks.expect_unset("class_embed_type", &self.class_embed_type)?;
        checks.expect_unset("addition_embed_type", &self.addition_embed_type)?;
        checks.expect_unset("num_class_embeds", &self.num_class_embeds)?;
        checks.expect_eq("resnet_time_scale_shift", &self.resnet_time_scale_shift.as_str(), &"default")?;
        checks.expect_eq("time_embedding_type", &self.time_embedding_type.as_str(), &"positional")?;
        checks.expect_unset("time_embedding_dim", &self.time_embedding_dim)?;
        checks.expect_unset("time_embedding_act_fn", &self.time_embedding_act_fn)?;
        checks.expect_unset("timestep_post_act", &self.timestep_post_act)?;
        checks.expect_unset("time_cond_proj_dim", &self.time_cond_proj_dim)?;
        checks.expect_eq("conv_in_kernel", &self.conv_in_kernel, &3)?;
        checks.expect_eq("attention_type", &self.attention_type.as_str(), &"default")?;

        let n = self.block_count(checks)?;
        checks.expect_same_lengths(&[
            ("block_out_channels", self.block_out_channels.len()),
            ("down_block_types", self.down_block_types.len()),
        ])?;
        let only_cross = self.only_cross_attention.expand_checked(checks, "only_cross_attention", n)?;
        if only_cross.iter().any(|&b| b) {
            return Err(checks.unsupported("only_cross_attention", &self.only_cross_attention));
        }
        let down_attention =
            block_kinds(checks, "down_block_types", &self.down_block_types, "CrossAttnDownBlock2D", "DownBlock2D")?;
        let heads = self.attention_head_dim.expand_checked(checks, "attention_head_dim", n)?;
        for (&channels, &h) in self.block_out_channels.iter().zip(&heads) {
            if h == 0 || channels % h != 0 {
                bail!("{}: {channels} channels do not split into `attention_head_dim` = {h} heads", checks.name)
            }
        }
        let layers = self.layers_per_block.expand_checked(checks, "layers_per_block", n)?;
        let transformer_layers =
            self.transformer_layers_per_block.expand_checked(checks, "transformer_layers_per_block", n)?;
        for (field, counts) in [("layers_per_block", &layers), ("transformer_layers_per_block", &transformer_layers)] {
            if let Some(count) = counts.iter().find(|&&c| c > MAX_LAYERS) {
                bail!("{}: `{field}` = {count}: at most {MAX_LAYERS} layers per block are supported", checks.name)
            }
        }
        Ok(EncoderSpec {
            in_channels: self.in_channels,
            block_out_channels: self.block_out_channels.clone(),
            down_attention,
            heads,
            layers,
            transformer_layers,
            cross_attention_dim: self.cross_attention_dim.expand_checked(checks, "cross_attention_dim", n)?,
            norm_groups,
            norm_eps: self.norm_eps,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        })
    }
}

/// Whether each block of `types` (config key `field`) is the `cross` kind (with transformers) or
/// the `plain` one.
fn block_kinds(checks: &ConfigChecks, field: &str, types: &[String], cross: &str, plain: &str) -> Result<Vec<bool>> {
    types
        .iter()
        .map(|t| match t.as_str() {
            t if t == cross => Ok(true),
            t if t == plain => Ok(false),
            _ => Err(checks.unsupported(field, t)),
        })
        .collect()
}

/// What a ControlNet adds to the UNet ([`UNet2DConditionModel::forward_with_additional_residuals`]).
#[derive(Debug, Clone)]
pub struct AdditionalResiduals {
    /// One per skip connection, in the order the down path makes them: `conv_in`'s output, then
    /// each down block's resnet (or transformer) outputs and its downsampler's output (12 for
    /// Stable Diffusion), each shaped like its skip connection (or (batch, channels, 1, 1),
    /// broadcast over it).
    pub down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub mid: Tensor,
}

/// Noise-prediction UNet conditioned on a timestep and encoder hidden states.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    /// `conv_in`, `time_embedding`, `down_blocks`, `mid_block`.
    encoder: UNetEncoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` at the root of `diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let Plan { encoder: spec, up_attention } = cfg.plan()?;
        let channels = &spec.block_out_channels;
        let n = channels.len();
        let stage = spec.stage();
        let encoder = UNetEncoder::new(&vb, &spec)?;
        let up_blocks = (0..n)
            .map(|i| {
                let d = n - 1 - i; // the mirrored down block
                UpBlock::new(
                    vb.pp(format!("up_blocks.{i}")),
                    &stage,
                    channels[(d + 1).min(n - 1)],
                    channels[d.saturating_sub(1)],
                    channels[d],
                    &vec![spec.transformer_layers[d]; spec.layers[d] + 1],
                    up_attention[i].then(|| spec.attention(d)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(Self {
            config: cfg.clone(),
            encoder,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), spec.norm_groups, channels[0], cfg.norm_eps)?,
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
        let temb_act = self.encoder.time_embedding(timesteps, batch, sample.dtype())?;

        // Sizes not divisible by the total downsampling make every upsampler resize to its skip
        // connection's size instead of doubling (diffusers' `forward_upsample_size`).
        let factor = 1 << (self.up_blocks.len() - 1);
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        let (mut x, mut skips) =
            self.encoder.forward_down(&self.encoder.conv_in(sample)?, &temb_act, encoder_hidden_states)?;
        if let Some(residuals) = residuals {
            if residuals.down.len() != skips.len() {
                bail!("unet: {} down-block residuals for {} skip connections", residuals.down.len(), skips.len())
            }
            // Broadcast: a ControlNet with `global_pool_conditions` gives (batch, c, 1, 1) means.
            for (skip, residual) in skips.iter_mut().zip(&residuals.down) {
                *skip = skip.broadcast_add(residual)?;
            }
            x = x.broadcast_add(&residuals.mid)?;
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
