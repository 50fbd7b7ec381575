//! MTCNN face detector (Zhang et al., "Joint Face Detection and Alignment Using Multitask Cascaded
//! Convolutional Networks", IEEE SPL 2016) as facenet-pytorch 2.6.0 runs it: the networks of its
//! `models/mtcnn.py` (`PNet`, `RNet`, `ONet`).
//!
//! Module names are those of facenet-pytorch's state dicts (`conv1`, `prelu1`, `dense5_1`, ...),
//! under `pnet.`, `rnet.` and `onet.` in `assets/mtcnn.safetensors` (written by
//! `tools/reference/convert_mtcnn.py` from the weights the facenet-pytorch wheel ships;
//! `assets/MTCNN-LICENSE.txt`). The convolutions and dense layers are [`crate::nn`] layers; PReLU,
//! the ceil-mode max pools and the two-way softmax are plain candle ops (the detector is never
//! differentiated).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, Conv2dConfig, Linear};

/// The weights of the three networks, shipped in the repository and built into the binary.
const WEIGHTS: &[u8] = include_bytes!("../../assets/mtcnn.safetensors");

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize) -> Result<Conv2d> {
    Conv2d::new(vb, c_in, c_out, kernel, Conv2dConfig::default())
}

/// `torch.nn.PReLU(channels)`: `x` where `x > 0`, else `weight[c] * x`, on the channel axis 1 of
/// (batch, channels, ...) inputs.
#[derive(Debug, Clone)]
struct PRelu {
    weight: Tensor,
}

impl PRelu {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { weight: vb.get(channels, "weight")? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = vec![1; x.rank()];
        shape[1] = self.weight.dim(0)?;
        let negative = x.minimum(0f32)?.broadcast_mul(&self.weight.reshape(shape)?)?;
        x.relu()? + negative
    }
}

/// `torch.nn.MaxPool2d(kernel, stride, ceil_mode=True)` without padding: windows that run past
/// the bottom or right border take the maximum of their pixels inside. The input is extended by
/// repeating its last row and column, which gives the same maxima: every such window holds the
/// border pixel it repeats.
fn max_pool_ceil(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let extra = |len: usize| {
        let out = (len - kernel).div_ceil(stride) + 1;
        ((out - 1) * stride + kernel).saturating_sub(len)
    };
    x.pad_with_same(2, 0, extra(h))?.pad_with_same(3, 0, extra(w))?.max_pool2d_with_stride(kernel, stride)
}

/// The flattening before the dense layers: facenet-pytorch permutes (batch, c, h, w) to
/// (batch, w, h, c) first, the order of the original Caffe / TensorFlow weights.
fn flatten_whc(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)
}

/// Proposal network: fully convolutional, one 12x12 window every 2 pixels.
#[derive(Debug, Clone)]
pub struct PNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4_1: Conv2d,
    conv4_2: Conv2d,
}

impl PNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 10, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 10)?,
            conv2: conv(vb.pp("conv2"), 10, 16, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 16)?,
            conv3: conv(vb.pp("conv3"), 16, 32, 3)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 32)?,
            conv4_1: conv(vb.pp("conv4_1"), 32, 2, 1)?,
            conv4_2: conv(vb.pp("conv4_2"), 32, 4, 1)?,
        })
    }

    /// `x` (batch, 3, h, w), normalised pixels, with h, w >= 12. Returns the box regression
    /// (batch, 4, h', w') and the probabilities (batch, 2, h', w') of (no face, face), where
    /// `h' = ceil((h - 2) / 2) - 4`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.prelu1.forward(&self.conv1.forward(x)?)?;
        let x = max_pool_ceil(&x, 2, 2)?;
        let x = self.prelu2.forward(&self.conv2.forward(&x)?)?;
        let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
        let prob = candle_nn::ops::softmax(&self.conv4_1.forward(&x)?, 1)?;
        Ok((self.conv4_2.forward(&x)?, prob))
    }
}

/// Refinement network on 24x24 crops.
#[derive(Debug, Clone)]
pub struct RNet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    dense4: Linear,
    prelu4: PRelu,
    dense5_1: Linear,
    dense5_2: Linear,
}

impl RNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 28, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 28)?,
            conv2: conv(vb.pp("conv2"), 28, 48, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 48)?,
            conv3: conv(vb.pp("conv3"), 48, 64, 2)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 64)?,
            dense4: Linear::new(vb.pp("dense4"), 576, 128, true)?,
            prelu4: PRelu::new(vb.pp("prelu4"), 128)?,
            dense5_1: Linear::new(vb.pp("dense5_1"), 128, 2, true)?,
            dense5_2: Linear::new(vb.pp("dense5_2"), 128, 4, true)?,
        })
    }

    /// `x` (batch, 3, 24, 24), normalised pixels. Returns the box regression (batch, 4) and the
    /// probabilities (batch, 2) of (no face, face).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = max_pool_ceil(&self.prelu1.forward(&self.conv1.forward(x)?)?, 3, 2)?;
        let x = max_pool_ceil(&self.prelu2.forward(&self.conv2.forward(&x)?)?, 3, 2)?;
        let x = self.prelu3.forward(&self.conv3.forward(&x)?)?;
        let x = self.prelu4.forward(&self.dense4.forward(&flatten_whc(&x)?)?)?;
        let prob = candle_nn::ops::softmax(&self.dense5_1.forward(&x)?, 1)?;
        Ok((self.dense5_2.forward(&x)?, prob))
    }
}

/// Output network on 48x48 crops, with the five landmarks.
#[derive(Debug, Clone)]
pub struct ONet {
    conv1: Conv2d,
    prelu1: PRelu,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4: Conv2d,
    prelu4: PRelu,
    dense5: Linear,
    prelu5: PRelu,
    dense6_1: Linear,
    dense6_2: Linear,
    dense6_3: Linear,
}

impl ONet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv1"), 3, 32, 3)?,
            prelu1: PRelu::new(vb.pp("prelu1"), 32)?,
            conv2: conv(vb.pp("conv2"), 32, 64, 3)?,
            prelu2: PRelu::new(vb.pp("prelu2"), 64)?,
            conv3: conv(vb.pp("conv3"), 64, 64, 3)?,
            prelu3: PRelu::new(vb.pp("prelu3"), 64)?,
            conv4: conv(vb.pp("conv4"), 64, 128, 2)?,
            prelu4: PRelu::new(vb.pp("prelu4"), 128)?,
            dense5: Linear::new(vb.pp("dense5"), 1152, 256, true)?,
            prelu5: PRelu::new(vb.pp("prelu5"), 256)?,
            dense6_1: Linear::new(vb.pp("dense6_1"), 256, 2, true)?,
            dense6_2: Linear::new(vb.pp("dense6_2"), 256, 4, true)?,
            dense6_3: Linear::new(vb.pp("dense6_3"), 256, 10, true)?,
        })
    }

    /// `x` (batch, 3, 48, 48), normalised pixels. Returns, in facenet-pytorch's order, the box
    /// regression (batch, 4), the landmarks (batch, 10: five x then five y, as fractions of the
    /// crop) and the probabilities (batch, 2) of (no face, face).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = max_pool_ceil(&self.prelu1.forward(&self.conv1.forward(x)?)?, 3, 2)?;
        let x = max_pool_ceil(&self.prelu2.forward(&self.conv2.forward(&x)?)?, 3, 2)?;
        let x = max_pool_ceil(&self.prelu3.forward(&self.conv3.forward(&x)?)?, 2, 2)?;
        let x = self.prelu4.forward(&self.conv4.forward(&x)?)?;
        let x = self.prelu5.forward(&self.dense5.forward(&flatten_whc(&x)?)?)?;
        let prob = candle_nn::ops::softmax(&self.dense6_1.forward(&x)?, 1)?;
        Ok((self.dense6_2.forward(&x)?, self.dense6_3.forward(&x)?, prob))
    }
}

/// The three networks.
#[derive(Debug, Clone)]
pub struct Mtcnn {
    pub pnet: PNet,
    pub rnet: RNet,
    pub onet: ONet,
}

impl Mtcnn {
    /// From weights named as in `assets/mtcnn.safetensors` (`pnet.*`, `rnet.*`, `onet.*`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self { pnet: PNet::new(vb.pp("pnet"))?, rnet: RNet::new(vb.pp("rnet"))?, onet: ONet::new(vb.pp("onet"))? })
    }

    /// With the weights built into the binary (`assets/mtcnn.safetensors`), in f32.
    pub fn shipped(device: &Device) -> Result<Self> {
        Self::new(VarBuilder::from_buffered_safetensors(WEIGHTS.to_vec(), DType::F32, device)?)
    }
}
