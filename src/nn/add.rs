//! `a + b` with a frozen `b` (e.g. the time embedding): one node whose backward passes the
//! gradient to `a` only, where candle's would also compute (and keep) one for `b`.

use candle_core::{Result, Tensor};

use super::node::{InputGrad, Node};

/// `a + b` where `b` broadcasts to the shape of `a`: when `b` is frozen and `a` is tracked, the
/// backward passes the gradient to `a` only.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.track_op() || b.track_op() {
        return a.broadcast_add(b);
    }
    a.apply_op1(Node::new(a.detach(), Some(b.clone()), AddGrad))
}

struct AddGrad;

impl InputGrad for AddGrad {
    const NAME: &'static str = "add-frozen";
    const BACKWARD: &'static str = "add backward";

    fn input_grad(&self, _: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Ok(grad.clone())
    }
}
