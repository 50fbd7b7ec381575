//! FaceNet: facenet-pytorch's `InceptionResnetV1`
//! (<https://github.com/timesler/facenet-pytorch/blob/master/models/inception_resnet_v1.py>), the
//! face-recognition network of FastComposer's Face Sim protocol: a 160x160 face crop to a unit
//! 512-d embedding. Weight names are the state dict's (`conv2d_1a.conv.weight`,
//! `repeat_1.0.branch1.1.bn.running_mean`, ..., `last_linear`, `last_bn`); the classifier
//! `logits` of the released checkpoints (`20180402-114759-vggface2.pt`) is not used. Layer sizes
//! are fixed by the reference code, so there is no config. Inference only: batch norms use their
//! running statistics and dropout is the identity.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{BatchNorm, ModuleT, VarBuilder};

use crate::models::blocks::basic_conv::{Branch, ConvSpec};
use crate::nn::{Conv2d, Conv2dConfig};

/// The batch norm after `last_linear` (TensorFlow's epsilon, as in the blocks).
const BATCH_NORM_EPS: f64 = 1e-3;

fn max_pool_3x3_stride_2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d_with_stride(3, 2)
}

/// `Block35`, `Block17` and `Block8`: branches concatenated, a 1x1 `conv2d` with bias back to the
/// input width, `x + scale * out`, then ReLU (all but the last `Block8`).
#[derive(Debug, Clone)]
struct ResidualBlock {
    branches: Vec<Branch>,
    conv2d: Conv2d,
    scale: f64,
    relu: bool,
}

/// Which residual block: their branch layouts.
#[derive(Debug, Clone, Copy)]
enum BlockKind {
    Block35,
    Block17,
    Block8,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, kind: BlockKind, scale: f64, relu: bool) -> Result<Self> {
        let (width, branches, concat) = match kind {
            BlockKind::Block35 => (
                256,
                vec![
                    Branch::single(vb.pp("branch0"), ConvSpec::square(256, 32, 1, 1, 0))?,
                    Branch::sequential(
                        vb.pp("branch1"),
                        &[ConvSpec::square(256, 32, 1, 1, 0), ConvSpec::square(32, 32, 3, 1, 1)],
                    )?,
                    Branch::sequential(
                        vb.pp("branch2"),
                        &[
                            ConvSpec::square(256, 32, 1, 1, 0),
                            ConvSpec::square(32, 32, 3, 1, 1),
                            ConvSpec::square(32, 32, 3, 1, 1),
                        ],
                    )?,
                ],
                96,
            ),
            BlockKind::Block17 => (
                896,
                vec![
                    Branch::single(vb.pp("branch0"), ConvSpec::square(896, 128, 1, 1, 0))?,
                    Branch::sequential(
                        vb.pp("branch1"),
                        &[
                            ConvSpec::square(896, 128, 1, 1, 0),
                            ConvSpec::wide(128, 128, 7),
                            ConvSpec::tall(128, 128, 7),
                        ],
                    )?,
                ],
                256,
            ),
            BlockKind::Block8 => (
                1792,
                vec![
                    Branch::single(vb.pp("branch0"), ConvSpec::square(1792, 192, 1, 1, 0))?,
                    Branch::sequential(
                        vb.pp("branch1"),
                        &[
                            ConvSpec::square(1792, 192, 1, 1, 0),
                            ConvSpec::wide(192, 192, 3),
                            ConvSpec::tall(192, 192, 3),
                        ],
                    )?,
                ],
                384,
            ),
        };
        let conv2d = Conv2d::new(vb.pp("conv2d"), concat, width, 1, Conv2dConfig::default())?;
        Ok(Self { branches, conv2d, scale, relu })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let outs = self.branches.iter().map(|b| b.forward(x)).collect::<Result<Vec<_>>>()?;
        let y = ((self.conv2d.forward(&Tensor::cat(&outs, 1)?)? * self.scale)? + x)?;
        if self.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

/// `Mixed_6a` (256 to 896 channels) and `Mixed_7a` (896 to 1792): stride-2 branches and a max pool,
/// concatenated.
#[derive(Debug, Clone)]
struct Reduction {
    branches: Vec<Branch>,
}

impl Reduction {
    fn mixed_6a(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            branches: vec![
                Branch::single(vb.pp("branch0"), ConvSpec::square(256, 384, 3, 2, 0))?,
                Branch::sequential(
                    vb.pp("branch1"),
                    &[
                        ConvSpec::square(256, 192, 1, 1, 0),
                        ConvSpec::square(192, 192, 3, 1, 1),
                        ConvSpec::square(192, 256, 3, 2, 0),
                    ],
                )?,
            ],
        })
    }

    fn mixed_7a(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            branches: vec![
                Branch::sequential(
                    vb.pp("branch0"),
                    &[ConvSpec::square(896, 256, 1, 1, 0), ConvSpec::square(256, 384, 3, 2, 0)],
                )?,
                Branch::sequential(
                    vb.pp("branch1"),
                    &[ConvSpec::square(896, 256, 1, 1, 0), ConvSpec::square(256, 256, 3, 2, 0)],
                )?,
                Branch::sequential(
                    vb.pp("branch2"),
                    &[
                        ConvSpec::square(896, 256, 1, 1, 0),
                        ConvSpec::square(256, 256, 3, 1, 1),
                        ConvSpec::square(256, 256, 3, 2, 0),
                    ],
                )?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.branches.iter().map(|b| b.forward(x)).collect::<Result<Vec<_>>>()?;
        outs.push(max_pool_3x3_stride_2(x)?);
        Tensor::cat(&outs, 1)
    }
}

/// InceptionResnetV1 without the classifier.
#[derive(Debug, Clone)]
pub struct InceptionResnetV1 {
    /// `conv2d_1a` .. `conv2d_2b`, then (after `maxpool_3a`) `conv2d_3b` .. `conv2d_4b`.
    stem_before_pool: Branch,
    stem_after_pool: Branch,
    repeat_1: Vec<ResidualBlock>,
    mixed_6a: Reduction,
    repeat_2: Vec<ResidualBlock>,
    mixed_7a: Reduction,
    /// `repeat_3` then `block8` (no ReLU).
    repeat_3: Vec<ResidualBlock>,
    last_linear: candle_nn::Linear,
    last_bn: BatchNorm,
}

/// The input side of the crops FaceNet was trained on.
pub const FACENET_INPUT_SIZE: usize = 160;

impl InceptionResnetV1 {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stem = |convs: &[(&str, ConvSpec)]| Branch::named(&vb, convs);
        let blocks = |name: &str, kind, count: usize, scale| {
            (0..count).map(|i| ResidualBlock::new(vb.pp(name).pp(i), kind, scale, true)).collect::<Result<Vec<_>>>()
        };
        let mut repeat_3 = blocks("repeat_3", BlockKind::Block8, 5, 0.2)?;
        repeat_3.push(ResidualBlock::new(vb.pp("block8"), BlockKind::Block8, 1.0, false)?);
        Ok(Self {
            stem_before_pool: stem(&[
                ("conv2d_1a", ConvSpec::square(3, 32, 3, 2, 0)),
                ("conv2d_2a", ConvSpec::square(32, 32, 3, 1, 0)),
                ("conv2d_2b", ConvSpec::square(32, 64, 3, 1, 1)),
            ])?,
            stem_after_pool: stem(&[
                ("conv2d_3b", ConvSpec::square(64, 80, 1, 1, 0)),
                ("conv2d_4a", ConvSpec::square(80, 192, 3, 1, 0)),
                ("conv2d_4b", ConvSpec::square(192, 256, 3, 2, 0)),
            ])?,
            repeat_1: blocks("repeat_1", BlockKind::Block35, 5, 0.17)?,
            mixed_6a: Reduction::mixed_6a(vb.pp("mixed_6a"))?,
            repeat_2: blocks("repeat_2", BlockKind::Block17, 10, 0.10)?,
            mixed_7a: Reduction::mixed_7a(vb.pp("mixed_7a"))?,
            repeat_3,
            last_linear: candle_nn::Linear::new(vb.get((512, 1792), "last_linear.weight")?, None),
            last_bn: candle_nn::batch_norm(512, BATCH_NORM_EPS, vb.pp("last_bn"))?,
        })
    }

    /// Standardised crops (batch, 3, h, w), `(levels - 127.5) / 128` (see [`fixed_image_standardization`]),
    /// to unit embeddings (batch, 512). The network takes any size from about 80 px; it was
    /// trained on [`FACENET_INPUT_SIZE`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = max_pool_3x3_stride_2(&self.stem_before_pool.forward(x)?)?;
        let mut x = self.stem_after_pool.forward(&x)?;
        for block in &self.repeat_1 {
            x = block.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        for block in &self.repeat_2 {
            x = block.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?;
        for block in &self.repeat_3 {
            x = block.forward(&x)?;
        }
        let pooled = x.mean((2, 3))?;
        let y = self.last_bn.forward_t(&self.last_linear.forward(&pooled)?, false)?;
        // F.normalize: y / max(|y|, 1e-12).
        let norm = y.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
        y.broadcast_div(&norm)
    }
}

/// facenet-pytorch's `fixed_image_standardization`: 8-bit levels (any dtype) to `(x - 127.5) / 128`.
pub fn fixed_image_standardization(levels: &Tensor) -> Result<Tensor> {
    (levels.to_dtype(candle_core::DType::F32)? - 127.5)? / 128.0
}
