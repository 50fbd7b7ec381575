//! The activations [`silu`], [`gelu_erf`] and [`geglu`]: one graph node each, value and
//! derivative computed in one pass over the input on the CPU (`cpu.rs`, f32 and f64; candle's own
//! backward of these takes about ten passes and, for GEGLU, pads both halves back to full size),
//! from candle's ops elsewhere.

mod cpu;

pub(super) use cpu::geglu_rows;

use candle_core::{Result, Tensor, D};

use super::node::{InputGrad, Node};
use super::profile;
use crate::nn::cpu::cpu_tensor;

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::Silu, |x| x.silu(), SiluGrad)
}

/// The exact (erf) GELU, `x * Phi(x)`, as PyTorch's default `gelu`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::GeluErf, |x| x.gelu_erf(), GeluErfGrad)
}

/// diffusers' GEGLU activation: `a * gelu_erf(gate)` where `a` and `gate` are the first and
/// second halves of the last dimension of `h`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: odd last dimension {width}")
    }
    let half = width / 2;
    let value = |h: &Tensor| h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?;
    activation(h, Activation::Geglu, value, GegluGrad)
}

/// An activation node: the value from the CPU kernels for f32 and f64 CPU tensors, from
/// `composite` (candle ops) elsewhere.
fn activation<G: InputGrad>(
    x: &Tensor,
    kind: Activation,
    composite: impl Fn(&Tensor) -> Result<Tensor>,
    grad: G,
) -> Result<Tensor> {
    profile::timed("activation", x.device(), || {
        if let Some(y) = cpu::forward(&x.detach(), kind)? {
            let mut dims = x.dims().to_vec();
            if kind == Activation::Geglu {
                *dims.last_mut().expect("geglu has a last dimension") /= 2;
            }
            if !x.track_op() {
                return cpu_tensor(y, dims);
            }
            return x.apply_op1(Node::computed(y, dims.into(), grad));
        }
        if !x.track_op() {
            return composite(x);
        }
        x.apply_op1(Node::new(composite(&x.detach())?, None, grad))
    })
}

/// The activations of this module, as the CPU kernels know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// `x * cdf(x)`, the standard normal CDF.
    GeluErf,
    /// `a * gelu_erf(gate)`, `a` and `gate` the halves of the last dimension.
    Geglu,
}

/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `cdf(x)` and `pdf(x)` as tensors, for the composite backwards.
fn normal_cdf_pdf_tensors(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI;
    Ok((cdf?, pdf?))
}

struct SiluGrad;

impl InputGrad for SiluGrad {
    const NAME: &'static str = "silu";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(x, grad, Activation::Silu)?.map_or_else(|| self.composite(x, grad), Ok)
    }
}

impl SiluGrad {
    /// `dy * s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
    fn composite(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let s = (x.neg()?.exp()? + 1.0)?.recip()?;
        grad * (&s * ((x * (1.0 - &s)?)? + 1.0)?)?
    }
}

struct GeluErfGrad;

impl InputGrad for GeluErfGrad {
    const NAME: &'static str = "gelu-erf";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(x, grad, Activation::GeluErf)?.map_or_else(|| self.composite(x, grad), Ok)
    }
}

impl GeluErfGrad {
    /// `dy * (cdf(x) + x * pdf(x))`.
    fn composite(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (cdf, pdf) = normal_cdf_pdf_tensors(x)?;
        grad * (cdf + (x * pdf)?)?
    }
}

struct GegluGrad;

impl InputGrad for GegluGrad {
    const NAME: &'static str = "geglu";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, h: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(h, grad, Activation::Geglu)?.map_or_else(|| self.composite(h, grad), Ok)
    }
}

impl GegluGrad {
    /// `[da, dgate] = [dy * gelu(gate), dy * a * (cdf(gate) + gate * pdf(gate))]`.
    fn composite(&self, h: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let half = grad.dim(D::Minus1)?;
        let (a, gate) = (h.narrow(D::Minus1, 0, half)?, h.narrow(D::Minus1, half, half)?);
        let (cdf, pdf) = normal_cdf_pdf_tensors(&gate)?;
        let da = (grad * (&gate * &cdf)?)?;
        let dgate = ((grad * a)? * (cdf + (gate * pdf)?)?)?;
        Tensor::cat(&[da, dgate], D::Minus1)
    }
}

/// The input gradient of an activation by the CPU kernels, `None` where they do not run.
fn cpu_grad(x: &Tensor, grad: &Tensor, kind: Activation) -> Result<Option<Tensor>> {
    cpu::input_grad(x, grad, kind)?.map(|dx| cpu_tensor(dx, x.shape())).transpose()
}

#[cfg(test)]
mod tests {
    use crate::nn::test_values::{max_diff, spread_tensor};
    use candle_core::{DType, Tensor};

    use super::{cpu_grad, Activation, GegluGrad, GeluErfGrad, SiluGrad};

    fn values(shape: (usize, usize), seed: u64) -> Tensor {
        spread_tensor(shape, seed, -2.0, 4.0, DType::F64)
    }

    /// The composite backwards (other devices and dtypes) against the one-pass CPU kernels.
    #[test]
    fn composite_activation_gradients_match_the_cpu_kernels() {
        let (x, g) = (values((3, 8), 1), values((3, 8), 2));
        let silu = cpu_grad(&x, &g, Activation::Silu).unwrap().unwrap();
        assert!(max_diff(&silu, &SiluGrad.composite(&x, &g).unwrap()) < 1e-14);
        let gelu = cpu_grad(&x, &g, Activation::GeluErf).unwrap().unwrap();
        assert!(max_diff(&gelu, &GeluErfGrad.composite(&x, &g).unwrap()) < 1e-14);
        let h = values((3, 16), 3);
        let geglu = cpu_grad(&h, &g, Activation::Geglu).unwrap().unwrap();
        assert_eq!(geglu.dims(), &[3, 16]);
        assert!(max_diff(&geglu, &GegluGrad.composite(&h, &g).unwrap()) < 1e-14);
        // Half precisions take the composite path.
        assert!(cpu_grad(&x.to_dtype(DType::F16).unwrap(), &g, Activation::Silu).unwrap().is_none());
    }
}
