//! DDIM with eta 0 (deterministic), as diffusers' `DDIMScheduler` (arXiv 2010.02502, eq. 12), and
//! [`Ddim::step_to`], the same move between any two timesteps, forward or inverted, as
//! LucidDreamer's `guidance/sd_step.py::ddim_step` (used by [`crate::pipelines::ism`]).

use candle_core::{DType, Tensor};

use super::{
    axpby, np_linspace, np_round, trailing_timesteps, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};

pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    /// `alphas_cumprod` one step past timestep 0.
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    /// diffusers steps back by `T // steps` whatever the spacing.
    step_ratio: usize,
    prediction_type: PredictionType,
    clip_sample_range: Option<f32>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> crate::Result<Self> {
        cfg.check_sampling("ddim", steps, false)?;
        let ddim = Self::with_steps(cfg, steps);
        cfg.check_timesteps(&ddim.timesteps)?;
        Ok(ddim)
    }

    /// DDIM over every training timestep, as `DDIMScheduler.set_timesteps(num_train_timesteps)`
    /// (LucidDreamer's guidance, [`crate::pipelines::ism`]). With "leading" spacing the timesteps
    /// are shifted by `steps_offset` (1..=1000 for Stable Diffusion), the noisiest one past the
    /// schedule, which diffusers leaves unchecked: [`Ddim::step_to`] refuses it.
    pub fn every_training_timestep(cfg: &SchedulerConfig) -> crate::Result<Self> {
        cfg.ensure_supported()?;
        Ok(Self::with_steps(cfg, cfg.num_train_timesteps))
    }

    fn with_steps(cfg: &SchedulerConfig, steps: usize) -> Self {
        let t = cfg.num_train_timesteps;
        let timesteps: Vec<usize> = match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading) {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(np_round).collect()
            }
            TimestepSpacing::Leading => (0..steps).rev().map(|i| i * (t / steps) + cfg.steps_offset).collect(),
            TimestepSpacing::Trailing => trailing_timesteps(t, steps),
        };
        let alphas_cumprod = cfg.alphas_cumprod();
        Self {
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] },
            alphas_cumprod,
            timesteps,
            step_ratio: t / steps,
            prediction_type: cfg.prediction_type,
            clip_sample_range: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
        }
    }

    /// The eta-0 DDIM move of `sample` from `timestep` to `target` (`None`: one step past
    /// timestep 0), eq. 12 of the DDIM paper with any gap: a denoising step when `target` is
    /// less noisy, a DDIM inversion step when it is noisier (LucidDreamer's `ddim_step` with
    /// `delta_timestep = timestep - target`, negative to invert).
    pub fn step_to(
        &self,
        model_output: &Tensor,
        timestep: usize,
        target: Option<usize>,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha = |t: usize| match self.alphas_cumprod.get(t) {
            Some(&alpha) => Ok(alpha),
            None => candle_core::bail!("DDIM: timestep {t} is past the training schedule"),
        };
        let alpha_prod_t = alpha(timestep)?;
        let alpha_prod_t_prev = match target {
            Some(target) => alpha(target)?,
            None => self.final_alpha_cumprod,
        };
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;

        let (pred_original, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => ((axpby(1.0, &sample, -sqrt_beta, &out)? / f64::from(sqrt_alpha))?, out),
            PredictionType::Sample => {
                let eps = (axpby(1.0, &sample, -sqrt_alpha, &out)? / f64::from(sqrt_beta))?;
                (out, eps)
            }
            PredictionType::VPrediction => {
                (axpby(sqrt_alpha, &sample, -sqrt_beta, &out)?, axpby(sqrt_alpha, &out, sqrt_beta, &sample)?)
            }
        };
        let pred_original = match self.clip_sample_range {
            Some(range) => pred_original.clamp(-range, range)?,
            None => pred_original,
        };
        // eta = 0: no noise, the whole remaining variance points along the predicted noise.
        let prev = axpby(alpha_prod_t_prev.sqrt(), &pred_original, (1.0 - alpha_prod_t_prev).sqrt(), &pred_epsilon)?;
        prev.to_dtype(model_output.dtype())
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        self.step_to(model_output, timestep, timestep.checked_sub(self.step_ratio), sample)
    }
}
