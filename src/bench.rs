//! `stableid bench`: the speed and memory of the real Stable Diffusion 2.1-base architecture
//! (UNet 865M parameters, 23-layer OpenCLIP-H text encoder, VAE), built with random weights so
//! that nothing has to be downloaded.
//!
//! What is timed (median of `repeats` runs after `warmup` runs), each with its peak memory:
//! - `learn`: one StableIdentity learning step ([`Learner::step`]: MLP -> AdaIN -> text encoder ->
//!   UNet -> masked two-phase loss -> backward -> clipping -> AdamW), VAE encoding of the photo
//!   included, at a timestep of the reconstruction phase (t <= 600) so that both the UNet and the
//!   `z0` reconstruction run;
//! - `denoise`: one classifier-free-guidance denoising step: the UNet on a batch of 2, guidance;
//! - `vae_encode`, `vae_decode`: the VAE at the benchmark resolution;
//! - `text`: one prompt through the text encoder, identity rows included.
//!
//! `tools/bench/pytorch_bench.py` does the same work with diffusers and transformers at the same
//! configs; `tools/bench/compare.sh` runs both (docs/benchmarks.md).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::distr::{Distribution, Uniform};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::identity::loss::LossConfig;
use crate::identity::mlp::{IdentityMlp, MlpShape};
use crate::identity::optim::AdamWConfig;
use crate::identity::step::{on_training_stack, Basis, FrozenModels, Learner, StepInputs};
use crate::models::clip_text::ClipTextModel;
use crate::models::stable_diffusion::SdConfigs;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::nn::profile::{self, Profile};
use crate::random::standard_normal;
use crate::schedulers::Ddpm;
use crate::{Error, Result};

/// Width of the face-recognition feature the identity MLP reads (ViT-B/16 CLS token).
const FEATURE_DIM: usize = 768;
/// The learning step's timestep: in the reconstruction phase (t <= 600), the costlier branch.
pub const LEARN_TIMESTEP: usize = 500;
/// The paper's guidance scale.
pub const GUIDANCE_SCALE: f64 = 8.5;
/// The timestep of the denoising step (any; the cost does not depend on it).
const DENOISE_TIMESTEP: f32 = 981.0;
/// The token length of every prompt.
const PROMPT_TOKENS: usize = 77;

/// A [`SimpleBackend`] that makes up every tensor a model asks for, of the requested shape, from
/// a seed and the tensor's name (so the same model gets the same weights in any build order):
/// biases are zero, 1-D weights (the norms' scales) near one, other weights uniform with standard
/// deviation `1 / sqrt(fan_in)`, which keeps activations of order one through deep stacks.
/// Nothing is allocated besides the requested tensors.
pub struct RandomWeights {
    seed: u64,
    elements: Arc<AtomicU64>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed, elements: Arc::new(AtomicU64::new(0)) }
    }

    /// A counter of the elements handed out so far (the parameter count of the models built).
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.elements.clone()
    }

    /// A `VarBuilder` over these weights.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, shape: &Shape, name: &str) -> Vec<f32> {
        let mut hasher = DefaultHasher::new();
        name.hash(&mut hasher);
        let mut rng = SmallRng::seed_from_u64(self.seed ^ hasher.finish());
        let n = shape.elem_count();
        match shape.dims() {
            // A norm's scale: 1 +- 0.1.
            [_] => (0..n).map(|_| 1.0 + rng.random_range(-0.1f32..0.1)).collect(),
            dims => {
                let fan_in: usize = dims[1..].iter().product();
                // Uniform on [-a, a] has standard deviation a / sqrt(3).
                let a = (3.0 / fan_in.max(1) as f32).sqrt();
                let uniform = Uniform::new_inclusive(-a, a).expect("finite bounds");
                (0..n).map(|_| uniform.sample(&mut rng)).collect()
            }
        }
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.elements.fetch_add(shape.elem_count() as u64, Ordering::Relaxed);
        if name.ends_with("bias") {
            return Tensor::zeros(shape, dtype, device);
        }
        let values = self.values(&shape, name);
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name} was asked for without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A group of measurements, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// One learning step.
    Learn,
    /// One guided denoising step.
    Denoise,
    /// VAE encode and decode.
    Vae,
    /// Text encoding.
    Text,
}

impl Measure {
    pub const ALL: [Measure; 4] = [Measure::Learn, Measure::Denoise, Measure::Vae, Measure::Text];
}

/// What to run, where, and how often.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Image side in pixels; latents are `resolution / 8`.
    pub resolution: usize,
    pub warmup: usize,
    pub repeats: usize,
    pub measures: Vec<Measure>,
    pub device: Device,
    /// The frozen models' dtype (the MLP and the loss stay f32).
    pub dtype: DType,
    pub seed: u64,
    /// After the timed runs, one more run of each measurement with op timing on
    /// ([`crate::nn::profile`]).
    pub profile: bool,
}

impl BenchOptions {
    /// Everything, once warmed up, 3 repeats, on the CPU in f32.
    pub fn new(resolution: usize) -> Self {
        Self {
            resolution,
            warmup: 1,
            repeats: 3,
            measures: Measure::ALL.to_vec(),
            device: Device::Cpu,
            dtype: DType::F32,
            seed: 0,
            profile: false,
        }
    }
}

/// The times and memory of one measured operation.
#[derive(Debug, Clone)]
pub struct Timing {
    /// `learn`, `denoise`, `vae_encode`, `vae_decode` or `text`.
    pub name: &'static str,
    /// Seconds of every timed run (warm-up runs excluded).
    pub times_s: Vec<f64>,
    /// Memory in use just before the first run, in bytes (see [`BenchReport::memory`]).
    pub memory_before: Option<u64>,
    /// The most memory in use during the runs, warm-up included, in bytes.
    pub memory_peak: Option<u64>,
    /// One more run's op-by-op times, with `--profile`.
    pub profile: Option<Profile>,
}

impl Timing {
    pub fn median_s(&self) -> f64 {
        let mut sorted = self.times_s.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        }
    }

    pub fn min_s(&self) -> f64 {
        self.times_s.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max_s(&self) -> f64 {
        self.times_s.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Parameter counts of the models built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    pub unet: u64,
    pub text_encoder: u64,
    pub vae: u64,
    pub mlp: u64,
}

/// Everything a benchmark run measured, and under which conditions.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub dtype: DType,
    /// Whether f32 products ran on TF32 tensor cores ([`crate::nn::set_tf32`]; CUDA only).
    pub tf32: bool,
    /// CPU threads candle uses (`RAYON_NUM_THREADS`, else all cores).
    pub threads: usize,
    pub resolution: usize,
    /// Side of the latents (`resolution / 8` for Stable Diffusion).
    pub latent_side: usize,
    pub warmup: usize,
    pub repeats: usize,
    pub parameters: ParameterCounts,
    /// Seconds to build the three models with random weights.
    pub build_s: f64,
    /// What the memory numbers are.
    pub memory: &'static str,
    /// Memory in use once the models are built.
    pub memory_after_build: Option<u64>,
    pub timings: Vec<Timing>,
}

/// Builds the models with random weights and measures `options.measures`, on a thread with a
/// stack deep enough for the learning step's backward ([`on_training_stack`]).
pub fn run(configs: &SdConfigs, options: &BenchOptions) -> Result<BenchReport> {
    check_options(configs, options)?;
    on_training_stack("bench", || run_here(configs, options))?
}

fn check_options(configs: &SdConfigs, options: &BenchOptions) -> Result<()> {
    // The UNet's up blocks must meet the skip connections' sizes exactly.
    let multiple = configs.exact_size_multiple();
    if options.resolution == 0 || !options.resolution.is_multiple_of(multiple) {
        return Err(Error::setting(
            "resolution",
            options.resolution,
            format!("must be a positive multiple of {multiple} (the VAE's and the UNet's downsampling together)"),
        ));
    }
    if options.repeats == 0 {
        return Err(Error::setting("repeats", 0, "must be at least 1"));
    }
    if options.measures.is_empty() {
        return Err(Error::setting(
            "measures",
            "none",
            "nothing to measure: give at least one of learn, denoise, vae, text",
        ));
    }
    crate::nn::check_dtype(options.dtype, &options.device)?;
    Ok(())
}

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
        let vb = weights.into_var_builder(options.dtype, &options.device);
        let mut count_since = {
            let mut last = 0;
            move || {
                let now = counter.load(Ordering::Relaxed);
                let added = now - last;
                last = now;
                added
            }
        };
        let text_encoder = ClipTextModel::new(vb.clone(), &configs.text_encoder)?;
        let text_encoder_count = count_since();
        let unet = UNet2DConditionModel::new(vb.clone(), &configs.unet)?;
        let unet_count = count_since();
        let vae = AutoencoderKL::new(vb, &configs.vae)?;
        let vae_count = count_since();
        Ok(Self {
            text_encoder,
            unet,
            vae,
            parameters: ModelParameters { unet: unet_count, text_encoder: text_encoder_count, vae: vae_count },
        })
    }
}

fn run_here(configs: &SdConfigs, options: &BenchOptions) -> Result<BenchReport> {
    let device = &options.device;
    let mut memory = MemoryProbe::new(device)?;
    let start = Instant::now();
    let models = Models::build(configs, options)?;
    device.synchronize()?;
    let build_s = start.elapsed().as_secs_f64();
    let memory_after_build = memory.current()?;

    let mut rng = StdRng::seed_from_u64(options.seed);
    let latent_side = options.resolution / (1 << (configs.vae.block_out_channels.len() - 1));
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
    let mut timings = Vec::new();
    if wanted(Measure::Learn) {
        timings.push(measure_learn(&models, configs, options, &inputs, mlp, &mut rng, &mut memory)?);
    }
    if wanted(Measure::Denoise) {
        timings.push(measure_denoise(&models, options, &inputs, &mut rng, &mut memory)?);
    }
    if wanted(Measure::Vae) {
        timings.extend(measure_vae(&models, options, &inputs, &mut rng, &mut memory)?);
    }
    if wanted(Measure::Text) {
        timings.push(measure_text(&models, options, &inputs, &mut memory)?);
    }

    Ok(BenchReport {
        device: device_name(device),
        dtype: options.dtype,
        tf32: device.is_cuda() && crate::nn::tf32(),
        threads: candle_core::utils::get_num_threads(),
        resolution: options.resolution,
        latent_side,
        warmup: options.warmup,
        repeats: options.repeats,
        parameters: ParameterCounts {
            unet: models.parameters.unet,
            text_encoder: models.parameters.text_encoder,
            vae: models.parameters.vae,
            mlp: mlp_parameters,
        },
        build_s,
        memory: memory.description(),
        memory_after_build,
        timings,
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
    let context = standard_normal((2, PROMPT_TOKENS, width), rng, device)?.to_dtype(options.dtype)?;
    let t = Tensor::full(DENOISE_TIMESTEP, 2, device)?;
    measure_op("denoise", options, memory, || {
        let input = Tensor::cat(&[&latents, &latents], 0)?.to_dtype(options.dtype)?;
        let pred = models.unet.forward(&input, &t, &context)?.to_dtype(DType::F32)?;
        let uncond = pred.narrow(0, 0, 1)?;
        let text = pred.narrow(0, 1, 1)?;
        let _guided = (&uncond + ((text - &uncond)? * GUIDANCE_SCALE)?)?;
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
    let image = inputs.image.to_dtype(options.dtype)?;
    let encode = measure_op("vae_encode", options, memory, || {
        let _posterior = models.vae.encode(&image)?;
        Ok(device.synchronize()?)
    })?;
    let latents = standard_normal(inputs.latent_shape, rng, device)?.to_dtype(options.dtype)?;
    let decode = measure_op("vae_decode", options, memory, || {
        let _image = models.vae.decode(&latents)?;
        Ok(device.synchronize()?)
    })?;
    Ok([encode, decode])
}

/// One prompt with an identity through the text encoder.
fn measure_text(models: &Models, options: &BenchOptions, inputs: &Inputs, memory: &mut MemoryProbe) -> Result<Timing> {
    let identity = inputs.basis.mean.to_dtype(options.dtype)?;
    measure_op("text", options, memory, || {
        let _features = models.text_encoder.forward(&inputs.caption_ids, Some(&identity))?;
        Ok(options.device.synchronize()?)
    })
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

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
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

/// Memory in use and its peak: the resident set size on the CPU (Linux's VmRSS / VmHWM, the
/// peak reset through /proc/self/clear_refs), device memory in use on CUDA.
enum MemoryProbe {
    Rss,
    #[cfg(feature = "cuda")]
    Cuda(cuda_memory::Sampler),
}

impl MemoryProbe {
    fn new(device: &Device) -> Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => Ok(Self::Cuda(cuda_memory::Sampler::new(cuda.cuda_stream().context().clone())?)),
            _ => Ok(Self::Rss),
        }
    }

    fn description(&self) -> &'static str {
        match self {
            Self::Rss => "resident set size (VmRSS; peak VmHWM, reset before each measurement)",
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => cuda_memory::DESCRIPTION,
        }
    }

    fn current(&mut self) -> Result<Option<u64>> {
        match self {
            Self::Rss => Ok(proc_status_bytes("VmRSS:")),
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(Some(sampler.current()?)),
        }
    }

    fn reset_peak(&mut self) -> Result<()> {
        match self {
            // "5" resets the peak resident set size to the current one (proc(5)); where that is
            // not allowed, the peak stays the process's.
            Self::Rss => {
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(sampler.reset()?),
        }
    }

    fn peak(&mut self) -> Result<Option<u64>> {
        match self {
            Self::Rss => Ok(proc_status_bytes("VmHWM:")),
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(Some(sampler.peak()?)),
        }
    }
}

/// A `kB` field of /proc/self/status, in bytes (None where there is no such file).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(feature = "cuda")]
mod cuda_memory {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda::cudarc::driver::CudaContext;

    pub const DESCRIPTION: &str =
        "device memory in use (total - free, as nvidia-smi counts it: CUDA context and memory pools included; peak sampled every millisecond)";

    /// Device memory in use, for every process on the device.
    fn used(context: &CudaContext) -> candle_core::Result<u64> {
        let (free, total) = context.mem_get_info().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((total - free) as u64)
    }

    /// The driver has no peak counter: a thread samples the memory in use and keeps the maximum.
    pub struct Sampler {
        context: Arc<CudaContext>,
        peak: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Sampler {
        pub fn new(context: Arc<CudaContext>) -> candle_core::Result<Self> {
            let peak = Arc::new(AtomicU64::new(used(&context)?));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = std::thread::spawn({
                let (context, peak, stop) = (context.clone(), peak.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(now) = used(&context) {
                            peak.fetch_max(now, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            Ok(Self { context, peak, stop, thread: Some(thread) })
        }

        pub fn current(&self) -> candle_core::Result<u64> {
            used(&self.context)
        }

        pub fn reset(&self) -> candle_core::Result<()> {
            self.peak.store(used(&self.context)?, Ordering::Relaxed);
            Ok(())
        }

        pub fn peak(&self) -> candle_core::Result<u64> {
            Ok(self.peak.load(Ordering::Relaxed).max(used(&self.context)?))
        }
    }

    impl Drop for Sampler {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl BenchReport {
    /// The report as JSON; tools/bench/pytorch_bench.py writes the same keys.
    pub fn to_json(&self) -> Value {
        let mut results = serde_json::Map::new();
        for t in &self.timings {
            results.insert(
                t.name.to_string(),
                json!({
                    "median_s": t.median_s(),
                    "min_s": t.min_s(),
                    "max_s": t.max_s(),
                    "times_s": t.times_s,
                    "memory_before_bytes": t.memory_before,
                    "peak_memory_bytes": t.memory_peak,
                }),
            );
            if let Some(profile) = &t.profile {
                let ops: Vec<Value> = profile
                    .ops
                    .iter()
                    .map(|op| json!({"name": op.name, "calls": op.calls, "seconds": op.seconds}))
                    .collect();
                let phases: Vec<Value> = profile
                    .phases
                    .iter()
                    .map(|p| json!({"name": p.name, "calls": p.calls, "seconds": p.seconds}))
                    .collect();
                results[t.name]["profile"] = json!({
                    "total_s": profile.total_seconds,
                    "rest_s": profile.rest_seconds(),
                    "ops": ops,
                    "phases": phases,
                });
            }
        }
        json!({
            "implementation": "stableid",
            "version": env!("CARGO_PKG_VERSION"),
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "tf32_matmul": self.tf32,
            "threads": self.threads,
            "resolution": self.resolution,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "learn_timestep": LEARN_TIMESTEP,
            "guidance_scale": GUIDANCE_SCALE,
            "parameters": {
                "unet": self.parameters.unet,
                "text_encoder": self.parameters.text_encoder,
                "vae": self.parameters.vae,
                "mlp": self.parameters.mlp,
            },
            "build_s": self.build_s,
            "memory": self.memory,
            "memory_after_build_bytes": self.memory_after_build,
            "results": results,
        })
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let p = &self.parameters;
        let millions = |n: u64| n as f64 / 1e6;
        let mut out = format!(
            "Stable Diffusion 2.1-base architecture, random weights\n\
             device {}, dtype {}{}, {} threads, {}x{} (latents {}x{}), warm-up {}, repeats {}\n\
             parameters: UNet {:.1}M, text encoder {:.1}M, VAE {:.1}M, identity MLP {:.1}M; built in {:.1} s\n\
             memory: {}{}\n\n",
            self.device,
            dtype_name(self.dtype),
            if self.tf32 { " (TF32 products)" } else { "" },
            self.threads,
            self.resolution,
            self.resolution,
            self.latent_side,
            self.latent_side,
            self.warmup,
            self.repeats,
            millions(p.unet),
            millions(p.text_encoder),
            millions(p.vae),
            millions(p.mlp),
            self.build_s,
            self.memory,
            self.memory_after_build.map(|b| format!("; {} after building the models", gib(b))).unwrap_or_default(),
        );
        out += &format!(
            "{:<12} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
            "measurement", "median", "min", "max", "mem before", "mem peak"
        );
        for t in &self.timings {
            let mem = |m: Option<u64>| m.map(gib).unwrap_or_else(|| "-".into());
            out += &format!(
                "{:<12} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
                t.name,
                seconds(t.median_s()),
                seconds(t.min_s()),
                seconds(t.max_s()),
                mem(t.memory_before),
                mem(t.memory_peak),
            );
        }
        for t in &self.timings {
            if let Some(profile) = &t.profile {
                out += &profile_table(t.name, profile);
            }
        }
        out
    }
}

/// One profiled run, op by op, with each op's share of the run's time.
fn profile_table(name: &str, profile: &Profile) -> String {
    let total = profile.total_seconds;
    let mut out = format!(
        "\n{name}, one run with op timing (waits for the device around every op): {}\n{:<22} {:>6} {:>10} {:>7}\n",
        seconds(total),
        "op",
        "calls",
        "time",
        "share"
    );
    let share = |s: f64| format!("{:.1}%", 100.0 * s / total);
    for op in &profile.ops {
        out += &format!("{:<22} {:>6} {:>10} {:>7}\n", op.name, op.calls, seconds(op.seconds), share(op.seconds));
    }
    let rest = profile.rest_seconds();
    out += &format!("{:<22} {:>6} {:>10} {:>7}\n", "rest (other candle ops)", "", seconds(rest), share(rest));
    for phase in &profile.phases {
        out += &format!(
            "phase: {:<15} {:>6} {:>10} {:>7}\n",
            phase.name,
            phase.calls,
            seconds(phase.seconds),
            share(phase.seconds)
        );
    }
    out
}

/// The dtype as the benchmarks' JSON and flags name it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
