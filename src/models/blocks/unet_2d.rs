//! The UNet's stages (`diffusers/models/unets/unet_2d_blocks.py`): `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn` and `UpBlock2D` / `CrossAttnUpBlock2D`. The plain
//! and cross-attention variants differ only by their transformers, so each pair is one type
//! whose `attentions` list is empty for the plain variant.
//!
//! [`UNetEncoder`] is the UNet's first half (input convolution, time embedding, down blocks, mid
//! block): the UNet continues it with its up blocks, a ControlNet is a trainable copy of it
//! (diffusers' `ControlNetModel.from_unet`).

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::attention::{Transformer2DModel, TransformerSpec};
use crate::models::blocks::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::models::blocks::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::nn::{Conv2d, Conv2dConfig};

/// What every stage of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    pub temb_channels: usize,
    pub norm_groups: usize,
    pub norm_eps: f64,
}

impl StageSpec {
    fn resnet(&self, vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(vb, in_channels, out_channels, Some(self.temb_channels), self.norm_groups, self.norm_eps)
    }
}

/// The transformers of `layers` (resnet, transformer) pairs, `transformer_layers[i]` blocks deep;
/// none when `attention` is `None`.
/// Input channels of resnet `i` of an up block's `layers`: the previous output (the previous
/// block's for the first, this block's after) concatenated with its skip connection (the down
/// block before for the last, this block's width before that), as diffusers' up blocks have it.
pub(crate) fn up_resnet_in_channels(
    i: usize,
    layers: usize,
    prev_output_channels: usize,
    skip_in_channels: usize,
    out_channels: usize,
) -> usize {
    let skip = if i == layers - 1 { skip_in_channels } else { out_channels };
    let previous = if i == 0 { prev_output_channels } else { out_channels };
    previous + skip
}

fn transformers(
    vb: &VarBuilder,
    attention: Option<&TransformerSpec>,
    transformer_layers: &[usize],
) -> Result<Vec<Transformer2DModel>> {
    let Some(spec) = attention else {
        return Ok(Vec::new());
    };
    transformer_layers
        .iter()
        .enumerate()
        .map(|(i, &layers)| Transformer2DModel::new(vb.pp(format!("attentions.{i}")), spec, layers))
        .collect()
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `transformer_layers` has one entry per resnet; `attention.channels` is `out_channels`.
    pub fn new(
        vb: VarBuilder,
        stage: &StageSpec,
        in_channels: usize,
        out_channels: usize,
        transformer_layers: &[usize],
        attention: Option<&TransformerSpec>,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..transformer_layers.len())
            .map(|i| {
                let in_c = if i == 0 { in_channels } else { out_channels };
                stage.resnet(vb.pp(format!("resnets.{i}")), in_c, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler =
            if add_downsample { Some(Downsample2D::new(vb.pp("downsamplers.0"), out_channels)?) } else { None };
        Ok(Self { resnets, attentions: transformers(&vb, attention, transformer_layers)?, downsampler })
    }

    /// Returns the output and the states the up path concatenates back (one per resnet, plus
    /// the downsampled output).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            states.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: a resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        stage: &StageSpec,
        channels: usize,
        transformer_layers: usize,
        attention: &TransformerSpec,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| stage.resnet(vb.pp(format!("resnets.{i}")), channels, channels))
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, Some(attention), &[transformer_layers])?;
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb_act))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(&attn.forward(&x, context)?, Some(temb_act))?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_output_channels`: channels coming from the stage below; `skip_in_channels`: channels
    /// of the last skip state this block consumes (the matching down stage's input).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        stage: &StageSpec,
        prev_output_channels: usize,
        skip_in_channels: usize,
        out_channels: usize,
        transformer_layers: &[usize],
        attention: Option<&TransformerSpec>,
        add_upsample: bool,
    ) -> Result<Self> {
        let n = transformer_layers.len();
        let resnets = (0..n)
            .map(|i| {
                let in_c = up_resnet_in_channels(i, n, prev_output_channels, skip_in_channels, out_channels);
                stage.resnet(vb.pp(format!("resnets.{i}")), in_c, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if add_upsample { Some(Upsample2D::new(vb.pp("upsamplers.0"), out_channels)?) } else { None };
        Ok(Self { resnets, attentions: transformers(&vb, attention, transformer_layers)?, upsampler })
    }

    /// How many skip states this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the last; `upsample_size` overrides the 2x upsampling.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = resnet.forward(&Tensor::cat(&[&x, skip], 1)?, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

/// The per-block shape of a UNet's first half, from a config its `validate` accepted (the UNet's
/// or a ControlNet's), down blocks in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSpec {
    pub in_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Whether each down block has transformers (`CrossAttnDownBlock2D`) or not (`DownBlock2D`).
    pub down_attention: Vec<bool>,
    pub heads: Vec<usize>,
    /// Resnets per down block.
    pub layers: Vec<usize>,
    /// Transformer blocks per transformer, per down block.
    pub transformer_layers: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub norm_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl EncoderSpec {
    /// Width of the time embedding: 4 x the first block's channels.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    pub fn stage(&self) -> StageSpec {
        StageSpec { temb_channels: self.time_embed_dim(), norm_groups: self.norm_groups, norm_eps: self.norm_eps }
    }

    /// The transformers of down block `i` (and of its mirrored up block).
    pub fn attention(&self, i: usize) -> TransformerSpec {
        TransformerSpec {
            channels: self.block_out_channels[i],
            heads: self.heads[i],
            cross_attention_dim: self.cross_attention_dim[i],
            norm_groups: self.norm_groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// `conv_in`, `time_embedding`, `down_blocks` and `mid_block` of a UNet or a ControlNet (weight
/// names relative to the model's root).
#[derive(Debug, Clone)]
pub struct UNetEncoder {
    spec: EncoderSpec,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
}

impl UNetEncoder {
    pub fn new(vb: &VarBuilder, spec: &EncoderSpec) -> Result<Self> {
        let channels = &spec.block_out_channels;
        let n = channels.len();
        let stage = spec.stage();
        let down_blocks = (0..n)
            .map(|i| {
                let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
                DownBlock::new(
                    vb.pp(format!("down_blocks.{i}")),
                    &stage,
                    in_channels,
                    channels[i],
                    &vec![spec.transformer_layers[i]; spec.layers[i]],
                    spec.down_attention[i].then(|| spec.attention(i)).as_ref(),
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            &stage,
            channels[n - 1],
            spec.transformer_layers[n - 1],
            &spec.attention(n - 1),
        )?;
        Ok(Self {
            spec: spec.clone(),
            conv_in: Conv2d::new(
                vb.pp("conv_in"),
                spec.in_channels,
                channels[0],
                3,
                Conv2dConfig { padding: 1, stride: 1 },
            )?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], spec.time_embed_dim())?,
            down_blocks,
            mid_block,
        })
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    /// The time embedding after the SiLU every resnet applies first (batch, time_embed_dim), in
    /// `dtype`, for `timesteps` of shape (batch,), (1,) or () (broadcast), any dtype.
    pub fn time_embedding(&self, timesteps: &Tensor, batch: usize, dtype: DType) -> Result<Tensor> {
        let timesteps = match timesteps.dims() {
            [] => timesteps.reshape(1)?,
            [n] if *n == 1 || *n == batch => timesteps.clone(),
            dims => bail!("unet: timesteps of shape {dims:?} for a batch of {batch} (expected ({batch},) or (1,))"),
        };
        let t_emb = timestep_embedding(
            &timesteps.broadcast_as(batch)?,
            self.spec.block_out_channels[0],
            self.spec.flip_sin_to_cos,
            self.spec.freq_shift,
        )?
        .to_dtype(dtype)?;
        self.time_embedding.forward(&t_emb)?.silu()
    }

    /// `conv_in` of the latents (batch, in_channels, h, w).
    pub fn conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(sample)
    }

    /// Runs the down blocks and the mid block on `x` (the input convolution's output, with
    /// whatever a ControlNet adds to it). Returns the mid block's output and the skip
    /// connections: `x` itself, then each down block's states, in order.
    pub fn forward_down(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&x, temb_act, context)?;
            x = out;
            skips.extend(states);
        }
        Ok((self.mid_block.forward(&x, temb_act, context)?, skips))
    }
}
