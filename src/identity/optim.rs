//! AdamW with global-norm gradient clipping, as `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` compute them, with its state open for checkpoints.

use candle_core::{Result, Tensor, Var};

/// AdamW hyper-parameters; defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 5e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// Optimizer state: step count and the first and second moments of every parameter.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: usize,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[&Var]) -> Result<Self> {
        let zeros = params.iter().map(|p| p.as_tensor().zeros_like()).collect::<Result<Vec<_>>>()?;
        Ok(Self { config, step: 0, exp_avg: zeros.clone(), exp_avg_sq: zeros })
    }

    /// One update of `params` with `grads` (same order).
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor]) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let decayed = (param.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            self.exp_avg[i] = ((&self.exp_avg[i] * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            self.exp_avg_sq[i] = ((&self.exp_avg_sq[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((self.exp_avg_sq[i].sqrt()? / bias_correction2.sqrt())? + c.eps)?;
            let update = (self.exp_avg[i].div(&denom)? * (c.lr / bias_correction1))?;
            param.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (as `clip_grad_norm_`, including its 1e-6 guard).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
