//! Differentiable building blocks shared by every model.
//!
//! candle's fused `softmax_last_dim` / `layer_norm` carry no backward op and silently cut the
//! graph (docs/candle.md, "Silent graph cuts"), and the identity learner back-propagates through
//! the frozen text encoder and UNet. So every model uses these blocks: one place to make training
//! correct and fast. They run on the ops below, whose backward computes input gradients only (never the
//! gradients of frozen weights) and keeps few tensors in the graph.
//!
//! candle's autograd computes, for every `matmul`, `conv2d` and binary op, the gradient of both
//! operands, even when one is a frozen constant: for a frozen UNet that is about a third more
//! backward work, and every such gradient is kept in the `GradStore` until it is dropped
//! (docs/candle.md, sections 3 and 5). The ops here are candle custom ops whose backward returns the
//! input gradient only, and whose graph node keeps only what that gradient needs:
//!
//! - [`linear`]: `dx = dy W`, no `dW`, no `db` (on the CPU, one `gemm` call for `x W^T + b`);
//! - [`conv2d`]: value and input gradient by im2col + gemm on the CPU, cuDNN with the fastest
//!   algorithm per shape on CUDA, no kernel gradient;
//! - [`group_norm`], [`layer_norm`]: one node per norm; the backward recomputes the statistics
//!   from the input instead of keeping five intermediate tensors (fused kernels for f32 / f64 on
//!   the CPU, and on CUDA);
//! - [`attention`]: one node keeping the probabilities; `q` is scaled rather than the
//!   (seq x seq) scores, the softmax backward runs in place, and only the gradients of the
//!   inputs that need one are computed;
//! - [`add`]: `a + b` with a frozen `b` (e.g. the time embedding), without a gradient for `b`;
//! - [`silu`], [`gelu_erf`], [`geglu`]: one node each, value and derivative computed in one pass
//!   over the input on the CPU (candle's own backward of these takes about ten passes and, for
//!   GEGLU, pads both halves back to full size).
//!
//! Each op has a folder (`conv/`, `norm/`, `activation/`, `linear/`, `attention/`): its layer,
//! entry points, graph node and gradients in `mod.rs`, its f32 / f64 CPU kernels in `cpu.rs`, its
//! CUDA kernels beside them. What they share: `node.rs`, the graph node that hands a value
//! computed outside the graph to candle; `cpu/`, the CPU kernels' element type, threads and
//! `gemm` products; [`profile`], the op timings.

mod activation;
mod add;
mod attention;
mod conv;
mod cpu;
mod linear;
mod node;
mod norm;
mod packed;
pub mod profile;
mod resize;
#[cfg(test)]
mod test_values;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};

pub use activation::{geglu, gelu_erf, silu};
pub use add::add;
pub use attention::{attention, softmax_last_dim};
pub use conv::{conv2d, Conv2d, Conv2dConfig};
pub(crate) use cpu::simd_fn;
pub use linear::{linear, Linear};
pub use norm::{group_norm, layer_norm, normalize_last_dim, GroupNorm, LayerNorm};
pub use packed::{load_matrices_as, MatrixFormat, Precision, Q8_BLOCK};
pub(crate) use resize::resize_nearest;

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

/// The precision norms and softmax compute in: half precisions are upcast to f32 (their range
/// is too small for variances and exponentials); f32 and f64 are kept.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
