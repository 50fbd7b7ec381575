//! Parity of the schedulers with diffusers (fixtures from tools/reference/schedulers.py): timestep
//! schedules, init_noise_sigma, Euler's scaled model inputs, and every intermediate sample of full
//! runs replaying recorded model outputs; DDPM's alphas_cumprod, add_noise and velocity.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};
use stableid::schedulers::{Ddpm, PredictionType, Sampler, SchedulerConfig, TimestepSpacing};

use common::{assert_close, fixture, load_tensors, max_abs, max_abs_diff};

const TENSORS: &str = "parity/schedulers.safetensors";

#[derive(Deserialize)]
struct Fixture {
    /// SD 2.1-base's scheduler_config.json.
    config: Map<String, Value>,
    runs: Vec<Run>,
    /// "sampler/spacing" -> steps -> diffusers' timesteps.
    tables: HashMap<String, HashMap<String, Vec<f64>>>,
    ddpm_timesteps: Vec<usize>,
}

#[derive(Deserialize)]
struct Run {
    name: String,
    sampler: String,
    steps: usize,
    overrides: Map<String, Value>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
}

fn load_fixture() -> Fixture {
    let path = fixture("parity/schedulers.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The SD 2.1-base config with some keys replaced, as `from_config({**config, **overrides})`.
fn config_with(fx: &Fixture, overrides: &Map<String, Value>) -> SchedulerConfig {
    let mut config = fx.config.clone();
    config.extend(overrides.clone());
    serde_json::from_value(Value::Object(config)).unwrap()
}

/// diffusers' timesteps are float32 (or integers); serde_json reads floats to within an ulp of float64.
fn as_f32(timesteps: &[f64]) -> Vec<f32> {
    timesteps.iter().map(|&t| t as f32).collect()
}

fn one_key(key: &str, value: Value) -> Map<String, Value> {
    Map::from_iter([(key.to_string(), value)])
}

fn write_config(dir: &tempfile::TempDir, config: &Map<String, Value>) -> std::path::PathBuf {
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, serde_json::to_string(config).unwrap()).unwrap();
    path
}

#[test]
fn config_from_file_takes_diffusers_defaults() {
    let fx = load_fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SchedulerConfig::from_file(write_config(&dir, &fx.config)).unwrap();
    assert_eq!(cfg.num_train_timesteps, 1000);
    assert_eq!(cfg.beta_start, 0.00085);
    assert_eq!(cfg.beta_end, 0.012);
    assert_eq!(cfg.steps_offset, 1);
    assert!(!cfg.set_alpha_to_one && !cfg.clip_sample);
    assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
    // Absent from the PNDM config: each sampler applies its own default spacing.
    assert_eq!(cfg.timestep_spacing, None);
    assert_eq!(cfg.trained_betas, None);

    let mut trailing = fx.config.clone();
    trailing.insert("timestep_spacing".into(), "trailing".into());
    let cfg = SchedulerConfig::from_file(write_config(&dir, &trailing)).unwrap();
    assert_eq!(cfg.timestep_spacing, Some(TimestepSpacing::Trailing));
}

#[test]
fn unsupported_config_is_rejected_naming_file_and_field() {
    let fx = load_fixture();
    let dir = tempfile::tempdir().unwrap();
    for (key, value, expected) in [
        ("beta_schedule", Value::from("sigmoid"), "beta_schedule \"sigmoid\""),
        ("prediction_type", Value::from("flow_prediction"), "prediction_type \"flow_prediction\""),
        ("timestep_spacing", Value::from("uniform"), "timestep_spacing \"uniform\""),
        ("thresholding", Value::from(true), "thresholding"),
        ("rescale_betas_zero_snr", Value::from(true), "rescale_betas_zero_snr"),
        ("trained_betas", Value::from(vec![0.1, 0.2]), "trained_betas"),
        ("trained_betas", Value::from(vec![1.0; 1000]), "trained_betas[0] = 1"),
        ("num_train_timesteps", Value::from(1_000_000_000_000u64), "num_train_timesteps 1000000000000"),
        ("steps_offset", Value::from(1000), "steps_offset 1000"),
        ("beta_start", Value::from(-0.5), "beta_start -0.5"),
    ] {
        let mut config = fx.config.clone();
        config.insert(key.into(), value);
        let path = write_config(&dir, &config);
        let err = SchedulerConfig::from_file(&path).unwrap_err();
        assert!(matches!(err, stableid::Error::Config { .. }), "{key}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(expected) && msg.contains(&path.display().to_string()), "{key}: {msg}");
    }
    assert!(SchedulerConfig::from_file(dir.path().join("missing.json")).is_err());

    let karras = config_with(&fx, &one_key("use_karras_sigmas", true.into()));
    for sampler in [Sampler::DpmSolverPlusPlus, Sampler::Euler] {
        let err = sampler.build(&karras, 20).err().unwrap().to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
    }
    let cfg = config_with(&fx, &Map::new());
    for sampler in Sampler::ALL {
        assert!(sampler.build(&cfg, 0).is_err());
        assert!(sampler.build(&cfg, 1001).is_err());
    }
    // Leading spacing with steps_offset 1 would reach timestep 1000 with 1000 steps.
    assert!(Sampler::Ddim.build(&cfg, 1000).err().unwrap().to_string().contains("steps_offset"));
}

#[test]
fn sampler_names_round_trip() {
    assert_eq!(Sampler::default(), Sampler::DpmSolverPlusPlus);
    for (sampler, name) in Sampler::ALL.into_iter().zip(Sampler::NAMES) {
        assert_eq!(sampler.to_string(), name);
        assert_eq!(name.parse::<Sampler>().unwrap(), sampler);
    }
    let err = "heun".parse::<Sampler>().unwrap_err().to_string();
    assert!(err.contains("heun") && err.contains("dpm++, ddim, euler"), "{err}");
}

/// Every sampler x spacing x step count of the tables: the exact diffusers timesteps.
#[test]
fn timestep_tables_match_diffusers() {
    let fx = load_fixture();
    let mut checked = 0;
    for (key, table) in &fx.tables {
        let (sampler, spacing) = key.split_once('/').unwrap();
        let overrides = one_key("timestep_spacing", spacing.into());
        let cfg = config_with(&fx, &overrides);
        let sampler: Sampler = sampler.parse().unwrap();
        for (steps, expected) in table {
            let scheduler = sampler.build(&cfg, steps.parse().unwrap()).unwrap();
            assert_eq!(as_f32(&scheduler.unet_timesteps()), as_f32(expected), "{key} {steps} steps");
            let rounded: Vec<usize> = expected.iter().map(|t| t.round() as usize).collect();
            assert_eq!(scheduler.timesteps(), rounded.as_slice(), "{key} {steps} steps");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 3 * 17);
}

/// `max |actual - expected| / max(1, max |expected|)`, the measure of `assert_close`.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    max_abs_diff(actual, expected) / max_abs(expected).max(1.0)
}

/// Replays every recorded run of `sampler`: timesteps, init_noise_sigma, scaled inputs, samples.
fn replay_runs(sampler_name: &str) {
    let fx = load_fixture();
    let tensors = load_tensors(TENSORS);
    let runs: Vec<&Run> = fx.runs.iter().filter(|run| run.sampler == sampler_name).collect();
    assert!(runs.len() >= 5, "{sampler_name}: {} runs", runs.len());
    for run in runs {
        let cfg = config_with(&fx, &run.overrides);
        let mut scheduler = run.sampler.parse::<Sampler>().unwrap().build(&cfg, run.steps).unwrap();
        assert_eq!(as_f32(&scheduler.unet_timesteps()), as_f32(&run.timesteps), "{}: timesteps", run.name);
        let sigma_err = (scheduler.init_noise_sigma() - run.init_noise_sigma).abs() / run.init_noise_sigma;
        assert!(
            sigma_err < 1e-6,
            "{}: init_noise_sigma {} vs {}",
            run.name,
            scheduler.init_noise_sigma(),
            run.init_noise_sigma
        );

        let samples = &tensors[&format!("{}.samples", run.name)];
        let outputs = &tensors[&format!("model_outputs_{}", run.steps)];
        let scaled = tensors.get(&format!("{}.scaled", run.name));
        let mut sample = (&tensors[&format!("noise_{}", run.steps)] * scheduler.init_noise_sigma()).unwrap();
        assert_close(&sample, &samples.get(0).unwrap(), 1e-6, &format!("{}: initial sample", run.name));

        let timesteps = scheduler.timesteps().to_vec();
        assert_eq!(timesteps.len(), run.steps);
        let (mut worst, mut worst_scaled) = (0f32, 0f32);
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = scheduler.scale_model_input(&sample, t).unwrap();
            if let Some(scaled) = scaled {
                let err = relative_error(&model_input, &scaled.get(i).unwrap());
                assert!(err <= 1e-4, "{}: scaled input {i} (t {t}) off by {err:e}", run.name);
                worst_scaled = worst_scaled.max(err);
            }
            sample = scheduler.step(&outputs.get(i).unwrap(), t, &sample).unwrap();
            let err = relative_error(&sample, &samples.get(i + 1).unwrap());
            assert!(err <= 1e-4, "{}: sample after step {i} (t {t}) off by {err:e}", run.name);
            worst = worst.max(err);
        }
        let scaled_note = match scaled {
            Some(_) => format!(", of a scaled input {worst_scaled:e}"),
            None => String::new(),
        };
        eprintln!("{}: worst relative error of a sample {worst:e}{scaled_note}", run.name);
    }
}

#[test]
fn dpm_solver_plus_plus_matches_diffusers() {
    replay_runs("dpm++");
}

#[test]
fn ddim_matches_diffusers() {
    replay_runs("ddim");
}

#[test]
fn euler_matches_diffusers() {
    replay_runs("euler");
}

#[test]
fn ddpm_matches_diffusers() {
    let fx = load_fixture();
    let tensors = load_tensors(TENSORS);
    let alphas_cumprod = |ddpm: &Ddpm| Tensor::new(ddpm.alphas_cumprod(), &Device::Cpu).unwrap();
    let ddpm = Ddpm::new(&config_with(&fx, &Map::new())).unwrap();
    assert_eq!(ddpm.num_train_timesteps(), 1000);
    assert_close(&alphas_cumprod(&ddpm), &tensors["ddpm.alphas_cumprod"], 1e-6, "alphas_cumprod scaled_linear");
    for schedule in ["linear", "squaredcos_cap_v2"] {
        let overrides = one_key("beta_schedule", schedule.into());
        let other = Ddpm::new(&config_with(&fx, &overrides)).unwrap();
        let expected = &tensors[&format!("ddpm.alphas_cumprod.{schedule}")];
        assert_close(&alphas_cumprod(&other), expected, 1e-6, &format!("alphas_cumprod {schedule}"));
    }

    let (z0, noise) = (&tensors["ddpm.z0"], &tensors["ddpm.noise"]);
    let ts = &fx.ddpm_timesteps;
    assert_eq!(ts, &[0, 500, 999]);
    let noisy = ddpm.add_noise(z0, noise, ts).unwrap();
    assert_close(&noisy, &tensors["ddpm.noisy"], 1e-6, "add_noise");
    assert_close(&ddpm.velocity(z0, noise, ts).unwrap(), &tensors["ddpm.velocity"], 1e-6, "velocity");
    for &t in ts {
        let a = ddpm.sqrt_alpha_cumprod(t);
        let b = ddpm.sqrt_one_minus_alpha_cumprod(t);
        assert!((a * a + b * b - 1.0).abs() < 1e-6, "t {t}: {a} {b}");
    }
    // The learner's reconstruction inverts the noising given the true noise.
    let z0_hat = ddpm.pred_original_sample(&noisy, noise, ts).unwrap();
    assert_close(&z0_hat, z0, 1e-4, "pred_original_sample");
    assert!(ddpm.add_noise(z0, noise, &[0, 1]).is_err());
    assert!(ddpm.add_noise(z0, noise, &[0, 1, 1000]).is_err());
}
