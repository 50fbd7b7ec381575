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
