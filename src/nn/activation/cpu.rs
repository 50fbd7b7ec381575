//! The f32 and f64 CPU kernels of the activations: value and input gradient in one pass over
//! the input, in f64 (for f32, with [`Element`]'s fast `exp` and `erf`).

use candle_core::{CpuStorage, DType, Result, Tensor};

use super::{Activation, FRAC_1_SQRT_2PI};
use crate::nn::cpu::{cpu_dtype, for_each_chunk, simd_fn, with_values, Element, MIN_TASK};

/// The standard normal CDF at `x`: GELU is `x * cdf`.
#[inline(always)]
fn normal_cdf<T: Element>(x: f64) -> f64 {
    0.5 * (1.0 + T::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// The standard normal density at `x`: GELU's derivative is `cdf + x * pdf`.
#[inline(always)]
fn normal_pdf<T: Element>(x: f64) -> f64 {
    FRAC_1_SQRT_2PI * T::exp(-0.5 * x * x)
}

/// The value of `activation` at `x` (for GEGLU, the last dimension halved); `None` unless `x`
/// is an f32 or f64 CPU tensor.
pub(super) fn forward(x: &Tensor, activation: Activation) -> Result<Option<CpuStorage>> {
    let width = x.dims().last().copied().unwrap_or(1);
    if activation == Activation::Geglu && !width.is_multiple_of(2) {
        candle_core::bail!("geglu: odd last dimension {width}")
    }
    match cpu_dtype(&[x]) {
        Some(DType::F32) => forward_typed::<f32>(x, activation, width).map(Some),
        Some(DType::F64) => forward_typed::<f64>(x, activation, width).map(Some),
        _ => Ok(None),
    }
}

fn forward_typed<T: Element>(x: &Tensor, activation: Activation, width: usize) -> Result<CpuStorage> {
    with_values::<T, _>(&[x], |v| {
        let x = v[0];
        if activation == Activation::Geglu {
            let half = width / 2;
            let mut out = vec![T::ZERO; x.len() / 2];
            let rows = MIN_TASK.div_ceil(width.max(1)).max(1);
            for_each_chunk(&mut out, rows * half, |i, out| geglu_rows(&x[i * rows * width..], half, out));
            return T::storage(out);
        }
        let mut out = vec![T::ZERO; x.len()];
        for_each_chunk(&mut out, MIN_TASK, |i, out| {
            let x = &x[i * MIN_TASK..][..out.len()];
            match activation {
                Activation::Silu => silu_values(x, out),
                _ => gelu_values(x, out),
            }
        });
        T::storage(out)
    })
}

simd_fn! {
    fn silu_values<T>(x: &[T], out: &mut [T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            let x = x.wide();
            *o = T::narrow(x / (1.0 + T::exp(-x)));
        }
    }
}

simd_fn! {
    fn gelu_values<T>(x: &[T], out: &mut [T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            let x = x.wide();
            *o = T::narrow(x * normal_cdf::<T>(x));
        }
    }
}

simd_fn! {
    /// Rows of `h` (`[a, gate]`, `2 * half` wide) from the start of `h` to GEGLU rows of `out`.
    pub(in crate::nn) fn geglu_rows<T>(h: &[T], half: usize, out: &mut [T]) {
        for (h, out) in h.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
            let (a, gate) = h.split_at(half);
            for ((o, &a), &gate) in out.iter_mut().zip(a).zip(gate) {
                let gate = gate.wide();
                *o = T::narrow(a.wide() * gate * normal_cdf::<T>(gate));
            }
        }
    }
}

/// The gradient with respect to `x` of [`forward`], from the output gradient `grad`; `None`
/// where [`forward`] is.
pub(super) fn input_grad(x: &Tensor, grad: &Tensor, activation: Activation) -> Result<Option<CpuStorage>> {
    if !grad.device().is_cpu() {
        return Ok(None);
    }
    match cpu_dtype(&[x]) {
        Some(DType::F32) => input_grad_typed::<f32>(x, grad, activation).map(Some),
        Some(DType::F64) => input_grad_typed::<f64>(x, grad, activation).map(Some),
        _ => Ok(None),
    }
}

fn input_grad_typed<T: Element>(x: &Tensor, grad: &Tensor, activation: Activation) -> Result<CpuStorage> {
    let width = x.dims().last().copied().unwrap_or(1).max(1);
    with_values::<T, _>(&[x, grad], |v| {
        let (x, grad) = (v[0], v[1]);
        let mut out = vec![T::ZERO; x.len()];
        if activation == Activation::Geglu {
            let rows = MIN_TASK.div_ceil(width).max(1);
            for_each_chunk(&mut out, rows * width, |i, out| {
                geglu_grad_rows(&x[i * rows * width..], &grad[i * rows * width / 2..], width / 2, out)
            });
            return T::storage(out);
        }
        for_each_chunk(&mut out, MIN_TASK, |i, out| {
            let (x, grad) = (&x[i * MIN_TASK..][..out.len()], &grad[i * MIN_TASK..][..out.len()]);
            match activation {
                Activation::Silu => silu_grad_values(x, grad, out),
                _ => gelu_grad_values(x, grad, out),
            }
        });
        T::storage(out)
    })
}

simd_fn! {
    /// `dy * s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
    fn silu_grad_values<T>(x: &[T], grad: &[T], out: &mut [T]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let x = x.wide();
            let s = 1.0 / (1.0 + T::exp(-x));
            *o = T::narrow(g.wide() * s * (1.0 + x * (1.0 - s)));
        }
    }
}

simd_fn! {
    /// `dy * (cdf(x) + x * pdf(x))`.
    fn gelu_grad_values<T>(x: &[T], grad: &[T], out: &mut [T]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let x = x.wide();
            *o = T::narrow(g.wide() * (normal_cdf::<T>(x) + x * normal_pdf::<T>(x)));
        }
    }
}

simd_fn! {
    /// `[da, dgate] = [dy * gelu(gate), dy * a * (cdf(gate) + gate * pdf(gate))]` for rows of
    /// `h` (`[a, gate]`) and `grad` (`half` wide) from their starts to the rows of `out`.
    fn geglu_grad_rows<T>(h: &[T], grad: &[T], half: usize, out: &mut [T]) {
        let rows = h.chunks_exact(2 * half).zip(grad.chunks_exact(half));
        for ((h, grad), out) in rows.zip(out.chunks_exact_mut(2 * half)) {
            let (a, gate) = h.split_at(half);
            let (da, dgate) = out.split_at_mut(half);
            for ((((da, dgate), &a), &gate), &g) in da.iter_mut().zip(dgate).zip(a).zip(gate).zip(grad) {
                let (g, gate) = (g.wide(), gate.wide());
                let cdf = normal_cdf::<T>(gate);
                *da = T::narrow(g * gate * cdf);
                *dgate = T::narrow(g * a.wide() * (cdf + gate * normal_pdf::<T>(gate)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, D};

    use super::{forward, input_grad};
    use crate::nn::activation::{Activation, GegluGrad, GeluErfGrad, SiluGrad};
    use crate::nn::cpu::cpu_tensor;
    use crate::nn::test_values::{rel_diff, tolerance, transposed_values};

    /// candle's own activation ops, and the composite backwards of [`crate::nn::activation`]
    /// (candle's autograd of `gelu_erf` differs from the exact derivative by 1e-7).
    fn composite_activation(x: &Tensor, kind: Activation, dy: &Tensor) -> (Tensor, Tensor) {
        match kind {
            Activation::Silu => (x.silu().unwrap(), SiluGrad.composite(x, dy).unwrap()),
            Activation::GeluErf => (x.gelu_erf().unwrap(), GeluErfGrad.composite(x, dy).unwrap()),
            Activation::Geglu => {
                let half = x.dim(D::Minus1).unwrap() / 2;
                let (a, gate) = (x.narrow(D::Minus1, 0, half).unwrap(), x.narrow(D::Minus1, half, half).unwrap());
                ((a * gate.gelu_erf().unwrap()).unwrap(), GegluGrad.composite(x, dy).unwrap())
            }
        }
    }

    #[test]
    fn activations_match_candle() {
        for dtype in [DType::F32, DType::F64] {
            for kind in [Activation::Silu, Activation::GeluErf, Activation::Geglu] {
                // Small (one task) and large (several) inputs.
                for dims in [[3usize, 2, 10], [4, 130, 130]] {
                    let x = (transposed_values(&dims, 5, dtype) * 2.0).unwrap();
                    let mut out_dims = dims;
                    if kind == Activation::Geglu {
                        out_dims[2] /= 2;
                    }
                    let dy = transposed_values(&out_dims, 6, dtype);
                    let y = cpu_tensor(forward(&x, kind).unwrap().unwrap(), out_dims.as_slice()).unwrap();
                    let dx = cpu_tensor(input_grad(&x, &dy, kind).unwrap().unwrap(), dims.as_slice()).unwrap();
                    let (y_ref, dx_ref) = composite_activation(&x, kind, &dy);
                    let (value, grad) = (rel_diff(&y, &y_ref), rel_diff(&dx, &dx_ref));
                    let tol = tolerance(dtype);
                    assert!(value < tol && grad < tol, "{kind:?} {dims:?} {dtype:?}: value {value:e}, grad {grad:e}");
                }
            }
        }
        let x = transposed_values(&[2, 4], 1, DType::F16);
        assert!(forward(&x, Activation::Silu).unwrap().is_none());
        assert!(forward(&transposed_values(&[2, 3], 1, DType::F32), Activation::Geglu).is_err());
    }
}
