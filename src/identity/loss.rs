//! The masked two-phase diffusion loss (docs/method.md, "Loss").
//!
//! For t above the phase threshold (layout forming), the UNet's noise prediction is compared with
//! the noise; at or below it (details), the predicted clean latent
//! `z0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)` is compared with `z0`, both divided
//! by the VAE scaling factor. Either way the error is masked:
//! `L = mse(M_face * pred, M_face * target) + beta * mse(M_hair * pred, M_hair * target)`,
//! each mse a mean over all elements.

use candle_core::{Result, Tensor};

use crate::schedulers::Ddpm;

/// Which loss the learner minimises: the paper's two-phase loss, or one phase throughout (ablations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    Noise,
    Reconstruction,
    TwoPhase,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "noise" => Ok(Self::Noise),
            "rec" => Ok(Self::Reconstruction),
            "two-phase" => Ok(Self::TwoPhase),
            other => Err(format!("unknown loss `{other}`: expected noise, rec or two-phase")),
        }
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Noise => "noise",
            Self::Reconstruction => "rec",
            Self::TwoPhase => "two-phase",
        })
    }
}

/// Loss settings; defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub kind: LossKind,
    /// t above this uses the noise loss, at or below the reconstruction loss (alpha * T = 0.6 * 1000).
    pub phase_threshold: usize,
    /// beta, the weight of the hair mask.
    pub hair_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { kind: LossKind::TwoPhase, phase_threshold: 600, hair_weight: 0.1 }
    }
}

impl LossConfig {
    /// Whether a sample at timestep `t` uses the noise loss.
    pub fn noise_phase(&self, t: usize) -> bool {
        match self.kind {
            LossKind::Noise => true,
            LossKind::Reconstruction => false,
            LossKind::TwoPhase => t > self.phase_threshold,
        }
    }
}

/// One batch of the learner's diffusion step, everything (batch, 4, h, w) except the masks
/// (batch, 1, h, w) and the per-sample timesteps.
pub struct LossInputs<'a> {
    pub noise_pred: &'a Tensor,
    pub noise: &'a Tensor,
    pub noisy_latents: &'a Tensor,
    /// Clean latents, already multiplied by the VAE scaling factor.
    pub latents: &'a Tensor,
    pub timesteps: &'a [usize],
    pub face_mask: &'a Tensor,
    pub hair_mask: &'a Tensor,
}

/// The masked two-phase loss; samples of a batch go to their own phase and the phase losses add.
pub fn masked_two_phase_loss(
    inputs: &LossInputs,
    config: &LossConfig,
    schedule: &Ddpm,
    vae_scaling_factor: f64,
) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for noise_phase in [true, false] {
        let indices: Vec<u32> = (0..inputs.timesteps.len() as u32)
            .filter(|&i| config.noise_phase(inputs.timesteps[i as usize]) == noise_phase)
            .collect();
        if indices.is_empty() {
            continue;
        }
        let device = inputs.noise_pred.device();
        let index = Tensor::new(indices.as_slice(), device)?;
        let pick = |t: &Tensor| t.index_select(&index, 0);
        let (pred, target) = if noise_phase {
            (pick(inputs.noise_pred)?, pick(inputs.noise)?)
        } else {
            let timesteps: Vec<usize> = indices.iter().map(|&i| inputs.timesteps[i as usize]).collect();
            let z0_hat =
                schedule.pred_original_sample(&pick(inputs.noisy_latents)?, &pick(inputs.noise_pred)?, &timesteps)?;
            ((z0_hat / vae_scaling_factor)?, (pick(inputs.latents)? / vae_scaling_factor)?)
        };
        let face = pick(inputs.face_mask)?;
        let hair = pick(inputs.hair_mask)?;
        let loss = (masked_mse(&pred, &target, &face)? + (masked_mse(&pred, &target, &hair)? * config.hair_weight)?)?;
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("loss of an empty batch".into()))
}

/// mean((M * pred - M * target)^2) over all elements, the mask broadcast over channels.
fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let diff = (pred.broadcast_mul(mask)? - target.broadcast_mul(mask)?)?;
    diff.sqr()?.mean_all()
}
