//! Differentiable building blocks shared by every model.
//!
//! candle's fused `softmax_last_dim` / `layer_norm` carry no backward op and silently cut the
//! graph (docs/candle.md, "Silent graph cuts"), and the identity learner back-propagates through the frozen text
//! encoder and UNet. So every model uses these blocks: one place to make training correct and
//! fast. They run on the ops of [`ops`], whose backward computes input gradients only (never
//! the gradients of frozen weights) and keeps few tensors in the graph.

mod conv;
mod cpu_kernels;
#[cfg(all(test, feature = "cuda"))]
mod cuda_checks;
#[cfg(feature = "cuda")]
mod norm_cuda;
pub mod ops;
pub mod profile;
#[cfg(test)]
mod test_values;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use ops::compute_dtype;

pub use ops::{attention, normalize_last_dim, softmax_last_dim};

static TF32: AtomicBool = AtomicBool::new(false);

/// Whether f32 matrix products and convolutions on CUDA may run on TF32 tensor cores (10-bit
/// mantissas in the products, f32 sums; PyTorch's `allow_tf32` switches). Off until set; the CLI
/// turns it on for CUDA unless `STABLEID_TF32=0`.
pub fn set_tf32(allowed: bool) {
    TF32.store(allowed, Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(allowed);
}

/// Checks that models can run in `dtype` on `device`: candle has no bf16 matrix product on the
/// CPU.
pub fn check_dtype(dtype: DType, device: &Device) -> crate::Result<()> {
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(crate::Error::setting(
            "dtype",
            "bf16",
            "candle has no bf16 matrix product on the CPU: use f32 or f16 there, or a CUDA device",
        ));
    }
    Ok(())
}

/// See [`set_tf32`].
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

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
        let y = ops::linear(&x.reshape((rows, in_dim))?, &self.weight, self.bias.as_ref())?;
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
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)
    }
}

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
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
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
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
