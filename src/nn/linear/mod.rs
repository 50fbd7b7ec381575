//! The linear layer [`Linear`] and its op [`linear`], `x W^T + b`: one graph node whose backward
//! is `dx = dy W`, no `dW`, no `db` (on the CPU, f32 and f64, one `gemm` call each way,
//! `cpu.rs`; candle's `matmul` elsewhere).

mod cpu;

use candle_core::{Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::node::{frozen, InputGrad, Node};
use super::profile;
use crate::nn::cpu::cpu_tensor;

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
        let y = linear(&x.reshape((rows, in_dim))?, &self.weight, self.bias.as_ref())?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
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
                return x.apply_op1(Node::computed(y, shape, LinearGrad { weight: weight.clone() }));
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
        let grad = LinearGrad { weight: weight.clone() };
        x.apply_op1(Node::new(value(&x.detach())?, bias.cloned(), grad))
    })
}

struct LinearGrad {
    weight: Tensor,
}

impl InputGrad for LinearGrad {
    const NAME: &'static str = "frozen-linear";
    const BACKWARD: &'static str = "linear backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match cpu::input_grad(grad, &self.weight)? {
            Some(dx) => cpu_tensor(dx, x.shape()),
            None => grad.contiguous()?.matmul(&self.weight),
        }
    }
}
