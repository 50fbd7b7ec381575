//! f32 and f64 CPU kernels for the norms, activations and linear layers of [`super::ops`]:
//! values and input gradients.
//!
//! candle computes a norm as about ten whole-tensor passes (and the composite backward fifteen),
//! its f32 `silu` / `gelu_erf` as scalar loops calling `expf` / `erff`, and its row reductions
//! one row at a time. These kernels read their inputs once or twice, split the rows over rayon's
//! pool (candle's thread count), and are compiled a second time for AVX2 + FMA, chosen at run
//! time ([`simd_fn!`]), so that the loops vectorise without a `target-cpu` flag.
//!
//! The linear layer and its input gradient are `gemm` products (candle's own matrix product),
//! split by output columns over the threads, with the bias written into the output first
//! rather than added in a second pass over it.
//!
//! f32 activations are computed in f64 with branch-free, vectorisable approximations of `exp`
//! ([`exp_fast`]) and `erf` ([`erf_fast`]), far below f32 rounding; f64 ones keep libm's. Norm
//! statistics are sums in f64 of the values shifted by the row's first one (so that a large
//! mean does not cancel the variance away).

use std::ops::{Add, Mul, Sub};

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::ops::NormSpec;

/// Elements each rayon task handles at least: smaller tasks cost more to hand out than to run.
const MIN_TASK: usize = 1 << 14;

/// The element types of the kernels.
pub(super) trait Element:
    Copy + Send + Sync + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    const DTYPE: DType;
    fn wide(self) -> f64;
    fn narrow(v: f64) -> Self;
    /// `e^v`, as precise as this type needs.
    fn exp(v: f64) -> f64;
    /// `erf(v)`, as precise as this type needs.
    fn erf(v: f64) -> f64;
    fn values(storage: &CpuStorage) -> Result<&[Self]>;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;

    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }

    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v as f32
    }

    #[inline(always)]
    fn exp(v: f64) -> f64 {
        exp_fast(v)
    }

    #[inline(always)]
    fn erf(v: f64) -> f64 {
        erf_fast(v)
    }

    fn values(storage: &CpuStorage) -> Result<&[Self]> {
        storage.as_slice()
    }

    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;

    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }

    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v
    }

    #[inline(always)]
    fn exp(v: f64) -> f64 {
        v.exp()
    }

    #[inline(always)]
    fn erf(v: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(v)
    }

    fn values(storage: &CpuStorage) -> Result<&[Self]> {
        storage.as_slice()
    }

    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
}

/// Defines `fn $name<T: Element>(...)` from one body compiled twice: for AVX2 + FMA, run where
/// the CPU has them, and for the build's baseline target. Everything the body calls must be
/// `#[inline(always)]` to be compiled for AVX2 too.
macro_rules! simd_fn {
    ($(#[$doc:meta])* fn $name:ident<$t:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name<$t: Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: Element>($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            #[inline(always)]
            fn portable<$t: Element>($($arg: $ty),*) $body
            portable::<$t>($($arg),*)
        }
    };
}

/// `e^x` to about 1e-13 relative for `|x| <= 700` (clamped beyond), without branches or calls:
/// `x = n ln 2 + r`, `|r| <= ln(2) / 2`, `e^r` by its Taylor series to degree 11, `2^n` built
/// in the exponent bits.
#[inline(always)]
pub(super) fn exp_fast(x: f64) -> f64 {
    // Adding 1.5 * 2^52 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let x = x.clamp(-700.0, 700.0);
    let k = x * std::f64::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 39_916_800.0;
    for factorial in [3_628_800.0, 362_880.0, 40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = p * r + 1.0 / factorial;
    }
    // `n` (two's complement in the low bits of `k`) shifted into the exponent field.
    p * f64::from_bits((k.to_bits() << 52).wrapping_add(1023 << 52))
}

/// `erf(x) / x` as a polynomial in `u = x^2 / 8 - 1` on `|x| <= 4` (a least-squares fit at 200
/// Chebyshev nodes of `[0, 16]` in `x^2`, max error of `erf` 2.5e-9), lowest degree first.
const ERF_POLY: [f64; 18] = [
    0.353_530_996_361_568_7,
    -0.176_576_235_873_080_7,
    0.131_675_001_456_862_6,
    -0.107_710_289_379_435_91,
    0.090_212_042_672_547_29,
    -0.074_730_536_097_508_93,
    0.059_855_993_578_874_084,
    -0.045_744_001_736_530_01,
    0.033_217_001_103_456_57,
    -0.022_563_597_686_665_438,
    0.013_908_146_203_360_923,
    -0.008_382_074_166_124_522,
    0.005_577_363_691_163_23,
    -0.002_911_838_977_258_711_4,
    0.000_616_610_708_557_667_7,
    -0.000_324_302_590_033_131_84,
    0.000_596_425_075_442_104_2,
    -0.000_246_708_823_727_455_06,
];

/// `erf(x)` to 2e-8 absolute, without branches or calls: a polynomial on `|x| <= 4`, and
/// `erf(+-4)` (1 - 1.5e-8) beyond, for the f32 kernels.
#[inline(always)]
pub(super) fn erf_fast(x: f64) -> f64 {
    let x = x.clamp(-4.0, 4.0);
    let u = x * x * 0.125 - 1.0;
    let mut p = ERF_POLY[ERF_POLY.len() - 1];
    for &c in ERF_POLY[..ERF_POLY.len() - 1].iter().rev() {
        p = p * u + c;
    }
    p * x
}

/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

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

/// The elements of a contiguous CPU tensor's storage.
fn cpu_values<'a, T: Element>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&T::values(cpu)?[start..end]),
        _ => candle_core::bail!("cpu kernel: a contiguous CPU tensor was expected"),
    }
}

/// `f` on the values of `tensors`, converted to `T` and made contiguous.
fn with_values<T: Element, R>(tensors: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
    let tensors = tensors.iter().map(|t| t.to_dtype(T::DTYPE)?.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards.iter().map(|(s, l)| cpu_values::<T>(s, l)).collect::<Result<Vec<_>>>()?;
    Ok(f(&values))
}

/// The f32 / f64 type of CPU tensors that all have it.
fn cpu_dtype(tensors: &[&Tensor]) -> Option<DType> {
    let dtype = tensors[0].dtype();
    let fits = tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype);
    (fits && matches!(dtype, DType::F32 | DType::F64)).then_some(dtype)
}

/// Runs `kernel` on each `width`-long chunk of `out` with its index, on rayon's pool where
/// there is enough work.
fn for_each_chunk<T: Element>(out: &mut [T], width: usize, kernel: impl Fn(usize, &mut [T]) + Sync) {
    if width == 0 {
        return;
    }
    if out.len() < 2 * MIN_TASK {
        out.chunks_mut(width).enumerate().for_each(|(i, chunk)| kernel(i, chunk));
    } else {
        let min_len = MIN_TASK.div_ceil(width);
        out.par_chunks_mut(width).with_min_len(min_len).enumerate().for_each(|(i, chunk)| kernel(i, chunk));
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` per [`NormSpec`]; `None` unless `x`,
/// `weight` and `bias` are CPU tensors of one dtype, f32 or f64.
pub(super) fn norm(x: &Tensor, weight: &Tensor, bias: &Tensor, spec: NormSpec) -> Result<Option<CpuStorage>> {
    let Some((per_row, inner)) = spec.split(weight.elem_count()) else { return Ok(None) };
    match cpu_dtype(&[x, weight, bias]) {
        Some(DType::F32) => norm_typed::<f32>(x, weight, bias, spec, per_row, inner).map(Some),
        Some(DType::F64) => norm_typed::<f64>(x, weight, bias, spec, per_row, inner).map(Some),
        _ => Ok(None),
    }
}

fn norm_typed<T: Element>(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    spec: NormSpec,
    per_row: usize,
    inner: usize,
) -> Result<CpuStorage> {
    with_values::<T, _>(&[x, weight, bias], |v| {
        let (x, weight, bias) = (v[0], v[1], v[2]);
        let mut out = vec![T::narrow(0.0); x.len()];
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
    /// One row of [`norm`]: `w` and `b` are the row's channels, `inner` values each.
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

/// The gradient with respect to `x` of [`norm`], from the output gradient `dy`: with
/// `x^ = (x - mean) * r`, `r = 1 / sqrt(var + eps)` and `g = dy * weight`,
/// `dx = r * (g - mean(g) - x^ * mean(g * x^))`. `None` where [`norm`] is.
pub(super) fn norm_input_grad(x: &Tensor, dy: &Tensor, weight: &Tensor, spec: NormSpec) -> Result<Option<CpuStorage>> {
    let Some((per_row, inner)) = spec.split(weight.elem_count()) else { return Ok(None) };
    if !dy.device().is_cpu() {
        return Ok(None);
    }
    match cpu_dtype(&[x, weight]) {
        Some(DType::F32) => norm_grad_typed::<f32>(x, dy, weight, spec, per_row, inner).map(Some),
        Some(DType::F64) => norm_grad_typed::<f64>(x, dy, weight, spec, per_row, inner).map(Some),
        _ => Ok(None),
    }
}

fn norm_grad_typed<T: Element>(
    x: &Tensor,
    dy: &Tensor,
    weight: &Tensor,
    spec: NormSpec,
    per_row: usize,
    inner: usize,
) -> Result<CpuStorage> {
    with_values::<T, _>(&[x, dy, weight], |v| {
        let (x, dy, weight) = (v[0], v[1], v[2]);
        let mut out = vec![T::narrow(0.0); x.len()];
        for_each_chunk(&mut out, spec.n, |row, out| {
            let first = (row % spec.groups) * per_row;
            let (x, dy) = (&x[row * spec.n..][..spec.n], &dy[row * spec.n..][..spec.n]);
            norm_grad_row(x, dy, &weight[first..first + per_row], inner, spec.eps, out);
        });
        T::storage(out)
    })
}

simd_fn! {
    /// One row of [`norm_input_grad`]; `w` holds the row's channels, `inner` values each.
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

/// The activations of [`super::ops`] computed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// `x * cdf(x)`, the standard normal CDF.
    GeluErf,
    /// `a * gelu_erf(gate)`, `a` and `gate` the halves of the last dimension.
    Geglu,
}

/// The value of `activation` at `x` (for GEGLU, the last dimension halved); `None` unless `x`
/// is an f32 or f64 CPU tensor.
pub(super) fn activation(x: &Tensor, activation: Activation) -> Result<Option<CpuStorage>> {
    let width = x.dims().last().copied().unwrap_or(1);
    if activation == Activation::Geglu && !width.is_multiple_of(2) {
        candle_core::bail!("geglu: odd last dimension {width}")
    }
    match cpu_dtype(&[x]) {
        Some(DType::F32) => activation_typed::<f32>(x, activation, width).map(Some),
        Some(DType::F64) => activation_typed::<f64>(x, activation, width).map(Some),
        _ => Ok(None),
    }
}

fn activation_typed<T: Element>(x: &Tensor, activation: Activation, width: usize) -> Result<CpuStorage> {
    with_values::<T, _>(&[x], |v| {
        let x = v[0];
        if activation == Activation::Geglu {
            let half = width / 2;
            let mut out = vec![T::narrow(0.0); x.len() / 2];
            let rows = MIN_TASK.div_ceil(width.max(1)).max(1);
            for_each_chunk(&mut out, rows * half, |i, out| geglu_rows(&x[i * rows * width..], half, out));
            return T::storage(out);
        }
        let mut out = vec![T::narrow(0.0); x.len()];
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
    fn geglu_rows<T>(h: &[T], half: usize, out: &mut [T]) {
        for (h, out) in h.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
            let (a, gate) = h.split_at(half);
            for ((o, &a), &gate) in out.iter_mut().zip(a).zip(gate) {
                let gate = gate.wide();
                *o = T::narrow(a.wide() * gate * normal_cdf::<T>(gate));
            }
        }
    }
}

/// The gradient with respect to `x` of [`activation`], from the output gradient `grad`; `None`
/// where [`activation`] is.
pub(super) fn activation_grad(x: &Tensor, grad: &Tensor, activation: Activation) -> Result<Option<CpuStorage>> {
    if !grad.device().is_cpu() {
        return Ok(None);
    }
    match cpu_dtype(&[x]) {
        Some(DType::F32) => activation_grad_typed::<f32>(x, grad, activation).map(Some),
        Some(DType::F64) => activation_grad_typed::<f64>(x, grad, activation).map(Some),
        _ => Ok(None),
    }
}

fn activation_grad_typed<T: Element>(x: &Tensor, grad: &Tensor, activation: Activation) -> Result<CpuStorage> {
    let width = x.dims().last().copied().unwrap_or(1).max(1);
    with_values::<T, _>(&[x, grad], |v| {
        let (x, grad) = (v[0], v[1]);
        let mut out = vec![T::narrow(0.0); x.len()];
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

/// `x W^T + b` for `x` (rows, in), `weight` (out, in), `bias` (out) by [`matmul`]: `W^T` is
/// read through its strides, and the bias rows are written into the output first, for the
/// product to add onto (no separate pass over the output). `None` unless all are non-empty
/// CPU tensors of one dtype, f32 or f64.
pub(super) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<CpuStorage>> {
    let ((rows, x_in), (out_dim, in_dim)) = (x.dims2()?, weight.dims2()?);
    // Mismatched sizes are left to candle's matmul to report.
    if x_in != in_dim || bias.is_some_and(|b| b.dims() != [out_dim]) || rows * out_dim * in_dim == 0 {
        return Ok(None);
    }
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    match cpu_dtype(&tensors) {
        Some(DType::F32) => with_values::<f32, _>(&tensors, |v| linear_typed(v, rows, in_dim, out_dim)).map(Some),
        Some(DType::F64) => with_values::<f64, _>(&tensors, |v| linear_typed(v, rows, in_dim, out_dim)).map(Some),
        _ => Ok(None),
    }
}

fn linear_typed<T: Element>(values: &[&[T]], rows: usize, in_dim: usize, out_dim: usize) -> CpuStorage {
    let (x, weight) = (values[0], values[1]);
    let (mut out, add) = match values.get(2) {
        Some(bias) => (bias.repeat(rows), true),
        None => (vec![T::narrow(0.0); rows * out_dim], false),
    };
    // `W^T` (in_dim, out_dim): row stride 1, column stride in_dim.
    let rhs = Strided { values: weight, row_stride: 1, col_stride: in_dim };
    matmul(&mut out, add, x, rows, in_dim, rhs, out_dim);
    T::storage(out)
}

/// The input gradient of [`linear`], `dy W` for `dy` (rows, out) and `weight` (out, in); `None`
/// where [`linear`] is.
pub(super) fn linear_input_grad(dy: &Tensor, weight: &Tensor) -> Result<Option<CpuStorage>> {
    let ((rows, dy_out), (out_dim, in_dim)) = (dy.dims2()?, weight.dims2()?);
    if dy_out != out_dim || rows * out_dim * in_dim == 0 {
        return Ok(None);
    }
    match cpu_dtype(&[dy, weight]) {
        Some(DType::F32) => {
            with_values::<f32, _>(&[dy, weight], |v| linear_grad_typed(v, rows, out_dim, in_dim)).map(Some)
        }
        Some(DType::F64) => {
            with_values::<f64, _>(&[dy, weight], |v| linear_grad_typed(v, rows, out_dim, in_dim)).map(Some)
        }
        _ => Ok(None),
    }
}

fn linear_grad_typed<T: Element>(values: &[&[T]], rows: usize, out_dim: usize, in_dim: usize) -> CpuStorage {
    let mut dx = vec![T::narrow(0.0); rows * in_dim];
    // `W` (out_dim, in_dim) row-major.
    let rhs = Strided { values: values[1], row_stride: in_dim, col_stride: 1 };
    matmul(&mut dx, false, values[0], rows, out_dim, rhs, in_dim);
    T::storage(dx)
}

/// A matrix in a slice: entry `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
struct Strided<'a, T> {
    values: &'a [T],
    row_stride: usize,
    col_stride: usize,
}

/// Output columns each thread's block of a product has at least; narrower products run on
/// gemm's own threads.
const MIN_BLOCK_COLUMNS: usize = 64;

/// `out (m, n) = [out +] lhs (m, k) * rhs (k, n)`, `out` and `lhs` row-major. With several
/// threads, each computes a block of columns single-threaded: at these layers' shapes (tens to
/// a thousand rows, a wide inner dimension) that is up to 1.6 times as fast as gemm's own
/// split over two threads.
fn matmul<T: Element>(out: &mut [T], add: bool, lhs: &[T], m: usize, k: usize, rhs: Strided<T>, n: usize) {
    let rhs_extent = (k - 1) * rhs.row_stride + (n - 1) * rhs.col_stride + 1;
    assert!(out.len() == m * n && lhs.len() == m * k && rhs.values.len() >= rhs_extent, "matmul: operand sizes");
    let threads = candle_core::utils::get_num_threads();
    let block = n.div_ceil(threads.max(1));
    // Raw pointers, shared between the threads, which write disjoint columns.
    let out_ptr = out.as_mut_ptr() as usize;
    let (lhs, rhs_values) = (lhs.as_ptr() as usize, rhs.values.as_ptr() as usize);
    // SAFETY (both calls): gemm reads `lhs` at `i * k + l` (i < m, l < k) and `rhs` at
    // `l * row_stride + j * col_stride` (j < n), and writes `out` at `i * n + j`, all inside
    // their slices by the asserted sizes; the blocks' columns `j0..j0 + cols` are disjoint, so
    // no two threads write one entry, and `out` is borrowed mutably for the whole call.
    let product = |j0: usize, cols: usize, parallelism| unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            (out_ptr as *mut T).add(j0),
            1,
            n as isize,
            add,
            lhs as *const T,
            1,
            k as isize,
            (rhs_values as *const T).add(j0 * rhs.col_stride),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::narrow(1.0),
            T::narrow(1.0),
            false,
            false,
            false,
            parallelism,
        )
    };
    if threads <= 1 {
        product(0, n, gemm::Parallelism::None);
    } else if block < MIN_BLOCK_COLUMNS {
        product(0, n, gemm::Parallelism::Rayon(threads));
    } else {
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let j0 = b * block;
            product(j0, block.min(n - j0), gemm::Parallelism::None);
        });
    }
}

/// A batch of matrices of a 4-dimensional tensor, one per (batch, head): matrix `(b, h)` starts
/// at `start + b * batch + h * head`, its entry `(i, j)` is `i * row + j * col` further.
#[derive(Clone, Copy, Debug)]
struct Heads {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
    col: usize,
}

impl Heads {
    /// The matrices of `layout` whose head, row and column dimensions are `head_dim`, `row_dim`
    /// and 3, and batch dimension 0, checked to lie inside `len` values.
    fn of(layout: &Layout, head_dim: usize, row_dim: usize, len: usize) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let extent: usize = dims.iter().zip(stride).map(|(&d, &s)| d.saturating_sub(1) * s).sum();
        if dims.len() != 4 || dims.contains(&0) || layout.start_offset() + extent >= len {
            candle_core::bail!("attention kernel: bad layout {layout:?}")
        }
        let [batch, head, row, col] = [0, head_dim, row_dim, 3].map(|d| stride[d]);
        Ok(Self { start: layout.start_offset(), batch, head, row, col })
    }

    /// The offset of row `i` of matrix `bh` (batch-major index) of a tensor with `heads` heads.
    fn at(&self, bh: usize, heads: usize, i: usize) -> usize {
        self.start + (bh / heads) * self.batch + (bh % heads) * self.head + i * self.row
    }
}

/// A buffer that parallel tasks write disjoint parts of, through raw pointers.
struct Disjoint<T>(*mut T);

// SAFETY: the tasks sharing a `Disjoint` write disjoint entries (stated at each use).
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    /// The entry at `offset` (a method, so that closures capture the whole `Disjoint`).
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// `dst (m, n) = alpha * lhs (m, k) * rhs (k, n)`, single-threaded; each operand is a pointer
/// with its (row, column) strides.
///
/// # Safety
/// Every entry of the three matrices must be inside its allocation; `dst` must not overlap the
/// operands nor be accessed by anyone else during the call.
unsafe fn product<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    alpha: f64,
) {
    let (dst, dst_rs, dst_cs) = dst;
    let (lhs, lhs_rs, lhs_cs) = lhs;
    let (rhs, rhs_rs, rhs_cs) = rhs;
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::narrow(0.0),
        T::narrow(alpha),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Runs `task(matrix, first, len)` for blocks of `len` rows of `matrices` matrices of `rows` rows
/// each, on rayon's pool: blocks of at least [`MIN_BLOCK_ROWS`] rows, about four per thread.
fn for_each_block(matrices: usize, rows: usize, task: impl Fn(usize, usize, usize) + Sync) {
    let threads = candle_core::utils::get_num_threads();
    let per_matrix = (4 * threads).div_ceil(matrices).max(1);
    let block = rows.div_ceil(per_matrix).max(MIN_BLOCK_ROWS).min(rows);
    let blocks = rows.div_ceil(block);
    let run = |t: usize| {
        let (matrix, first) = (t / blocks, (t % blocks) * block);
        task(matrix, first, block.min(rows - first));
    };
    if threads <= 1 {
        (0..matrices * blocks).for_each(run);
    } else {
        (0..matrices * blocks).into_par_iter().for_each(run);
    }
}

/// Rows of a product that one attention task handles at least.
const MIN_BLOCK_ROWS: usize = 32;

/// The probabilities (batch, heads, n, m), when asked to keep them, and the output of scaled
/// dot-product attention for `q` (batch, heads, n, d), `k` (batch, heads, m, d), `v` (batch,
/// heads, m, dv) and an additive `mask` broadcastable to (batch, heads, n, m). The output is laid
/// out (batch, n, heads, dv), so that merging the heads back is free. The inputs are read
/// through their strides (the heads split from a linear layer's output are transposed views);
/// per (batch, head, block of query rows), `s q k^T` is one gemm product (the scale in its
/// factor), the softmax runs in place, and `P v` is written into the output. `None` unless all
/// are CPU tensors of one dtype, f32 or f64.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    keep_probs: bool,
) -> Result<Option<(Option<CpuStorage>, CpuStorage)>> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    // Mismatched sizes are left to candle's matmul to report.
    if k.dims() != [b, h, m, d] || v.dims()[..2] != [b, h] || b * h * n * m * d * dv == 0 {
        return Ok(None);
    }
    match cpu_dtype(&[q, k, v]) {
        Some(DType::F32) => attention_typed::<f32>(q, k, v, mask, scale, keep_probs).map(Some),
        Some(DType::F64) => attention_typed::<f64>(q, k, v, mask, scale, keep_probs).map(Some),
        _ => Ok(None),
    }
}

/// `mask` in `T`, broadcast to `shape`, its last dimension contiguous.
fn broadcast_mask<T: Element>(mask: Option<&Tensor>, shape: (usize, usize, usize, usize)) -> Result<Option<Tensor>> {
    let Some(mask) = mask else { return Ok(None) };
    let mask = mask.to_dtype(T::DTYPE)?.to_device(&candle_core::Device::Cpu)?.broadcast_as(shape)?;
    Ok(Some(if mask.stride()[3] == 1 { mask } else { mask.contiguous()? }))
}

fn attention_typed<T: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    keep_probs: bool,
) -> Result<(Option<CpuStorage>, CpuStorage)> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    let mask = broadcast_mask::<T>(mask, (b, h, n, m))?;
    let tensors: Vec<&Tensor> = [q, k, v].into_iter().chain(mask.as_ref()).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention kernel: CPU tensors expected") };
        let values = T::values(cpu)?;
        views.push((values, Heads::of(layout, 1, 2, values.len())?));
    }
    let [(qv, qh), (kv, kh), (vv, vh)] = [views[0], views[1], views[2]];
    let mask = views.get(3).copied();
    let mut probs = if keep_probs { vec![T::narrow(0.0); b * h * n * m] } else { Vec::new() };
    let mut out = vec![T::narrow(0.0); b * n * h * dv];
    let (probs_ptr, out_ptr) = (Disjoint(probs.as_mut_ptr()), Disjoint(out.as_mut_ptr()));
    for_each_block(b * h, n, |bh, i0, rows| {
        let mut scratch = Vec::new();
        // The task's rows of the probabilities: its own part of `probs`, or a scratch buffer.
        let p = if keep_probs {
            // SAFETY: rows `i0..i0 + rows` of matrix `bh`, which no other task writes.
            unsafe { probs_ptr.at((bh * n + i0) * m) }
        } else {
            scratch.resize(rows * m, T::narrow(0.0));
            scratch.as_mut_ptr()
        };
        let (q0, k0, v0) = (qh.at(bh, h, i0), kh.at(bh, h, 0), vh.at(bh, h, 0));
        // SAFETY: `Heads::of` checked that the views lie in their slices; `p` holds `rows * m`
        // values that only this task uses; the output rows `i0..i0 + rows` of head `bh % h` of
        // batch `bh / h` are written by this task only.
        unsafe {
            let (qp, kp, vp) = (qv.as_ptr().add(q0), kv.as_ptr().add(k0), vv.as_ptr().add(v0));
            product((rows, m, d), (p, m, 1), (qp, qh.row, qh.col), (kp, kh.col, kh.row), scale);
            let p_rows = std::slice::from_raw_parts_mut(p, rows * m);
            for (i, row) in p_rows.chunks_exact_mut(m).enumerate() {
                let mask_row = mask.map_or(&[][..], |(values, heads)| &values[heads.at(bh, h, i0 + i)..][..m]);
                softmax_row(row, mask_row);
            }
            let o = out_ptr.at(((bh / h) * n + i0) * h * dv + (bh % h) * dv);
            product((rows, dv, m), (o, h * dv, 1), (p, m, 1), (vp, vh.row, vh.col), 1.0);
        }
    });
    Ok((keep_probs.then(|| T::storage(probs)), T::storage(out)))
}

simd_fn! {
    /// `row + mask` (no mask when it is empty), then its softmax, in place.
    fn softmax_row<T>(row: &mut [T], mask: &[T]) {
        if !mask.is_empty() {
            for (s, &a) in row.iter_mut().zip(mask) {
                *s = *s + a;
            }
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |max, s| max.max(s.wide()));
        let mut sums = [0.0f64; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (s, sum) in chunk.iter_mut().zip(&mut sums) {
                let e = T::exp(s.wide() - max);
                *s = T::narrow(e);
                *sum += e;
            }
        }
        for (s, sum) in chunks.into_remainder().iter_mut().zip(&mut sums) {
            let e = T::exp(s.wide() - max);
            *s = T::narrow(e);
            *sum += e;
        }
        let inv = T::narrow(1.0 / sums.iter().sum::<f64>());
        for s in row.iter_mut() {
            *s = *s * inv;
        }
    }
}

simd_fn! {
    /// The softmax backward of one row: the gradient of the probabilities `dp` becomes that of
    /// the scores, `p * (dp - sum(p * dp))`.
    fn softmax_grad_row<T>(dp: &mut [T], p: &[T]) {
        let mut dots = [0.0f64; 8];
        let full = dp.len() / 8 * 8;
        for (dp, p) in dp[..full].chunks_exact(8).zip(p[..full].chunks_exact(8)) {
            for i in 0..8 {
                dots[i] += dp[i].wide() * p[i].wide();
            }
        }
        for (j, (dp, p)) in dp[full..].iter().zip(&p[full..]).enumerate() {
            dots[j] += dp.wide() * p.wide();
        }
        let dot = T::narrow(dots.iter().sum());
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = p * (*dp - dot);
        }
    }
}

/// The gradients `[dq, dk, dv]` of [`attention`] (each where `needed`, laid out as its input,
/// contiguous) from its probabilities `probs` (batch, heads, n, m) and the output gradient `grad`
/// (batch, n, heads, dv), the layout of [`attention`]'s output: `dv = P^T dO`, `dP = dO v^T`,
/// `dS = P * (dP - rowsum(dP * P))`, `dq = s dS k`, `dk = s dS^T q`, each a gemm product per
/// (batch, head, block of rows of the result) reading its operands through their strides.
/// `None` where [`attention`] is.
pub(super) fn attention_grad(
    [q, k, v]: [&Tensor; 3],
    probs: &Tensor,
    grad: &Tensor,
    scale: f64,
    needed: [bool; 3],
) -> Result<Option<[Option<CpuStorage>; 3]>> {
    match cpu_dtype(&[q, k, v, probs]) {
        Some(DType::F32) => attention_grad_typed::<f32>([q, k, v], probs, grad, scale, needed).map(Some),
        Some(DType::F64) => attention_grad_typed::<f64>([q, k, v], probs, grad, scale, needed).map(Some),
        _ => Ok(None),
    }
}

fn attention_grad_typed<T: Element>(
    [q, k, v]: [&Tensor; 3],
    probs: &Tensor,
    grad: &Tensor,
    scale: f64,
    [need_q, need_k, need_v]: [bool; 3],
) -> Result<[Option<CpuStorage>; 3]> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    let (probs, grad) = (probs.contiguous()?, grad.to_dtype(T::DTYPE)?.to_device(&candle_core::Device::Cpu)?);
    if probs.dims() != [b, h, n, m] || grad.dims() != [b, n, h, dv] || k.dims() != [b, h, m, d] {
        candle_core::bail!("attention kernel: gradient shapes {:?}, {:?}", probs.shape(), grad.shape())
    }
    let guards: Vec<_> = [q, k, v, &probs, &grad].iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (i, (storage, layout)) in guards.iter().enumerate() {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention kernel: CPU tensors expected") };
        let values = T::values(cpu)?;
        // The output gradient has its heads in dimension 2.
        let (head_dim, row_dim) = if i == 4 { (2, 1) } else { (1, 2) };
        views.push((values, Heads::of(layout, head_dim, row_dim, values.len())?));
    }
    let [(qv, qh), (kv, kh), (vv, vh), (pv, ph), (gv, gh)] = [views[0], views[1], views[2], views[3], views[4]];
    // SAFETY (all products below): `Heads::of` checked that the views lie in their slices, and
    // each task writes only its own block of rows of its own (batch, head) matrix of a fresh
    // buffer.
    let dv_out = need_v.then(|| {
        let mut dv_out = vec![T::narrow(0.0); b * h * m * dv];
        let ptr = Disjoint(dv_out.as_mut_ptr());
        for_each_block(b * h, m, |bh, j0, rows| unsafe {
            let (p, g) = (pv.as_ptr().add(ph.at(bh, h, 0) + j0 * ph.col), gv.as_ptr().add(gh.at(bh, h, 0)));
            let dst = ptr.at((bh * m + j0) * dv);
            product((rows, dv, n), (dst, dv, 1), (p, ph.col, ph.row), (g, gh.row, gh.col), 1.0);
        });
        T::storage(dv_out)
    });
    if !need_q && !need_k {
        return Ok([None, None, dv_out]);
    }
    // `dS / s`, then `dq` from its rows.
    let mut ds = vec![T::narrow(0.0); b * h * n * m];
    let mut dq = vec![T::narrow(0.0); if need_q { b * h * n * d } else { 0 }];
    let (ds_ptr, dq_ptr) = (Disjoint(ds.as_mut_ptr()), Disjoint(dq.as_mut_ptr()));
    for_each_block(b * h, n, |bh, i0, rows| unsafe {
        let dst = ds_ptr.at((bh * n + i0) * m);
        let (g, vp) = (gv.as_ptr().add(gh.at(bh, h, i0)), vv.as_ptr().add(vh.at(bh, h, 0)));
        product((rows, m, dv), (dst, m, 1), (g, gh.row, gh.col), (vp, vh.col, vh.row), 1.0);
        let ds_rows = std::slice::from_raw_parts_mut(dst, rows * m);
        for (i, row) in ds_rows.chunks_exact_mut(m).enumerate() {
            softmax_grad_row(row, &pv[ph.at(bh, h, i0 + i)..][..m]);
        }
        if need_q {
            let kp = kv.as_ptr().add(kh.at(bh, h, 0));
            let dst = dq_ptr.at((bh * n + i0) * d);
            product((rows, d, m), (dst, d, 1), (ds_rows.as_ptr(), m, 1), (kp, kh.row, kh.col), scale);
        }
    });
    let dk = need_k.then(|| {
        let mut dk = vec![T::narrow(0.0); b * h * m * d];
        let ptr = Disjoint(dk.as_mut_ptr());
        let ds = &ds;
        for_each_block(b * h, m, |bh, j0, rows| unsafe {
            let (s, qp) = (ds.as_ptr().add(bh * n * m + j0), qv.as_ptr().add(qh.at(bh, h, 0)));
            let dst = ptr.at((bh * m + j0) * d);
            product((rows, d, n), (dst, d, 1), (s, 1, m), (qp, qh.row, qh.col), scale);
        });
        T::storage(dk)
    });
    Ok([need_q.then(|| T::storage(dq)), dk, dv_out])
}

#[cfg(test)]
mod tests {
    use crate::nn::test_values::spread_tensor;
    use candle_core::{DType, Tensor, Var, D};

    use super::{
        activation, activation_grad, erf_fast, exp_fast, linear, linear_input_grad, norm, norm_input_grad, Activation,
    };
    use crate::nn::ops::{cpu_tensor, normalize_last_dim, GegluGrad, GeluErfGrad, NormSpec, SiluGrad};

    /// Deterministic values in [-3, 3), `dtype`, transposed in its last two dimensions so that
    /// the kernels see a non-contiguous tensor (`dims` is the shape they see).
    fn values(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut swapped = dims.to_vec();
        let rank = dims.len();
        swapped.swap(rank - 1, rank - 2);
        spread_tensor(swapped, seed, -3.0, 6.0, dtype).transpose(rank - 1, rank - 2).unwrap()
    }

    /// `max |a - b| / max(1, max |b|)`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        max(&(&a - &b).unwrap()) / max(&b).max(1.0)
    }

    fn tolerance(dtype: DType) -> f64 {
        if dtype == DType::F64 {
            1e-12
        } else {
            2e-6
        }
    }

    #[test]
    fn erf_fast_is_within_1e_7_of_libm() {
        let worst = (-80_000..=80_000)
            .map(|i| i as f64 * 1e-4)
            .map(|x| (erf_fast(x) - candle_core::cpu::erf::erf_f64(x)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-7, "erf error {worst:e}");
        // And as the f32 kernels use it, rounded to f32, against libm's f32 erf.
        let worst_f32 = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (erf_fast(x as f64) as f32 - candle_core::cpu::erf::erf_f32(x)).abs())
            .fold(0.0, f32::max);
        assert!(worst_f32 < 1e-7, "f32 erf error {worst_f32:e}");
    }

    #[test]
    fn exp_fast_matches_exp() {
        let worst = (-70_000..=70_000)
            .map(|i| i as f64 * 1e-2)
            .map(|x| ((exp_fast(x) - x.exp()) / x.exp()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-13, "exp relative error {worst:e}");
        assert!(exp_fast(-1e4) < 1e-300 && exp_fast(1e4) > 1e300);
    }

    /// The composite norm of `ops` (candle ops) with candle's autograd for the input gradient.
    fn composite_norm(x: &Tensor, stats: &[usize], w: &Tensor, b: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(&x.contiguous().unwrap()).unwrap();
        let y = normalize_last_dim(&var.reshape(stats).unwrap(), 1e-5).unwrap().reshape(x.shape()).unwrap();
        let y = y.broadcast_mul(w).unwrap().broadcast_add(b).unwrap();
        let grads = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
        (y.detach(), grads.get(&var).unwrap().clone())
    }

    fn check_norm(dims: &[usize], stats: &[usize], groups: usize, affine: &[usize], dtype: DType) {
        let channels: usize = affine.iter().product();
        let x = values(dims, 1, dtype).affine(3.0, 5.0).unwrap();
        let w = values(&[channels, 1], 2, dtype).reshape(affine).unwrap();
        let b = values(&[channels, 1], 3, dtype).reshape(affine).unwrap();
        let dy = values(dims, 4, dtype);
        let spec = NormSpec { n: *stats.last().unwrap(), groups, eps: 1e-5 };
        let y = cpu_tensor(norm(&x, &w, &b, spec).unwrap().unwrap(), dims).unwrap();
        let dx = cpu_tensor(norm_input_grad(&x, &dy, &w, spec).unwrap().unwrap(), dims).unwrap();
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
        let x = values(&[2, 4], 1, DType::F16);
        let w = values(&[4, 1], 2, DType::F32).reshape(4).unwrap();
        assert!(norm(&x, &w, &w, NormSpec { n: 4, groups: 1, eps: 1e-5 }).unwrap().is_none());
    }

    /// candle's own activation ops, and the composite backwards of `ops` (candle's autograd of
    /// `gelu_erf` differs from the exact derivative by 1e-7).
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
                    let x = (values(&dims, 5, dtype) * 2.0).unwrap();
                    let mut out_dims = dims;
                    if kind == Activation::Geglu {
                        out_dims[2] /= 2;
                    }
                    let dy = values(&out_dims, 6, dtype);
                    let y = cpu_tensor(activation(&x, kind).unwrap().unwrap(), out_dims.as_slice()).unwrap();
                    let dx = cpu_tensor(activation_grad(&x, &dy, kind).unwrap().unwrap(), dims.as_slice()).unwrap();
                    let (y_ref, dx_ref) = composite_activation(&x, kind, &dy);
                    let (value, grad) = (rel_diff(&y, &y_ref), rel_diff(&dx, &dx_ref));
                    let tol = tolerance(dtype);
                    assert!(value < tol && grad < tol, "{kind:?} {dims:?} {dtype:?}: value {value:e}, grad {grad:e}");
                }
            }
        }
        let x = values(&[2, 4], 1, DType::F16);
        assert!(activation(&x, Activation::Silu).unwrap().is_none());
        assert!(activation(&values(&[2, 3], 1, DType::F32), Activation::Geglu).is_err());
    }

    #[test]
    fn linear_matches_matmul() {
        for dtype in [DType::F32, DType::F64] {
            // Non-contiguous `x` and `dy`; a narrow product (on gemm's threads) and a wide one
            // (split by columns), sizes that are not multiples of gemm's blocks.
            for (rows, in_dim, out_dim) in [(37, 19, 23), (37, 301, 259)] {
                let x = values(&[rows, in_dim], 7, dtype);
                let weight = values(&[in_dim, out_dim], 8, dtype).t().unwrap().contiguous().unwrap();
                let bias = values(&[out_dim, 1], 9, dtype).reshape(out_dim).unwrap();
                let product = x.matmul(&weight.t().unwrap()).unwrap();
                let tol = tolerance(dtype) / 10.0;
                let y = cpu_tensor(linear(&x, &weight, Some(&bias)).unwrap().unwrap(), (rows, out_dim)).unwrap();
                assert!(rel_diff(&y, &product.broadcast_add(&bias).unwrap()) < tol);
                let y = cpu_tensor(linear(&x, &weight, None).unwrap().unwrap(), (rows, out_dim)).unwrap();
                assert!(rel_diff(&y, &product) < tol);
                let dy = values(&[rows, out_dim], 10, dtype);
                let dx = cpu_tensor(linear_input_grad(&dy, &weight).unwrap().unwrap(), (rows, in_dim)).unwrap();
                assert!(rel_diff(&dx, &dy.matmul(&weight).unwrap()) < tol);
            }
        }
        // Mismatched sizes are left to candle.
        let (x, w) = (values(&[3, 4], 1, DType::F32), values(&[5, 3], 2, DType::F32));
        assert!(linear(&x, &w, None).unwrap().is_none());
        assert!(linear_input_grad(&x, &w).unwrap().is_none());
    }
}
