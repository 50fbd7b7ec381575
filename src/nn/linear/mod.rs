//! The linear layer [`Linear`] and its op [`linear`], `x W^T + b`: one graph node whose backward
//! is `dx = dy W`, no `dW`, no `db` (on the CPU, f32 and f64, one `gemm` call each way,
//! `cpu.rs`; candle's `matmul` elsewhere). A layer whose weight is packed (f16 or 8-bit, see
//! [`crate::nn::packed`]) multiplies it panel by panel on the CPU.

mod cpu;

use std::sync::Arc;

use candle_core::{Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::node::{frozen, InputGrad, Node};
use super::packed::{MatrixWeight, PackedMatrix};
use super::profile;
use crate::nn::activation::geglu;
use crate::nn::cpu::cpu_tensor;

/// `y = x W^T + b` over the last dimension of an input of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(in crate::nn) weight: MatrixWeight,
    pub(in crate::nn) bias: Option<Tensor>,
}

impl Linear {
    /// The layer `weight` (out, in) and `bias` of `vb`, the weight kept in the format of
    /// [`crate::nn::load_matrices_as`].
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = MatrixWeight::load(&vb, (out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        let y = match &self.weight {
            MatrixWeight::Tensor(weight) => linear(&x, weight, self.bias.as_ref())?,
            MatrixWeight::Packed(weight) => packed_linear(&x, weight, self.bias.as_ref())?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dims()[0];
        y.reshape(out_dims)
    }
}

impl Linear {
    /// `geglu(self.forward(x))` (diffusers' GEGLU projection). In inference on the CPU with an
    /// f32 or f64 weight it runs a block of rows at a time, never storing the product whole.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        if let (MatrixWeight::Tensor(weight), false) = (&self.weight, x.track_op()) {
            let dims = x.dims().to_vec();
            let in_dim = dims[dims.len() - 1];
            let fused = profile::timed("linear", x.device(), || {
                cpu::forward_geglu(&x.reshape((x.elem_count() / in_dim, in_dim))?, weight, self.bias.as_ref())
            })?;
            if let Some(y) = fused {
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank >= 1") = weight.dim(0)? / 2;
                return cpu_tensor(y, out_dims);
            }
        }
        geglu(&self.forward(x)?)
    }
}

/// [`linear`] with a packed weight, for f32 CPU inputs; the input gradient widens the weight.
fn packed_linear(x: &Tensor, weight: &Arc<PackedMatrix>, bias: Option<&Tensor>) -> Result<Tensor> {
    profile::timed("linear", x.device(), || {
        let (rows, in_dim) = x.dims2()?;
        if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || in_dim != weight.cols() {
            candle_core::bail!(
                "linear: a packed {}x{} weight multiplies f32 CPU inputs of width {}, not {:?} {:?} of width {in_dim}",
                weight.rows(),
                weight.cols(),
                weight.cols(),
                x.dtype(),
                x.device().location()
            )
        }
        if !frozen([bias]) {
            candle_core::bail!("linear: packed weights are for frozen models; this bias is trained")
        }
        let y = cpu::forward_packed(&x.detach(), weight, bias)?;
        let shape = Shape::from((rows, weight.rows()));
        if !x.track_op() {
            return cpu_tensor(y, shape);
        }
        x.apply_op1(Node::computed(y, shape, LinearGrad { weight: MatrixWeight::Packed(weight.clone()) }))
    })
}

/// `x W^T + b` for `x` (rows, in), `weight` (out, in), `bias` (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    profile::timed("linear", x.device(), || {
        if frozen([Some(weight), bias]) {
            if let Some(y) = cpu::forward(&x.detach(), weight, bias)? {
                let shape = Shape::from((x.dim(0)?, weight.dim(0)?));
                if !x.track_op() {
                    return cpu_tensor(y, shape);
                }
                return x.apply_op1(Node::computed(
                    y,
                    shape,
                    LinearGrad { weight: MatrixWeight::Tensor(weight.clone()) },
                ));
            }
        }
        let value = |x: &Tensor| x.matmul(&weight.t()?);
        if !x.track_op() || !frozen([Some(weight), bias]) {
            let y = value(x)?;
            return match bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let grad = LinearGrad { weight: MatrixWeight::Tensor(weight.clone()) };
        x.apply_op1(Node::new(value(&x.detach())?, bias.cloned(), grad))
    })
}

struct LinearGrad {
    /// Packed weights are widened only when the gradient is computed, one layer at a time.
    weight: MatrixWeight,
}

impl InputGrad for LinearGrad {
    const NAME: &'static str = "frozen-linear";
    const BACKWARD: &'static str = "linear backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let weight = self.weight.tensor()?;
        match cpu::input_grad(grad, &weight)? {
            Some(dx) => cpu_tensor(dx, x.shape()),
            None => grad.contiguous()?.matmul(&weight),
        }
    }
}
