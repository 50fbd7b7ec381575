//! LPIPS, the learned perceptual distance of the lpips package v0.1
//! (<https://github.com/richzhang/PerceptualSimilarity/blob/master/lpips/lpips.py>), on AlexNet
//! features: the Face Div metric compares face crops of generations with it.
//!
//! The backbone is torchvision's `alexnet` (`features.{0,3,6,8,10}` of `alexnet-owt-7be5be79.pth`,
//! not shipped); the five linear heads (`lin{0..4}.model.1.weight`, 1,152 values) are the lpips
//! wheel's `weights/v0.1/alex.pth`, shipped as `assets/lpips_alex.safetensors` under their BSD
//! licence (`assets/LPIPS-LICENSE.txt`). Dropout before the heads is the identity at inference.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, Conv2dConfig};

const HEADS: &[u8] = include_bytes!("../../assets/lpips_alex.safetensors");

/// lpips' `ScalingLayer`: inputs in [-1, 1] become `(x - shift) / scale`.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// AlexNet's convolutions: torchvision index, input and output channels, kernel, stride, padding.
/// A ReLU follows each; its output is one of the five compared feature maps; max pools (3, stride
/// 2) come before the second and the third.
const ALEXNET_CONVS: [(usize, usize, usize, usize, usize, usize); 5] = [
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
];

/// LPIPS-Alex: `d(a, b) = sum_l mean_hw( w_l . (n(f_l(a)) - n(f_l(b)))^2 )`, with `f_l` the five
/// ReLU outputs and `n` the unit normalisation along channels.
#[derive(Debug, Clone)]
pub struct Lpips {
    convs: Vec<Conv2d>,
    /// (1, channels, 1, 1) each.
    heads: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// `alexnet` at the root of torchvision's AlexNet state dict; `heads` at the root of the
    /// lpips heads (see [`Lpips::shipped_heads`]).
    pub fn new(alexnet: VarBuilder, heads: VarBuilder) -> Result<Self> {
        let features = alexnet.pp("features");
        let convs = ALEXNET_CONVS
            .iter()
            .map(|&(index, c_in, c_out, kernel, stride, padding)| {
                Conv2d::new(features.pp(index), c_in, c_out, kernel, Conv2dConfig { padding, stride })
            })
            .collect::<Result<Vec<_>>>()?;
        let heads = ALEXNET_CONVS
            .iter()
            .enumerate()
            .map(|(i, &(_, _, c_out, ..))| heads.pp(format!("lin{i}.model.1")).get((1, c_out, 1, 1), "weight"))
            .collect::<Result<Vec<_>>>()?;
        let device = alexnet.device();
        let channel = |v: [f32; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), device)?.to_dtype(alexnet.dtype());
        Ok(Self { convs, heads, shift: channel(SHIFT)?, scale: channel(SCALE)? })
    }

    /// The v0.1 AlexNet heads the lpips package ships.
    pub fn shipped_heads(dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        VarBuilder::from_buffered_safetensors(HEADS.to_vec(), dtype, device)
    }

    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        let mut maps = Vec::with_capacity(self.convs.len());
        for (i, conv) in self.convs.iter().enumerate() {
            if i == 1 || i == 2 {
                x = x.max_pool2d_with_stride(3, 2)?;
            }
            x = conv.forward(&x)?.relu()?;
            maps.push(x.clone());
        }
        Ok(maps)
    }

    /// Distances (batch) between images `a` and `b` (batch, 3, h, w) in [-1, 1], row by row.
    pub fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dtype = self.shift.dtype();
        let (fa, fb) = (self.features(&a.to_dtype(dtype)?)?, self.features(&b.to_dtype(dtype)?)?);
        let mut total: Option<Tensor> = None;
        for ((fa, fb), head) in fa.iter().zip(&fb).zip(&self.heads) {
            let diff = (unit_channels(fa)? - unit_channels(fb)?)?.sqr()?;
            let layer = diff.broadcast_mul(head)?.sum(1)?.mean((1, 2))?;
            total = Some(match total {
                Some(t) => (t + layer)?,
                None => layer,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("LPIPS has no layers".into()))
    }
}

/// lpips' `normalize_tensor`: `x / (|x|_channels + 1e-10)`.
fn unit_channels(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?;
    x.broadcast_div(&norm)
}
