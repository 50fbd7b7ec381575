//! The trainable part of StableIdentity: an MLP from the face-recognition feature to two word
//! embeddings, landed in the celebrity-name embedding space by AdaIN (docs/method.md, "MLP
//! and AdaIN landing").
//!
//! f (768) -> EqualLinear -> LeakyReLU(0.2) -> LayerNorm -> EqualLinear -> LayerNorm -> 2 x width,
//! then v* = mean_C + out * std_C.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::nn::normalize_last_dim;

/// Learning-rate multiplier of the equalized linears: the forward uses `W * 0.1`, `b * 0.1`.
const LR_MUL: f64 = 0.1;
/// Standard deviation of the initial weights.
const INIT_STD: f64 = 0.02;
const LEAKY_SLOPE: f64 = 0.2;
const LAYER_NORM_EPS: f64 = 1e-5;

/// Sizes of the MLP. For SD 2.1: feature 768, hidden 2048, two tokens of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpShape {
    pub feature_dim: usize,
    pub token_dim: usize,
}

impl MlpShape {
    /// The hidden and output width: both tokens side by side (2048 for SD 2.1).
    pub fn hidden_dim(&self) -> usize {
        2 * self.token_dim
    }
}

/// The MLP's parameters, in a fixed order with stable names (used by checkpoints and the optimizer).
pub struct IdentityMlp {
    shape: MlpShape,
    params: Vec<(&'static str, Var)>,
}

/// Parameter names, in order.
pub const PARAM_NAMES: [&str; 8] =
    ["fc1.weight", "fc1.bias", "norm1.weight", "norm1.bias", "fc2.weight", "fc2.bias", "norm2.weight", "norm2.bias"];

impl IdentityMlp {
    /// Fresh parameters: weights ~ N(0, 0.02), biases 0, layer norms identity.
    pub fn new(shape: MlpShape, rng: &mut impl Rng, device: &Device) -> Result<Self> {
        let hidden = shape.hidden_dim();
        let normal = Normal::new(0.0f32, INIT_STD as f32).expect("valid std");
        let mut gaussian = |rows: usize, cols: usize| -> Result<Tensor> {
            let values: Vec<f32> = (0..rows * cols).map(|_| normal.sample(rng)).collect();
            Tensor::from_vec(values, (rows, cols), device)
        };
        let fc1 = gaussian(hidden, shape.feature_dim)?;
        let fc2 = gaussian(hidden, hidden)?;
        let zeros = Tensor::zeros(hidden, DType::F32, device)?;
        let ones = Tensor::ones(hidden, DType::F32, device)?;
        let tensors = [fc1, zeros.clone(), ones.clone(), zeros.clone(), fc2, zeros.clone(), ones, zeros];
        Self::from_tensors(shape, tensors.to_vec())
    }

    /// Parameters from tensors in `PARAM_NAMES` order (e.g. from a checkpoint); shapes are checked.
    /// f64 tensors stay f64 (for finite-difference checks); anything else becomes f32.
    pub fn from_tensors(shape: MlpShape, tensors: Vec<Tensor>) -> Result<Self> {
        let hidden = shape.hidden_dim();
        let expected: [&[usize]; 8] = [
            &[hidden, shape.feature_dim],
            &[hidden],
            &[hidden],
            &[hidden],
            &[hidden, hidden],
            &[hidden],
            &[hidden],
            &[hidden],
        ];
        if tensors.len() != PARAM_NAMES.len() {
            candle_core::bail!("identity MLP: expected {} tensors, got {}", PARAM_NAMES.len(), tensors.len())
        }
        let mut params = Vec::with_capacity(tensors.len());
        for ((name, dims), tensor) in PARAM_NAMES.iter().zip(expected).zip(tensors) {
            if tensor.dims() != dims {
                candle_core::bail!("identity MLP: {name} has shape {:?}, expected {dims:?}", tensor.dims())
            }
            let dtype = if tensor.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            params.push((*name, Var::from_tensor(&tensor.to_dtype(dtype)?)?));
        }
        Ok(Self { shape, params })
    }

    pub fn shape(&self) -> MlpShape {
        self.shape
    }

    /// (name, parameter) pairs in `PARAM_NAMES` order.
    pub fn params(&self) -> &[(&'static str, Var)] {
        &self.params
    }

    fn param(&self, i: usize) -> &Tensor {
        self.params[i].1.as_tensor()
    }

    /// MLP output for features (batch, feature_dim): (batch, 2, token_dim), before AdaIN.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let x = equal_linear(features, self.param(0), self.param(1))?;
        let x = leaky_relu(&x, LEAKY_SLOPE)?;
        let x = layer_norm(&x, self.param(2), self.param(3))?;
        let x = equal_linear(&x, self.param(4), self.param(5))?;
        let x = layer_norm(&x, self.param(6), self.param(7))?;
        x.reshape((features.dim(0)?, 2, self.shape.token_dim))
    }
}

/// `x (W * 0.1)^T + b * 0.1`: StyleGAN's equalized linear with learning-rate multiplier 0.1.
fn equal_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.matmul(&(weight * LR_MUL)?.t()?)?.broadcast_add(&(bias * LR_MUL)?)
}

fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    // max(x, slope * x) for 0 < slope < 1, from differentiable ops.
    x.maximum(&(x * slope)?)
}

fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    normalize_last_dim(x, LAYER_NORM_EPS)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// AdaIN landing into the celebrity basis: `v* = mean_C + out * std_C`, per position.
/// `out` (batch, 2, width); `mean`, `std` (2, width).
pub fn adain_landing(out: &Tensor, mean: &Tensor, std: &Tensor) -> Result<Tensor> {
    out.broadcast_mul(std)?.broadcast_add(mean)
}
