//! Seeded randomness shared by generation and learning: the same seed gives the same numbers on
//! every machine (rand's StdRng, pinned by Cargo.lock), independent of the device.

use candle_core::{Device, Shape, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// Standard normal noise of `shape` drawn from `rng`, as f32 on `device`.
pub fn standard_normal(shape: impl Into<Shape>, rng: &mut impl Rng, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}
