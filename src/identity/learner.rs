//! One StableIdentity learning step, as REFERENCE.md describes it:
//! MLP(f) -> AdaIN into the celebrity basis -> `v1*`, `v2*` rows of the caption's token
//! embeddings -> frozen text encoder -> frozen UNet on the noised latent of the photo -> masked
//! two-phase loss -> backward into the MLP only -> global-norm clipping -> AdamW.

use candle_core::{DType, Tensor};

use crate::identity::loss::{masked_two_phase_loss, LossConfig, LossInputs};
use crate::identity::mlp::{adain_landing, IdentityMlp};
use crate::identity::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::pipelines::StableDiffusion;
use crate::schedulers::Ddpm;
use crate::{Error, Result};

/// The celebrity-name statistics the MLP output lands on: (2, width) each.
#[derive(Debug, Clone)]
pub struct Basis {
    pub mean: Tensor,
    pub std: Tensor,
}

/// Everything one step consumes; drawn at random by the training loop, fixed by tests.
pub struct StepInputs {
    /// Face-recognition feature (1, 768) of the (possibly flipped) photo.
    pub feature: Tensor,
    /// The augmented photo (1, 3, H, W) in [-1, 1].
    pub image: Tensor,
    /// Masks at latent size (1, 1, H/8, W/8), values in {0, 1}.
    pub face_mask: Tensor,
    pub hair_mask: Tensor,
    /// Caption containing `v1* v2*`.
    pub caption: String,
    pub timestep: usize,
    /// Diffusion noise eps (1, 4, H/8, W/8).
    pub noise: Tensor,
    /// Noise of the VAE posterior sample (1, 4, H/8, W/8).
    pub posterior_noise: Tensor,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The trainable MLP and its optimizer over the frozen Stable Diffusion models.
pub struct Learner<'a> {
    sd: &'a StableDiffusion,
    schedule: Ddpm,
    basis: Basis,
    pub mlp: IdentityMlp,
    pub optimizer: AdamW,
    pub loss_config: LossConfig,
    pub max_grad_norm: f64,
}

impl<'a> Learner<'a> {
    pub fn new(
        sd: &'a StableDiffusion,
        basis: Basis,
        mlp: IdentityMlp,
        adamw: AdamWConfig,
        loss_config: LossConfig,
        max_grad_norm: f64,
    ) -> Result<Self> {
        let schedule = Ddpm::new(sd.scheduler_config())?;
        let params: Vec<_> = mlp.params().iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(adamw, &params)?;
        Ok(Self { sd, schedule, basis, mlp, optimizer, loss_config, max_grad_norm })
    }

    /// The identity (batch, 2, width) for features (batch, 768): MLP output landed by AdaIN.
    pub fn identity(&self, feature: &Tensor) -> Result<Tensor> {
        Ok(adain_landing(&self.mlp.forward(feature)?, &self.basis.mean, &self.basis.std)?)
    }

    /// The loss of one step, with the graph back to the MLP parameters.
    pub fn loss(&self, inputs: &StepInputs) -> Result<Tensor> {
        let sd = self.sd;
        let dtype = sd.dtype();
        let identity = self.identity(&inputs.feature)?.squeeze(0)?;
        let prompt = sd.prompt_ids(&inputs.caption)?;
        if prompt.identities_used != 1 {
            return Err(Error::Input(format!("caption `{}` must contain v1* v2* (and no other placeholders)", inputs.caption)));
        }
        let context = sd.text_encoder().forward(&prompt.ids, Some(&identity))?;

        // The photo's latent: a posterior sample, scaled; no gradient flows into the VAE.
        let scaling = sd.vae().config().scaling_factor;
        let posterior = sd.vae().encode(&inputs.image.to_dtype(dtype)?)?;
        let latents = (posterior.sample(&inputs.posterior_noise.to_dtype(dtype)?)?.to_dtype(DType::F32)? * scaling)?
            .detach();
        let timesteps = [inputs.timestep];
        let noisy = self.schedule.add_noise(&latents, &inputs.noise, &timesteps)?;
        let t = Tensor::new(&[inputs.timestep as f32], sd.device())?;
        let noise_pred = sd.unet().forward(&noisy.to_dtype(dtype)?, &t, &context)?.to_dtype(DType::F32)?;

        let loss_inputs = LossInputs {
            noise_pred: &noise_pred,
            noise: &inputs.noise,
            noisy_latents: &noisy,
            latents: &latents,
            timesteps: &timesteps,
            face_mask: &inputs.face_mask,
            hair_mask: &inputs.hair_mask,
        };
        Ok(masked_two_phase_loss(&loss_inputs, &self.loss_config, &self.schedule, scaling)?)
    }

    /// Gradients of the loss for every MLP parameter (in `PARAM_NAMES` order), and the loss.
    pub fn gradients(&self, inputs: &StepInputs) -> Result<(f64, Vec<Tensor>)> {
        let loss = self.loss(inputs)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Input(format!("the loss is {value} at timestep {}", inputs.timestep)));
        }
        let grads = loss.backward()?;
        drop(loss);
        let grads = self
            .mlp
            .params()
            .iter()
            .map(|(name, var)| {
                grads.get(var.as_tensor()).cloned().ok_or_else(|| {
                    Error::Input(format!("no gradient reached the MLP parameter {name}: the graph is cut"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((value, grads))
    }

    /// One optimisation step: loss, backward, clipping to the global norm, AdamW.
    pub fn step(&mut self, inputs: &StepInputs) -> Result<StepReport> {
        let (loss, mut grads) = self.gradients(inputs)?;
        let grad_norm = clip_grad_norm(&mut grads, self.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::Input(format!("the gradient norm is {grad_norm} at timestep {}", inputs.timestep)));
        }
        let params: Vec<_> = self.mlp.params().iter().map(|(_, v)| v).collect();
        self.optimizer.step(&params, &grads)?;
        Ok(StepReport { loss, grad_norm })
    }
}
