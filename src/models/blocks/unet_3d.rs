//! The video UNet's stages (`diffusers/models/unets/unet_3d_blocks.py`): `CrossAttnDownBlock3D` /
//! `DownBlock3D`, `UNetMidBlock3DCrossAttn` and `UpBlock3D` / `CrossAttnUpBlock3D`. Each is the 2-D
//! stage's resnets, spatial transformers and resamplers ([`super::resnet`], [`super::attention`])
//! with a [`TemporalConvLayer`] after every resnet and a [`TransformerTemporalModel`] after every
//! spatial transformer; as in [`super::unet_2d`], the plain and cross-attention variants are one
//! type whose attention lists are empty for the plain one.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::attention::{Transformer2DModel, TransformerSpec};
use crate::models::blocks::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::blocks::temporal::{TemporalConvLayer, TemporalTransformerSpec, TransformerTemporalModel};
use crate::models::blocks::unet_2d::{up_resnet_in_channels, StageSpec};

/// A resnet followed by its temporal convolution, the unit every 3-D stage repeats.
#[derive(Debug, Clone)]
struct ResnetTemporal {
    resnet: ResnetBlock2D,
    temp_conv: TemporalConvLayer,
}

impl ResnetTemporal {
    fn new(vb: &VarBuilder, i: usize, stage: &StageSpec, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            resnet: ResnetBlock2D::new(
                vb.pp(format!("resnets.{i}")),
                in_channels,
                out_channels,
                Some(stage.temb_channels),
                stage.norm_groups,
                stage.norm_eps,
            )?,
            temp_conv: TemporalConvLayer::new(vb.pp(format!("temp_convs.{i}")), out_channels, stage.norm_groups)?,
        })
    }

    fn forward(&self, x: &Tensor, temb_act: &Tensor, frames: usize) -> Result<Tensor> {
        self.temp_conv.forward(&self.resnet.forward(x, Some(temb_act))?, frames)
    }
}

/// A spatial transformer (cross-attention to the text) followed by a temporal one.
#[derive(Debug, Clone)]
struct AttentionTemporal {
    attention: Transformer2DModel,
    temp_attention: TransformerTemporalModel,
}

impl AttentionTemporal {
    /// `spec.heads` heads of `channels / heads` features, spatial and temporal alike.
    fn new(vb: &VarBuilder, i: usize, spec: &TransformerSpec) -> Result<Self> {
        let temporal = TemporalTransformerSpec {
            channels: spec.channels,
            heads: spec.heads,
            head_dim: spec.channels / spec.heads,
            norm_groups: spec.norm_groups,
        };
        Ok(Self {
            attention: Transformer2DModel::new(vb.pp(format!("attentions.{i}")), spec, 1)?,
            temp_attention: TransformerTemporalModel::new(vb.pp(format!("temp_attentions.{i}")), &temporal, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, frames: usize) -> Result<Tensor> {
        self.temp_attention.forward(&self.attention.forward(x, context)?, frames)
    }
}

fn attentions(vb: &VarBuilder, count: usize, spec: Option<&TransformerSpec>) -> Result<Vec<AttentionTemporal>> {
    match spec {
        Some(spec) => (0..count).map(|i| AttentionTemporal::new(vb, i, spec)).collect(),
        None => Ok(Vec::new()),
    }
}

/// `CrossAttnDownBlock3D` (with attentions) or `DownBlock3D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock3D {
    resnets: Vec<ResnetTemporal>,
    attentions: Vec<AttentionTemporal>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock3D {
    /// `attention.channels` is `out_channels`.
    pub fn new(
        vb: VarBuilder,
        stage: &StageSpec,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attention: Option<&TransformerSpec>,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| ResnetTemporal::new(&vb, i, stage, if i == 0 { in_channels } else { out_channels }, out_channels))
            .collect::<Result<Vec<_>>>()?;
        let downsampler =
            if add_downsample { Some(Downsample2D::new(vb.pp("downsamplers.0"), out_channels)?) } else { None };
        Ok(Self { resnets, attentions: attentions(&vb, layers, attention)?, downsampler })
    }

    /// Returns the output and the states the up path concatenates back.
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        frames: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb_act, frames)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, frames)?;
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

/// `UNetMidBlock3DCrossAttn`: a resnet, then (attentions, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock3D {
    resnets: Vec<ResnetTemporal>,
    attentions: Vec<AttentionTemporal>,
}

impl MidBlock3D {
    pub fn new(vb: VarBuilder, stage: &StageSpec, attention: &TransformerSpec) -> Result<Self> {
        let c = attention.channels;
        let resnets = (0..2).map(|i| ResnetTemporal::new(&vb, i, stage, c, c)).collect::<Result<Vec<_>>>()?;
        Ok(Self { resnets, attentions: attentions(&vb, 1, Some(attention))? })
    }

    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor, frames: usize) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, temb_act, frames)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(&attn.forward(&x, context, frames)?, temb_act, frames)?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock3D` (with attentions) or `UpBlock3D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock3D {
    resnets: Vec<ResnetTemporal>,
    attentions: Vec<AttentionTemporal>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock3D {
    /// `prev_output_channels`: channels from the stage below; `skip_in_channels`: channels of the
    /// last skip state this block consumes (the matching down stage's input).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        stage: &StageSpec,
        prev_output_channels: usize,
        skip_in_channels: usize,
        out_channels: usize,
        layers: usize,
        attention: Option<&TransformerSpec>,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let in_c = up_resnet_in_channels(i, layers, prev_output_channels, skip_in_channels, out_channels);
                ResnetTemporal::new(&vb, i, stage, in_c, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if add_upsample { Some(Upsample2D::new(vb.pp("upsamplers.0"), out_channels)?) } else { None };
        Ok(Self { resnets, attentions: attentions(&vb, layers, attention)?, upsampler })
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
        frames: usize,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = resnet.forward(&Tensor::cat(&[&x, skip], 1)?, temb_act, frames)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, frames)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}
