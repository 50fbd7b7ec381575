//! FID's Inception-v3: pytorch-fid's `InceptionV3` with its default output, the 2048-d final
//! average pool (<https://github.com/mseitzer/pytorch-fid/blob/master/src/pytorch_fid/inception.py>),
//! on the weights of TensorFlow's 2015 Inception that every FID implementation uses
//! (`pt_inception-2015-12-05-6726825d.pth`).
//!
//! It is torchvision's `Inception3` with pytorch-fid's patches, which are what make FID values
//! comparable with TensorFlow's:
//! - `FIDInceptionA` (`Mixed_5b..d`), `FIDInceptionC` (`Mixed_6b..e`) and `FIDInceptionE_1`
//!   (`Mixed_7b`) average-pool without counting the zero padding (`count_include_pad=False`);
//! - `FIDInceptionE_2` (`Mixed_7c`) max-pools in its pool branch;
//! - the input, in [0, 1], is resized to 299 x 299 bilinearly (`align_corners=False`, no
//!   antialiasing) and scaled to [-1, 1].
//!
//! Weight names are the checkpoint's (`Conv2d_1a_3x3.conv.weight`, `Mixed_6b.branch7x7_2.bn.*`,
//! ...). Its classifier `fc` (1008 classes, TensorFlow's label set) is not used by FID and not
//! loaded; neither are the auxiliary logits, which the checkpoint lacks. Layer sizes are fixed by
//! the reference code, so there is no config. Inference only.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::basic_conv::{BasicConv2d, Branch, ConvSpec};

/// The side the network sees: every image is resized to it.
pub const FID_INPUT_SIZE: usize = 299;
/// Features per image: the width of the final average pool.
pub const FID_FEATURES: usize = 2048;

/// What a path of a mixed block does to its input before its convolutions.
#[derive(Debug, Clone, Copy)]
enum Pool {
    None,
    /// 3x3, stride 1, padding 1, averaging over the window's pixels inside the map
    /// (`count_include_pad=False`): TensorFlow's average pool.
    AverageSame,
    /// 3x3, stride 1, padding 1 (`FIDInceptionE_2`).
    MaxSame,
    /// 3x3, stride 2, no padding: the reduction blocks' pool path, which has no convolution.
    MaxReduce,
}

/// One path of a mixed block: a pool, convolutions in turn, and for `InceptionE` a final pair of
/// convolutions (`(1, 3)` and `(3, 1)`) applied side by side and concatenated.
#[derive(Debug, Clone)]
struct Path {
    pool: Pool,
    convs: Branch,
    split: Option<[BasicConv2d; 2]>,
}

impl Path {
    fn new(vb: &VarBuilder, pool: Pool, convs: &[(&str, ConvSpec)]) -> Result<Self> {
        Ok(Self { pool, convs: Branch::named(vb, convs)?, split: None })
    }

    fn split(vb: &VarBuilder, convs: &[(&str, ConvSpec)], split: [(&str, ConvSpec); 2]) -> Result<Self> {
        let [(a, spec_a), (b, spec_b)] = split;
        let split = [BasicConv2d::new(vb.pp(a), spec_a)?, BasicConv2d::new(vb.pp(b), spec_b)?];
        Ok(Self { pool: Pool::None, convs: Branch::named(vb, convs)?, split: Some(split) })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = match self.pool {
            Pool::None => x.clone(),
            Pool::AverageSame => average_pool_3x3_same(x)?,
            // The blocks' inputs are ReLU outputs (>= 0), so zero padding is max_pool2d's -inf padding.
            Pool::MaxSame => x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.max_pool2d_with_stride(3, 1)?,
            Pool::MaxReduce => max_pool_3x3_stride_2(x)?,
        };
        let y = self.convs.forward(&pooled)?;
        match &self.split {
            Some([a, b]) => Tensor::cat(&[a.forward(&y)?, b.forward(&y)?], 1),
            None => Ok(y),
        }
    }
}

fn max_pool_3x3_stride_2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d_with_stride(3, 2)
}

/// `avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`: the window sums of the
/// zero-padded map, each divided by the number of the window's pixels inside the map.
fn average_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let window_sums = (x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)? * 9.0)?;
    // Pixels of the 3-wide window inside a line of `n`, at each position.
    let inside = |n: usize| -> Vec<f32> { (0..n).map(|i| (i.min(1) + 1 + usize::from(i + 1 < n)) as f32).collect() };
    let rows = Tensor::from_vec(inside(h), (h, 1), x.device())?;
    let columns = Tensor::from_vec(inside(w), (1, w), x.device())?;
    let counts = rows.broadcast_mul(&columns)?.to_dtype(x.dtype())?;
    window_sums.broadcast_div(&counts)
}

/// A mixed block: its paths' outputs concatenated along the channels.
#[derive(Debug, Clone)]
struct Mixed(Vec<Path>);

impl Mixed {
    /// torchvision's `InceptionA` with `FIDInceptionA`'s pool: 64 + 64 + 96 + `pool_features` channels.
    fn a(vb: VarBuilder, c_in: usize, pool_features: usize) -> Result<Self> {
        let s = ConvSpec::square;
        Ok(Self(vec![
            Path::new(&vb, Pool::None, &[("branch1x1", s(c_in, 64, 1, 1, 0))])?,
            Path::new(&vb, Pool::None, &[("branch5x5_1", s(c_in, 48, 1, 1, 0)), ("branch5x5_2", s(48, 64, 5, 1, 2))])?,
            Path::new(
                &vb,
                Pool::None,
                &[
                    ("branch3x3dbl_1", s(c_in, 64, 1, 1, 0)),
                    ("branch3x3dbl_2", s(64, 96, 3, 1, 1)),
                    ("branch3x3dbl_3", s(96, 96, 3, 1, 1)),
                ],
            )?,
            Path::new(&vb, Pool::AverageSame, &[("branch_pool", s(c_in, pool_features, 1, 1, 0))])?,
        ]))
    }

    /// `InceptionB` (`Mixed_6a`): 288 to 384 + 96 + 288 = 768 channels at half the size.
    fn b(vb: VarBuilder) -> Result<Self> {
        let s = ConvSpec::square;
        Ok(Self(vec![
            Path::new(&vb, Pool::None, &[("branch3x3", s(288, 384, 3, 2, 0))])?,
            Path::new(
                &vb,
                Pool::None,
                &[
                    ("branch3x3dbl_1", s(288, 64, 1, 1, 0)),
                    ("branch3x3dbl_2", s(64, 96, 3, 1, 1)),
                    ("branch3x3dbl_3", s(96, 96, 3, 2, 0)),
                ],
            )?,
            Path::new(&vb, Pool::MaxReduce, &[])?,
        ]))
    }

    /// torchvision's `InceptionC` with `FIDInceptionC`'s pool: 768 channels in and out, factorised
    /// 7x7 convolutions `c7` wide.
    fn c(vb: VarBuilder, c7: usize) -> Result<Self> {
        let s = ConvSpec::square;
        Ok(Self(vec![
            Path::new(&vb, Pool::None, &[("branch1x1", s(768, 192, 1, 1, 0))])?,
            Path::new(
                &vb,
                Pool::None,
                &[
                    ("branch7x7_1", s(768, c7, 1, 1, 0)),
                    ("branch7x7_2", ConvSpec::wide(c7, c7, 7)),
                    ("branch7x7_3", ConvSpec::tall(c7, 192, 7)),
                ],
            )?,
            Path::new(
                &vb,
                Pool::None,
                &[
                    ("branch7x7dbl_1", s(768, c7, 1, 1, 0)),
                    ("branch7x7dbl_2", ConvSpec::tall(c7, c7, 7)),
                    ("branch7x7dbl_3", ConvSpec::wide(c7, c7, 7)),
                    ("branch7x7dbl_4", ConvSpec::tall(c7, c7, 7)),
                    ("branch7x7dbl_5", ConvSpec::wide(c7, 192, 7)),
                ],
            )?,
            Path::new(&vb, Pool::AverageSame, &[("branch_pool", s(768, 192, 1, 1, 0))])?,
        ]))
    }

    /// `InceptionD` (`Mixed_7a`): 768 to 320 + 192 + 768 = 1280 channels at half the size.
    fn d(vb: VarBuilder) -> Result<Self> {
        let s = ConvSpec::square;
        Ok(Self(vec![
            Path::new(
                &vb,
                Pool::None,
                &[("branch3x3_1", s(768, 192, 1, 1, 0)), ("branch3x3_2", s(192, 320, 3, 2, 0))],
            )?,
            Path::new(
                &vb,
                Pool::None,
                &[
                    ("branch7x7x3_1", s(768, 192, 1, 1, 0)),
                    ("branch7x7x3_2", ConvSpec::wide(192, 192, 7)),
                    ("branch7x7x3_3", ConvSpec::tall(192, 192, 7)),
                    ("branch7x7x3_4", s(192, 192, 3, 2, 0)),
                ],
            )?,
            Path::new(&vb, Pool::MaxReduce, &[])?,
        ]))
    }

    /// torchvision's `InceptionE`: 320 + 768 + 768 + 192 = 2048 channels; `pool` is
    /// `FIDInceptionE_1`'s average pool or `FIDInceptionE_2`'s max pool.
    fn e(vb: VarBuilder, c_in: usize, pool: Pool) -> Result<Self> {
        let s = ConvSpec::square;
        Ok(Self(vec![
            Path::new(&vb, Pool::None, &[("branch1x1", s(c_in, 320, 1, 1, 0))])?,
            Path::split(
                &vb,
                &[("branch3x3_1", s(c_in, 384, 1, 1, 0))],
                [("branch3x3_2a", ConvSpec::wide(384, 384, 3)), ("branch3x3_2b", ConvSpec::tall(384, 384, 3))],
            )?,
            Path::split(
                &vb,
                &[("branch3x3dbl_1", s(c_in, 448, 1, 1, 0)), ("branch3x3dbl_2", s(448, 384, 3, 1, 1))],
                [("branch3x3dbl_3a", ConvSpec::wide(384, 384, 3)), ("branch3x3dbl_3b", ConvSpec::tall(384, 384, 3))],
            )?,
            Path::new(&vb, pool, &[("branch_pool", s(c_in, 192, 1, 1, 0))])?,
        ]))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let outs = self.0.iter().map(|path| path.forward(x)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)
    }
}

/// pytorch-fid's `InceptionV3([3])`: images to their 2048-d pool features.
#[derive(Debug, Clone)]
pub struct FidInceptionV3 {
    /// `Conv2d_1a_3x3` .. `Conv2d_2b_3x3`, then (after a max pool) `Conv2d_3b_1x1`, `Conv2d_4a_3x3`.
    stem_before_pool: Branch,
    stem_after_pool: Branch,
    /// `Mixed_5b` .. `Mixed_7c`, in order.
    mixed: Vec<Mixed>,
}

impl FidInceptionV3 {
    /// From `vb` at the root of pytorch-fid's state dict.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let s = ConvSpec::square;
        let mixed = vec![
            Mixed::a(vb.pp("Mixed_5b"), 192, 32)?,
            Mixed::a(vb.pp("Mixed_5c"), 256, 64)?,
            Mixed::a(vb.pp("Mixed_5d"), 288, 64)?,
            Mixed::b(vb.pp("Mixed_6a"))?,
            Mixed::c(vb.pp("Mixed_6b"), 128)?,
            Mixed::c(vb.pp("Mixed_6c"), 160)?,
            Mixed::c(vb.pp("Mixed_6d"), 160)?,
            Mixed::c(vb.pp("Mixed_6e"), 192)?,
            Mixed::d(vb.pp("Mixed_7a"))?,
            Mixed::e(vb.pp("Mixed_7b"), 1280, Pool::AverageSame)?,
            Mixed::e(vb.pp("Mixed_7c"), 2048, Pool::MaxSame)?,
        ];
        Ok(Self {
            stem_before_pool: Branch::named(
                &vb,
                &[
                    ("Conv2d_1a_3x3", s(3, 32, 3, 2, 0)),
                    ("Conv2d_2a_3x3", s(32, 32, 3, 1, 0)),
                    ("Conv2d_2b_3x3", s(32, 64, 3, 1, 1)),
                ],
            )?,
            stem_after_pool: Branch::named(
                &vb,
                &[("Conv2d_3b_1x1", s(64, 80, 1, 1, 0)), ("Conv2d_4a_3x3", s(80, 192, 3, 1, 0))],
            )?,
            mixed,
        })
    }

    /// Images (batch, 3, h, w) with values in [0, 1], of any size, to their features (batch,
    /// [`FID_FEATURES`]): resized to [`FID_INPUT_SIZE`] (bilinear, `align_corners=False`), scaled
    /// to [-1, 1], through the network, averaged over the final map.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (_, channels, h, w) = images.dims4()?;
        if channels != 3 {
            candle_core::bail!("Inception-v3 takes RGB images (batch, 3, h, w), got {:?}", images.dims())
        }
        let s = FID_INPUT_SIZE;
        let resized = if (h, w) == (s, s) { images.clone() } else { images.upsample_bilinear2d(s, s, false)? };
        let x = ((resized * 2.0)? - 1.0)?;
        let x = max_pool_3x3_stride_2(&self.stem_before_pool.forward(&x)?)?;
        let mut x = max_pool_3x3_stride_2(&self.stem_after_pool.forward(&x)?)?;
        for block in &self.mixed {
            x = block.forward(&x)?;
        }
        x.mean((2, 3))
    }
}
