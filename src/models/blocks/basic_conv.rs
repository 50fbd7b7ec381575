//! The convolution unit of the Inception family: torchvision's and facenet-pytorch's
//! `BasicConv2d` (a convolution without bias, a batch norm with TensorFlow's epsilon, ReLU), and
//! the branches of their mixed blocks, convolutions applied in turn. FaceNet's
//! `InceptionResnetV1` ([`crate::models::facenet`]) and FID's Inception-v3
//! ([`crate::models::inception`]) are built from them. Inference only: batch norms use their
//! running statistics.

use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, ModuleT, VarBuilder};

use crate::nn::{conv2d, Conv2dConfig};

/// The batch-norm epsilon of both references (TensorFlow's value).
const BATCH_NORM_EPS: f64 = 1e-3;

/// One convolution of a `BasicConv2d`: kernel, stride and padding per axis (rows, columns).
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: (usize, usize),
}

impl ConvSpec {
    /// A square kernel.
    pub const fn square(c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        Self { c_in, c_out, kernel: (kernel, kernel), stride, padding: (padding, padding) }
    }

    /// A `(1, k)` kernel (one row, `k` columns), stride 1, padded to keep the size: one half of
    /// Inception's factorised `k x k` convolutions.
    pub const fn wide(c_in: usize, c_out: usize, k: usize) -> Self {
        Self { c_in, c_out, kernel: (1, k), stride: 1, padding: (0, k / 2) }
    }

    /// A `(k, 1)` kernel (`k` rows, one column), the other half.
    pub const fn tall(c_in: usize, c_out: usize, k: usize) -> Self {
        Self { c_in, c_out, kernel: (k, 1), stride: 1, padding: (k / 2, 0) }
    }
}

/// `conv` (no bias), `bn`, ReLU.
#[derive(Debug, Clone)]
pub struct BasicConv2d {
    weight: Tensor,
    bn: BatchNorm,
    spec: ConvSpec,
}

impl BasicConv2d {
    /// From `vb` at the block (`conv.weight`, `bn.*`).
    pub fn new(vb: VarBuilder, spec: ConvSpec) -> Result<Self> {
        let (kh, kw) = spec.kernel;
        Ok(Self {
            weight: vb.get((spec.c_out, spec.c_in, kh, kw), "conv.weight")?,
            bn: candle_nn::batch_norm(spec.c_out, BATCH_NORM_EPS, vb.pp("bn"))?,
            spec,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.spec.padding;
        // The project's convolution pads both axes alike: the (1, k) and (k, 1) kernels' one-axis
        // padding is added here.
        let (x, padding) =
            if ph == pw { (x.clone(), ph) } else { (x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?, 0) };
        let y = conv2d(&x, &self.weight, None, Conv2dConfig { padding, stride: self.spec.stride })?;
        self.bn.forward_t(&y, false)?.relu()
    }
}

/// `BasicConv2d`s applied in turn: an `nn.Sequential` of them, or named members of a block.
#[derive(Debug, Clone)]
pub struct Branch(Vec<BasicConv2d>);

impl Branch {
    /// An `nn.Sequential` at `vb`: its convolutions are `vb.0`, `vb.1`, ...
    pub fn sequential(vb: VarBuilder, specs: &[ConvSpec]) -> Result<Self> {
        specs.iter().enumerate().map(|(i, &spec)| BasicConv2d::new(vb.pp(i), spec)).collect::<Result<_>>().map(Self)
    }

    /// Members of a block, each at `vb.name`.
    pub fn named(vb: &VarBuilder, convs: &[(&str, ConvSpec)]) -> Result<Self> {
        convs.iter().map(|&(name, spec)| BasicConv2d::new(vb.pp(name), spec)).collect::<Result<_>>().map(Self)
    }

    /// A single convolution at `vb`.
    pub fn single(vb: VarBuilder, spec: ConvSpec) -> Result<Self> {
        Ok(Self(vec![BasicConv2d::new(vb, spec)?]))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.iter().try_fold(x.clone(), |x, conv| conv.forward(&x))
    }
}
