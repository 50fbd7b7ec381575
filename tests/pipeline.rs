//! The whole text-to-image pipeline against diffusers' StableDiffusionPipeline on the tiny model,
//! and the gradient of the UNet output with respect to the identity vectors through the text
//! encoder and the UNet (the path the identity learner trains through).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, copy_dir, fixture, load_tensors};
use stableid::error::ErrorKind;
use stableid::identity::Identity;
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::nn::Precision;
use stableid::pipelines::{encode_prompt, generate, GenerateRequest};
use stableid::schedulers::Sampler;
use stableid::weights::ModelDir;

fn tiny_model() -> ModelDir {
    ModelDir::local(&fixture("tiny-sd"))
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: String,
    identity: bool,
    sampler: String,
    steps: usize,
    guidance: f64,
}

#[test]
fn pipeline_matches_diffusers_from_the_same_latents() {
    let pipeline = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let tensors = load_tensors("parity/pipeline.safetensors");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/pipeline.json")).unwrap()).unwrap();
    let identity =
        Identity { embeddings: tensors["identity"].clone(), source: "fixture".into(), metadata: Default::default() };
    assert!(!cases.is_empty());
    for case in cases {
        let mut request = GenerateRequest::new(&case.prompt, 64, 64);
        request.negative_prompt = case.negative_prompt.clone();
        request.steps = case.steps;
        request.guidance = case.guidance;
        request.sampler = case.sampler.parse::<Sampler>().unwrap();
        request.initial_latents = Some(tensors["latents"].clone());
        let identities = if case.identity { vec![identity.clone()] } else { vec![] };
        let mut steps_seen = 0;
        let image = generate(&pipeline, &request, &identities, &mut |done, _| steps_seen = done).unwrap().image;
        assert_eq!(steps_seen, case.steps, "{}: progress callback", case.name);
        assert_close(&image, &tensors[&case.name], 1e-4, &case.name);
    }
}

#[test]
fn identity_changes_the_image_and_seed_reproduces_it() {
    let pipeline = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let mut request = GenerateRequest::new("a photo of v1* v2*", 64, 64);
    request.steps = 4;
    // Random vectors: a constant one would vanish in the text encoder's first layer norm.
    let first = Identity {
        embeddings: Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap(),
        source: "a".into(),
        metadata: Default::default(),
    };
    let second = Identity { embeddings: Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap(), ..first.clone() };
    let a = generate(&pipeline, &request, std::slice::from_ref(&first), &mut |_, _| {}).unwrap().image;
    let a_again = generate(&pipeline, &request, &[first], &mut |_, _| {}).unwrap().image;
    let b = generate(&pipeline, &request, &[second], &mut |_, _| {}).unwrap().image;
    assert_eq!(common::max_abs_diff(&a, &a_again), 0.0, "same seed, same identity: same image");
    let gap = common::max_abs_diff(&a, &b);
    assert!(gap > 1e-2, "another identity must change the image (max diff {gap:e})");
}

#[test]
fn prompt_placeholders_need_identities() {
    let pipeline = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let err = encode_prompt(&pipeline, "a photo of v1* v2*", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input, "{err}");
    let err = err.to_string();
    assert!(err.contains("identities = 0") && err.contains("no identity was given"), "{err}");
    let one = Identity {
        embeddings: Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        source: "a".into(),
        metadata: Default::default(),
    };
    let err = encode_prompt(&pipeline, "v1* v2* and v3* v4*", std::slice::from_ref(&one)).unwrap_err().to_string();
    assert!(err.contains("needs 2 identities"), "{err}");
    let wide = Identity {
        embeddings: Tensor::zeros((2, 1024), DType::F32, &Device::Cpu).unwrap(),
        source: "wide".into(),
        metadata: Default::default(),
    };
    let err = encode_prompt(&pipeline, "v1* v2*", &[wide]).unwrap_err().to_string();
    assert!(err.contains("1024-wide") && err.contains("32 wide"), "{err}");
    // Two identities fill two pairs.
    let two = encode_prompt(&pipeline, "v1* v2* and v3* v4*", &[one.clone(), one]).unwrap();
    assert_eq!(two.dims(), &[1, 77, 32]);
}

/// d/d(identity) of sum(UNet(z_t, t, TextEncoder(prompt with v1* v2*)) * w), by autograd and by
/// central differences, in f64. A silent graph cut anywhere on the path makes them disagree.
#[test]
fn identity_gradient_through_text_encoder_and_unet_matches_finite_differences() {
    let device = Device::Cpu;
    let pipeline = StableDiffusion::load(&tiny_model(), &device, DType::F64).unwrap();
    let ids = pipeline.prompt_ids("a close-up photo of v1* v2*").unwrap().ids;
    let latents = Tensor::randn(0f64, 1.0, (1, 4, 8, 8), &device).unwrap();
    let timestep = Tensor::new(&[420f64], &device).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (1, 4, 8, 8), &device).unwrap();
    let objective = |identity: &Tensor| -> Tensor {
        let context = pipeline.text_encoder().forward(&ids, Some(identity)).unwrap();
        let eps = pipeline.unet().forward(&latents, &timestep, &context).unwrap();
        (eps * &weights).unwrap().sum_all().unwrap()
    };

    let start = (Tensor::randn(0f64, 1.0, (2, 32), &device).unwrap() * 0.5).unwrap();
    let identity = Var::from_tensor(&start).unwrap();
    let grads = objective(identity.as_tensor()).backward().unwrap();
    let analytic = grads.get(identity.as_tensor()).expect("the identity receives a gradient").to_vec2::<f64>().unwrap();

    let h = 1e-5;
    let base = start.to_vec2::<f64>().unwrap();
    let mut checked = 0;
    for (row, col) in [(0, 0), (0, 7), (0, 31), (1, 3), (1, 16), (1, 30)] {
        let shifted = |delta: f64| {
            let mut values = base.clone();
            values[row][col] += delta;
            objective(&Tensor::new(values, &device).unwrap()).to_scalar::<f64>().unwrap()
        };
        let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
        let exact = analytic[row][col];
        let rel = (numeric - exact).abs() / numeric.abs().max(exact.abs()).max(1e-8);
        assert!(rel < 1e-4, "d/d identity[{row}][{col}]: autograd {exact} vs finite difference {numeric}");
        eprintln!("identity[{row}][{col}]: autograd {exact:.8e} finite difference {numeric:.8e} rel {rel:.1e}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn v_prediction_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-sd"), dir.path());
    let config_path = dir.path().join("scheduler/scheduler_config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"epsilon\"", "\"v_prediction\"");
    std::fs::write(&config_path, config).unwrap();
    let model = ModelDir::local(dir.path());
    let err = StableDiffusion::load(&model, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("v_prediction") && err.contains("stable-diffusion-2-1-base"), "{err}");
}

#[test]
fn missing_and_mismatched_weights_name_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-sd"), dir.path());
    std::fs::remove_file(dir.path().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let model = ModelDir::local(dir.path());
    let err = StableDiffusion::load(&model, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("vae") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");

    // A UNet config that disagrees with its weights: the error names the file and the tensor.
    copy_dir(&fixture("tiny-sd"), dir.path());
    let config_path = dir.path().join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"in_channels\": 4", "\"in_channels\": 5");
    std::fs::write(&config_path, config).unwrap();
    let model = ModelDir::local(dir.path());
    let err = StableDiffusion::load(&model, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("unet") && err.contains("conv_in.weight") && err.contains("shape"), "{err}");
}

/// `stableid export --format diffusers` of the fixture identity, loaded by diffusers'
/// `load_textual_inversion` in the reference script, gives the image this pipeline gives with the
/// same file through `--identity`.
#[test]
fn exported_identity_matches_diffusers_textual_inversion_loading() {
    let pipeline = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let tensors = load_tensors("parity/pipeline.safetensors");
    let exported = Identity::load(&fixture("parity/identity-diffusers.safetensors")).unwrap();
    assert_eq!(common::max_abs_diff(&exported.embeddings, &tensors["identity"]), 0.0);

    // What the export writes today is what the reference loaded.
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.safetensors");
    exported.export(&again, stableid::identity::ExportFormat::Diffusers).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(fixture("parity/identity-diffusers.safetensors")).unwrap()
    );

    let mut request = GenerateRequest::new("a photo of v1* v2* smiling", 64, 64);
    request.steps = 10;
    request.initial_latents = Some(tensors["latents"].clone());
    let image = generate(&pipeline, &request, &[exported], &mut |_, _| {}).unwrap().image;
    assert_close(&image, &load_tensors("parity/identity_export.safetensors")["image"], 1e-4, "diffusers-loaded export");
}

/// diffusers' `variant="fp16"` files (`*.fp16.safetensors`) load when the f32 ones are absent,
/// upcast to the dtype asked for.
#[test]
fn fp16_variant_weights_load_and_upcast() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-sd"), dir.path());
    for (component, stem) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    {
        let f32_file = dir.path().join(component).join(format!("{stem}.safetensors"));
        let half: std::collections::HashMap<String, Tensor> = candle_core::safetensors::load(&f32_file, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(&half, dir.path().join(component).join(format!("{stem}.fp16.safetensors")))
            .unwrap();
        std::fs::remove_file(f32_file).unwrap();
    }
    let model = ModelDir::local(dir.path());
    let half = StableDiffusion::load(&model, &Device::Cpu, DType::F32).unwrap();
    let full = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let mut request = GenerateRequest::new("a lighthouse", 64, 64);
    request.steps = 3;
    let a = generate(&half, &request, &[], &mut |_, _| {}).unwrap().image;
    let b = generate(&full, &request, &[], &mut |_, _| {}).unwrap().image;
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 2e-2, "fp16 weights upcast to f32 should give nearly the same image (max diff {diff})");
}

/// PSNR in dB of `a` against `b`, images with values in [0, 1].
fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    10.0 * (1.0 / mse).log10()
}

/// f16 and 8-bit weight matrices on the CPU (packed, f32 activations) make nearly the f32 image:
/// on the tiny model, without and with an identity, f16 reached 80.4 and 78.4 dB PSNR against
/// the f32 image, q8 54.1 and 52.0 dB.
#[test]
fn packed_weights_make_nearly_the_f32_image() {
    let full = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let identity = Identity {
        embeddings: Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap(),
        source: "a".into(),
        metadata: Default::default(),
    };
    for (precision, min_psnr) in
        [(Precision::f16_on(&Device::Cpu), 65.0), (Precision::q8_on(&Device::Cpu).unwrap(), 45.0)]
    {
        let packed = StableDiffusion::load(&tiny_model(), &Device::Cpu, precision).unwrap();
        assert_eq!(packed.dtype(), DType::F32, "activations stay f32");
        for identities in [vec![], vec![identity.clone()]] {
            let mut request = GenerateRequest::new("a photo of v1* v2* in a lighthouse", 64, 64);
            request.steps = 4;
            if identities.is_empty() {
                request.prompt = "a lighthouse".into();
            }
            let a = generate(&packed, &request, &identities, &mut |_, _| {}).unwrap().image;
            let b = generate(&full, &request, &identities, &mut |_, _| {}).unwrap().image;
            let db = psnr(&a, &b);
            eprintln!("{}: {db:.1} dB against f32", precision.name());
            assert!(db > min_psnr, "{}: {db:.1} dB against f32", precision.name());
        }
    }
}
