//! AutoencoderKL against diffusers (fixture from tools/reference/clip_text_vae.py).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, fixture, load_config, load_tensors, var_builder};
use stableid::models::vae::{AutoencoderKL, AutoencoderKLConfig};

const WEIGHTS: &str = "tiny-sd/vae/diffusion_pytorch_model.safetensors";

fn config() -> AutoencoderKLConfig {
    load_config("tiny-sd/vae/config.json")
}

fn from_weights(weights: HashMap<String, Tensor>) -> AutoencoderKL {
    AutoencoderKL::new(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &config()).unwrap()
}

fn load() -> AutoencoderKL {
    AutoencoderKL::new(var_builder(&fixture(WEIGHTS), DType::F32), &config()).unwrap()
}

#[test]
fn encode_matches_diffusers() {
    let t = load_tensors("parity/vae.safetensors");
    let vae = load();
    let posterior = vae.encode(&t["image"]).unwrap();
    assert_close(&posterior.mean, &t["mean"], 1e-4, "posterior mean");
    assert_close(&posterior.std, &t["std"], 1e-4, "posterior std");
    assert_close(&posterior.sample(&t["noise"]).unwrap(), &t["sample"], 1e-4, "posterior sample");
}

#[test]
fn decode_matches_diffusers() {
    let t = load_tensors("parity/vae.safetensors");
    let decoded = load().decode(&t["latents"]).unwrap();
    assert_close(&decoded, &t["decoded"], 1e-4, "decoded image");
}

#[test]
fn non_square_batch_matches_diffusers() {
    let t = load_tensors("parity/vae.safetensors");
    let vae = load();
    let posterior = vae.encode(&t["image_ns"]).unwrap();
    assert_close(&posterior.mean, &t["mean_ns"], 1e-4, "posterior mean 64x48");
    assert_close(&posterior.std, &t["std_ns"], 1e-4, "posterior std 64x48");
    assert_close(&vae.decode(&t["latents_ns"]).unwrap(), &t["decoded_ns"], 1e-4, "decoded 64x48");
}

#[test]
fn matches_diffusers_with_randomised_norms_and_biases() {
    let t = load_tensors("parity/vae.safetensors");
    let mut weights = load_tensors(WEIGHTS);
    for (name, value) in &t {
        if let Some(weight) = name.strip_prefix("perturbed.") {
            assert!(weights.insert(weight.to_string(), value.clone()).is_some(), "no weight {weight}");
        }
    }
    let vae = from_weights(weights);
    let posterior = vae.encode(&t["image"]).unwrap();
    assert_close(&posterior.mean, &t["perturbed_mean"], 1e-4, "posterior mean, perturbed weights");
    assert_close(&posterior.std, &t["perturbed_std"], 1e-4, "posterior std, perturbed weights");
    assert_close(&vae.decode(&t["latents"]).unwrap(), &t["perturbed_decoded"], 1e-4, "decoded, perturbed weights");
}

/// Checkpoints from before diffusers 0.14 name the mid-block attention query/key/value/proj_attn.
#[test]
fn loads_legacy_attention_names() {
    let t = load_tensors("parity/vae.safetensors");
    let renames = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")];
    let legacy = load_tensors(WEIGHTS)
        .into_iter()
        .map(|(name, value)| {
            let name = renames.iter().fold(name, |n, (new, old)| n.replace(new, old));
            (name, value)
        })
        .collect::<HashMap<_, _>>();
    assert!(legacy.keys().any(|k| k.ends_with("attentions.0.proj_attn.weight")));
    let decoded = from_weights(legacy).decode(&t["latents"]).unwrap();
    assert_close(&decoded, &t["decoded"], 1e-4, "decoded image, legacy names");
}

#[test]
fn config_defaults_and_rejections() {
    let cfg: AutoencoderKLConfig = serde_json::from_str(r#"{"block_out_channels": [128, 256, 512, 512]}"#).unwrap();
    assert!(cfg.mid_block_add_attention && cfg.use_quant_conv && cfg.use_post_quant_conv);
    assert_eq!((cfg.latent_channels, cfg.norm_num_groups, cfg.scaling_factor), (4, 32, 0.18215));
    assert_eq!(load().downscale_factor(), 8);

    let vb = || var_builder(&fixture(WEIGHTS), DType::F32);
    let mut attn_blocks = config();
    attn_blocks.down_block_types[1] = "AttnDownEncoderBlock2D".into();
    let err = AutoencoderKL::new(vb(), &attn_blocks).unwrap_err().to_string();
    assert!(err.contains("vae config: `down_block_types` = \"AttnDownEncoderBlock2D\""), "{err}");
    let gelu = AutoencoderKLConfig { act_fn: "gelu".into(), ..config() };
    let err = AutoencoderKL::new(vb(), &gelu).unwrap_err().to_string();
    assert!(err.contains("vae config: `act_fn` = \"gelu\""), "{err}");
}

/// d/d image of `sum(w * sample(encode(2 image - 1), noise))` by autograd and by central
/// differences, in f64, through every part of the encoder (convolutions, the stride-2
/// downsamplers with their one-sided padding, group norms, SiLU, the mid-block attention,
/// `quant_conv`, the clamped log-variance) and the posterior sample: the path ISM sends the
/// renders' gradient along. A graph cut anywhere on it makes the two disagree.
#[test]
fn encoder_gradient_matches_finite_differences() {
    let device = Device::Cpu;
    let vae = AutoencoderKL::new(var_builder(&fixture(WEIGHTS), DType::F64), &config()).unwrap();
    // Batch 2, 16 x 24 pixels: 2 x 3 latents.
    let image = Tensor::rand(0f64, 1.0, (2, 3, 16, 24), &device).unwrap();
    let noise = Tensor::randn(0f64, 1.0, (2, 4, 2, 3), &device).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (2, 4, 2, 3), &device).unwrap();
    let objective = |image: &Tensor| -> Tensor {
        let posterior = vae.encode(&((image * 2.0).unwrap() - 1.0).unwrap()).unwrap();
        (posterior.sample(&noise).unwrap() * &weights).unwrap().sum_all().unwrap()
    };
    let value = |image: &Tensor| objective(image).to_scalar::<f64>().unwrap();

    let var = candle_core::Var::from_tensor(&image).unwrap();
    let grads = objective(var.as_tensor()).backward().unwrap();
    let grad = grads.get(var.as_tensor()).expect("the image receives a gradient");
    assert!(common::max_abs(grad) > 1e-6, "the image's gradient is zero");

    let h = 1e-5;
    for seed in 0..3u64 {
        let direction = Tensor::randn(0f64, 1.0, image.dims(), &device).unwrap();
        let moved = |delta: f64| value(&(&image + (&direction * delta).unwrap()).unwrap());
        let numeric = (moved(h) - moved(-h)) / (2.0 * h);
        let exact = (grad * &direction).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let rel = (numeric - exact).abs() / exact.abs().max(1e-12);
        eprintln!("direction {seed}: autograd {exact:.10e}, finite difference {numeric:.10e}, rel {rel:.1e}");
        assert!(rel < 1e-6, "direction {seed}: autograd {exact} vs finite difference {numeric}");
    }
    // Single pixels: one in a corner (where the downsamplers pad) and one inside.
    let pixels = image.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let grad_values = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for index in [0, 16 * 24 - 1, 3 * 16 * 24 + 7 * 24 + 11] {
        let moved = |delta: f64| {
            let mut values = pixels.clone();
            values[index] += delta;
            value(&Tensor::from_vec(values, image.dims(), &device).unwrap())
        };
        let numeric = (moved(h) - moved(-h)) / (2.0 * h);
        let exact = grad_values[index];
        let rel = (numeric - exact).abs() / numeric.abs().max(exact.abs()).max(1e-9);
        eprintln!("pixel {index}: autograd {exact:.10e}, finite difference {numeric:.10e}, rel {rel:.1e}");
        assert!(rel < 1e-5, "pixel {index}: autograd {exact} vs finite difference {numeric}");
    }
}
