//! Weights computed from each tensor's name, for models whose layer sizes are fixed by their
//! reference code (FaceNet, AlexNet) and too large to store as fixtures:
//! tools/reference/eval_models.py (`formula_tensor`) computes the same values bit for bit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// FNV-1a (64 bit) of the name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// `n` numbers in [0, 1): splitmix64 of (name hash + index * golden ratio), top 53 bits.
fn uniform(name: &str, n: usize) -> impl Iterator<Item = f64> {
    let hash = name_hash(name);
    (0..n as u64).map(move |i| {
        let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(hash);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    })
}

fn values(name: &str, shape: &Shape) -> Vec<f32> {
    let n = shape.elem_count();
    let dims = shape.dims();
    let map: Box<dyn Fn(f64) -> f64> = if name.ends_with("running_var") {
        Box::new(|u| 0.5 + u)
    } else if name.ends_with("running_mean") || name.ends_with("bias") {
        Box::new(|u| 0.2 * (u - 0.5))
    } else if dims.len() == 1 {
        Box::new(|u| 0.75 + 0.5 * u)
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let a = (24.0 / fan_in as f64).sqrt();
        Box::new(move |u| (u - 0.5) * a)
    };
    uniform(name, n).map(|u| map(u) as f32).collect()
}

/// The formula's weights, each tensor also recorded in `asked` when there is one.
struct FormulaWeights {
    asked: Option<Arc<Mutex<HashMap<String, Tensor>>>>,
}

impl SimpleBackend for FormulaWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = values(name, &shape);
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
        if let Some(asked) = &self.asked {
            asked.lock().unwrap().insert(name.to_string(), tensor.clone());
        }
        tensor.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("formula weights need a shape: {name} was asked for without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A CPU f32 `VarBuilder` over the formula's weights.
pub fn var_builder() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(FormulaWeights { asked: None }), DType::F32, Device::Cpu)
}

/// Writes the formula's weights of the model `build` makes (the tensors it asks for) as a
/// safetensors file at `path`: a weights file for the command line.
pub fn write_safetensors<M>(path: &Path, build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>) {
    let asked = Arc::new(Mutex::new(HashMap::new()));
    let vb = VarBuilder::from_backend(Box::new(FormulaWeights { asked: Some(asked.clone()) }), DType::F32, Device::Cpu);
    build(vb).unwrap();
    let tensors = std::mem::take(&mut *asked.lock().unwrap());
    candle_core::safetensors::save(&tensors, path).unwrap();
}
