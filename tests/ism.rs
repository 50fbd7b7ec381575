//! Interval Score Matching against the PyTorch re-implementation of LucidDreamer's step
//! (fixture from tools/reference/ism.py): the gradient injected at the latents and the one that
//! reaches the renders through the VAE encoder; the schedules and Perp-Neg weights against the
//! config's formulas; the draws' ranges; refused models and inputs.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_parity, fixture, load_tensors};
use rand::SeedableRng;
use stableid::identity::Identity;
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::ism::{view_blend, IsmDraws, IsmGuidance, IsmOptions, PerpNeg, View, ViewBlend};
use stableid::schedulers::PredictionType;
use stableid::weights::ModelDir;

fn tiny_model() -> ModelDir {
    ModelDir::local(&fixture("tiny-sd"))
}

fn load_tiny() -> StableDiffusion {
    StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap()
}

#[derive(serde::Deserialize)]
struct Fixture {
    prompt: String,
    negative_prompt: String,
    guidance_scale: f64,
    grad_scale: f64,
    xs_delta_t: usize,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    perp_neg: bool,
    flip: bool,
    ind_t: usize,
    ind_prev_t: usize,
    xs_inv_steps: usize,
    azimuths: Vec<f64>,
    t: usize,
    s: usize,
}

#[test]
fn step_matches_lucid_dreamer_with_and_without_perp_neg() {
    let sd = load_tiny();
    let tensors = load_tensors("parity/ism.safetensors");
    let reference: Fixture =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/ism.json")).unwrap()).unwrap();
    let identity =
        Identity { embeddings: tensors["identity"].clone(), source: "fixture".into(), metadata: Default::default() };
    assert_eq!(reference.cases.len(), 3);
    for case in &reference.cases {
        let options = IsmOptions {
            guidance_scale: reference.guidance_scale,
            grad_scale: reference.grad_scale,
            xs_delta_t: reference.xs_delta_t,
            xs_inv_steps: case.xs_inv_steps,
            perp_neg: case.perp_neg.then(PerpNeg::default),
            ..IsmOptions::default()
        };
        let guidance = IsmGuidance::new(
            &sd,
            &reference.prompt,
            &reference.negative_prompt,
            std::slice::from_ref(&identity),
            options,
        )
        .unwrap();
        let name = &case.name;
        let get = |key: &str| tensors[&format!("{name}.{key}")].clone();
        let draws = IsmDraws {
            ind_t: case.ind_t,
            ind_prev_t: case.ind_prev_t,
            noise: get("noise"),
            vae_noise: get("vae_noise"),
            flip: case.flip,
        };
        let images = Var::from_tensor(&get("images")).unwrap();
        let step = guidance.step(images.as_tensor(), &case.azimuths, &draws).unwrap();
        assert_eq!((step.t, step.s), (case.t, case.s), "{name}: timesteps");
        assert_parity(&step.latents_grad, &get("latents_grad"), &format!("{name}: gradient at the latents"));
        let expected_norm = get("latents_grad").sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!((step.grad_norm - expected_norm as f64).abs() < 1e-4 * expected_norm as f64, "{name}: grad_norm");
        assert_eq!(step.loss.dims(), &[] as &[usize]);

        let grads = step.loss.backward().unwrap();
        let images_grad = grads.get(images.as_tensor()).expect("the renders receive a gradient");
        assert_parity(images_grad, &get("images_grad"), &format!("{name}: gradient at the renders"));
        assert!(common::max_abs(images_grad) > 1e-6, "{name}: the renders' gradient vanished");
    }
}

#[test]
fn interval_and_timestep_range_anneal_as_the_config() {
    let options = IsmOptions::default();
    assert_eq!(
        (options.guidance_scale, options.grad_scale, options.t_range, options.max_t),
        (7.5, 0.1, (20, 500), 980)
    );
    assert_eq!((options.warmup_iterations, options.delta_t, options.delta_t_start), (1500, 150, 100));
    assert_eq!((options.xs_delta_t, options.xs_inv_steps, options.inverse_prompt.as_str()), (200, 5, ""));
    assert_eq!(options.perp_neg, Some(PerpNeg { negative_weight: -2.0, front_decay: 2.0, side_decay: 10.0 }));

    // w = 1 - min(it / 1500, 1); interval = 150 + ceil(w (100 - 150)).
    assert_eq!(options.warmup_rate(0), 1.0);
    assert_eq!(options.warmup_rate(750), 0.5);
    assert_eq!(options.warmup_rate(4000), 0.0);
    for (iteration, interval) in [(0, 100), (1, 101), (750, 125), (1499, 150), (1500, 150), (5000, 150)] {
        assert_eq!(options.interval(iteration), interval, "interval at iteration {iteration}");
    }
    // Without Perp-Neg (train_step): int(150 + w (100 - 150)).
    let plain = IsmOptions { perp_neg: None, ..IsmOptions::default() };
    for (iteration, interval) in [(0, 100), (1, 100), (3, 100), (750, 125), (1499, 149), (1500, 150)] {
        assert_eq!(plain.interval(iteration), interval, "interval without Perp-Neg at iteration {iteration}");
    }
    // ind_t ~ U[20, 500 + int(480 w)).
    for (iteration, end) in [(0, 980), (1, 979), (750, 740), (1500, 500), (5000, 500)] {
        assert_eq!(options.timestep_range(iteration), 20..end, "timestep range at iteration {iteration}");
    }
    let no_warmup = IsmOptions { warmup_iterations: 0, ..IsmOptions::default() };
    assert_eq!((no_warmup.timestep_range(0), no_warmup.interval(0)), (20..500, 150));
}

/// The research notes' formulas (LucidDreamer train.py `get_pos_neg_text_embeddings`).
#[test]
fn perp_neg_weights_follow_the_formulas() {
    let perp_neg = PerpNeg::default();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let front_half = |azimuth: f64, r: f64| {
        let blend = view_blend(azimuth);
        assert_eq!((blend.from, blend.to), (View::Front, View::Side), "azimuth {azimuth}");
        assert!(close(blend.r, r), "azimuth {azimuth}: r {} vs {r}", blend.r);
        let front = if r > 0.8 { 0.0 } else { -2.0 * (-2.0 * r).exp() };
        let side = if r < 0.2 { 0.0 } else { -2.0 * (-10.0 * (1.0 - r)).exp() };
        let [(v0, w0), (v1, w1)] = perp_neg.negatives(azimuth);
        assert_eq!((v0, v1), (View::Front, View::Side));
        assert!(close(w0, front) && close(w1, side), "azimuth {azimuth}: {w0} {w1} vs {front} {side}");
    };
    front_half(0.0, 1.0);
    front_half(10.0, 1.0 - 10.0 / 90.0);
    front_half(-10.0, 1.0 - 10.0 / 90.0);
    front_half(45.0, 0.5);
    front_half(-60.0, 1.0 / 3.0);
    front_half(80.0, 1.0 / 9.0);
    front_half(-90.0, 0.0);
    let back_half = |azimuth: f64, r: f64| {
        let blend = view_blend(azimuth);
        assert_eq!((blend.from, blend.to), (View::Side, View::Back), "azimuth {azimuth}");
        assert!(close(blend.r, r), "azimuth {azimuth}: r {} vs {r}", blend.r);
        let side = if r > 0.8 { 0.0 } else { -2.0 * (-10.0 * r).exp() / 2.0 };
        let [(v0, w0), (v1, w1)] = perp_neg.negatives(azimuth);
        assert_eq!((v0, v1), (View::Side, View::Front));
        assert!(close(w0, side) && close(w1, -2.0), "azimuth {azimuth}: {w0} {w1} vs {side} -2");
    };
    back_half(90.0, 1.0);
    back_half(100.0, 1.0 - 10.0 / 90.0);
    back_half(135.0, 0.5);
    back_half(-135.0, 0.5);
    back_half(179.0, 1.0 / 90.0);
    back_half(180.0, 0.0);
    back_half(-180.0, 0.0);
    // Spot values: a camera at 45 degrees negates the front at -2 e^-1 and the side at -2 e^-5.
    let [(_, front), (_, side)] = perp_neg.negatives(45.0);
    assert!(close(front, -0.7357588823428847) && close(side, -0.013475893998170934));
    assert_eq!(view_blend(0.0), ViewBlend { from: View::Front, to: View::Side, r: 1.0 });
}

#[test]
fn draws_follow_the_annealed_ranges() {
    let sd = load_tiny();
    let guidance = IsmGuidance::new(&sd, "a head", "blurry", &[], IsmOptions::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for iteration in [0, 750, 3000] {
        let range = guidance.options().timestep_range(iteration);
        let interval = guidance.options().interval(iteration);
        let (mut lowest, mut highest, mut flips) = (usize::MAX, 0, 0);
        let draws = 2000;
        for _ in 0..draws {
            let d = guidance.draw(2, (1, 1), iteration, &mut rng).unwrap();
            assert!(range.contains(&d.ind_t), "iteration {iteration}: ind_t {} outside {range:?}", d.ind_t);
            assert_eq!(d.ind_prev_t, d.ind_t.saturating_sub(interval));
            (lowest, highest) = (lowest.min(d.ind_t), highest.max(d.ind_t));
            flips += d.flip as usize;
        }
        // 2000 uniform draws over < 1000 values reach both ends (within a few).
        assert!(lowest <= range.start + 5 && highest + 6 >= range.end, "iteration {iteration}: {lowest}..={highest}");
        assert!((850..1150).contains(&flips), "iteration {iteration}: {flips} flips in {draws}");
    }
    // Offset noise: per channel, a value shared by the batch on top of independent noise.
    let d = guidance.draw(64, (16, 16), 0, &mut rng).unwrap();
    assert_eq!(d.noise.dims(), &[64, 4, 16, 16]);
    assert_eq!(d.vae_noise.dims(), &[64, 4, 16, 16]);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let moments = |values: &[f32]| {
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, var)
    };
    let (_, var) = moments(&flat(&d.noise));
    assert!((var - 1.0).abs() < 0.03, "noise variance {var}");
    // The channel means over the batch carry the shared offset (std 0.1) and little else (std 1/128).
    let channel_means = d.noise.mean((0, 2, 3)).unwrap();
    let (mean_of_means, var_of_means) = moments(&flat(&channel_means));
    assert!(var_of_means > 1e-5 && mean_of_means.abs() < 0.5, "channel means {:?}", flat(&channel_means));
    let (vae_mean, vae_var) = moments(&flat(&d.vae_noise));
    assert!(vae_mean.abs() < 0.02 && (vae_var - 1.0).abs() < 0.03, "vae noise {vae_mean} {vae_var}");
}

/// A v-prediction model is refused by the guidance itself, with the reason, however it was
/// loaded.
#[test]
fn v_prediction_models_are_refused() {
    let model = tiny_model();
    let mut configs = SdConfigs::read(&model).unwrap();
    configs.scheduler.prediction_type = PredictionType::VPrediction;
    let sd = StableDiffusion::load_with_configs(&model, configs, &Device::Cpu, DType::F32).unwrap();
    let err = IsmGuidance::new(&sd, "a head", "", &[], IsmOptions::default()).err().unwrap().to_string();
    assert!(err.contains("v_prediction") && err.contains("epsilon"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn bad_options_and_inputs_are_refused_with_the_reason() {
    let sd = load_tiny();
    let refused = |options: IsmOptions, needle: &str| {
        let err = IsmGuidance::new(&sd, "a head", "", &[], options).err().unwrap().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    };
    refused(IsmOptions { t_range: (500, 500), ..IsmOptions::default() }, "t_range");
    // Index 999 is timestep 1000 (steps_offset 1): past the schedule.
    refused(IsmOptions { max_t: 1000, ..IsmOptions::default() }, "max_t");
    refused(IsmOptions { xs_inv_steps: 0, ..IsmOptions::default() }, "xs_inv_steps");
    refused(IsmOptions { guidance_scale: f64::NAN, ..IsmOptions::default() }, "guidance_scale");
    let err = IsmGuidance::new(&sd, "v1* v2* in a hat", "", &[], IsmOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no identity was given"), "{err}");

    let guidance = IsmGuidance::new(&sd, "a head", "", &[], IsmOptions::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let draws = guidance.draw(2, (4, 4), 0, &mut rng).unwrap();
    let images = Tensor::rand(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let step_error = |images: &Tensor, azimuths: &[f64], draws: &IsmDraws| {
        guidance.step(images, azimuths, draws).err().unwrap().to_string()
    };
    assert!(step_error(&images, &[0.0], &draws).contains("one per image (2)"));
    assert!(step_error(&images, &[0.0, 270.0], &draws).contains("[-180, 180]"));
    assert!(step_error(&images, &[0.0, f64::NAN], &draws).contains("[-180, 180]"));
    let odd = Tensor::rand(0f32, 1.0, (2, 3, 30, 32), &Device::Cpu).unwrap();
    assert!(step_error(&odd, &[0.0, 0.0], &draws).contains("multiples of 8"));
    let gray = Tensor::rand(0f32, 1.0, (2, 1, 32, 32), &Device::Cpu).unwrap();
    assert!(step_error(&gray, &[0.0, 0.0], &draws).contains("(batch, 3, height, width)"));
    let small = Tensor::rand(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
    assert!(step_error(&small, &[0.0, 0.0], &draws).contains("noise"));
    let late = IsmDraws { ind_t: 980, ..draws.clone() };
    assert!(step_error(&images, &[0.0, 0.0], &late).contains("ind_t"));
    // The draws themselves run.
    let step = guidance.step(&images, &[0.0, 120.0], &draws).unwrap();
    assert!(step.grad_norm.is_finite() && step.grad_norm > 0.0);
    assert_eq!(step.latents_grad.dims(), &[2, 4, 4, 4]);
}

/// With f16 frozen models (their dtype on a GPU), the casts at the boundaries keep the step
/// working: the gradients come back in the renders' f32 and close to the f32 models' ones.
#[test]
fn half_precision_models_give_f32_gradients_close_to_f32() {
    let tensors = load_tensors("parity/ism.safetensors");
    let identity =
        Identity { embeddings: tensors["identity"].clone(), source: "fixture".into(), metadata: Default::default() };
    let full = load_tiny();
    let half = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F16).unwrap();
    let prompt = "v1* v2* wearing a hat";
    let ids = std::slice::from_ref(&identity);
    let full_guidance = IsmGuidance::new(&full, prompt, "blurry", ids, IsmOptions::default()).unwrap();
    let half_guidance = IsmGuidance::new(&half, prompt, "blurry", ids, IsmOptions::default()).unwrap();
    let draws = full_guidance.draw(3, (4, 6), 200, &mut rand::rngs::StdRng::seed_from_u64(5)).unwrap();
    let images = Var::from_tensor(&tensors["perp_neg.images"]).unwrap();
    let run = |guidance: &IsmGuidance| {
        let step = guidance.step(images.as_tensor(), &[30.0, -150.0, 95.0], &draws).unwrap();
        let images_grad = step.loss.backward().unwrap().remove(images.as_tensor()).unwrap();
        (step, images_grad)
    };
    let (full_step, full_grad) = run(&full_guidance);
    let (half_step, half_grad) = run(&half_guidance);
    let dtypes = (half_step.loss.dtype(), half_step.latents_grad.dtype(), half_grad.dtype());
    assert_eq!(dtypes, (DType::F32, DType::F32, DType::F32));
    let relative = |a: &Tensor, b: &Tensor| common::max_abs_diff(a, b) / common::max_abs(b);
    let latents = relative(&half_step.latents_grad, &full_step.latents_grad);
    let renders = relative(&half_grad, &full_grad);
    eprintln!(
        "f16 vs f32 models: gradient at the latents {latents:.1e}, at the renders {renders:.1e} (of the largest)"
    );
    assert!(latents < 5e-2 && renders < 5e-2, "f16 models: {latents:e}, {renders:e}");
}
