//! Text-to-video parity with diffusers (fixtures from tools/reference/unet3d.py): the tiny
//! ModelScope-style `UNet3DConditionModel` (fp16 weights, every parameter perturbed) for 1, 2 and 3
//! frames at several timesteps, and whole `TextToVideoSDPipeline` runs from the same initial
//! latents, with and without an identity, with DDIM and DPM-Solver++; and the refusal of folders
//! and requests that do not fit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, copy_dir, fixture, load_tensors, max_abs_diff};
use stableid::identity::Identity;
use stableid::models::text_to_video::{TextToVideoModel, VideoConfigs};
use stableid::pipelines::{generate_video, VideoRequest};
use stableid::schedulers::Sampler;
use stableid::weights::ModelDir;

fn tiny_video_dir() -> ModelDir {
    ModelDir::local(&fixture("tiny-video"))
}

fn tiny_video() -> TextToVideoModel {
    let dir = tiny_video_dir();
    TextToVideoModel::load(&dir, VideoConfigs::read(&dir).unwrap(), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn unet3d_matches_diffusers_for_one_two_and_three_frames() {
    let model = tiny_video();
    let fx = load_tensors("parity/unet3d.safetensors");
    let mut keys: Vec<&String> = fx.keys().filter(|k| k.starts_with("unet.") && k.ends_with(".out")).collect();
    keys.sort();
    assert_eq!(keys.len(), 4, "cases: 1 frame, 2 frames x 2 timesteps, 3 frames");
    let mut worst = 0f32;
    for key in keys {
        let case = key.trim_end_matches(".out");
        let out = model
            .unet()
            .forward(&fx[&format!("{case}.sample")], &fx[&format!("{case}.timestep")], &fx[&format!("{case}.context")])
            .unwrap();
        assert_close(&out, &fx[key.as_str()], 1e-4, case);
        worst = worst.max(max_abs_diff(&out, &fx[key.as_str()]));
    }
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: String,
    sampler: String,
    steps: usize,
    guidance: f64,
    frames: usize,
    size: (usize, usize),
    identity: bool,
}

#[test]
fn pipeline_matches_diffusers_from_the_same_latents() {
    let model = tiny_video();
    let fx = load_tensors("parity/unet3d.safetensors");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/unet3d.json")).unwrap()).unwrap();
    let identity =
        Identity { embeddings: fx["identity"].clone(), source: "fixture".into(), metadata: Default::default() };
    assert_eq!(cases.len(), 4);
    for case in cases {
        let mut request = VideoRequest::new(&case.prompt, case.size.0, case.size.1);
        request.negative_prompt = case.negative_prompt.clone();
        request.frames = case.frames;
        request.steps = case.steps;
        request.guidance = case.guidance;
        request.sampler = Some(case.sampler.parse::<Sampler>().unwrap());
        request.initial_latents = Some(fx[&format!("{}.latents", case.name)].clone());
        let identities = if case.identity { vec![identity.clone()] } else { vec![] };
        let video = generate_video(&model, &request, &identities, &mut |_, _| {}).unwrap();
        let expected = &fx[&format!("{}.frames", case.name)];
        assert_close(&video.frames, expected, 1e-4, &case.name);
    }
}

#[test]
fn the_model_scheduler_is_the_default_sampler_and_the_seed_reproduces_a_video() {
    let model = tiny_video();
    let mut request = VideoRequest::new("a dog running", 16, 16);
    request.frames = 2;
    request.steps = 2;
    assert_eq!(request.sampler(model.configs()), Sampler::Ddim, "the tiny folder ships ModelScope's DDIM config");
    let a = generate_video(&model, &request, &[], &mut |_, _| {}).unwrap();
    let again = generate_video(&model, &request, &[], &mut |_, _| {}).unwrap();
    assert_eq!(a.frames.dims(), [2, 3, 16, 16]);
    assert_eq!(max_abs_diff(&a.frames, &again.frames), 0.0);
    request.seed += 1;
    let other = generate_video(&model, &request, &[], &mut |_, _| {}).unwrap();
    assert!(max_abs_diff(&a.frames, &other.frames) > 1e-3);
    assert!(a.settings.iter().any(|(k, v)| *k == "sampler" && v == "ddim"));
}

#[test]
fn bad_requests_are_refused_before_running() {
    let configs = VideoConfigs::read(&tiny_video_dir()).unwrap();
    let check = |edit: &dyn Fn(&mut VideoRequest), needle: &str| {
        let mut request = VideoRequest::new("a dog", 32, 32);
        edit(&mut request);
        let err = request.validate(&configs).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    };
    check(&|r| r.frames = 0, "frames");
    check(&|r| r.width = 30, "multiple of 8");
    check(&|r| r.height = 0, "multiple of 8");
    check(&|r| r.steps = 0, "steps");
    check(&|r| r.frames = 10_000_000, "GiB");
    check(&|r| r.initial_latents = Some(Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap()), "latents");
}

#[test]
fn an_image_model_folder_is_named_as_what_it_is() {
    let err = VideoConfigs::read(&ModelDir::local(&fixture("tiny-sd"))).unwrap_err().to_string();
    assert!(err.contains("UNet2DConditionModel") && err.contains("UNet3DConditionModel"), "{err}");
    // A UNet3D config with a key diffusers refuses.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-video"), dir.path());
    let config = dir.path().join("unet/config.json");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("\"time_cond_proj_dim\": null", "\"time_cond_proj_dim\": 8");
    std::fs::write(&config, text).unwrap();
    let err = VideoConfigs::read(&ModelDir::local(dir.path())).unwrap_err().to_string();
    assert!(err.contains("time_cond_proj_dim"), "{err}");
}
