//! Diffusion schedulers that reproduce diffusers step for step: the training noise schedule
//! ([`Ddpm`]) and three samplers behind one [`Scheduler`] trait ([`DpmSolverMultistep`],
//! [`Ddim`], [`EulerDiscrete`]), chosen by name through [`Sampler`].
//!
//! Reference: diffusers 0.42 `schedulers/scheduling_{ddpm,ddim,euler_discrete,dpmsolver_multistep}.py`
//! (<https://github.com/huggingface/diffusers/tree/main/src/diffusers/schedulers>).
//!
//! Precision follows diffusers so that trajectories agree to float32 rounding: betas and
//! `alphas_cumprod` are float32 (torch's CPU `linspace` is a fused multiply-add of a float32
//! stride, and its `cumprod` accumulates in float64), timestep grids are numpy float64, sigma
//! interpolation is numpy float64 rounded to float32, and every per-step coefficient is float32
//! arithmetic, as torch does on 0-d float32 tensors. Samples are stepped in float32 and returned
//! in the model output's dtype.

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::Tensor;
use serde::Deserialize;

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;

/// The most training timesteps a schedule may have (Stable Diffusion has 1000): the schedules
/// hold a few values per timestep.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// How the betas grow over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum BetaSchedule {
    Linear,
    /// Linear in sqrt(beta), the latent-diffusion schedule of Stable Diffusion.
    ScaledLinear,
    /// The cosine schedule of improved DDPM (GLIDE), betas capped at 0.999.
    SquaredCosCapV2,
}

impl TryFrom<String> for BetaSchedule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" => Ok(Self::SquaredCosCapV2),
            _ => Err(format!(
                "beta_schedule \"{s}\" is not supported (expected linear, scaled_linear or squaredcos_cap_v2)"
            )),
        }
    }
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `sqrt(abar) * noise - sqrt(1 - abar) * x0`.
    VPrediction,
    /// The clean sample itself.
    Sample,
}

impl TryFrom<String> for PredictionType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            _ => Err(format!("prediction_type \"{s}\" is not supported (expected epsilon, v_prediction or sample)")),
        }
    }
}

/// How inference timesteps are placed among the training ones (`timestep_spacing`, Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TryFrom<String> for TimestepSpacing {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            _ => Err(format!("timestep_spacing \"{s}\" is not supported (expected linspace, leading or trailing)")),
        }
    }
}

/// `scheduler/scheduler_config.json` of a diffusers model folder. Keys missing from the file take
/// diffusers' defaults, as `XScheduler.from_config(config)` does, so SD 2.1's PNDM config builds
/// any of the schedulers here; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers scheduler the model ships with (`_class_name`), e.g. `DDIMScheduler`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// Added to every "leading" timestep.
    pub steps_offset: usize,
    /// DDIM: whether the step past timestep 0 lands on `alphas_cumprod = 1` (else on `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted clean sample to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// `None` takes each scheduler's own diffusers default (DDIM: leading; DPM-Solver, Euler: linspace).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Dynamic thresholding (Imagen): rejected.
    pub thresholding: bool,
    /// Zero-terminal-SNR rescaling of the betas: rejected.
    pub rescale_betas_zero_snr: bool,
    /// Karras sigmas for DPM-Solver and Euler: rejected by those two.
    pub use_karras_sigmas: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' constructor defaults, shared by DDPM, DDIM, DPM-Solver and Euler.
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            timestep_spacing: None,
            thresholding: false,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
        }
    }
}

impl SchedulerConfig {
    /// Reads and checks a `scheduler_config.json`; errors name the file and the offending field.
    pub fn from_file(path: impl AsRef<Path>) -> crate::Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::io::read_json(path)?;
        config.check().map_err(|msg| crate::Error::Config { file: path.to_path_buf(), msg })?;
        Ok(config)
    }

    /// Rejects settings none of the schedulers here implement, and numbers that would size
    /// buffers beyond any schedule or make the noise levels meaningless.
    fn check(&self) -> Result<(), String> {
        let steps = self.num_train_timesteps;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&steps) {
            return Err(format!(
                "num_train_timesteps {steps} is out of range: expected 2 to {MAX_TRAIN_TIMESTEPS} (Stable Diffusion has 1000)"
            ));
        }
        if self.steps_offset >= steps {
            return Err(format!("steps_offset {} must be less than num_train_timesteps {steps}", self.steps_offset));
        }
        let valid_beta = |beta: f64| beta > 0.0 && beta < 1.0;
        match &self.trained_betas {
            Some(betas) if betas.len() != steps => {
                return Err(format!("trained_betas holds {} values but num_train_timesteps is {steps}", betas.len()))
            }
            Some(betas) => {
                if let Some((i, beta)) = betas.iter().enumerate().find(|(_, &b)| !valid_beta(b)) {
                    return Err(format!("trained_betas[{i}] = {beta}: betas must lie strictly between 0 and 1"));
                }
            }
            None if self.beta_schedule != BetaSchedule::SquaredCosCapV2 => {
                for (key, beta) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                    if !valid_beta(beta) {
                        return Err(format!("{key} {beta}: betas must lie strictly between 0 and 1"));
                    }
                }
            }
            None => {}
        }
        if self.thresholding {
            return Err("thresholding: dynamic thresholding is not supported".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr: zero-terminal-SNR rescaling is not supported".into());
        }
        Ok(())
    }

    /// [`Self::check`] for configs built in code, where there is no file to name.
    fn ensure_supported(&self) -> crate::Result<()> {
        self.check().map_err(|msg| crate::Error::UnsupportedModel(format!("scheduler config: {msg}")))
    }

    /// The betas as diffusers' float32 tensor.
    fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        if let Some(betas) = &self.trained_betas {
            return betas.iter().map(|&b| b as f32).collect();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    }

    /// Cumulative products of `1 - beta`, float32 values accumulated in float64 like torch's CPU `cumprod`.
    fn alphas_cumprod(&self) -> Vec<f32> {
        let mut acc = 1f64;
        self.betas()
            .into_iter()
            .map(|beta| {
                acc *= f64::from(1.0 - beta);
                acc as f32
            })
            .collect()
    }

    /// Inference timesteps must exist, and at most one per training timestep.
    /// Checks the config and the step count before a sampler is built. Karras sigmas are
    /// rejected for the samplers that would use them (`uses_sigmas`), naming `sampler`.
    fn check_sampling(&self, sampler: &str, steps: usize, uses_sigmas: bool) -> crate::Result<()> {
        self.ensure_supported()?;
        if uses_sigmas && self.use_karras_sigmas {
            return Err(crate::Error::UnsupportedModel(format!(
                "scheduler config: use_karras_sigmas is not supported by the {sampler} sampler"
            )));
        }
        self.check_steps(steps)
    }

    fn check_steps(&self, steps: usize) -> crate::Result<()> {
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(crate::Error::Input(format!(
                "the number of sampling steps must be between 1 and {} (got {steps})",
                self.num_train_timesteps
            )));
        }
        Ok(())
    }

    /// Leading spacing plus `steps_offset` can run past the last training timestep.
    fn check_timesteps(&self, timesteps: &[usize]) -> crate::Result<()> {
        match timesteps.iter().find(|&&t| t >= self.num_train_timesteps) {
            Some(t) => Err(crate::Error::UnsupportedModel(format!(
                "scheduler config: steps_offset {} puts timestep {t} past num_train_timesteps {}",
                self.steps_offset, self.num_train_timesteps
            ))),
            None => Ok(()),
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: a float32 stride applied with one
/// rounding (fused multiply-add), from `start` for the first half and from `end` for the second.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// `numpy.linspace(start, stop, num)` in float64: `i * step + start`, the last point exactly `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num.max(2) - 1) as f64;
    let mut points: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if num > 1 {
        points[num - 1] = stop;
    }
    points
}

/// Round half to even, numpy's `round`.
fn np_round(x: f64) -> usize {
    x.round_ties_even() as usize
}

/// "trailing" spacing, `round(np.arange(T, 0, -T / steps)) - 1`: numpy fills a float arange as
/// `start + i * (first stride as stored)`. numpy's length `ceil(T / (T / steps))` can exceed
/// `steps` by rounding (e.g. 61 steps), which makes diffusers end on timestep -1; exactly `steps`
/// timesteps are kept here.
fn trailing_timesteps(num_train_timesteps: usize, steps: usize) -> Vec<usize> {
    let start = num_train_timesteps as f64;
    let stride = (start - start / steps as f64) - start;
    (0..steps).map(|i| np_round(start + i as f64 * stride) - 1).collect()
}

/// Position of `timestep` in a schedule, as diffusers' `index_for_timestep`: the second match when
/// the schedule repeats it, so that a run started mid-schedule does not skip a sigma.
fn index_for_timestep(timesteps: &[usize], timestep: usize) -> Option<usize> {
    let mut matches = timesteps.iter().enumerate().filter(|&(_, &t)| t == timestep).map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// `a * x + b * y` for float32 coefficients.
fn axpby(a: f32, x: &Tensor, b: f32, y: &Tensor) -> candle_core::Result<Tensor> {
    x.affine(a.into(), 0.0)? + y.affine(b.into(), 0.0)?
}

/// A sampling schedule with diffusers' calling convention: for each `t` of [`Scheduler::timesteps`],
/// `scale_model_input`, run the model on the result, then `step`. Start from noise scaled by
/// [`Scheduler::init_noise_sigma`].
pub trait Scheduler: Send {
    /// The inference timesteps, from the noisiest down.
    fn timesteps(&self) -> &[usize];

    /// The timesteps as diffusers passes them to the UNet: [`Scheduler::timesteps`] except where
    /// a schedule lies between integers (Euler with linspace spacing), whose exact values these are.
    fn unet_timesteps(&self) -> Vec<f64> {
        self.timesteps().iter().map(|&t| t as f64).collect()
    }

    /// Standard deviation of the initial noise.
    /// Scale of the initial noise: 1 for the samplers that work on variance-preserving samples.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model input for `sample` at `timestep` (unchanged unless the scheduler works in sigma space).
    fn scale_model_input(&self, sample: &Tensor, _timestep: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    /// One denoising step: the sample at the next (less noisy) timestep.
    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor>;
}

/// The samplers `generate --sampler` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// DPM-Solver++ 2M (diffusers `DPMSolverMultistepScheduler` defaults).
    #[default]
    DpmSolverPlusPlus,
    /// DDIM with eta 0 (diffusers `DDIMScheduler` defaults).
    Ddim,
    /// Euler, deterministic (diffusers `EulerDiscreteScheduler` defaults).
    Euler,
}

impl Sampler {
    /// Every sampler, in the order of [`Sampler::NAMES`].
    pub const ALL: [Sampler; 3] = [Sampler::DpmSolverPlusPlus, Sampler::Ddim, Sampler::Euler];
    /// Command-line names, for help text.
    pub const NAMES: [&'static str; 3] = ["dpm++", "ddim", "euler"];

    pub fn name(&self) -> &'static str {
        match self {
            Sampler::DpmSolverPlusPlus => "dpm++",
            Sampler::Ddim => "ddim",
            Sampler::Euler => "euler",
        }
    }

    /// The sampler of a diffusers scheduler class (`_class_name` of a scheduler config), if it is
    /// one of these.
    pub fn from_class_name(class_name: &str) -> Option<Sampler> {
        match class_name {
            "DPMSolverMultistepScheduler" => Some(Sampler::DpmSolverPlusPlus),
            "DDIMScheduler" => Some(Sampler::Ddim),
            "EulerDiscreteScheduler" => Some(Sampler::Euler),
            _ => None,
        }
    }

    /// The scheduler for `steps` sampling steps under `cfg`.
    pub fn build(&self, cfg: &SchedulerConfig, steps: usize) -> crate::Result<Box<dyn Scheduler>> {
        Ok(match self {
            Sampler::DpmSolverPlusPlus => Box::new(DpmSolverMultistep::new(cfg, steps)?),
            Sampler::Ddim => Box::new(Ddim::new(cfg, steps)?),
            Sampler::Euler => Box::new(EulerDiscrete::new(cfg, steps)?),
        })
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sampler {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Sampler::ALL.into_iter().find(|sampler| sampler.name() == s).ok_or_else(|| {
            crate::Error::Input(format!("unknown sampler \"{s}\" (expected one of {})", Sampler::NAMES.join(", ")))
        })
    }
}
