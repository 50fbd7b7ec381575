//! Deterministic inputs and comparisons shared by the kernel tests: no random generator, the same
//! values on every machine.

use candle_core::{DType, Device, Shape, Tensor};

/// `n` values in `[low, low + width)` in a scrambled order, a different one for each `seed`. The
/// period is prime (1201), so that a row read with a stride such as 1000 does not repeat one value.
pub(crate) fn spread(n: usize, seed: u64, low: f64, width: f64) -> Vec<f64> {
    const PERIOD: u64 = 1201;
    (0..n as u64).map(|i| ((i * 7919 + seed * 104_729) % PERIOD) as f64 / PERIOD as f64 * width + low).collect()
}

/// A CPU tensor of [`spread`] values in `dtype`.
pub(crate) fn spread_tensor(shape: impl Into<Shape>, seed: u64, low: f64, width: f64, dtype: DType) -> Tensor {
    let shape = shape.into();
    let values = spread(shape.elem_count(), seed, low, width);
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// `max |a - b|` over all elements, computed in f64.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Deterministic values in [-3, 3), `dtype`, transposed in its last two dimensions so that
/// the kernels see a non-contiguous tensor (`dims` is the shape they see).
pub(crate) fn transposed_values(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut swapped = dims.to_vec();
    let rank = dims.len();
    swapped.swap(rank - 1, rank - 2);
    spread_tensor(swapped, seed, -3.0, 6.0, dtype).transpose(rank - 1, rank - 2).unwrap()
}

/// `max |a - b| / max(1, max |b|)`.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    max(&(&a - &b).unwrap()) / max(&b).max(1.0)
}

/// What the f32 / f64 CPU kernels may differ by from candle's composite ops, relatively.
pub(crate) fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-6
    }
}
