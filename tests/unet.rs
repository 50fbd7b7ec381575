//! UNet parity with diffusers' `UNet2DConditionModel` (fixtures from tools/reference/unet.py)
//! and gradient checks against finite differences.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use stableid::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

use common::{assert_parity, fixture, load_config, load_tensors, max_abs_diff, var_builder};

/// Loads a diffusers UNet folder under `tests/fixtures/`.
fn load_unet(folder: &str, dtype: DType) -> UNet2DConditionModel {
    let vb = var_builder(&fixture(folder).join("diffusion_pytorch_model.safetensors"), dtype);
    UNet2DConditionModel::new(vb, &load_config(&format!("{folder}/config.json"))).unwrap()
}

fn check_case(unet: &UNet2DConditionModel, fx: &HashMap<String, Tensor>, case: &str) {
    let out = unet
        .forward(&fx[&format!("{case}.sample")], &fx[&format!("{case}.timesteps")], &fx[&format!("{case}.context")])
        .unwrap();
    assert_parity(&out, &fx[&format!("{case}.out")], case);
}

#[test]
fn tiny_sd_batch_with_one_timestep_per_sample() {
    check_case(&load_unet("tiny-sd/unet", DType::F32), &load_tensors("parity/unet.safetensors"), "batch");
}

#[test]
fn tiny_sd_single_timestep_broadcasts_over_the_batch() {
    let unet = load_unet("tiny-sd/unet", DType::F32);
    let fx = load_tensors("parity/unet.safetensors");
    for t in [0u32, 500, 981] {
        let timesteps = Tensor::new(&[t as f32], &Device::Cpu).unwrap();
        let out = unet.forward(&fx["single.sample"], &timesteps, &fx["single.context"]).unwrap();
        assert_parity(&out, &fx[&format!("single.t{t}.out")], &format!("t = {t}"));
    }
    // Integer timesteps and a scalar tensor are accepted too.
    let out = unet.forward(&fx["single.sample"], &Tensor::new(500u32, &Device::Cpu).unwrap(), &fx["single.context"]);
    assert_parity(&out.unwrap(), &fx["single.t500.out"], "scalar u32 timestep");
}

#[test]
fn tiny_sd_latents_not_divisible_by_the_downsampling() {
    check_case(&load_unet("tiny-sd/unet", DType::F32), &load_tensors("parity/unet.safetensors"), "odd");
}

#[test]
fn sd15_style_unet_matches_diffusers() {
    let unet = load_unet("unet-sd15", DType::F32);
    let fx = load_tensors("parity/unet_sd15.safetensors");
    check_case(&unet, &fx, "batch");
    check_case(&unet, &fx, "odd");
}

#[test]
fn timesteps_of_the_wrong_length_are_rejected() {
    let unet = load_unet("tiny-sd/unet", DType::F32);
    let fx = load_tensors("parity/unet.safetensors");
    let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let err = unet.forward(&fx["batch.sample"], &t, &fx["batch.context"]).unwrap_err();
    assert!(err.to_string().contains("timesteps of shape [3]"), "{err}");
}

#[test]
fn config_defaults_and_rejections() {
    let cfg: UNet2DConditionConfig =
        serde_json::from_str(r#"{"attention_head_dim": [5, 10, 20, 20], "unknown_key": 1}"#).unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.norm_num_groups, Some(32));
    assert!(cfg.flip_sin_to_cos && !cfg.use_linear_projection);
    cfg.validate().unwrap();

    for (json, field) in [
        (r#"{"class_embed_type": "timestep"}"#, "`class_embed_type` = \"timestep\""),
        (r#"{"resnet_time_scale_shift": "scale_shift"}"#, "`resnet_time_scale_shift` = \"scale_shift\""),
        (r#"{"num_attention_heads": 8}"#, "`num_attention_heads` = One(8)"),
        (r#"{"mid_block_type": null}"#, "`mid_block_type` = None"),
        (r#"{"only_cross_attention": true}"#, "`only_cross_attention` = One(true)"),
        (r#"{"attention_head_dim": [5, 10]}"#, "`attention_head_dim` = [5, 10] has 2 entries for 4 blocks"),
        (
            r#"{"down_block_types": ["DownBlock2D"]}"#,
            "`block_out_channels` (4 entries), `down_block_types` (1) and `up_block_types` (4) must have the same",
        ),
        (
            r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
            "`down_block_types` = \"AttnDownBlock2D\"",
        ),
    ] {
        let cfg: UNet2DConditionConfig = serde_json::from_str(json).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
}

/// Deterministic standard-normal tensor.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Compares autograd with central finite differences of `L = sum(unet(sample, t, ctx) * w)`
/// (weights in f64), for the sample and for the encoder hidden states: at random coordinates,
/// and along random dense directions (every coordinate at once, so a cut anywhere shows).
fn check_gradients(folder: &str, sample_shape: &[usize], ctx_shape: &[usize], t: f64) {
    let unet = load_unet(folder, DType::F64);
    let sample = Var::from_tensor(&randn(sample_shape, 1)).unwrap();
    let ctx = Var::from_tensor(&randn(ctx_shape, 2)).unwrap();
    let timesteps = Tensor::new(&[t], &Device::Cpu).unwrap();
    let w = randn(sample_shape, 3);
    let loss = |s: &Tensor, c: &Tensor| {
        let out = unet.forward(s, &timesteps, c).unwrap();
        (out * &w).unwrap().sum_all().unwrap()
    };
    let grads = loss(sample.as_tensor(), ctx.as_tensor()).backward().unwrap();

    let h = 1e-4;
    for (name, var) in [("sample", &sample), ("encoder_hidden_states", &ctx)] {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = grad.elem_count();
        let mut rng = StdRng::seed_from_u64(4);
        let mut directions: Vec<(String, Tensor)> =
            (0..2).map(|k| (format!("random direction {k}"), randn(var.dims(), 10 + k))).collect();
        for _ in 0..4 {
            let i = rng.random_range(0..n as u32);
            let one_hot = Tensor::arange(0, n as u32, &Device::Cpu).unwrap().eq(i).unwrap();
            let one_hot = one_hot.to_dtype(DType::F64).unwrap().reshape(var.dims()).unwrap();
            directions.push((format!("coordinate {i}"), one_hot));
        }
        for (what, v) in directions {
            let autograd = (grad * &v).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let value = |delta: f64| {
                let moved = (var.as_tensor() + (&v * delta).unwrap()).unwrap();
                let l = match name {
                    "sample" => loss(&moved, ctx.as_tensor()),
                    _ => loss(sample.as_tensor(), &moved),
                };
                l.to_scalar::<f64>().unwrap()
            };
            let fd = (value(h) - value(-h)) / (2.0 * h);
            let rel = (fd - autograd).abs() / autograd.abs();
            eprintln!("{folder} d/d{name}, {what}: autograd {autograd:.6e}, finite difference {fd:.6e}, rel {rel:.1e}");
            assert!(rel < 1e-3, "{folder} d/d{name}, {what}: autograd {autograd} vs finite difference {fd}");
        }
    }
}

#[test]
fn tiny_sd_gradients_match_finite_differences() {
    // 9x7 latents: the upsampler resizes to the skip size, through the index-select path.
    check_gradients("tiny-sd/unet", &[1, 4, 9, 7], &[1, 8, 32], 700.0);
}

#[test]
fn sd15_style_gradients_match_finite_differences() {
    // 10x6 latents: one 2x upsample (broadcast path) and one resize 3 -> 5.
    check_gradients("unet-sd15", &[1, 4, 10, 6], &[1, 8, 48], 300.0);
}

#[test]
fn additional_residuals_match_diffusers() {
    use stableid::models::unet::AdditionalResiduals;
    let unet = load_unet("tiny-sd/unet", DType::F32);
    let fx = load_tensors("parity/unet_residuals.safetensors");
    let (sample, timesteps, context) = (&fx["residuals.sample"], &fx["residuals.timesteps"], &fx["residuals.context"]);
    let down: Vec<Tensor> = (0..).map_while(|i| fx.get(&format!("residuals.down.{i}")).cloned()).collect();
    let residuals = AdditionalResiduals { down: down.clone(), mid: fx["residuals.mid"].clone() };
    let out = unet.forward_with_additional_residuals(sample, timesteps, context, Some(&residuals)).unwrap();
    assert_parity(&out, &fx["residuals.out"], "with residuals");

    // Zero residuals: exactly the plain forward.
    let zeros = AdditionalResiduals {
        down: down.iter().map(|r| r.zeros_like().unwrap()).collect(),
        mid: residuals.mid.zeros_like().unwrap(),
    };
    let with_zeros = unet.forward_with_additional_residuals(sample, timesteps, context, Some(&zeros)).unwrap();
    assert_eq!(max_abs_diff(&unet.forward(sample, timesteps, context).unwrap(), &with_zeros), 0.0);

    // A residual list that does not match the skip connections is refused.
    let short = AdditionalResiduals { down: down[1..].to_vec(), mid: residuals.mid.clone() };
    let err = unet.forward_with_additional_residuals(sample, timesteps, context, Some(&short)).unwrap_err();
    assert!(err.to_string().contains("residuals"), "{err}");
}
