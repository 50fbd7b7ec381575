//! ControlNet parity with diffusers (fixtures from tools/reference/controlnet.py): the residuals
//! of `ControlNetModel`, and whole `StableDiffusionControlNetPipeline` runs on the tiny model
//! from the same initial latents; and the refusal of ControlNets that do not fit the base model.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, copy_dir, fixture, load_tensors, max_abs_diff};
use stableid::error::ErrorKind;
use stableid::identity::Identity;
use stableid::models::controlnet::{ChannelOrder, ControlNetDir, ControlNetModel, ControlScale};
use stableid::models::stable_diffusion::{SdConfigs, StableDiffusion};
use stableid::pipelines::control::{Control, ControlImage};
use stableid::pipelines::{generate, GenerateRequest};
use stableid::schedulers::Sampler;
use stableid::weights::{Hub, ModelDir};

fn tiny_model() -> ModelDir {
    ModelDir::local(&fixture("tiny-sd"))
}

fn load_controlnet(folder: &str) -> ControlNetModel {
    let dir = ControlNetDir::resolve(fixture(folder).to_str().unwrap(), &Hub::from_env(), DType::F32).unwrap();
    dir.load(&dir.config().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn residuals_match_diffusers() {
    let fx = load_tensors("parity/controlnet.safetensors");
    // The fp16 PyTorch pickle, as thibaud/controlnet-sd21-openpose-diffusers ships it.
    let controlnet = load_controlnet("tiny-controlnet");
    let (sample, t, context, cond) =
        (&fx["residuals.sample"], &fx["residuals.timesteps"], &fx["residuals.context"], &fx["residuals.cond"]);
    let mut bgr_config = controlnet.config().clone();
    bgr_config.controlnet_conditioning_channel_order = ChannelOrder::Bgr;
    let dir =
        ControlNetDir::resolve(fixture("tiny-controlnet").to_str().unwrap(), &Hub::from_env(), DType::F32).unwrap();
    let bgr = dir.load(&bgr_config, DType::F32, &Device::Cpu).unwrap();
    for (name, model, conditioning_scale, guess_mode) in
        [("plain", &controlnet, 1.0, false), ("guess", &controlnet, 0.7, true), ("bgr", &bgr, 0.5, false)]
    {
        let residuals =
            model.forward(sample, t, context, cond, ControlScale { conditioning_scale, guess_mode }).unwrap();
        // The tiny UNet has 2 blocks: conv_in, 2 resnets + a downsampler, 2 resnets; then the mid block.
        assert_eq!(residuals.down.len(), 6, "{name}");
        for (i, r) in residuals.down.iter().enumerate() {
            assert_close(r, &fx[&format!("residuals.{name}.down.{i}")], 1e-4, &format!("{name} down {i}"));
        }
        assert_close(&residuals.mid, &fx[&format!("residuals.{name}.mid")], 1e-4, &format!("{name} mid"));
    }
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    sampler: String,
    steps: usize,
    guidance: f64,
    guess_mode: bool,
    size: Option<(usize, usize)>,
    controls: Vec<CaseControl>,
}

#[derive(serde::Deserialize)]
struct CaseControl {
    controlnet: String,
    image: String,
    scale: f64,
    start: f64,
    end: f64,
    swap_red_blue: bool,
}

#[test]
fn pipeline_matches_diffusers_from_the_same_latents() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let fx = load_tensors("parity/controlnet.safetensors");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("parity/controlnet.json")).unwrap()).unwrap();
    let identity =
        Identity { embeddings: fx["identity"].clone(), source: "fixture".into(), metadata: Default::default() };
    let controlnets: Vec<(String, Arc<ControlNetModel>)> = ["tiny-controlnet", "tiny-controlnet-2"]
        .iter()
        .map(|name| (name.to_string(), Arc::new(load_controlnet(name))))
        .collect();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let images: Vec<ControlImage> =
            case.controls.iter().map(|c| ControlImage::read(&fixture(&c.image)).unwrap()).collect();
        let (width, height) = case.size.unwrap_or_else(|| images[0].default_size(sd.configs().latent_factor()));
        let mut request = GenerateRequest::new(&case.prompt, width, height);
        request.steps = case.steps;
        request.guidance = case.guidance;
        request.sampler = case.sampler.parse::<Sampler>().unwrap();
        request.initial_latents = Some(fx[&format!("{}.latents", case.name)].clone());
        request.guess_mode = case.guess_mode;
        for (spec, image) in case.controls.iter().zip(&images) {
            let (_, controlnet) = controlnets.iter().find(|(name, _)| *name == spec.controlnet).unwrap();
            let mut control = Control::new(controlnet.clone(), &spec.controlnet, image, width, height).unwrap();
            control.scale = spec.scale;
            control.start = spec.start;
            control.end = spec.end;
            if spec.swap_red_blue {
                control.channel_order = ChannelOrder::Bgr;
            }
            request.controls.push(control);
        }
        let generated = generate(&sd, &request, std::slice::from_ref(&identity), &mut |_, _| {}).unwrap();
        assert_close(&generated.image, &fx[&format!("{}.image", case.name)], 1e-4, &case.name);
        let keys: Vec<&str> = generated.settings.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.iter().filter(|k| **k == "controlnet").count(), case.controls.len(), "{}", case.name);
    }
}

#[test]
fn controlnets_change_the_image_and_zero_scale_does_not() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let controlnet = Arc::new(load_controlnet("tiny-controlnet"));
    let image = ControlImage::read(&fixture("controlnet/pose_80x72.png")).unwrap();
    let mut request = GenerateRequest::new("a photo of a dancer", 64, 64);
    request.steps = 3;
    let plain = generate(&sd, &request, &[], &mut |_, _| {}).unwrap().image;
    let mut control = Control::new(controlnet, "tiny", &image, 64, 64).unwrap();
    request.controls.push(control.clone());
    let steered = generate(&sd, &request, &[], &mut |_, _| {}).unwrap().image;
    assert!(max_abs_diff(&plain, &steered) > 1e-3, "a ControlNet must change the image");
    control.scale = 0.0;
    request.controls = vec![control];
    let zero = generate(&sd, &request, &[], &mut |_, _| {}).unwrap().image;
    assert_eq!(max_abs_diff(&plain, &zero), 0.0, "scale 0 adds exact zeros");
}

/// A ControlNet config with one key replaced, in a copy of the tiny ControlNet's folder.
fn altered_controlnet(dir: &std::path::Path, from: &str, to: &str) -> ControlNetDir {
    copy_dir(&fixture("tiny-controlnet"), dir);
    let path = dir.join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains(from), "{from} in {config}");
    std::fs::write(&path, config.replace(from, to)).unwrap();
    ControlNetDir::resolve(dir.to_str().unwrap(), &Hub::from_env(), DType::F32).unwrap()
}

#[test]
fn controlnets_for_another_base_model_are_refused_naming_both() {
    let configs = SdConfigs::read(&tiny_model()).unwrap();
    let model = tiny_model();
    let tmp = tempfile::tempdir().unwrap();

    let wide =
        altered_controlnet(&tmp.path().join("wide"), "\"cross_attention_dim\": 32", "\"cross_attention_dim\": 1024");
    let err = wide.check_fits(&wide.config().unwrap(), &configs, model.name()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Model);
    let msg = err.to_string();
    assert!(msg.contains("wide") && msg.contains("tiny-sd") && msg.contains("[1024]") && msg.contains("[32]"), "{msg}");

    let deeper = altered_controlnet(&tmp.path().join("deeper"), "\"layers_per_block\": 2", "\"layers_per_block\": 1");
    let msg = deeper.check_fits(&deeper.config().unwrap(), &configs, model.name()).unwrap_err().to_string();
    assert!(msg.contains("block layout") && msg.contains("[1, 1]") && msg.contains("[2, 2]"), "{msg}");

    let order = altered_controlnet(&tmp.path().join("order"), "\"rgb\"", "\"grb\"");
    let msg = order.config().unwrap_err().to_string();
    assert!(msg.contains("config.json") && msg.contains("grb"), "{msg}");

    let msg = ControlNetDir::resolve("/no/such/controlnet", &Hub::from_env(), DType::F32).unwrap_err().to_string();
    assert!(msg.contains("/no/such/controlnet") && msg.contains("hub id such as thibaud/"), "{msg}");
}

#[test]
fn control_settings_are_checked() {
    let controlnet = Arc::new(load_controlnet("tiny-controlnet-2"));
    let image = ControlImage::read(&fixture("controlnet/pose_75x70.png")).unwrap();
    assert_eq!(image.default_size(8), (72, 64), "rounded down to multiples of 8, as diffusers");
    let configs = SdConfigs::read(&tiny_model()).unwrap();
    let mut request = GenerateRequest::new("a dancer", 64, 64);
    let control = Control::new(controlnet, "tiny", &image, 64, 64).unwrap();
    for (start, end, field) in [(0.5, 0.5, "control_end"), (-0.1, 1.0, "control_start"), (0.0, 1.5, "control_end")] {
        request.controls = vec![Control { start, end, ..control.clone() }];
        let msg = request.validate(&configs).unwrap_err().to_string();
        assert!(msg.starts_with(field), "{msg}");
    }
    request.controls = vec![control.clone()];
    request.width = 72;
    let msg = request.validate(&configs).unwrap_err().to_string();
    assert!(msg.contains("control_image") && msg.contains("(1, 3, 64, 72)"), "{msg}");
    assert_eq!(control.image.dims(), &[1, 3, 64, 64]);
    let _: &Tensor = &control.image;
}
