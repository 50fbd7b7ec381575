//! Weights made up from a seed, for building a model without its files: the benchmark
//! (`stableid bench`) and the tests.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::distr::{Distribution, Uniform};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A [`SimpleBackend`] that makes up every tensor a model asks for, of the requested shape, from
/// a seed and the tensor's name (so the same model gets the same weights in any build order):
/// biases are zero, 1-D weights (the norms' scales) near one, other weights uniform with standard
/// deviation `1 / sqrt(fan_in)`, which keeps activations of order one through deep stacks.
/// Nothing is allocated besides the requested tensors.
pub struct RandomWeights {
    seed: u64,
    elements: Arc<AtomicU64>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed, elements: Arc::new(AtomicU64::new(0)) }
    }

    /// A counter of the elements handed out so far (the parameter count of the models built).
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.elements.clone()
    }

    /// A `VarBuilder` over these weights.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, shape: &Shape, name: &str) -> Vec<f32> {
        let mut hasher = DefaultHasher::new();
        name.hash(&mut hasher);
        let mut rng = SmallRng::seed_from_u64(self.seed ^ hasher.finish());
        let n = shape.elem_count();
        match shape.dims() {
            // A norm's scale: 1 +- 0.1.
            [_] => (0..n).map(|_| 1.0 + rng.random_range(-0.1f32..0.1)).collect(),
            dims => {
                let fan_in: usize = dims[1..].iter().product();
                // Uniform on [-a, a] has standard deviation a / sqrt(3).
                let a = (3.0 / fan_in.max(1) as f32).sqrt();
                let uniform = Uniform::new_inclusive(-a, a).expect("finite bounds");
                (0..n).map(|_| uniform.sample(&mut rng)).collect()
            }
        }
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.elements.fetch_add(shape.elem_count() as u64, Ordering::Relaxed);
        if name.ends_with("bias") {
            return Tensor::zeros(shape, dtype, device);
        }
        let values = self.values(&shape, name);
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name} was asked for without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
