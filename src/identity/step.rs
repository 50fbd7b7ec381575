//! One StableIdentity learning step, as docs/method.md describes it ("Overview", "Loss",
//! "Optimizer"): MLP(f) -> AdaIN into the celebrity basis -> `v1*`, `v2*` rows of the caption's
//! token embeddings -> frozen text encoder -> frozen UNet on the noised latent of the photo ->
//! masked two-phase loss -> backward into the MLP only -> global-norm clipping -> AdamW.

use candle_core::{DType, Tensor};

use crate::identity::loss::{masked_two_phase_loss, LossConfig, LossInputs};
use crate::identity::mlp::{adain_landing, IdentityMlp};
use crate::identity::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::models::clip_text::ClipTextModel;
use crate::models::stable_diffusion::StableDiffusion;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::nn::profile;
use crate::schedulers::Ddpm;
use crate::{Error, Result};

/// The stack a learning step needs: candle's backward walks the graph recursively
/// (docs/candle.md, "Deep graphs"), and through the 23-layer text encoder and the UNet that is
/// far deeper than a main thread's 8 MB allow.
pub const TRAINING_STACK_BYTES: usize = 256 << 20;

/// Runs `work` on a thread named `name` with a [`TRAINING_STACK_BYTES`] stack and returns its
/// result (a panic in `work` is passed on).
pub fn on_training_stack<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name(name.into()).stack_size(TRAINING_STACK_BYTES);
        let handle = thread.spawn_scoped(scope, work)?;
        Ok(handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// The frozen networks a learning step runs through, and the training noise schedule.
pub struct FrozenModels<'a> {
    pub text_encoder: &'a ClipTextModel,
    pub unet: &'a UNet2DConditionModel,
    pub vae: &'a AutoencoderKL,
    pub schedule: Ddpm,
}

impl<'a> FrozenModels<'a> {
    /// The networks of loaded Stable Diffusion components, with their training schedule.
    pub fn of(sd: &'a StableDiffusion) -> Result<Self> {
        Ok(Self {
            text_encoder: sd.text_encoder(),
            unet: sd.unet(),
            vae: sd.vae(),
            schedule: Ddpm::new(sd.scheduler_config())?,
        })
    }
}

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
    /// Token ids (1, 77) of a caption containing `v1* v2*`, the placeholders already mapped to
    /// the rows after the vocabulary ([`StableDiffusion::prompt_ids`] does this).
    pub caption_ids: Tensor,
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
    models: FrozenModels<'a>,
    basis: Basis,
    pub mlp: IdentityMlp,
    pub optimizer: AdamW,
    pub loss_config: LossConfig,
    pub max_grad_norm: f64,
}

impl<'a> Learner<'a> {
    pub fn new(
        models: FrozenModels<'a>,
        basis: Basis,
        mlp: IdentityMlp,
        adamw: AdamWConfig,
        loss_config: LossConfig,
        max_grad_norm: f64,
    ) -> Result<Self> {
        let params: Vec<_> = mlp.params().iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(adamw, &params)?;
        Ok(Self { models, basis, mlp, optimizer, loss_config, max_grad_norm })
    }

    /// The identity (batch, 2, width) for features (batch, 768): MLP output landed by AdaIN.
    pub fn identity(&self, feature: &Tensor) -> Result<Tensor> {
        Ok(adain_landing(&self.mlp.forward(feature)?, &self.basis.mean, &self.basis.std)?)
    }

    /// The loss of one step, with the graph back to the MLP parameters.
    pub fn loss(&self, inputs: &StepInputs) -> Result<Tensor> {
        let m = &self.models;
        let dtype = m.text_encoder.token_embedding().dtype();
        // The loss is computed in f32 (f64 when the models are f64, for finite-difference checks).
        let loss_dtype = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let device = inputs.feature.device();
        let identity = self.identity(&inputs.feature)?.squeeze(0)?;
        let context =
            profile::phase("text encoder", device, || m.text_encoder.forward(&inputs.caption_ids, Some(&identity)))?;

        // The photo's latent: a posterior sample, scaled; no gradient flows into the VAE.
        let scaling = m.vae.config().scaling_factor;
        let posterior = profile::phase("VAE encoder", device, || m.vae.encode(&inputs.image.to_dtype(dtype)?))?;
        let latents =
            (posterior.sample(&inputs.posterior_noise.to_dtype(dtype)?)?.to_dtype(loss_dtype)? * scaling)?.detach();
        let timesteps = [inputs.timestep];
        let noisy = m.schedule.add_noise(&latents, &inputs.noise, &timesteps)?;
        let t = Tensor::new(&[inputs.timestep as f32], noisy.device())?;
        let noise_pred = profile::phase("UNet", device, || m.unet.forward(&noisy.to_dtype(dtype)?, &t, &context))?
            .to_dtype(loss_dtype)?;

        let loss_inputs = LossInputs {
            noise_pred: &noise_pred,
            noise: &inputs.noise,
            noisy_latents: &noisy,
            latents: &latents,
            timesteps: &timesteps,
            face_mask: &inputs.face_mask,
            hair_mask: &inputs.hair_mask,
        };
        Ok(masked_two_phase_loss(&loss_inputs, &self.loss_config, &m.schedule, scaling)?)
    }

    /// Gradients of the loss for every MLP parameter (in `PARAM_NAMES` order), and the loss.
    pub fn gradients(&self, inputs: &StepInputs) -> Result<(f64, Vec<Tensor>)> {
        let loss = self.loss(inputs)?;
        // Read after the backward is queued, so that a GPU is not left idle while it is built.
        let grads = profile::phase("backward", loss.device(), || loss.backward())?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Numeric(format!("the loss is {value} at timestep {}", inputs.timestep)));
        }
        drop(loss);
        let grads = self
            .mlp
            .params()
            .iter()
            .map(|(name, var)| {
                grads.get(var.as_tensor()).cloned().ok_or_else(|| {
                    Error::Internal(format!("no gradient reached the MLP parameter {name}: the graph is cut"))
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
            return Err(Error::Numeric(format!("the gradient norm is {grad_norm} at timestep {}", inputs.timestep)));
        }
        let params: Vec<_> = self.mlp.params().iter().map(|(_, v)| v).collect();
        self.optimizer.step(&params, &grads)?;
        Ok(StepReport { loss, grad_norm })
    }
}
