//! Differentiable building blocks shared by every model.
//!
//! candle's fused `softmax_last_dim` / `layer_norm` carry no backward op and silently cut the
//! graph (see CANDLE_NOTES.md), and the identity learner back-propagates through the frozen text
//! encoder and UNet. So the norms and the softmax here are written from differentiable ops, and
//! every model uses these blocks: one place to make training correct and fast.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `y = x W^T + b` over the last dimension of an input of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// 2-D convolution with square kernels, as `torch.nn.Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_channels, "bias")?);
        Ok(Self { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// The precision norms and softmax compute in: half precisions are upcast to f32 (their range
/// is too small for variances and exponentials); f32 and f64 are kept.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Group normalisation over `(batch, channels, ...)`, statistics in at least f32.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if channels % groups != 0 {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let compute = compute_dtype(dtype);
        let xs = x.to_dtype(compute)?.reshape((b, self.groups, ()))?;
        let xs = normalize_last_dim(&xs, self.eps)?.reshape(dims.as_slice())?;
        let mut shape = vec![1, c];
        shape.resize(dims.len(), 1);
        let w = self.weight.to_dtype(compute)?.reshape(shape.as_slice())?;
        let bias = self.bias.to_dtype(compute)?.reshape(shape.as_slice())?;
        xs.broadcast_mul(&w)?.broadcast_add(&bias)?.to_dtype(dtype)
    }
}

/// Layer normalisation over the last dimension, statistics in at least f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let compute = compute_dtype(dtype);
        let xs = normalize_last_dim(&x.to_dtype(compute)?, self.eps)?;
        let w = self.weight.to_dtype(compute)?;
        let b = self.bias.to_dtype(compute)?;
        xs.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance, as PyTorch's norms).
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Softmax over the last dimension, built from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Scaled dot-product attention on `(batch, heads, seq, head_dim)` tensors; `mask` is added
/// to the scores (use large negative values to hide positions).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores.to_dtype(compute_dtype(scores.dtype()))?)?.to_dtype(v.dtype())?;
    probs.matmul(&v.contiguous()?)
}
