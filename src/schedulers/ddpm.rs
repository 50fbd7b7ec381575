//! The training noise schedule, as diffusers' `DDPMScheduler` (arXiv 2006.11239): forward
//! noising `z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps` with one timestep per sample, and its
//! inverse for reconstructing `z0` from a model prediction.

use candle_core::Tensor;

use super::{PredictionType, SchedulerConfig};

pub struct Ddpm {
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig) -> crate::Result<Self> {
        cfg.ensure_supported()?;
        Ok(Self { alphas_cumprod: cfg.alphas_cumprod(), prediction_type: cfg.prediction_type })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `abar_t` for every training timestep (float32, as diffusers).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// `sqrt(abar_t)`, computed in float32 like diffusers.
    pub fn sqrt_alpha_cumprod(&self, timestep: usize) -> f64 {
        self.alphas_cumprod[timestep].sqrt().into()
    }

    /// `sqrt(1 - abar_t)`, computed in float32 like diffusers.
    pub fn sqrt_one_minus_alpha_cumprod(&self, timestep: usize) -> f64 {
        (1.0 - self.alphas_cumprod[timestep]).sqrt().into()
    }

    /// `sqrt(abar_t) * z0 + sqrt(1 - abar_t) * noise`, `timesteps[i]` applying to sample `i`.
    pub fn add_noise(&self, z0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> candle_core::Result<Tensor> {
        let (a, b) = self.coefficients(timesteps, z0)?;
        a.broadcast_mul(z0)? + b.broadcast_mul(noise)?
    }

    /// diffusers' `get_velocity`: the v-prediction target `sqrt(abar_t) * noise - sqrt(1 - abar_t) * z0`.
    pub fn velocity(&self, z0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> candle_core::Result<Tensor> {
        let (a, b) = self.coefficients(timesteps, z0)?;
        a.broadcast_mul(noise)? - b.broadcast_mul(z0)?
    }

    /// The clean sample implied by the model's prediction at `z_t` (per-sample timesteps), for
    /// the configured prediction type. Differentiable in both tensors.
    pub fn pred_original_sample(
        &self,
        z_t: &Tensor,
        model_output: &Tensor,
        timesteps: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (a, b) = self.coefficients(timesteps, z_t)?;
        match self.prediction_type {
            PredictionType::Epsilon => (z_t - b.broadcast_mul(model_output)?)?.broadcast_div(&a),
            PredictionType::VPrediction => a.broadcast_mul(z_t)? - b.broadcast_mul(model_output)?,
            PredictionType::Sample => Ok(model_output.clone()),
        }
    }

    /// `sqrt(abar_t)` and `sqrt(1 - abar_t)` per sample, shaped `(batch, 1, 1, ..)` to broadcast over `like`.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let batch = like.dim(0)?;
        if timesteps.len() != batch {
            candle_core::bail!("DDPM: {} timesteps for a batch of {batch}", timesteps.len())
        }
        if let Some(t) = timesteps.iter().find(|&&t| t >= self.alphas_cumprod.len()) {
            candle_core::bail!("DDPM: timestep {t} is past num_train_timesteps {}", self.alphas_cumprod.len())
        }
        let mut shape = vec![1; like.rank()];
        shape[0] = batch;
        let column = |f: &dyn Fn(f32) -> f32| -> candle_core::Result<Tensor> {
            let values: Vec<f32> = timesteps.iter().map(|&t| f(self.alphas_cumprod[t])).collect();
            Tensor::from_vec(values, shape.as_slice(), like.device())?.to_dtype(like.dtype())
        };
        Ok((column(&|abar| abar.sqrt())?, column(&|abar| (1.0 - abar).sqrt())?))
    }
}
