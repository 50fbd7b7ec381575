//! Euler's method on the probability-flow ODE in sigma space (Karras et al., arXiv 2206.00364,
//! algorithm 2 without churn), as diffusers' `EulerDiscreteScheduler` with its defaults: linear
//! sigma interpolation, `s_churn` 0 (deterministic), final sigma 0.

use candle_core::{DType, Tensor};

use super::{
    axpby, index_for_timestep, np_linspace, trailing_timesteps, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};

pub struct EulerDiscrete {
    /// `unet_timesteps` rounded to the nearest integer.
    timesteps: Vec<usize>,
    /// diffusers' float32 timesteps, fractional under linspace spacing.
    unet_timesteps: Vec<f32>,
    /// One sigma per timestep, then the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    step_index: Option<usize>,
}

impl EulerDiscrete {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> crate::Result<Self> {
        cfg.check_sampling("Euler", steps, true)?;
        let t = cfg.num_train_timesteps;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let unet_timesteps: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(|x| x as f32).collect()
            }
            TimestepSpacing::Leading => (0..steps).rev().map(|i| (i * (t / steps) + cfg.steps_offset) as f32).collect(),
            TimestepSpacing::Trailing => trailing_timesteps(t, steps).into_iter().map(|x| x as f32).collect(),
        };
        let timesteps: Vec<usize> = unet_timesteps.iter().map(|&x| x.round() as usize).collect();
        cfg.check_timesteps(&timesteps)?;

        // The training sigmas sqrt((1 - abar) / abar) in float32, then numpy's float64 `interp`
        // at the (possibly fractional) timesteps, stored back as float32.
        let train_sigmas: Vec<f32> =
            cfg.alphas_cumprod().into_iter().map(|abar| ((1.0 - abar) / abar).sqrt()).collect();
        let mut sigmas: Vec<f32> = unet_timesteps.iter().map(|&x| interp(f64::from(x), &train_sigmas) as f32).collect();
        sigmas.push(0.0);

        let max_sigma = sigmas.iter().copied().fold(0f32, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            unet_timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: cfg.prediction_type,
            step_index: None,
        })
    }

    /// The current step: counted once started, else looked up like diffusers' `_init_step_index`.
    fn index(&self, timestep: usize) -> candle_core::Result<usize> {
        match self.step_index.or_else(|| index_for_timestep(&self.timesteps, timestep)) {
            Some(i) if i < self.timesteps.len() => Ok(i),
            Some(_) => candle_core::bail!("Euler: every step of the schedule has been taken"),
            None => candle_core::bail!("Euler: timestep {timestep} is not in the schedule {:?}", self.timesteps),
        }
    }
}

/// `np.interp(x, arange(len(ys)), ys)` in float64.
fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last].into();
    }
    if x <= 0.0 {
        return ys[0].into();
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return ys[j].into();
    }
    let slope = f64::from(ys[j + 1]) - f64::from(ys[j]);
    slope * (x - j as f64) + f64::from(ys[j])
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn unet_timesteps(&self) -> Vec<f64> {
        self.unet_timesteps.iter().map(|&t| t.into()).collect()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma.into()
    }

    /// The ODE lives in `x / sqrt(sigma^2 + 1)`-scaled space; the model expects unit variance.
    fn scale_model_input(&self, sample: &Tensor, timestep: usize) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[self.index(timestep)?];
        sample / f64::from((sigma * sigma + 1.0).sqrt())
    }

    fn step(&mut self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let i = self.index(timestep)?;
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;

        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => axpby(1.0, &sample, -sigma, &out)?,
            PredictionType::VPrediction => {
                let c = sigma * sigma + 1.0;
                axpby(-sigma / c.sqrt(), &out, 1.0 / c, &sample)?
            }
            PredictionType::Sample => out,
        };
        let derivative = ((&sample - pred_original)? / f64::from(sigma))?;
        let prev = axpby(1.0, &sample, sigma_next - sigma, &derivative)?;
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}
