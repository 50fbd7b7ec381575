//! The f32 and f64 CPU kernels of the norms, value and input gradient per [`NormSpec`]: a pass
//! over each row for its statistics, one for the result. The statistics are sums in f64 of the
//! values shifted by the row's first one (so that a large mean does not cancel the variance away).

use candle_core::{CpuStorage, DType, Result, Tensor};

use super::NormSpec;
use crate::nn::cpu::{cpu_dtype, for_each_chunk, simd_fn, with_values, Element};

/// `(x - mean) / sqrt(var + eps) * weight + bias` per [`NormSpec`]; `None` unless `x`,
/// `weight` and `bias` are CPU tensors of one dtype, f32 or f64.
pub(super) fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, spec: NormSpec) -> Result<Option<CpuStorage>> {
    let Some((per_row, inner)) = spec.split(weight.elem_count()) else { return Ok(None) };
    match cpu_dtype(&[x, weight, bias]) {
        Some(DType::F32) => forward_typed::<f32>(x, weight, bias, spec, per_row, inner).map(Some),
        Some(DType::F64) => forward_typed::<f64>(x, weight, bias, spec, per_row, inner).map(Some),
        _ => Ok(None),
    }
}

fn forward_typed<T: Element>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    spec: NormSpec,
    per_row: usize,
    inner: usize,
) -> Result<CpuStorage> {
    with_values::<T, _>(&[x, weight, bias], |v| {
        let (x, weight, bias) = (v[0], v[1], v[2]);
        let mut out = vec![T::ZERO; x.len()];
        for_each_chunk(&mut out, spec.n, |row, out| {
            let first = (row % spec.groups) * per_row;
            let (w, b) = (&weight[first..first + per_row], &bias[first..first + per_row]);
            norm_row(&x[row * spec.n..][..spec.n], w, b, inner, spec.eps, out);
        });
        T::storage(out)
    })
}

/// Shifted sums of a row: `(sum(x - x0), sum((x - x0)^2))` in f64.
#[inline(always)]
fn shifted_sums<T: Element>(x: &[T], shift: f64) -> (f64, f64) {
    let (mut s1, mut s2) = ([0.0f64; 8], [0.0f64; 8]);
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for i in 0..8 {
            let d = chunk[i].wide() - shift;
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    for (i, v) in rest.iter().enumerate() {
        let d = v.wide() - shift;
        s1[i] += d;
        s2[i] += d * d;
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// `(mean, 1 / sqrt(var + eps))` from shifted sums.
#[inline(always)]
fn mean_rstd(shift: f64, s1: f64, s2: f64, n: usize, eps: f64) -> (f64, f64) {
    let (m1, m2) = (s1 / n as f64, s2 / n as f64);
    (shift + m1, 1.0 / ((m2 - m1 * m1).max(0.0) + eps).sqrt())
}

simd_fn! {
    /// One row of [`forward`]: `w` and `b` are the row's channels, `inner` values each.
    fn norm_row<T>(x: &[T], w: &[T], b: &[T], inner: usize, eps: f64, out: &mut [T]) {
        let shift = x[0].wide();
        let (s1, s2) = shifted_sums(x, shift);
        let (mean, rstd) = mean_rstd(shift, s1, s2, x.len(), eps);
        let mean_t = T::narrow(mean);
        if inner == 1 {
            let rstd = T::narrow(rstd);
            for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                *o = (x - mean_t) * rstd * w + b;
            }
        } else {
            let channels = x.chunks_exact(inner).zip(out.chunks_exact_mut(inner));
            for ((x, out), (&w, &b)) in channels.zip(w.iter().zip(b)) {
                let scale = T::narrow(rstd * w.wide());
                for (o, &x) in out.iter_mut().zip(x) {
                    *o = (x - mean_t) * scale + b;
                }
            }
        }
    }
}

/// The gradient with respect to `x` of [`forward`], from the output gradient `dy`: with
/// `x^ = (x - mean) * r`, `r = 1 / sqrt(var + eps)` and `g = dy * weight`,
/// `dx = r * (g - mean(g) - x^ * mean(g * x^))`. `None` where [`forward`] is.
pub(super) fn input_grad(x: &Tensor, dy: &Tensor, weight: &Tensor, spec: NormSpec) -> Result<Option<CpuStorage>> {
    let Some((per_row, inner)) = spec.split(weight.elem_count()) else { return Ok(None) };
    if !dy.device().is_cpu() {
        return Ok(None);
    }
    match cpu_dtype(&[x, weight]) {
        Some(DType::F32) => input_grad_typed::<f32>(x, dy, weight, spec, per_row, inner).map(Some),
        Some(DType::F64) => input_grad_typed::<f64>(x, dy, weight, spec, per_row, inner).map(Some),
        _ => Ok(None),
    }
}

fn input_grad_typed<T: Element>(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    spec: NormSpec,
    per_row: usize,
    inner: usize,
) -> Result<CpuStorage> {
    with_values::<T, _>(&[x, dy, weight], |v| {
        let (x, dy, weight) = (v[0], v[1], v[2]);
        let mut out = vec![T::ZERO; x.len()];
        for_each_chunk(&mut out, spec.n, |row, out| {
            let first = (row % spec.groups) * per_row;
            let (x, dy) = (&x[row * spec.n..][..spec.n], &dy[row * spec.n..][..spec.n]);
            norm_grad_row(x, dy, &weight[first..first + per_row], inner, spec.eps, out);
        });
        T::storage(out)
    })
}

simd_fn! {
    /// One row of [`input_grad`]; `w` holds the row's channels, `inner` values each.
    fn norm_grad_row<T>(x: &[T], dy: &[T], w: &[T], inner: usize, eps: f64, out: &mut [T]) {
        let shift = x[0].wide();
        // sum(x - x0), sum((x - x0)^2), sum(g), sum(g * (x - x0)).
        let (s1, s2, sg, sgx) = if inner == 1 {
            let (s1, s2) = shifted_sums(x, shift);
            let (sg, sgx) = grad_sums(x, dy, Some(w), shift);
            (s1, s2, sg, sgx)
        } else {
            let channels = x.chunks_exact(inner).zip(dy.chunks_exact(inner));
            channels.zip(w).fold((0.0, 0.0, 0.0, 0.0), |(s1, s2, sg, sgx), ((x, dy), &w)| {
                let ((a1, a2), (ag, agx)) = (shifted_sums(x, shift), grad_sums(x, dy, None, shift));
                let w = w.wide();
                (s1 + a1, s2 + a2, sg + w * ag, sgx + w * agx)
            })
        };
        let n = x.len();
        let (mean, rstd) = mean_rstd(shift, s1, s2, n, eps);
        let mean_g = sg / n as f64;
        // mean(g * x^) = r * (mean(g * (x - x0)) - (mean - x0) * mean(g)).
        let mean_gx = rstd * (sgx / n as f64 - (mean - shift) * mean_g);
        // dx = r * w * dy + (x - mean) * k + c.
        let k = T::narrow(-rstd * rstd * mean_gx);
        let c = T::narrow(-rstd * mean_g);
        let mean = T::narrow(mean);
        if inner == 1 {
            let rstd = T::narrow(rstd);
            for (((o, &x), &dy), &w) in out.iter_mut().zip(x).zip(dy).zip(w) {
                *o = rstd * w * dy + (x - mean) * k + c;
            }
        } else {
            let channels = x.chunks_exact(inner).zip(dy.chunks_exact(inner)).zip(out.chunks_exact_mut(inner));
            for (((x, dy), out), &w) in channels.zip(w) {
                let a = T::narrow(rstd * w.wide());
                for ((o, &x), &dy) in out.iter_mut().zip(x).zip(dy) {
                    *o = a * dy + (x - mean) * k + c;
                }
            }
        }
    }
}

/// `(sum(g), sum(g * (x - x0)))` in f64 with `g = dy * w`, a weight per value, or `g = dy`.
#[inline(always)]
fn grad_sums<T: Element>(x: &[T], dy: &[T], w: Option<&[T]>, shift: f64) -> (f64, f64) {
    let (mut sg, mut sgx) = ([0.0f64; 8], [0.0f64; 8]);
    let full = x.len() / 8 * 8;
    let lanes = x[..full].chunks_exact(8).zip(dy[..full].chunks_exact(8));
    match w {
        Some(w) => {
            for ((x, dy), w) in lanes.zip(w[..full].chunks_exact(8)) {
                for i in 0..8 {
                    let g = dy[i].wide() * w[i].wide();
                    sg[i] += g;
                    sgx[i] += g * (x[i].wide() - shift);
                }
            }
        }
        None => {
            for (x, dy) in lanes {
                for i in 0..8 {
                    let g = dy[i].wide();
                    sg[i] += g;
                    sgx[i] += g * (x[i].wide() - shift);
                }
            }
        }
    }
    for j in full..x.len() {
        let g = dy[j].wide() * w.map_or(1.0, |w| w[j].wide());
        sg[0] += g;
        sgx[0] += g * (x[j].wide() - shift);
    }
    (sg.iter().sum(), sgx.iter().sum())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, Var};

    use super::{forward, input_grad};
    use crate::nn::cpu::cpu_tensor;
    use crate::nn::norm::{normalize_last_dim, NormSpec};
    use crate::nn::test_values::{rel_diff, tolerance, transposed_values};

    /// The composite norm of [`crate::nn::norm`] (candle ops) with candle's autograd for the input
    /// gradient.
    fn composite_norm(x: &Tensor, stats: &[usize], w: &Tensor, b: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(&x.contiguous().unwrap()).unwrap();
        let y = normalize_last_dim(&var.reshape(stats).unwrap(), 1e-5).unwrap().reshape(x.shape()).unwrap();
        let y = y.broadcast_mul(w).unwrap().broadcast_add(b).unwrap();
        let grads = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), grads.get(&var).unwrap().clone())
    }

    fn check_norm(dims: &[usize], stats: &[usize], groups: usize, affine: &[usize], dtype: DType) {
        let channels: usize = affine.iter().product();
        let x = transposed_values(dims, 1, dtype).affine(3.0, 5.0).unwrap();
        let w = transposed_values(&[channels, 1], 2, dtype).reshape(affine).unwrap();
        let b = transposed_values(&[channels, 1], 3, dtype).reshape(affine).unwrap();
        let dy = transposed_values(dims, 4, dtype);
        let spec = NormSpec { n: *stats.last().unwrap(), groups, eps: 1e-5 };
        let y = cpu_tensor(forward(&x, &w, &b, spec).unwrap().unwrap(), dims).unwrap();
        let dx = cpu_tensor(input_grad(&x, &dy, &w, spec).unwrap().unwrap(), dims).unwrap();
        let (y_ref, dx_ref) = composite_norm(&x, stats, &w, &b, &dy);
        let tol = tolerance(dtype);
        assert!(rel_diff(&y, &y_ref) < tol, "{dims:?} {dtype:?}: value {:e}", rel_diff(&y, &y_ref));
        assert!(rel_diff(&dx, &dx_ref) < 10.0 * tol, "{dims:?} {dtype:?}: grad {:e}", rel_diff(&dx, &dx_ref));
    }

    #[test]
    fn norms_match_the_composite_norm() {
        for dtype in [DType::F32, DType::F64] {
            // Group norm: batch 2, 12 channels in 4 groups of 3 channels of 5 x 7 values.
            check_norm(&[2, 12, 5, 7], &[2, 4, 105], 4, &[1, 12, 1, 1], dtype);
            // One group, and a group per channel.
            check_norm(&[2, 6, 3, 3], &[2, 1, 54], 1, &[1, 6, 1, 1], dtype);
            check_norm(&[1, 8, 1, 2], &[1, 8, 2], 8, &[1, 8, 1, 1], dtype);
            // Layer norm over rows of 13, long enough to spread over threads.
            check_norm(&[3, 4, 13], &[3, 4, 13], 1, &[13], dtype);
            check_norm(&[4, 1000, 24], &[4, 1000, 24], 1, &[24], dtype);
        }
        // Half precision (with an f32 affine map) is left to the composite path.
        let x = transposed_values(&[2, 4], 1, DType::F16);
        let w = transposed_values(&[4, 1], 2, DType::F32).reshape(4).unwrap();
        assert!(forward(&x, &w, &w, NormSpec { n: 4, groups: 1, eps: 1e-5 }).unwrap().is_none());
    }
}
