//! BiSeNet face parser (Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time Semantic
//! Segmentation", arXiv 1808.00897) as trained on CelebAMask-HQ by face-parsing.PyTorch
//! (<https://github.com/zllrunning/face-parsing.PyTorch>, checkpoint `79999_iter.pth`), the face
//! parser the StableIdentity paper uses.
//!
//! That implementation replaces the spatial path with the ResNet-18 features at 1/8 resolution:
//! a context path (ResNet-18, attention refinement modules on the 1/16 and 1/32 features, a global
//! average branch) and a feature fusion module feed the main head, whose logits are upsampled
//! (bilinear, `align_corners=True`) to the input size. The two auxiliary heads (`conv_out16`,
//! `conv_out32`) only serve training and are not loaded. Module names follow the checkpoint
//! (`cp.resnet.layer1.0.conv1.weight`, `cp.arm16...`, `ffm...`, `conv_out.conv_out.weight`).
//!
//! The checkpoint has no config: widths are read from it (ResNet base width 64 and 19 classes for
//! `79999_iter.pth`; every other width is a fixed multiple of the base width).

use candle_core::{Module, Result, Tensor};
use candle_nn::{BatchNorm, Conv2dConfig, ModuleT, VarBuilder};

use crate::nn::resize_nearest;

/// The classes of face-parsing.PyTorch, in output order (CelebAMask-HQ).
pub const CLASSES: [&str; 19] = [
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
];

/// Input normalisation of the reference code (`ToTensor` then ImageNet mean / std).
pub const IMAGE_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGE_STD: [f64; 3] = [0.229, 0.224, 0.225];

const BATCH_NORM_EPS: f64 = 1e-5;

/// A convolution without bias (every BiSeNet convolution), square kernel.
fn conv(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize, stride: usize) -> Result<candle_nn::Conv2d> {
    let cfg = Conv2dConfig { padding: kernel / 2, stride, ..Default::default() };
    candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)
}

fn batch_norm(vb: VarBuilder, channels: usize) -> Result<BatchNorm> {
    candle_nn::batch_norm(channels, BATCH_NORM_EPS, vb)
}

/// Convolution, batch norm (running statistics), ReLU.
#[derive(Debug, Clone)]
struct ConvBnRelu {
    conv: candle_nn::Conv2d,
    bn: BatchNorm,
}

impl ConvBnRelu {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize) -> Result<Self> {
        Ok(Self { conv: conv(vb.pp("conv"), c_in, c_out, kernel, 1)?, bn: batch_norm(vb.pp("bn"), c_out)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, false)?.relu()
    }
}

/// ResNet basic block: two 3x3 conv + batch norm, with a 1x1 conv + batch norm shortcut where the
/// width or the resolution changes.
#[derive(Debug, Clone)]
struct BasicBlock {
    conv1: candle_nn::Conv2d,
    bn1: BatchNorm,
    conv2: candle_nn::Conv2d,
    bn2: BatchNorm,
    downsample: Option<(candle_nn::Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let downsample = if c_in != c_out || stride != 1 {
            let vd = vb.pp("downsample");
            Some((conv(vd.pp("0"), c_in, c_out, 1, stride)?, batch_norm(vd.pp("1"), c_out)?))
        } else {
            None
        };
        Ok(Self {
            conv1: conv(vb.pp("conv1"), c_in, c_out, 3, stride)?,
            bn1: batch_norm(vb.pp("bn1"), c_out)?,
            conv2: conv(vb.pp("conv2"), c_out, c_out, 3, 1)?,
            bn2: batch_norm(vb.pp("bn2"), c_out)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let residual = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        let residual = self.bn2.forward_t(&self.conv2.forward(&residual)?, false)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, false)?,
            None => x.clone(),
        };
        (shortcut + residual)?.relu()
    }
}

/// ResNet-18 trunk; returns the features at 1/8, 1/16 and 1/32 resolution.
#[derive(Debug, Clone)]
struct Resnet18 {
    conv1: candle_nn::Conv2d,
    bn1: BatchNorm,
    /// `layer1`..`layer4`, two blocks each.
    layers: Vec<[BasicBlock; 2]>,
}

impl Resnet18 {
    fn new(vb: VarBuilder, base: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(4);
        let mut c_in = base;
        for i in 0..4 {
            let c_out = base << i;
            let stride = if i == 0 { 1 } else { 2 };
            let vl = vb.pp(format!("layer{}", i + 1));
            layers.push([
                BasicBlock::new(vl.pp("0"), c_in, c_out, stride)?,
                BasicBlock::new(vl.pp("1"), c_out, c_out, 1)?,
            ]);
            c_in = c_out;
        }
        Ok(Self { conv1: conv(vb.pp("conv1"), 3, base, 7, 2)?, bn1: batch_norm(vb.pp("bn1"), base)?, layers })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        // Max pool 3x3, stride 2, padding 1: replicating the border gives the same maxima as
        // PyTorch's -inf padding, since every padded window still holds the border pixel.
        let x = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?.max_pool2d_with_stride(3, 2)?;
        let mut feats = Vec::with_capacity(4);
        let mut x = x;
        for [a, b] in &self.layers {
            x = b.forward(&a.forward(&x)?)?;
            feats.push(x.clone());
        }
        Ok((feats[1].clone(), feats[2].clone(), feats[3].clone()))
    }
}

/// Global average over the spatial dimensions, kept as a 1x1 map.
fn global_average(x: &Tensor) -> Result<Tensor> {
    x.mean_keepdim(3)?.mean_keepdim(2)
}

/// Features re-weighted per channel by an attention computed from their global average.
#[derive(Debug, Clone)]
struct AttentionRefinementModule {
    conv: ConvBnRelu,
    conv_atten: candle_nn::Conv2d,
    bn_atten: BatchNorm,
}

impl AttentionRefinementModule {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            conv: ConvBnRelu::new(vb.pp("conv"), c_in, c_out, 3)?,
            conv_atten: conv(vb.pp("conv_atten"), c_out, c_out, 1, 1)?,
            bn_atten: batch_norm(vb.pp("bn_atten"), c_out)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let feat = self.conv.forward(x)?;
        let atten = self.conv_atten.forward(&global_average(&feat)?)?;
        let atten = candle_nn::ops::sigmoid(&self.bn_atten.forward_t(&atten, false)?)?;
        feat.broadcast_mul(&atten)
    }
}

/// ResNet-18 with attention refinement on the 1/32 and 1/16 features, merged top-down
/// (nearest-neighbour upsampling) with a global-context branch.
#[derive(Debug, Clone)]
struct ContextPath {
    resnet: Resnet18,
    arm16: AttentionRefinementModule,
    arm32: AttentionRefinementModule,
    conv_head32: ConvBnRelu,
    conv_head16: ConvBnRelu,
    conv_avg: ConvBnRelu,
}

impl ContextPath {
    fn new(vb: VarBuilder, base: usize) -> Result<Self> {
        let mid = 2 * base;
        Ok(Self {
            resnet: Resnet18::new(vb.pp("resnet"), base)?,
            arm16: AttentionRefinementModule::new(vb.pp("arm16"), 4 * base, mid)?,
            arm32: AttentionRefinementModule::new(vb.pp("arm32"), 8 * base, mid)?,
            conv_head32: ConvBnRelu::new(vb.pp("conv_head32"), mid, mid, 3)?,
            conv_head16: ConvBnRelu::new(vb.pp("conv_head16"), mid, mid, 3)?,
            conv_avg: ConvBnRelu::new(vb.pp("conv_avg"), 8 * base, mid, 1)?,
        })
    }

    /// The 1/8 ResNet features and the refined context at 1/8.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (feat8, feat16, feat32) = self.resnet.forward(x)?;
        let (_, _, h8, w8) = feat8.dims4()?;
        let (_, _, h16, w16) = feat16.dims4()?;
        let avg = self.conv_avg.forward(&global_average(&feat32)?)?;
        let feat32_sum = self.arm32.forward(&feat32)?.broadcast_add(&avg)?;
        let feat32_up = self.conv_head32.forward(&resize_nearest(&feat32_sum, (h16, w16))?)?;
        let feat16_sum = (self.arm16.forward(&feat16)? + feat32_up)?;
        let feat16_up = self.conv_head16.forward(&resize_nearest(&feat16_sum, (h8, w8))?)?;
        Ok((feat8, feat16_up))
    }
}

/// Concatenation, 1x1 conv + batch norm, then a squeeze-and-excitation style channel attention
/// added back to the features.
#[derive(Debug, Clone)]
struct FeatureFusionModule {
    convblk: ConvBnRelu,
    conv1: candle_nn::Conv2d,
    conv2: candle_nn::Conv2d,
}

impl FeatureFusionModule {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            convblk: ConvBnRelu::new(vb.pp("convblk"), c_in, c_out, 1)?,
            conv1: conv(vb.pp("conv1"), c_out, c_out / 4, 1, 1)?,
            conv2: conv(vb.pp("conv2"), c_out / 4, c_out, 1, 1)?,
        })
    }

    fn forward(&self, spatial: &Tensor, context: &Tensor) -> Result<Tensor> {
        let feat = self.convblk.forward(&Tensor::cat(&[spatial, context], 1)?)?;
        let atten = self.conv1.forward(&global_average(&feat)?)?.relu()?;
        let atten = candle_nn::ops::sigmoid(&self.conv2.forward(&atten)?)?;
        feat.broadcast_mul(&atten)? + feat
    }
}

/// 3x3 conv + batch norm + ReLU, then a 1x1 classifier.
#[derive(Debug, Clone)]
struct BiSeNetOutput {
    conv: ConvBnRelu,
    conv_out: candle_nn::Conv2d,
}

impl BiSeNetOutput {
    fn new(vb: VarBuilder, c_in: usize, mid: usize, classes: usize) -> Result<Self> {
        Ok(Self {
            conv: ConvBnRelu::new(vb.pp("conv"), c_in, mid, 3)?,
            conv_out: conv(vb.pp("conv_out"), mid, classes, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.conv.forward(x)?)
    }
}

/// The BiSeNet face parser (inference: main head only).
#[derive(Debug, Clone)]
pub struct BiSeNet {
    cp: ContextPath,
    ffm: FeatureFusionModule,
    conv_out: BiSeNetOutput,
    num_classes: usize,
}

impl BiSeNet {
    /// Builds the network from a face-parsing.PyTorch state dict, reading its base width from
    /// `cp.resnet.conv1.weight` and its class count from `conv_out.conv_out.weight`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let base = vb.get_unchecked("cp.resnet.conv1.weight")?.dim(0)?;
        let num_classes = vb.get_unchecked("conv_out.conv_out.weight")?.dim(0)?;
        Ok(Self {
            cp: ContextPath::new(vb.pp("cp"), base)?,
            ffm: FeatureFusionModule::new(vb.pp("ffm"), 4 * base, 4 * base)?,
            conv_out: BiSeNetOutput::new(vb.pp("conv_out"), 4 * base, 4 * base, num_classes)?,
            num_classes,
        })
    }

    /// Number of classes the head predicts.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// `(B, 3, H, W)` normalised pixel values -> main-head logits `(B, classes, H, W)`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixel_values.dims4()?;
        let (feat8, context8) = self.cp.forward(pixel_values)?;
        let logits = self.conv_out.forward(&self.ffm.forward(&feat8, &context8)?)?;
        logits.upsample_bilinear2d(h, w, true)
    }
}
