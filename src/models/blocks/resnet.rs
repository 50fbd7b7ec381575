//! `ResnetBlock2D` (`diffusers/models/resnet.py`), `Downsample2D` (`downsampling.py`) and
//! `Upsample2D` (`upsampling.py`), in the configuration Stable Diffusion uses: pre-norm, SiLU,
//! time embedding (UNet only) added after `conv1`, convolutional down/upsamplers. Shared by the
//! UNet and the VAE.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{add, resize_nearest, silu, Conv2d, Conv2dConfig, GroupNorm, Linear};

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Projection of the time embedding; the VAE's blocks have none.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1x1 convolution on the skip path when the channel count changes.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_channels, out_channels, 1, Conv2dConfig::default())?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, in_channels, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, Conv2dConfig { padding: 1, stride: 1 })?,
            time_emb_proj: temb_channels
                .map(|temb| Linear::new(vb.pp("time_emb_proj"), temb, out_channels, true))
                .transpose()?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, out_channels, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), out_channels, out_channels, 3, Conv2dConfig { padding: 1, stride: 1 })?,
            conv_shortcut,
        })
    }

    /// `temb_act` is the time embedding after the SiLU that every block applies to it first
    /// (computed once per forward by the UNet); `None` in the VAE.
    pub fn forward(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(temb_act)) = (&self.time_emb_proj, temb_act) {
            let t = proj.forward(temb_act)?.unsqueeze(2)?.unsqueeze(3)?;
            // The time embedding does not depend on what is learned: no gradient is kept for it.
            h = add(&h, &t)?;
        }
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Strided 3x3 convolution halving the resolution (`Downsample2D` with `use_conv`, padding 1).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, Conv2dConfig { padding: 1, stride: 2 })? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour upsampling followed by a 3x3 convolution (`Upsample2D` with `use_conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, Conv2dConfig { padding: 1, stride: 1 })? })
    }

    /// Doubles the resolution, or resizes to `size` (height, width) when given: the UNet passes
    /// the skip connection's size when the input was not divisible by the total downsampling.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let up = match size {
            Some(size) if size != (2 * h, 2 * w) => resize_nearest(x, size)?,
            _ => upsample_nearest_2x(x)?,
        };
        self.conv.forward(&up)
    }
}

/// 2x nearest upsampling as a broadcast: its backward is a cheap sum, unlike candle's
/// `upsample_nearest2d` (a per-channel convolution).
fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.reshape((b, c, 2 * h, 2 * w))
}
