//! Timestep embedding: diffusers' `get_timestep_embedding` / `Timesteps` and `TimestepEmbedding`
//! (`diffusers/models/embeddings.py`).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// Sinusoidal embedding of `timesteps` (shape `(batch,)`, any dtype) into `dim` f32 channels.
///
/// Frequency `i` is `exp(-ln(10000) * i / (dim / 2 - freq_shift))`; the output holds
/// `[sin, cos]` of `t * freq`, or `[cos, sin]` with `flip_sin_to_cos`.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    // The frequencies go through the same f32 operations as in diffusers: at t ~ 1000 a one-ulp
    // difference in a frequency moves the phase by ~1e-4.
    let log_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / denominator).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let phases = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (phases.sin()?, phases.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[&cos, &sin], 1)? } else { Tensor::cat(&[&sin, &cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, time_embed_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
