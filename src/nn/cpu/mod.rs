//! What the f32 and f64 CPU kernels share; the kernels themselves live beside their ops
//! (`conv/cpu.rs`, `norm/cpu.rs`, `activation/cpu.rs`, `linear/cpu.rs`, `attention/cpu.rs`).
//!
//! candle computes a norm as about ten whole-tensor passes (and the composite backward fifteen),
//! its f32 `silu` / `gelu_erf` as scalar loops calling `expf` / `erff`, and its row reductions
//! one row at a time. The kernels read their inputs once or twice, split the rows over rayon's
//! pool (candle's thread count), and are compiled a second time for AVX2 + FMA, chosen at run
//! time ([`simd_fn!`]), so that the loops vectorise without a `target-cpu` flag. Their matrix
//! products are [`gemm`]'s.
//!
//! f32 kernels compute in f64 with branch-free, vectorisable approximations of `exp` and `erf`
//! ([`fast_math`]), far below f32 rounding; f64 ones keep libm's.

mod fast_math;
pub(super) mod gemm;

use std::ops::{Add, AddAssign, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use fast_math::{erf_fast, exp_fast};

/// Elements each rayon task handles at least: smaller tasks cost more to hand out than to run.
pub(super) const MIN_TASK: usize = 1 << 14;

/// The element types of the kernels: `f32` and `f64`, the types `gemm` multiplies.
pub(super) trait Element:
    Copy + Send + Sync + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + AddAssign
{
    const DTYPE: DType;
    const ZERO: Self;
    const ONE: Self;
    fn wide(self) -> f64;
    fn narrow(v: f64) -> Self;
    /// `e^v`, as precise as this type needs.
    fn exp(v: f64) -> f64;
    /// `erf(v)`, as precise as this type needs.
    fn erf(v: f64) -> f64;
    fn values(storage: &CpuStorage) -> Result<&[Self]>;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

/// Implements [`Element`] for `$t`, stored as the `$dtype` variant of `DType` and `CpuStorage`,
/// with its `exp` and `erf`.
macro_rules! element {
    ($t:ty, $dtype:ident, exp: $exp:path, erf: $erf:path) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            #[inline(always)]
            fn wide(self) -> f64 {
                self as f64
            }

            #[inline(always)]
            fn narrow(v: f64) -> Self {
                v as $t
            }

            #[inline(always)]
            fn exp(v: f64) -> f64 {
                $exp(v)
            }

            #[inline(always)]
            fn erf(v: f64) -> f64 {
                $erf(v)
            }

            fn values(storage: &CpuStorage) -> Result<&[Self]> {
                storage.as_slice()
            }

            fn storage(values: Vec<Self>) -> CpuStorage {
                CpuStorage::$dtype(values)
            }
        }
    };
}

element!(f32, F32, exp: exp_fast, erf: erf_fast);
element!(f64, F64, exp: f64::exp, erf: candle_core::cpu::erf::erf_f64);

/// Defines `fn $name<T: Element>(...)` (or a `fn $name(...)` without type parameter) from one
/// body compiled twice: for AVX2 + FMA, run where the CPU has them, and for the build's baseline
/// target. Rust never fuses a multiply and an add into an FMA by itself, so both compute the same
/// bits. Everything the body calls must be
/// `#[inline(always)]` to be compiled for AVX2 too.
macro_rules! simd_fn {
    ($(#[$doc:meta])* $vis:vis fn $name:ident<$t:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name<$t: $crate::nn::cpu::Element>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $crate::nn::cpu::Element>($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            #[inline(always)]
            fn portable<$t: $crate::nn::cpu::Element>($($arg: $ty),*) $body
            portable::<$t>($($arg),*)
        }
    };
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// The elements of a contiguous CPU tensor's storage.
fn cpu_values<'a, T: Element>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&T::values(cpu)?[start..end]),
        _ => candle_core::bail!("cpu kernel: a contiguous CPU tensor was expected"),
    }
}

/// `f` on the values of `tensors`, converted to `T` and made contiguous.
pub(super) fn with_values<T: Element, R>(tensors: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
    let tensors = tensors.iter().map(|t| t.to_dtype(T::DTYPE)?.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards.iter().map(|(s, l)| cpu_values::<T>(s, l)).collect::<Result<Vec<_>>>()?;
    Ok(f(&values))
}

/// The f32 / f64 type of CPU tensors that all have it.
pub(super) fn cpu_dtype(tensors: &[&Tensor]) -> Option<DType> {
    let dtype = tensors[0].dtype();
    let fits = tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype);
    (fits && matches!(dtype, DType::F32 | DType::F64)).then_some(dtype)
}

/// Runs `kernel` on each `width`-long chunk of `out` with its index, on rayon's pool where
/// there is enough work.
pub(super) fn for_each_chunk<T: Element>(out: &mut [T], width: usize, kernel: impl Fn(usize, &mut [T]) + Sync) {
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

/// A tensor on the CPU holding `values`, a kernel's result.
pub(super) fn cpu_tensor(values: CpuStorage, shape: impl Into<Shape>) -> Result<Tensor> {
    match values {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        other => candle_core::bail!("cpu kernel: unexpected {:?} values", other.dtype()),
    }
}

/// A buffer that parallel tasks write disjoint parts of, through raw pointers.
pub(super) struct Disjoint<T>(pub(super) *mut T);

// SAFETY: the tasks sharing a `Disjoint` write disjoint entries (stated at each use).
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    /// The entry at `offset` (a method, so that closures capture the whole `Disjoint`).
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    pub(super) unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}
