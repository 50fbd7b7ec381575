//! The OpenPose test weights of tools/reference/openpose.py (`pose_weight`), computed here from
//! the tensor names: 209 MB that are never stored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use stableid::models::openpose::BodyPoseModel;

fn fnv1a(name: &str) -> u32 {
    name.bytes().fold(0x811C9DC5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x01000193))
}

/// Element `i` of tensor `name`: `(2u - 1) * a`, `u` murmur3's fmix32 of
/// `i * 0x9E3779B1 + fnv1a(name)` over 2^32, `a = sqrt(6 / fan_in)` (0.1 for biases).
pub fn pose_weight(name: &str, dims: &[usize]) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let fan_in: usize = dims[1..].iter().product();
    let scale = if name.ends_with("bias") { 0.1 } else { (6.0 / fan_in as f64).sqrt() };
    let seed = fnv1a(name);
    (0..n as u32)
        .map(|i| {
            let mut h = i.wrapping_mul(0x9E3779B1).wrapping_add(seed);
            h ^= h >> 16;
            h = h.wrapping_mul(0x85EBCA6B);
            h ^= h >> 13;
            h = h.wrapping_mul(0xC2B2AE35);
            h ^= h >> 16;
            let u = f64::from(h) / 4294967296.0;
            ((2.0 * u - 1.0) * scale) as f32
        })
        .collect()
}

/// Hands out [`pose_weight`]s and remembers them.
#[derive(Default)]
struct HashedWeights {
    made: Mutex<HashMap<String, Tensor>>,
}

impl SimpleBackend for HashedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Tensor::from_vec(pose_weight(name, shape.dims()), shape, device)?.to_dtype(dtype)?;
        self.made.lock().unwrap().insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name} was asked for without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The flat names of body_pose_model.pth.
        !name.starts_with("model")
    }
}

/// The body network on the test weights.
pub fn test_model() -> BodyPoseModel {
    BodyPoseModel::new(VarBuilder::from_backend(Box::<HashedWeights>::default(), DType::F32, Device::Cpu)).unwrap()
}

/// Writes the test weights as a safetensors file under their flat names (as body_pose_model.pth
/// names them). The random network finds "people" in any photo (its heat maps and PAFs are noise
/// above the thresholds); with `blind`, the last heat-map layer's biases are -100, so that its
/// ReLU zeroes every heat map and it finds nobody.
pub fn write_test_weights(path: &Path, blind: bool) {
    let backend = std::sync::Arc::new(HashedWeights::default());
    struct Shared(std::sync::Arc<HashedWeights>);
    impl SimpleBackend for Shared {
        fn get(&self, s: Shape, n: &str, i: candle_nn::Init, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get(s, n, i, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    BodyPoseModel::new(VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, Device::Cpu)).unwrap();
    let mut made = backend.made.lock().unwrap();
    if blind {
        made.insert("Mconv7_stage6_L2.bias".into(), Tensor::full(-100f32, 19, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&made, path).unwrap();
}
