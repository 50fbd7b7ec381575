//! The workloads: the frozen models built with random weights, the inputs they share, and each
//! measurement timed with its memory.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::memory::MemoryProbe;
use super::report::{device_name, BenchReport, BuiltModels, ParameterCounts, Timing};
use super::{BenchOptions, Measure, GUIDANCE_SCALE, LEARN_TIMESTEP, VIDEO_FRAMES, VIDEO_GUIDANCE_SCALE};
use crate::identity::loss::LossConfig;
use crate::identity::mlp::{IdentityMlp, MlpShape};
use crate::identity::optim::AdamWConfig;
use crate::identity::step::{Basis, FrozenModels, Learner, StepInputs};
use crate::models::clip_text::ClipTextModel;
use crate::models::controlnet::{ControlNetConfig, ControlNetModel, ControlScale};
use crate::models::stable_diffusion::{SdConfigs, StableDiffusion};
use crate::models::unet::UNet2DConditionModel;
use crate::models::unet3d::UNet3DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::nn::{load_matrices_as, profile};
use crate::pipelines::guide;
use crate::priors::align::{align, choose_face, FaceDetector, ALIGNED_SIZE};
use crate::priors::photo::load_upright;
use crate::random::standard_normal;
use crate::schedulers::Ddpm;
use crate::splats::{render, Camera, Gaussians, OrbitPosition, RenderOptions};
use crate::weights::{ModelDir, RandomWeights};
use crate::{Error, Result};

/// Width of the face-recognition feature the identity MLP reads (ViT-B/16 CLS token).
const FEATURE_DIM: usize = 768;
/// The timestep of the denoising step (any; the cost does not depend on it).
const DENOISE_TIMESTEP: f32 = 981.0;
/// The token length of every prompt.
const PROMPT_TOKENS: usize = 77;

/// The frozen models with random weights.
struct Models {
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    parameters: ModelParameters,
}

/// Parameter counts of the frozen models.
struct ModelParameters {
    unet: u64,
    text_encoder: u64,
    vae: u64,
}

impl Models {
    fn build(configs: &SdConfigs, options: &BenchOptions) -> Result<Self> {
        let weights = RandomWeights::new(options.seed);
        let counter = weights.counter();
        let vb = weights.into_var_builder(options.precision.dtype, &options.device);
        let mut count_since = {
            let mut last = 0;
            move || {
                let now = counter.load(Ordering::Relaxed);
                let added = now - last;
                last = now;
                added
            }
        };
        let matrices = options.precision.matrices;
        let text_encoder = load_matrices_as(matrices, || ClipTextModel::new(vb.clone(), &configs.text_encoder))?;
        let text_encoder_count = count_since();
        let unet = load_matrices_as(matrices, || UNet2DConditionModel::new(vb.clone(), &configs.unet))?;
        let unet_count = count_since();
        let vae = load_matrices_as(matrices, || AutoencoderKL::new(vb, &configs.vae))?;
        let vae_count = count_since();
        Ok(Self {
            text_encoder,
            unet,
            vae,
            parameters: ModelParameters { unet: unet_count, text_encoder: text_encoder_count, vae: vae_count },
        })
    }
}

/// Runs the measurements `options.measures` names: the models are built (and described in the
/// report) only for those that use them.
pub(super) fn build_and_measure(configs: &SdConfigs, options: &BenchOptions) -> Result<BenchReport> {
    let device = &options.device;
    let mut memory = MemoryProbe::new(device)?;
    let mut timings = Vec::new();
    // Before the random-weight models are built, so that the peak is loading's alone.
    if let (true, Some(dir)) = (options.measures.contains(&Measure::Load), &options.model) {
        timings.push(measure_load(dir, options, &mut memory)?);
    }
    let models = if options.measures.iter().any(|m| m.uses_models()) {
        Some(measure_models(configs, options, &mut memory, &mut timings)?)
    } else {
        None
    };
    if options.measures.contains(&Measure::Video) {
        timings.push(measure_video(options, &mut memory)?);
    }
    if options.measures.contains(&Measure::Align) {
        let photo = options.photo.as_deref().ok_or_else(|| Error::setting("photo", "none", "align needs a photo"))?;
        timings.extend(measure_align(photo, options, &mut memory)?);
    }
    if options.measures.contains(&Measure::Splat) {
        timings.extend(measure_splat(options, &mut memory)?);
    }
    Ok(BenchReport {
        device: device_name(device),
        precision: options.precision,
        tf32: device.is_cuda() && crate::nn::tf32(),
        threads: candle_core::utils::get_num_threads(),
        resolution: options.resolution,
        latent_side: options.resolution / configs.latent_factor(),
        warmup: options.warmup,
        repeats: options.repeats,
        models,
        memory: memory.description(),
        timings,
    })
}

/// Builds the models, then runs the measurements of `options.measures` that use them.
fn measure_models(
    configs: &SdConfigs,
    options: &BenchOptions,
    memory: &mut MemoryProbe,
    timings: &mut Vec<Timing>,
) -> Result<BuiltModels> {
    let device = &options.device;
    let start = Instant::now();
    let models = Models::build(configs, options)?;
    device.synchronize()?;
    let build_s = start.elapsed().as_secs_f64();
    let memory_after_build = memory.current()?;

    let mut rng = StdRng::seed_from_u64(options.seed);
    let latent_side = options.resolution / configs.latent_factor();
    let width = configs.text_encoder.hidden_size;
    let inputs = Inputs {
        image: uniform((1, 3, options.resolution, options.resolution), -1.0, 1.0, &mut rng, device)?,
        latent_shape: (1, configs.unet.in_channels, latent_side, latent_side),
        caption_ids: caption_ids(configs.text_encoder.vocab_size, device)?,
        // Stand-ins for the celebrity basis (2, width): the identity lands near the mean.
        basis: Basis {
            mean: (standard_normal((2, width), &mut rng, device)? * 0.01)?,
            std: ((standard_normal((2, width), &mut rng, device)?.abs()? * 0.01)? + 0.005)?,
        },
    };
    let mlp = IdentityMlp::new(MlpShape { feature_dim: FEATURE_DIM, token_dim: width }, &mut rng, device)?;
    let mlp_parameters = mlp.params().iter().map(|(_, v)| v.elem_count() as u64).sum();

    let wanted = |m: Measure| options.measures.contains(&m);
    if wanted(Measure::Learn) {
        timings.push(measure_learn(&models, configs, options, &inputs, mlp, &mut rng, memory)?);
    }
    if wanted(Measure::Denoise) {
        timings.push(measure_denoise(&models, options, &inputs, &mut rng, memory)?);
    }
    if wanted(Measure::Controlnet) {
        timings.push(measure_controlnet(&models, configs, options, &inputs, &mut rng, memory)?);
    }
    if wanted(Measure::Vae) {
        timings.extend(measure_vae(&models, options, &inputs, &mut rng, memory)?);
    }
    if wanted(Measure::Text) {
        timings.push(measure_text(&models, options, &inputs, memory)?);
    }
    Ok(BuiltModels {
        parameters: ParameterCounts {
            unet: models.parameters.unet,
            text_encoder: models.parameters.text_encoder,
            vae: models.parameters.vae,
            mlp: mlp_parameters,
        },
        build_s,
        memory_after_build,
    })
}

/// The inputs the measurements share.
struct Inputs {
    /// The photo (1, 3, res, res) in [-1, 1], f32.
    image: Tensor,
    latent_shape: (usize, usize, usize, usize),
    caption_ids: Tensor,
    basis: Basis,
}

/// One learning step through the library's [`Learner`], with fixed inputs.
fn measure_learn(
    models: &Models,
    configs: &SdConfigs,
    options: &BenchOptions,
    inputs: &Inputs,
    mlp: IdentityMlp,
    rng: &mut StdRng,
    memory: &mut MemoryProbe,
) -> Result<Timing> {
    let device = &options.device;
    let frozen = FrozenModels {
        text_encoder: &models.text_encoder,
        unet: &models.unet,
        vae: &models.vae,
        schedule: Ddpm::new(&configs.scheduler)?,
    };
    let mut learner =
        Learner::new(frozen, inputs.basis.clone(), mlp, AdamWConfig::default(), LossConfig::default(), 1.0)?;
    let (_, _, h, w) = inputs.latent_shape;
    // Face and hair masks covering about 60% and 20% of the latent pixels.
    let mut mask = |threshold: f64| -> Result<Tensor> {
        Ok(uniform((1, 1, h, w), 0.0, 1.0, rng, device)?.ge(threshold)?.to_dtype(DType::F32)?)
    };
    let (face_mask, hair_mask) = (mask(0.4)?, mask(0.8)?);
    let step = StepInputs {
        feature: standard_normal((1, FEATURE_DIM), rng, device)?,
        image: inputs.image.clone(),
        face_mask,
        hair_mask,
        caption_ids: inputs.caption_ids.clone(),
        timestep: LEARN_TIMESTEP,
        noise: standard_normal(inputs.latent_shape, rng, device)?,
        posterior_noise: standard_normal(inputs.latent_shape, rng, device)?,
    };
    // `step` reads the loss and the gradient norm back, so the device has finished.
    measure_op("learn", options, memory, || learner.step(&step).map(drop))
}

/// One classifier-free-guidance step: the UNet on the latents twice (unconditional and
/// conditional text features), then the guided noise prediction.
fn measure_denoise(
    models: &Models,
    options: &BenchOptions,
    inputs: &Inputs,
    rng: &mut StdRng,
    memory: &mut MemoryProbe,
) -> Result<Timing> {
    let device = &options.device;
    let width = models.text_encoder.config().hidden_size;
    let latents = standard_normal(inputs.latent_shape, rng, device)?;
    let context = standard_normal((2, PROMPT_TOKENS, width), rng, device)?.to_dtype(options.precision.dtype)?;
    let t = Tensor::full(DENOISE_TIMESTEP, 2, device)?;
    measure_op("denoise", options, memory, || {
        let input = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(options.precision.dtype)?;
        let pred = models.unet.forward(&input, &t, &context)?.to_dtype(DType::F32)?;
        let _guided = guide(pred, true, GUIDANCE_SCALE)?;
        Ok(device.synchronize()?)
    })
}

/// One ControlNet-steered classifier-free-guidance step, as diffusers'
/// `StableDiffusionControlNetPipeline` makes it: the ControlNet (built here, with random weights)
/// on the latents twice with the control image, the UNet with its residuals, then guidance.
fn measure_controlnet(
    models: &Models,
    configs: &SdConfigs,
    options: &BenchOptions,
    inputs: &Inputs,
    rng: &mut StdRng,
    memory: &mut MemoryProbe,
) -> Result<Timing> {
    let device = &options.device;
    let vb = RandomWeights::new(options.seed + 1).into_var_builder(options.precision.dtype, device);
    let controlnet = load_matrices_as(options.precision.matrices, || {
        ControlNetModel::new(vb, &ControlNetConfig::from_unet(&configs.unet))
    })?;
    let width = models.text_encoder.config().hidden_size;
    let latents = standard_normal(inputs.latent_shape, rng, device)?;
    let context = standard_normal((2, PROMPT_TOKENS, width), rng, device)?.to_dtype(options.precision.dtype)?;
    let control_image = ((&inputs.image + 1.0)? / 2.0)?.to_dtype(options.precision.dtype)?;
    let control_image = Tensor::cat(&[&control_image, &control_image], 0)?;
    let t = Tensor::full(DENOISE_TIMESTEP, 2, device)?;
    let scale = ControlScale { conditioning_scale: 1.0, guess_mode: false };
    measure_op("controlnet", options, memory, || {
        let input = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(options.precision.dtype)?;
        let residuals = controlnet.forward(&input, &t, &context, &control_image, scale)?;
        let pred = models
            .unet
            .forward_with_additional_residuals(&input, &t, &context, Some(&residuals))?
            .to_dtype(DType::F32)?;
        let _guided = guide(pred, true, GUIDANCE_SCALE)?;
        Ok(device.synchronize()?)
    })
}

/// The VAE's encoder on the photo and its decoder on latents.
fn measure_vae(
    models: &Models,
    options: &BenchOptions,
    inputs: &Inputs,
    rng: &mut StdRng,
    memory: &mut MemoryProbe,
) -> Result<[Timing; 2]> {
    let device = &options.device;
    let image = inputs.image.to_dtype(options.precision.dtype)?;
    let encode = measure_op("vae_encode", options, memory, || {
        let _posterior = models.vae.encode(&image)?;
        Ok(device.synchronize()?)
    })?;
    let latents = standard_normal(inputs.latent_shape, rng, device)?.to_dtype(options.precision.dtype)?;
    let decode = measure_op("vae_decode", options, memory, || {
        let _image = models.vae.decode(&latents)?;
        Ok(device.synchronize()?)
    })?;
    Ok([encode, decode])
}

/// One prompt with an identity through the text encoder.
fn measure_text(models: &Models, options: &BenchOptions, inputs: &Inputs, memory: &mut MemoryProbe) -> Result<Timing> {
    let identity = inputs.basis.mean.to_dtype(options.precision.dtype)?;
    measure_op("text", options, memory, || {
        let _features = models.text_encoder.forward(&inputs.caption_ids, Some(&identity))?;
        Ok(options.device.synchronize()?)
    })
}

/// Loading the text encoder, UNet and VAE of the diffusers folder `dir` as `stableid generate`
/// does, in the benchmark's precision (each run drops what the previous one loaded).
fn measure_load(dir: &Path, options: &BenchOptions, memory: &mut MemoryProbe) -> Result<Timing> {
    let model = ModelDir::local(dir);
    let configs = SdConfigs::read(&model)?;
    measure_op("load", options, memory, || {
        StableDiffusion::load_with_configs(&model, configs.clone(), &options.device, options.precision)?;
        Ok(())
    })
}

/// One classifier-free-guidance step of the text-to-video UNet [`BenchOptions::video_unet`]
/// (ModelScope's by default) with random weights: the UNet on the latents of [`VIDEO_FRAMES`]
/// frames twice (batch 2), then the guidance.
fn measure_video(options: &BenchOptions, memory: &mut MemoryProbe) -> Result<Timing> {
    let device = &options.device;
    let config = &options.video_unet;
    let unet = load_matrices_as(options.precision.matrices, || {
        UNet3DConditionModel::new(
            RandomWeights::new(options.seed).into_var_builder(options.precision.dtype, device),
            config,
        )
    })?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let side = options.resolution / 8;
    let latents = standard_normal((1, config.in_channels, VIDEO_FRAMES, side, side), &mut rng, device)?;
    let context = standard_normal((2, PROMPT_TOKENS, config.cross_attention_dim), &mut rng, device)?
        .to_dtype(options.precision.dtype)?;
    let t = Tensor::full(DENOISE_TIMESTEP, 2, device)?;
    measure_op("video", options, memory, || {
        let input = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(options.precision.dtype)?;
        let pred = unet.forward(&input, &t, &context)?.to_dtype(DType::F32)?;
        let _guided = guide(pred, true, VIDEO_GUIDANCE_SCALE)?;
        Ok(device.synchronize()?)
    })
}

/// Face detection and alignment of a photo, as `learn` frames it: reading it (decoding, EXIF
/// orientation), detecting its faces, and cutting the 512 crop of the largest, each timed on its
/// own. Always on the CPU, in f32 (the detector's only device).
fn measure_align(photo: &Path, options: &BenchOptions, memory: &mut MemoryProbe) -> Result<[Timing; 3]> {
    let detector = FaceDetector::shipped(&Device::Cpu)?;
    let load = measure_op("photo_load", options, memory, || load_upright(photo).map(drop))?;
    let image = load_upright(photo)?;
    let mut faces = Vec::new();
    let detect = measure_op("face_detect", options, memory, || {
        faces = detector.detect(&image)?;
        Ok(())
    })?;
    let face = choose_face(&faces, None, photo)?;
    let align = measure_op("face_align", options, memory, || align(&image, face, ALIGNED_SIZE).map(drop))?;
    Ok([load, detect, align])
}

/// Rendering Gaussians, and rendering them with the backward pass of an L1 loss against a grey
/// image, from `splat_views` cameras around LucidDreamer's initial cloud.
fn measure_splat(options: &BenchOptions, memory: &mut MemoryProbe) -> Result<[Timing; 2]> {
    let (n, device) = (options.splats, &options.device);
    let mut rng = StdRng::seed_from_u64(options.seed);
    // Uniform in a ball of radius 0.5 (cube root of a uniform radius).
    let mut means = Vec::with_capacity(3 * n);
    while means.len() < 3 * n {
        let p: [f32; 3] = [0, 1, 2].map(|_| rng.random_range(-0.5f32..0.5));
        if p.iter().map(|v| v * v).sum::<f32>() <= 0.25 {
            means.extend(p);
        }
    }
    // The mean nearest-neighbour distance of n points in that ball.
    let spacing = (std::f32::consts::PI / 6.0 / n as f32).cbrt();
    let quats: Vec<f32> = (0..n).flat_map(|_| [1.0, 0.0, 0.0, 0.0]).collect();
    let gaussians = Gaussians {
        means: Tensor::from_vec(means, (n, 3), device)?,
        log_scales: Tensor::full(spacing.ln(), (n, 3), device)?,
        rotations: Tensor::from_vec(quats, (n, 4), device)?,
        opacity_logits: Tensor::full((0.1f32 / 0.9).ln(), n, device)?,
        sh_dc: uniform((n, 3), -1.7, 1.7, &mut rng, device)?,
        sh_rest: None,
    };
    let side = options.resolution;
    let cameras = (0..options.splat_views)
        .map(|view| {
            let azimuth = 360.0 * view as f64 / options.splat_views as f64;
            let position =
                OrbitPosition { target: [0.0; 3], up: [0.0, 0.0, 1.0], radius: 3.5, elevation: 15.0, azimuth };
            Camera::orbit(&position, 0.55, side, side)
        })
        .collect::<Result<Vec<_>>>()?;
    let render_options = RenderOptions::default();
    let forward = measure_op("splat_forward", options, memory, || {
        for camera in &cameras {
            render(&gaussians, camera, &render_options)?;
        }
        Ok(())
    })?;
    let trainable = Gaussians::from_parts(
        gaussians.parts().into_iter().map(|t| Ok(Var::from_tensor(t)?.as_tensor().clone())).collect::<Result<_>>()?,
    )?;
    let both = measure_op("splat", options, memory, || {
        for camera in &cameras {
            let view = render(&trainable, camera, &render_options)?;
            let loss = (view.color()? - 0.5)?.abs()?.mean_all()?;
            loss.backward()?;
        }
        Ok(device.synchronize()?)
    })?;
    Ok([forward, both])
}

/// Values uniform on [lo, hi) of `shape`, f32 on `device`.
fn uniform(shape: impl Into<Shape>, lo: f32, hi: f32, rng: &mut impl Rng, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| rng.random_range(lo..hi)).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Token ids (1, 77) of "a photo of v1* v2*": BOS, three words, the two placeholder rows after
/// the vocabulary, EOS, then padding with id 0 as SD 2 pads. BOS and EOS are the last two ids of
/// CLIP's vocabulary; the word ids are CLIP's, reduced into smaller vocabularies.
fn caption_ids(vocab: usize, device: &Device) -> Result<Tensor> {
    let vocab = vocab as u32;
    let (bos, eos) = (vocab - 2, vocab - 1);
    let words = [320u32, 1125, 539].map(|id| id % bos);
    let mut ids = vec![bos];
    ids.extend(words);
    ids.extend([vocab, vocab + 1, eos]);
    ids.resize(PROMPT_TOKENS, 0);
    Ok(Tensor::from_vec(ids, (1, PROMPT_TOKENS), device)?)
}

/// Runs `op` `warmup` times, then `repeats` timed times; `op` returns once its work is done on
/// the device.
fn measure_op(
    name: &'static str,
    options: &BenchOptions,
    memory: &mut MemoryProbe,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    let memory_before = memory.current()?;
    memory.reset_peak()?;
    for _ in 0..options.warmup {
        op()?;
    }
    let mut times_s = Vec::with_capacity(options.repeats);
    for _ in 0..options.repeats {
        let start = Instant::now();
        op()?;
        times_s.push(start.elapsed().as_secs_f64());
    }
    let memory_peak = memory.peak()?;
    let profile = if options.profile { Some(profile::record(&options.device, &mut op)?.1) } else { None };
    Ok(Timing { name, times_s, memory_before, memory_peak, profile })
}
