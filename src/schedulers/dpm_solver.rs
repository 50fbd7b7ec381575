//! DPM-Solver++ 2M (Lu et al., arXiv 2211.01095), as diffusers' `DPMSolverMultistepScheduler`
//! with its defaults: solver order 2, algorithm dpmsolver++, midpoint solver type, first-order
//! first and last steps (`lower_order_final`, final sigma 0), no Karras sigmas, no thresholding.
//!
//! The solver integrates the data prediction `x0(x_t)` in `lambda = log(alpha_t / sigma_t)`,
//! reusing the previous step's `x0` for the second-order term.

use candle_core::{DType, Tensor};

use super::{
    axpby, index_for_timestep, np_linspace, np_round, trailing_timesteps, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};

pub struct DpmSolverMultistep {
    timesteps: Vec<usize>,
    /// `sqrt((1 - abar) / abar)` per timestep, then the final 0.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    step_index: Option<usize>,
    /// The data prediction of the previous step, for the second-order update.
    previous_x0: Option<Tensor>,
}

/// The VP-schedule quantities of one sigma, in float32 like diffusers.
struct Level {
    alpha: f32,
    sigma: f32,
    lambda: f32,
}

impl Level {
    /// From the schedule's sigma `sqrt((1 - abar) / abar)`: `alpha = sqrt(abar)`, `sigma = sqrt(1 - abar)`.
    fn new(schedule_sigma: f32) -> Self {
        let alpha = 1.0 / (schedule_sigma * schedule_sigma + 1.0).sqrt();
        let sigma = schedule_sigma * alpha;
        // At the final sigma 0, lambda is +inf and the update returns the data prediction.
        Self { alpha, sigma, lambda: alpha.ln() - sigma.ln() }
    }
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> crate::Result<Self> {
        cfg.check_sampling("dpm++", steps, true)?;
        let t = cfg.num_train_timesteps;
        // Spaced over steps + 1 points, dropping the one at 0.
        let timesteps: Vec<usize> = match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (t - 1) as f64, steps + 1).into_iter().skip(1).rev().map(np_round).collect()
            }
            TimestepSpacing::Leading => (1..=steps).rev().map(|i| i * (t / (steps + 1)) + cfg.steps_offset).collect(),
            TimestepSpacing::Trailing => trailing_timesteps(t, steps),
        };
        cfg.check_timesteps(&timesteps)?;
        let alphas_cumprod = cfg.alphas_cumprod();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| ((1.0 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas, prediction_type: cfg.prediction_type, step_index: None, previous_x0: None })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        // diffusers falls back to the last step for a timestep it cannot find.
        let i = self
            .step_index
            .unwrap_or_else(|| index_for_timestep(&self.timesteps, timestep).unwrap_or(self.timesteps.len() - 1));
        if i >= self.timesteps.len() {
            candle_core::bail!("DPM-Solver++: every step of the schedule has been taken")
        }
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let s0 = Level::new(self.sigmas[i]);
        let next = Level::new(self.sigmas[i + 1]);

        let x0 = match self.prediction_type {
            PredictionType::Epsilon => (axpby(1.0, &sample, -s0.sigma, &out)? / f64::from(s0.alpha))?,
            PredictionType::VPrediction => axpby(s0.alpha, &sample, -s0.sigma, &out)?,
            PredictionType::Sample => out,
        };

        let h = next.lambda - s0.lambda;
        let first_order = axpby(next.sigma / s0.sigma, &sample, -(next.alpha * ((-h).exp() - 1.0)), &x0)?;
        let is_last = i + 1 == self.timesteps.len();
        let prev = match (&self.previous_x0, is_last) {
            (Some(x0_prev), false) => {
                // Midpoint correction from the slope between this and the previous data prediction.
                let s1 = Level::new(self.sigmas[i - 1]);
                let r0 = (s0.lambda - s1.lambda) / h;
                let d1 = ((&x0 - x0_prev)? * f64::from(1.0 / r0))?;
                (first_order - (d1 * f64::from(0.5 * (next.alpha * ((-h).exp() - 1.0))))?)?
            }
            _ => first_order,
        };
        self.previous_x0 = Some(x0);
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}
