//! The video UNet's temporal layers: `TemporalConvLayer` (`diffusers/models/resnet.py`) and
//! `TransformerTemporalModel` (`diffusers/models/transformers/transformer_temporal.py`, with its
//! defaults: `double_self_attention`, GEGLU, no positional embedding). Both take the frames
//! folded into the batch, `(batch * frames, c, h, w)` with the frame index fastest, and mix
//! information across the frames of each pixel only.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::attention::BasicTransformerBlock;
use crate::nn::{conv2d, silu, Conv2dConfig, GroupNorm, Linear};

/// `(batch * frames, c, h, w)` -> `(batch, c, frames, h * w)`: the layout in which a Conv3d with a
/// (3, 1, 1) kernel is a conv2d with a (3, 1) kernel, and a 5-D group norm a 4-D one.
fn frames_as_height(x: &Tensor, frames: usize) -> Result<Tensor> {
    let (bf, c, h, w) = x.dims4()?;
    x.reshape((bf / frames, frames, c, h * w))?.permute((0, 2, 1, 3))
}

/// The inverse of [`frames_as_height`].
fn frames_to_batch(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, frames, _) = x.dims4()?;
    x.permute((0, 2, 1, 3))?.reshape((b * frames, c, h, w))
}

/// One `nn.Sequential(GroupNorm, SiLU, [Dropout], Conv3d((3, 1, 1), padding (1, 0, 0)))` stage.
#[derive(Debug, Clone)]
struct TemporalConvStage {
    norm: GroupNorm,
    /// (out, in, 3, 1): the Conv3d kernel without its unit width.
    weight: Tensor,
    bias: Tensor,
}

impl TemporalConvStage {
    /// `conv_index`: the Conv3d's position in the Sequential (2, or 3 after a Dropout).
    fn new(vb: &VarBuilder, name: &str, conv_index: usize, channels: usize, groups: usize) -> Result<Self> {
        let conv = vb.pp(format!("{name}.{conv_index}"));
        Ok(Self {
            norm: GroupNorm::new(vb.pp(format!("{name}.0")), groups, channels, 1e-5)?,
            weight: conv.get((channels, channels, 3, 1, 1), "weight")?.reshape((channels, channels, 3, 1))?,
            bias: conv.get(channels, "bias")?,
        })
    }

    /// `x` (batch, c, frames, pixels); zero padding of one frame on each side, as the Conv3d's.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = silu(&self.norm.forward(x)?)?.pad_with_zeros(2, 1, 1)?;
        conv2d(&h, &self.weight, Some(&self.bias), Conv2dConfig::default())
    }
}

/// `x + conv4(conv3(conv2(conv1(x))))` over the frames, each stage a group norm (statistics over
/// frames and pixels), a SiLU and a temporal convolution; `conv4` is zero-initialised in
/// training so the layer starts as the identity. Dropout is off at inference.
#[derive(Debug, Clone)]
pub struct TemporalConvLayer {
    stages: [TemporalConvStage; 4],
}

impl TemporalConvLayer {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            stages: [
                TemporalConvStage::new(&vb, "conv1", 2, channels, groups)?,
                TemporalConvStage::new(&vb, "conv2", 3, channels, groups)?,
                TemporalConvStage::new(&vb, "conv3", 3, channels, groups)?,
                TemporalConvStage::new(&vb, "conv4", 3, channels, groups)?,
            ],
        })
    }

    /// `x` (batch * frames, c, h, w).
    pub fn forward(&self, x: &Tensor, frames: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let identity = frames_as_height(x, frames)?;
        let mut y = identity.clone();
        for stage in &self.stages {
            y = stage.forward(&y)?;
        }
        frames_to_batch(&(identity + y)?, h, w)
    }
}

/// Shape of one `TransformerTemporalModel`.
#[derive(Debug, Clone, Copy)]
pub struct TemporalTransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub norm_groups: usize,
}

/// Group norm (eps 1e-6, statistics over frames and pixels), `proj_in` to `heads * head_dim`
/// features, transformer blocks whose two attentions both attend over the frames of one pixel,
/// `proj_out`, plus the input.
#[derive(Debug, Clone)]
pub struct TransformerTemporalModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl TransformerTemporalModel {
    /// `layers`: the number of transformer blocks.
    pub fn new(vb: VarBuilder, spec: &TemporalTransformerSpec, layers: usize) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        let transformer_blocks = (0..layers)
            .map(|i| {
                let block = vb.pp(format!("transformer_blocks.{i}"));
                BasicTransformerBlock::new(block, inner, spec.heads, spec.head_dim, inner, false)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), spec.norm_groups, spec.channels, 1e-6)?,
            proj_in: Linear::new(vb.pp("proj_in"), spec.channels, inner, true)?,
            transformer_blocks,
            proj_out: Linear::new(vb.pp("proj_out"), inner, spec.channels, true)?,
        })
    }

    /// `x` (batch * frames, c, h, w).
    pub fn forward(&self, x: &Tensor, frames: usize) -> Result<Tensor> {
        let (bf, c, h, w) = x.dims4()?;
        let b = bf / frames;
        // (b, c, frames, h*w) -> one sequence of `frames` tokens per pixel: (b*h*w, frames, c).
        let normed = self.norm.forward(&frames_as_height(x, frames)?)?;
        let tokens = normed.permute((0, 3, 2, 1))?.reshape((b * h * w, frames, c))?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, None)?;
        }
        let out = self.proj_out.forward(&tokens)?;
        // (b*h*w, frames, c) -> (b*frames, c, h, w).
        let out = out.reshape((b, h, w, frames, c))?.permute((0, 3, 4, 1, 2))?.reshape((bf, c, h, w))?;
        out + x
    }
}
