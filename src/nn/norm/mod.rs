//! Group and layer normalisation: the layers [`GroupNorm`] and [`LayerNorm`] and their ops
//! [`group_norm`] and [`layer_norm`], one graph node per norm. Its backward recomputes the
//! statistics from the input instead of keeping five intermediate tensors; fused kernels compute
//! value and input gradient for f32 and f64 on the CPU (`cpu.rs`) and on CUDA (`cuda.rs`), and
//! candle's ops everywhere else.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::compute_dtype;
use super::node::{frozen, InputGrad, Node};
use super::profile;
use crate::nn::cpu::cpu_tensor;

/// Group normalisation over `(batch, channels, ...)`, statistics in at least f32 (the weight and
/// bias are kept in that precision from loading on).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
        }
        let compute = compute_dtype(vb.dtype());
        let weight = vb.get(channels, "weight")?.to_dtype(compute)?;
        let bias = vb.get(channels, "bias")?.to_dtype(compute)?;
        Ok(Self { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
    }
}

/// Layer normalisation over the last dimension, statistics in at least f32 (the weight and bias
/// are kept in that precision from loading on).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let compute = compute_dtype(vb.dtype());
        let weight = vb.get(dim, "weight")?.to_dtype(compute)?;
        let bias = vb.get(dim, "bias")?.to_dtype(compute)?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Group normalisation of `x` (batch, channels, ...) with a per-channel affine map; statistics
/// and the affine map in `compute_dtype`, the result in the dtype of `x`.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: input {:?} does not split into {groups} groups of channels", x.shape())
    }
    let mut channel = vec![1; dims.len()];
    channel[1] = dims[1];
    let stats_shape = vec![dims[0], groups, x.elem_count() / (dims[0] * groups)];
    norm(x, stats_shape, groups, &weight.reshape(channel.as_slice())?, &bias.reshape(channel.as_slice())?, eps)
}

/// Layer normalisation over the last dimension; statistics and the affine map in
/// `compute_dtype`, the result in the dtype of `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let stats_shape = x.dims().to_vec();
    norm(x, stats_shape, 1, weight, bias, eps)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance, as PyTorch's norms).
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// A normalisation: `x` viewed as rows of `n` values, each row normalised, then value `col` of
/// row `row` scaled and shifted by channel `(row % groups) * (channels / groups) + col / inner`
/// with `inner = n * groups / channels` (group norm: `channels / groups` channels of `h * w`
/// values per row; layer norm: one group, a channel per value).
#[derive(Debug, Clone, Copy)]
struct NormSpec {
    n: usize,
    groups: usize,
    eps: f64,
}

impl NormSpec {
    /// `(channels per row, values per channel)` for an affine map of `channels`, if it fits.
    fn split(&self, channels: usize) -> Option<(usize, usize)> {
        let per_row = channels / self.groups.max(1);
        let fits = self.groups > 0 && channels.is_multiple_of(self.groups) && per_row > 0;
        (fits && self.n.is_multiple_of(per_row)).then(|| (per_row, self.n / per_row))
    }
}

/// Normalises `x` viewed as `stats_shape` over its last dimension, then `* weight + bias`
/// (both broadcastable to `x`, in the compute dtype; `groups` consecutive rows of `stats_shape`
/// share none of their channels, 1 for a layer norm).
fn norm(
    x: &Tensor,
    stats_shape: Vec<usize>,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    profile::timed("norm", x.device(), || {
        let (dtype, compute) = (x.dtype(), weight.dtype());
        let n = *stats_shape.last().expect("a norm has a dimension to normalise");
        let spec = NormSpec { n, groups, eps };
        let scaled = |x: &Tensor| {
            normalize_last_dim(&x.to_dtype(compute)?.reshape(stats_shape.as_slice())?, eps)?
                .reshape(x.shape())?
                .broadcast_mul(weight)
        };
        if !frozen([Some(weight), Some(bias)]) {
            return scaled(x)?.broadcast_add(bias)?.to_dtype(dtype);
        }
        #[cfg(feature = "cuda")]
        if let Some(y) = cuda::forward(&x.detach(), weight, bias, spec)? {
            if !x.track_op() {
                return Ok(y);
            }
            return x.apply_op1(Node::new(y, None, NormGrad { stats_shape, weight: weight.clone(), spec }));
        }
        if let Some(y) = cpu::forward(&x.detach(), weight, bias, spec)? {
            if !x.track_op() {
                return cpu_tensor(y, x.shape());
            }
            let grad = NormGrad { stats_shape, weight: weight.clone(), spec };
            return x.apply_op1(Node::computed(y, x.shape().clone(), grad));
        }
        if !x.track_op() {
            return scaled(x)?.broadcast_add(bias)?.to_dtype(dtype);
        }
        let scaled_x = scaled(&x.detach())?;
        let grad = NormGrad { stats_shape, weight: weight.clone(), spec };
        let node = if compute == dtype {
            Node::new(scaled_x, Some(bias.clone()), grad)
        } else {
            Node::new(scaled_x.broadcast_add(bias)?.to_dtype(dtype)?, None, grad)
        };
        x.apply_op1(node)
    })
}

struct NormGrad {
    stats_shape: Vec<usize>,
    weight: Tensor,
    spec: NormSpec,
}

impl InputGrad for NormGrad {
    const NAME: &'static str = "frozen-norm";
    const BACKWARD: &'static str = "norm backward";

    /// With `x^ = (x - mean) * r`, `r = 1 / sqrt(var + eps)` and `g = dy * weight`:
    /// `dx = r * (g - mean(g) - x^ * mean(g * x^))`, the means over each normalised group.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dx) = cuda::input_grad(x, grad, &self.weight, self.spec)? {
            return Ok(dx);
        }
        if let Some(dx) = cpu::input_grad(x, grad, &self.weight, self.spec)? {
            return cpu_tensor(dx, x.shape());
        }
        let compute = self.weight.dtype();
        let shape = self.stats_shape.as_slice();
        let x_c = x.to_dtype(compute)?.reshape(shape)?;
        let centered = x_c.broadcast_sub(&x_c.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.spec.eps)?.sqrt()?.recip()?;
        let x_hat = centered.broadcast_mul(&r)?;
        let g = grad.to_dtype(compute)?.broadcast_mul(&self.weight)?.reshape(shape)?;
        let projection = (&g * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx =
            g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?.sub(&x_hat.broadcast_mul(&projection)?)?.broadcast_mul(&r)?;
        dx.reshape(x.shape())?.to_dtype(x.dtype())
    }
}
