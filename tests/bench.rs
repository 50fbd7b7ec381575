//! `stableid bench` on the tiny SD model's configs (random weights, 64x64): every measurement runs
//! and reports finite times and memory, the random-weight backend builds exactly the
//! architecture of the config (same parameter count as the reference weights), and the built-in
//! SD 2.1-base configs describe the published model.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::fixture;
use stableid::bench::{self, BenchOptions, Measure};
use stableid::models::clip_text::ClipTextModel;
use stableid::models::stable_diffusion::SdConfigs;
use stableid::models::unet::UNet2DConditionModel;
use stableid::models::vae::AutoencoderKL;
use stableid::weights::RandomWeights;

/// Benchmarks in this process run one at a time: the peak memory of the process is reset before
/// each measurement.
static ONE_BENCH_AT_A_TIME: Mutex<()> = Mutex::new(());

fn tiny_configs() -> SdConfigs {
    fn read<T: serde::de::DeserializeOwned>(rel: &str) -> T {
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("tiny-sd/{rel}"))).unwrap()).unwrap()
    }
    SdConfigs {
        text_encoder: read("text_encoder/config.json"),
        unet: read("unet/config.json"),
        vae: read("vae/config.json"),
        scheduler: read("scheduler/scheduler_config.json"),
    }
}

/// Elements in a safetensors file.
fn element_count(rel: &str) -> u64 {
    let bytes = std::fs::read(fixture(rel)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>() as u64).sum()
}

#[test]
fn tiny_bench_measures_everything_with_finite_times_and_memory() {
    let mut options = BenchOptions::new(64);
    options.warmup = 1;
    options.repeats = 2;
    let _one = ONE_BENCH_AT_A_TIME.lock().unwrap();
    let report = bench::run(&tiny_configs(), &options).unwrap();

    let names: Vec<_> = report.timings.iter().map(|t| t.name).collect();
    assert_eq!(names, ["learn", "denoise", "controlnet", "vae_encode", "vae_decode", "text"]);
    for t in &report.timings {
        assert_eq!(t.times_s.len(), 2, "{}", t.name);
        assert!(t.times_s.iter().all(|s| s.is_finite() && *s > 0.0), "{}: {:?}", t.name, t.times_s);
        assert!(t.min_s() <= t.median_s() && t.median_s() <= t.max_s(), "{}", t.name);
        if cfg!(target_os = "linux") {
            let (before, peak) = (t.memory_before.unwrap(), t.memory_peak.unwrap());
            assert!(before > 0 && peak >= before, "{}: memory {before} before, {peak} peak", t.name);
        }
    }
    assert_eq!(report.latent_side, 8);
    assert_eq!(report.threads, candle_core::utils::get_num_threads());

    // The random backend built exactly the reference architecture.
    let p = report.models.as_ref().expect("the models were built").parameters;
    assert_eq!(p.text_encoder, element_count("tiny-sd/text_encoder/model.safetensors"));
    assert_eq!(p.unet, element_count("tiny-sd/unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(p.vae, element_count("tiny-sd/vae/diffusion_pytorch_model.safetensors"));
    let hidden = 2 * 32;
    assert_eq!(p.mlp, hidden * 768 + hidden * hidden + 6 * hidden);

    // The JSON carries what tools/bench/compare.sh reads.
    let json = report.to_json();
    for key in [
        "implementation",
        "device",
        "dtype",
        "threads",
        "resolution",
        "warmup",
        "repeats",
        "learn_timestep",
        "parameters",
        "memory",
        "results",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}: {json}");
    }
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["dtype"], "f32");
    assert_eq!(json["resolution"], 64);
    assert!(json["learn_timestep"].as_u64().unwrap() <= 600, "the learning step must run the reconstruction phase");
    let results = json["results"].as_object().unwrap();
    assert_eq!(results.len(), 6);
    for (name, r) in results {
        let median = r["median_s"].as_f64().unwrap();
        assert!(median > 0.0 && median.is_finite(), "{name}");
        assert_eq!(r["times_s"].as_array().unwrap().len(), 2, "{name}");
        for key in ["min_s", "max_s", "memory_before_bytes", "peak_memory_bytes"] {
            assert!(r.get(key).is_some(), "{name} lacks {key}");
        }
    }
    assert!(report.table().contains("vae_decode"));
}

#[test]
fn only_the_requested_measurements_run() {
    let mut options = BenchOptions::new(64);
    options.warmup = 0;
    options.repeats = 1;
    options.measures = vec![Measure::Text, Measure::Vae];
    let _one = ONE_BENCH_AT_A_TIME.lock().unwrap();
    let report = bench::run(&tiny_configs(), &options).unwrap();
    let names: Vec<_> = report.timings.iter().map(|t| t.name).collect();
    assert_eq!(names, ["vae_encode", "vae_decode", "text"]);
}

#[test]
fn align_times_a_real_photo_without_building_the_models() {
    let mut options = BenchOptions::new(64);
    options.warmup = 0;
    options.repeats = 2;
    options.measures = vec![Measure::Align];
    options.photo = Some(fixture("photos/faces_3_480x320.png"));
    let _one = ONE_BENCH_AT_A_TIME.lock().unwrap();
    let report = bench::run(&tiny_configs(), &options).unwrap();
    let names: Vec<_> = report.timings.iter().map(|t| t.name).collect();
    assert_eq!(names, ["photo_load", "face_detect", "face_align"]);
    assert!(report.timings.iter().all(|t| t.times_s.len() == 2 && t.median_s() > 0.0));
    assert!(report.models.is_none());
    let json = report.to_json();
    assert!(json.get("parameters").is_none() && json["results"]["face_detect"]["median_s"].as_f64().unwrap() > 0.0);
    assert!(!report.table().contains("Stable Diffusion"));

    // A photo without a face, and no photo: one error each, naming the problem.
    options.photo = Some(fixture("photos/chelsea_300x256.png"));
    let err = bench::run(&tiny_configs(), &options).unwrap_err().to_string();
    assert!(err.contains("no face found"), "{err}");
    options.photo = None;
    let err = bench::run(&tiny_configs(), &options).unwrap_err().to_string();
    assert!(err.contains("photo = none"), "{err}");
}

#[test]
fn video_times_a_guided_step_of_the_text_to_video_unet() {
    let mut options = BenchOptions::new(64);
    options.warmup = 0;
    options.repeats = 1;
    options.measures = vec![Measure::Video];
    options.video_unet =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-video/unet/config.json")).unwrap()).unwrap();
    let _one = ONE_BENCH_AT_A_TIME.lock().unwrap();
    let report = bench::run(&tiny_configs(), &options).unwrap();
    let names: Vec<_> = report.timings.iter().map(|t| t.name).collect();
    assert_eq!(names, ["video"]);
    assert!(report.timings[0].median_s() > 0.0 && report.models.is_none());
}

#[test]
fn bad_options_are_refused_with_the_setting_named() {
    let mut options = BenchOptions::new(60);
    let err = bench::run(&tiny_configs(), &options).unwrap_err().to_string();
    assert!(err.contains("resolution = 60"), "{err}");
    options.resolution = 64;
    options.repeats = 0;
    let err = bench::run(&tiny_configs(), &options).unwrap_err().to_string();
    assert!(err.contains("repeats = 0"), "{err}");
}

#[test]
fn random_weights_follow_their_rules_and_are_reproducible() {
    let weights = RandomWeights::new(7);
    let counter = weights.counter();
    let vb = weights.into_var_builder(DType::F32, &Device::Cpu);
    let bias = vb.get(300, "proj.bias").unwrap();
    assert_eq!(bias.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

    let scale: Vec<f32> = vb.get(300, "norm.weight").unwrap().to_vec1().unwrap();
    assert!(scale.iter().all(|v| (0.9..=1.1).contains(v)), "norm scales near one");

    let w = vb.get((256, 64, 2, 2), "conv.weight").unwrap();
    let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let expected = 1.0 / (64.0f64 * 4.0).sqrt();
    assert!(mean.abs() < 0.1 * expected, "mean {mean}");
    assert!((std / expected - 1.0).abs() < 0.03, "std {std} vs 1/sqrt(fan_in) = {expected}");

    // Same seed and name, same tensor; another name, another tensor.
    let again = RandomWeights::new(7).into_var_builder(DType::F32, &Device::Cpu);
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff(&w, &again.get((256, 64, 2, 2), "conv.weight").unwrap()), 0.0);
    assert!(diff(&w, &again.get((256, 64, 2, 2), "other.weight").unwrap()) > 1.0);
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 300 + 300 + 256 * 64 * 4);

    let half = RandomWeights::new(7).into_var_builder(DType::F16, &Device::Cpu);
    assert_eq!(half.get((4, 4), "x.weight").unwrap().dtype(), DType::F16);
}

/// Hands out shape-only tensors (one zero broadcast to the shape) and records every shape: the
/// full SD 2.1-base models can be built without their 5 GB.
#[derive(Default, Clone)]
struct Shapes(Arc<Mutex<HashMap<String, Vec<usize>>>>);

impl SimpleBackend for Shapes {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The parameter count and the weight shapes of the model `build` makes.
fn parameters(build: impl FnOnce(VarBuilder) -> candle_core::Result<()>) -> (u64, HashMap<String, Vec<usize>>) {
    let shapes = Shapes::default();
    build(VarBuilder::from_backend(Box::new(shapes.clone()), DType::F32, Device::Cpu)).unwrap();
    let shapes = shapes.0.lock().unwrap().clone();
    (shapes.values().map(|d| d.iter().product::<usize>() as u64).sum(), shapes)
}

#[test]
fn sd21_base_configs_build_the_published_architecture() {
    let configs = SdConfigs::sd21_base();
    configs.unet.validate().unwrap();
    // Parameter counts of diffusers' UNet2DConditionModel / AutoencoderKL and transformers'
    // CLIPTextModel at the published configs (sum of p.numel()).
    let (unet, unet_shapes) = parameters(|vb| UNet2DConditionModel::new(vb, &configs.unet).map(drop));
    assert_eq!(unet, 865_910_724);
    // Linear projections, 1024-wide cross-attention, 5 heads of 64 in the first block.
    assert_eq!(unet_shapes["down_blocks.0.attentions.0.proj_in.weight"], [320, 320]);
    assert_eq!(unet_shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"], [320, 1024]);
    let (text, text_shapes) = parameters(|vb| ClipTextModel::new(vb, &configs.text_encoder).map(drop));
    assert_eq!(text, 340_387_840);
    assert!(text_shapes.contains_key("text_model.encoder.layers.22.mlp.fc2.weight"));
    assert!(!text_shapes.contains_key("text_model.encoder.layers.23.mlp.fc2.weight"));
    let (vae, _) = parameters(|vb| AutoencoderKL::new(vb, &configs.vae).map(drop));
    assert_eq!(vae, 83_653_863);
    assert_eq!(configs.vae.scaling_factor, 0.18215);
    let ddpm = stableid::schedulers::Ddpm::new(&configs.scheduler).unwrap();
    assert_eq!(ddpm.num_train_timesteps(), 1000);
}
