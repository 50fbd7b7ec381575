//! The Stable Diffusion VAE, as diffusers' `AutoencoderKL`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py>,
//! blocks in `autoencoders/vae.py`, `unets/unet_2d_blocks.py`, `resnet.py`).
//!
//! The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents (the identity learner
//! samples it every step); the decoder maps latents back to an image. Module names follow
//! diffusers' weight names. Built from [`crate::nn`] blocks, so both directions back-propagate.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::blocks::resnet::{ResnetBlock2D, Upsample2D};
use crate::models::config::ConfigChecks;
use crate::nn::{attention, Conv2d, Conv2dConfig, GroupNorm, Linear};

/// The resnets and attention of the VAE use this epsilon in every group norm.
const NORM_EPS: f64 = 1e-6;
/// Blocks the VAE may have: each after the first halves the image (Stable Diffusion has 4).
const MAX_BLOCKS: usize = 8;

/// `sample_size` of a diffusers config: one side or (height, width).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

/// The fields of a diffusers `AutoencoderKL` config (vae/config.json); missing keys take
/// diffusers' defaults, unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Training image size; informative only.
    pub sample_size: SampleSize,
    /// Latents fed to the UNet are `scaling_factor` times the VAE's; callers apply it.
    pub scaling_factor: f64,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_BLOCK.to_string()],
            up_block_types: vec![UP_BLOCK.to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

const VAE: ConfigChecks = ConfigChecks {
    name: "vae config",
    supported: "only SiLU VAEs of DownEncoderBlock2D / UpDecoderBlock2D blocks are",
};

impl AutoencoderKLConfig {
    /// Checks that the config describes a VAE this module implements; the error names the
    /// offending field and its value.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(VAE.unsupported("act_fn", &self.act_fn));
        }
        let n = self.block_out_channels.len();
        if n > MAX_BLOCKS {
            return Err(VAE.invalid(
                "block_out_channels",
                &format_args!("[{n} entries]"),
                format_args!(
                    "has more than {MAX_BLOCKS} blocks (each after the first halves the image; Stable Diffusion has 4)"
                ),
            ));
        }
        VAE.expect_same_lengths(&[
            ("block_out_channels", self.block_out_channels.len()),
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ])?;
        for t in &self.down_block_types {
            VAE.expect_eq("down_block_types", &t.as_str(), &DOWN_BLOCK)?;
        }
        for t in &self.up_block_types {
            VAE.expect_eq("up_block_types", &t.as_str(), &UP_BLOCK)?;
        }
        Ok(())
    }
}

/// diffusers `Attention` as built by the VAE mid block: group norm, one head over all channels,
/// residual connection.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 name the projections query/key/value/proj_attn.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        let linear = |n: &str| Linear::new(vb.pp(n), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, NORM_EPS)?,
            to_q: linear(name("to_q", "query"))?,
            to_k: linear(name("to_k", "key"))?,
            to_v: linear(name("to_v", "value"))?,
            to_out: linear(name("to_out.0", "proj_attn"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // (b, c, h, w) -> (b, 1 head, h*w tokens, c)
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let one_head = |t: Tensor| t.unsqueeze(1);
        let q = one_head(self.to_q.forward(&tokens)?)?;
        let k = one_head(self.to_k.forward(&tokens)?)?;
        let v = one_head(self.to_v.forward(&tokens)?)?;
        let y = self.to_out.forward(&attention(&q, &k, &v, None)?.squeeze(1)?)?;
        x + y.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

/// diffusers `UNetMidBlock2D` (one layer): resnet, attention (optional), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let resnet =
            |i: usize| ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), channels, channels, None, groups, NORM_EPS);
        let attention =
            if add_attention { Some(AttentionBlock::new(vb.pp("attentions.0"), channels, groups)?) } else { None };
        Ok(Self { resnets: [resnet(0)?, resnet(1)?], attention })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

/// diffusers `DownEncoderBlock2D`: resnets, then (except for the last block) a stride-2 conv
/// after zero padding on the right and bottom only (`Downsample2D` with `padding=0`).
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

impl DownEncoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None)?;
        }
        match &self.downsampler {
            Some(conv) => conv.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?),
            None => Ok(x),
        }
    }
}

/// diffusers `UpDecoderBlock2D`: resnets, then (except for the last block) a nearest 2x
/// upsample and a 3x3 conv.
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None)?;
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&x, None),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        let mut down_blocks = Vec::with_capacity(ch.len());
        for (i, &out_ch) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let block_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), block_in, out_ch, None, groups, NORM_EPS)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < ch.len() {
                Some(Conv2d::new(
                    vb.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    Conv2dConfig { padding: 0, stride: 2 },
                )?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, Conv2dConfig { padding: 1, stride: 1 })?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, groups, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, last, NORM_EPS)?,
            // Mean and log-variance, stacked on the channel axis.
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                last,
                2 * cfg.latent_channels,
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward(&x)?.silu()?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &out_ch) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let in_ch = if i == 0 { reversed[0] } else { reversed[i - 1] };
            // The decoder has one resnet more per block than the encoder.
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let block_in = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), block_in, out_ch, None, groups, NORM_EPS)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < reversed.len() { Some(Upsample2D::new(vb.pp("upsamplers.0"), out_ch)?) } else { None };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        let (first, last) = (reversed[reversed.len() - 1], reversed[0]);
        Ok(Self {
            conv_in: Conv2d::new(
                vb.pp("conv_in"),
                cfg.latent_channels,
                last,
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, groups, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, first, NORM_EPS)?,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                first,
                cfg.out_channels,
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&x)?.silu()?)
    }
}

/// The posterior of the encoder: a Gaussian with diagonal covariance, (batch, latent, h, w).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * noise`, with `noise` standard normal of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Loads the weights from `vb` at the root of vae/diffusion_pytorch_model.safetensors.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, Conv2dConfig::default())?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), latent, latent, 1, Conv2dConfig::default())?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Image side / latent side: 2^(number of blocks - 1), 8 for Stable Diffusion.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// The posterior over (unscaled) latents of images `x` (batch, 3, H, W) in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?;
        // Clamped as diffusers, so that exp stays finite.
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30.0, 20.0)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// Images (batch, 3, H, W), about [-1, 1], of unscaled latents `z` (the caller divides the
    /// UNet's latents by `scaling_factor`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(z)?),
            None => self.decoder.forward(z),
        }
    }
}
