//! The UNet's stages (`diffusers/models/unets/unet_2d_blocks.py`): `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn` and `UpBlock2D` / `CrossAttnUpBlock2D`. The plain
//! and cross-attention variants differ only by their transformers, so each pair is one type
//! whose `attentions` list is empty for the plain variant.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::attention::{Transformer2DModel, TransformerSpec};
use crate::models::blocks::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

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
                let skip = if i == n - 1 { skip_in_channels } else { out_channels };
                let in_c = if i == 0 { prev_output_channels } else { out_channels };
                stage.resnet(vb.pp(format!("resnets.{i}")), in_c + skip, out_channels)
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
