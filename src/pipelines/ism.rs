//! Interval Score Matching (ISM), the guidance of text-to-3D: the gradient a frozen Stable
//! Diffusion gives renders of a 3D scene so that they look like the prompt, as LucidDreamer
//! codes it (arXiv 2311.11284; EnVision-Research/LucidDreamer at 2ecf093), with the settings of
//! StableIdentity's `LucidDreamer/configs/stableid.yaml` as [`IsmOptions::default`].
//!
//! One [`IsmGuidance::step`] reproduces `guidance/sd_utils.py::train_step_perpneg` (with
//! [`IsmOptions::perp_neg`]) or `train_step` (without), ISM branch:
//!
//! 1. the renders (batch B, in [0, 1]) are flipped horizontally or not (one draw for the batch,
//!    `T.RandomHorizontalFlip`) and encoded: `z0 = scaling * sample(VAE(2 x - 1))`;
//! 2. `x_s`: DDIM inversion of `add_noise(z0, noise, timesteps[start])` with the inverse prompt,
//!    in steps of `xs_delta_t` (at most `xs_inv_steps`) up to index `s`
//!    (`add_noise_with_cfg`, `denoise_guidance_scale` 1: the inverse prompt only, eta 0);
//! 3. one more inversion step `s -> t`; the UNet's output at `(x_s, s)` is the target;
//! 4. the prediction at `(x_t, t)`, one UNet call on a batch of (1 + K) B: classifier-free
//!    guidance whose unconditional branch is the negative prompt, the positive prompt blended
//!    between the `"{prompt}, front view"`, `"side view"` and `"back view"` features by each
//!    view's azimuth (`train.py::get_pos_neg_text_embeddings`), and with Perp-Neg the
//!    perpendicular parts of two view prompts subtracted (`guidance/perpneg_utils.py`);
//! 5. `grad = nan_to_num(grad_scale sqrt((1 - abar_t) / abar_t) (pred - target))`, returned as
//!    the loss `sum(z0 * grad)` (`SpecifyGradient`), whose backward carries `grad` through the
//!    VAE encoder to the renders.
//!
//! Index `i` of LucidDreamer's schedule is timestep `i + 1` for Stable Diffusion: its timesteps
//! are `DDIMScheduler.set_timesteps(1000)` reversed, which adds `steps_offset` (1); `abar` is read
//! at the shifted timestep, as there ([`IsmGuidance::timestep`]).
//!
//! Deviations: the arithmetic between the frozen models is f32 whatever their dtype (LucidDreamer
//! keeps it in the models' f16); the random draws ([`IsmDraws`]) come from the caller's `rng`,
//! not torch's generators; a Perp-Neg weight that LucidDreamer skips (|w| <= 1e-4) is applied as
//! zero; `IsmOptions::warmup_iterations` 0 means no warm-up, where LucidDreamer would divide by
//! zero. Not here: the choice of depth over colour (`as_latent_ratio`), which is the caller's
//! (it passes the disparity repeated to three channels as `images`).

use std::ops::Range;

use candle_core::{DType, Tensor, D};
use rand::Rng;

use crate::identity::Identity;
use crate::models::stable_diffusion::StableDiffusion;
use crate::pipelines::encode_prompt;
use crate::random::standard_normal;
use crate::schedulers::{Ddim, Ddpm, Scheduler};
use crate::{Error, Result};

/// The settings of ISM; the defaults are StableIdentity's `configs/stableid.yaml` (LucidDreamer's
/// head configs with `delta_t` 150). Timesteps are indices into the 1000-step schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct IsmOptions {
    /// Classifier-free guidance scale of the prediction at `t` (`guidance_scale`).
    pub guidance_scale: f64,
    /// Factor on the gradient (`lambda_guidance`).
    pub grad_scale: f64,
    /// `[t_range[0], t_range[1]) x 1000`: where `t` is drawn after the warm-up.
    pub t_range: (usize, usize),
    /// `max_t_range x 1000`: the upper end of `t`'s range at iteration 0, shrinking to
    /// `t_range.1` over the warm-up.
    pub max_t: usize,
    /// Iterations over which the ranges anneal (`warmup_iter`); 0: none.
    pub warmup_iterations: usize,
    /// Interval `t - s` after the warm-up (`delta_t`).
    pub delta_t: usize,
    /// Interval `t - s` at iteration 0 (`delta_t_start`).
    pub delta_t_start: usize,
    /// Step of the DDIM inversion to `x_s` (`xs_delta_t`).
    pub xs_delta_t: usize,
    /// Most steps of that inversion (`xs_inv_steps`): it starts at `s - xs_delta_t xs_inv_steps`
    /// or at 0.
    pub xs_inv_steps: usize,
    /// The prompt of the DDIM inversion (`inverse_text`), empty in every LucidDreamer config.
    pub inverse_prompt: String,
    /// Perp-Neg on the view prompts (`perpneg`); `None`: plain guidance on the view-blended
    /// prompt, as LucidDreamer's `train_step`.
    pub perp_neg: Option<PerpNeg>,
}

impl Default for IsmOptions {
    fn default() -> Self {
        Self {
            guidance_scale: 7.5,
            grad_scale: 0.1,
            t_range: (20, 500),
            max_t: 980,
            warmup_iterations: 1500,
            delta_t: 150,
            delta_t_start: 100,
            xs_delta_t: 200,
            xs_inv_steps: 5,
            inverse_prompt: String::new(),
            perp_neg: Some(PerpNeg::default()),
        }
    }
}

impl IsmOptions {
    /// `w = 1 - min(iteration / warmup_iterations, 1)`: 1 at the start, 0 after the warm-up.
    pub fn warmup_rate(&self, iteration: usize) -> f64 {
        if self.warmup_iterations == 0 {
            return 0.0;
        }
        1.0 - (iteration as f64 / self.warmup_iterations as f64).min(1.0)
    }

    /// The interval `t - s` at `iteration`, annealed from `delta_t_start` to `delta_t`:
    /// `delta_t + ceil(w (delta_t_start - delta_t))` with Perp-Neg (`train_step_perpneg`),
    /// `floor(delta_t + w (delta_t_start - delta_t))` without (`train_step`).
    pub fn interval(&self, iteration: usize) -> usize {
        let w = self.warmup_rate(iteration);
        let (end, start) = (self.delta_t as f64, self.delta_t_start as f64);
        let interval = match self.perp_neg {
            Some(_) => end + (w * (start - end)).ceil(),
            None => (end + w * (start - end)).floor(),
        };
        interval as usize
    }

    /// The indices `t` is drawn from at `iteration`:
    /// `[t_range.0, t_range.1 + floor((max_t - t_range.1) w))`.
    pub fn timestep_range(&self, iteration: usize) -> Range<usize> {
        let warmup = self.max_t.saturating_sub(self.t_range.1) as f64;
        self.t_range.0..self.t_range.1 + (warmup * self.warmup_rate(iteration)) as usize
    }

    /// Checks the options against a schedule of `timesteps` indices, index `i` being timestep
    /// `timestep_of(i)`.
    fn validate(&self, timesteps: usize, timestep_of: impl Fn(usize) -> usize) -> Result<()> {
        for (name, value) in [("guidance_scale", self.guidance_scale), ("grad_scale", self.grad_scale)] {
            if !value.is_finite() {
                return Err(Error::setting(name, value, "must be a finite number"));
            }
        }
        let (low, high) = self.t_range;
        if low >= high {
            return Err(Error::setting("t_range", format!("{low}..{high}"), "must be a non-empty range of timesteps"));
        }
        if self.max_t < high || self.max_t > timesteps || timestep_of(self.max_t - 1) >= timesteps {
            return Err(Error::setting(
                "max_t",
                self.max_t,
                format!(
                    "must lie between t_range's end ({high}) and the schedule's {timesteps} timesteps (LucidDreamer: 980)"
                ),
            ));
        }
        for (name, value) in [("xs_delta_t", self.xs_delta_t), ("xs_inv_steps", self.xs_inv_steps)] {
            if value == 0 || value > timesteps {
                return Err(Error::setting(name, value, format!("must be between 1 and {timesteps}")));
            }
        }
        if let Some(perp_neg) = &self.perp_neg {
            for (name, value) in [
                ("perp_neg.negative_weight", perp_neg.negative_weight),
                ("perp_neg.front_decay", perp_neg.front_decay),
                ("perp_neg.side_decay", perp_neg.side_decay),
            ] {
                if !value.is_finite() {
                    return Err(Error::setting(name, value, "must be a finite number"));
                }
            }
        }
        Ok(())
    }
}

/// Perp-Neg (arXiv 2304.04968) as LucidDreamer weighs it: the view prompts that a camera should
/// not show are negated, perpendicular to the positive one, with weights decaying away from the
/// views where they apply (`arguments/__init__.py`: `negative_w`, `front_decay_factor`,
/// `side_decay_factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerpNeg {
    pub negative_weight: f64,
    pub front_decay: f64,
    pub side_decay: f64,
}

impl Default for PerpNeg {
    fn default() -> Self {
        Self { negative_weight: -2.0, front_decay: 2.0, side_decay: 10.0 }
    }
}

/// One of the three view prompts, `"{prompt}, front view"` and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Front,
    Side,
    Back,
}

impl View {
    /// What `train.py::prepare_embeddings` appends to the prompt.
    pub fn suffix(self) -> &'static str {
        match self {
            View::Front => "front view",
            View::Side => "side view",
            View::Back => "back view",
        }
    }
}

/// The positive prompt of a camera: the text features `r * from + (1 - r) * to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewBlend {
    pub from: View,
    pub to: View,
    pub r: f64,
}

/// The blend of a camera at `azimuth` degrees (0 = front, in [-180, 180]): in the front half
/// (`-90 <= azimuth < 90`) front to side with `r = 1 - |azimuth| / 90`, behind it side to back
/// with `r = 2 - |azimuth| / 90` (`train.py::get_pos_neg_text_embeddings`).
pub fn view_blend(azimuth: f64) -> ViewBlend {
    if (-90.0..90.0).contains(&azimuth) {
        let r = if azimuth >= 0.0 { 1.0 - azimuth / 90.0 } else { 1.0 + azimuth / 90.0 };
        ViewBlend { from: View::Front, to: View::Side, r }
    } else {
        let r = if azimuth >= 0.0 { 1.0 - (azimuth - 90.0) / 90.0 } else { 1.0 + (azimuth + 90.0) / 90.0 };
        ViewBlend { from: View::Side, to: View::Back, r }
    }
}

impl PerpNeg {
    /// The two negated view prompts of a camera at `azimuth` degrees and their weights, in
    /// LucidDreamer's order. With `r` of [`view_blend`] and `n` = `negative_weight`:
    /// front half: front `0 if r > 0.8 else n exp(-r front_decay)`, side
    /// `0 if r < 0.2 else n exp(-(1 - r) side_decay)`; back half: side
    /// `0 if r > 0.8 else n exp(-r side_decay) / 2`, front `n`.
    pub fn negatives(&self, azimuth: f64) -> [(View, f64); 2] {
        let ViewBlend { from, r, .. } = view_blend(azimuth);
        let n = self.negative_weight;
        if from == View::Front {
            let front = if r > 0.8 { 0.0 } else { (-r * self.front_decay).exp() * n };
            let side = if r < 0.2 { 0.0 } else { (-(1.0 - r) * self.side_decay).exp() * n };
            [(View::Front, front), (View::Side, side)]
        } else {
            let side = if r > 0.8 { 0.0 } else { (-r * self.side_decay).exp() * n / 2.0 };
            [(View::Side, side), (View::Front, n)]
        }
    }
}

/// The random draws of one step; public so that a test can fix them.
#[derive(Debug, Clone)]
pub struct IsmDraws {
    /// Index of `t` in the schedule.
    pub ind_t: usize,
    /// Index of `s`: `max(ind_t - interval, 0)`.
    pub ind_prev_t: usize,
    /// (B, 4, h, w) f32: standard normal plus 0.1 times a standard normal shared by the batch,
    /// one value per channel (offset noise).
    pub noise: Tensor,
    /// (B, 4, h, w) f32: the standard normal noise of the VAE posterior's sample.
    pub vae_noise: Tensor,
    /// Whether the renders are flipped horizontally before encoding.
    pub flip: bool,
}

/// The result of one step.
#[derive(Debug)]
pub struct IsmStep {
    /// `sum(latents * grad)`, a scalar in the images' dtype whose gradient with respect to the
    /// latents is [`IsmStep::latents_grad`]: its backward reaches the images.
    pub loss: Tensor,
    /// (B, 4, h, w) in the images' dtype: the ISM gradient injected at the latents.
    pub latents_grad: Tensor,
    /// The timesteps (not indices) of the step.
    pub t: usize,
    pub s: usize,
    /// The L2 norm of `latents_grad`.
    pub grad_norm: f64,
}

/// ISM guidance from a frozen Stable Diffusion: the prompt features, computed once, and the
/// DDIM schedule.
pub struct IsmGuidance<'a> {
    sd: &'a StableDiffusion,
    options: IsmOptions,
    /// Text features (1, 77, hidden) in the models' dtype: the unconditional branch.
    negative: Tensor,
    /// The inversion's prompt.
    inverse: Tensor,
    /// `"{prompt}, front view"`, `"side view"`, `"back view"`.
    views: [Tensor; 3],
    /// `abar` and `add_noise`.
    schedule: Ddpm,
    /// Every training timestep, noisiest first.
    ddim: Ddim,
}

impl<'a> IsmGuidance<'a> {
    /// Encodes the prompts (identities fill `v1* v2*`, ... wherever a prompt has them) and
    /// checks the options; refuses models that do not predict the noise.
    pub fn new(
        sd: &'a StableDiffusion,
        prompt: &str,
        negative_prompt: &str,
        identities: &[Identity],
        options: IsmOptions,
    ) -> Result<Self> {
        sd.configs().validate(sd.model_name())?;
        let scheduler = sd.scheduler_config();
        let ddim = Ddim::every_training_timestep(scheduler)?;
        let timesteps = ddim.timesteps().len();
        options.validate(timesteps, |index| timestep_at(&ddim, index))?;
        let encode = |text: &str| encode_prompt(sd, text, identities);
        let view = |view: View| encode(&format!("{prompt}, {}", view.suffix()));
        Ok(Self {
            sd,
            negative: encode(negative_prompt)?,
            inverse: encode(&options.inverse_prompt)?,
            views: [view(View::Front)?, view(View::Side)?, view(View::Back)?],
            schedule: Ddpm::new(scheduler)?,
            ddim,
            options,
        })
    }

    pub fn options(&self) -> &IsmOptions {
        &self.options
    }

    /// The timestep of schedule index `index` (below the schedule's length, 1000).
    pub fn timestep(&self, index: usize) -> usize {
        timestep_at(&self.ddim, index)
    }

    /// The random draws of one step at `iteration` for `batch` views of `latent_hw` latents:
    /// `ind_t` uniform in [`IsmOptions::timestep_range`], `s` [`IsmOptions::interval`] before it
    /// (at least 0), the offset noise, the posterior's noise and the flip (probability 1/2).
    pub fn draw(
        &self,
        batch: usize,
        latent_hw: (usize, usize),
        iteration: usize,
        rng: &mut impl Rng,
    ) -> Result<IsmDraws> {
        let device = self.sd.device();
        let (h, w) = latent_hw;
        let configs = self.sd.configs();
        let channels = configs.unet.in_channels;
        let ind_t = rng.random_range(self.options.timestep_range(iteration));
        let ind_prev_t = ind_t.saturating_sub(self.options.interval(iteration));
        let noise = standard_normal((batch, channels, h, w), rng, device)?;
        let offset = (standard_normal((1, channels, 1, 1), rng, device)? * 0.1)?;
        let noise = noise.broadcast_add(&offset)?;
        let vae_noise = standard_normal((batch, configs.vae.latent_channels, h, w), rng, device)?;
        let flip = rng.random_bool(0.5);
        Ok(IsmDraws { ind_t, ind_prev_t, noise, vae_noise, flip })
    }

    /// One ISM step on `images` (B, 3, H, W) in [0, 1] (renders, differentiable), seen from
    /// `azimuths` (degrees, one per view, 0 = front, in [-180, 180]), with `draws`: the loss
    /// whose gradient is the ISM gradient.
    pub fn step(&self, images: &Tensor, azimuths: &[f64], draws: &IsmDraws) -> Result<IsmStep> {
        // 1. Check the inputs.
        self.check(images, azimuths, draws)?;
        let (t, s) = (self.timestep(draws.ind_t), self.timestep(draws.ind_prev_t));
        let batch = azimuths.len();

        // 2. Encode the renders; the graph runs back to them through the VAE encoder.
        let latents = self.encode(images, draws)?;
        let clean = latents.detach();

        // 3. x_s by DDIM inversion with the inverse prompt, from add_noise at the start index.
        let inverse = self.inverse.repeat((batch, 1, 1))?;
        let x_s = self.invert_to_s(&clean, &draws.noise, draws.ind_prev_t, &inverse)?;

        // 4. One step s -> t; the prediction at (x_s, s) is the target.
        let target = self.unet(&x_s, s, &inverse)?;
        let x_t = self.ddim.step_to(&target, s, Some(t), &x_s)?;

        // 5. The guided prediction at (x_t, t).
        let pred = self.guided_prediction(&x_t, t, azimuths)?;

        // 6. grad = nan_to_num(grad_scale w(t) (pred - target)), w(t) = sqrt((1 - abar_t) / abar_t).
        let abar = self.schedule.alphas_cumprod()[t];
        let weight = ((1.0 - abar) / abar).sqrt();
        let grad = ((pred - target)? * f64::from(weight))?;
        let grad = nan_to_num(&(grad * self.options.grad_scale)?)?;
        let grad_norm = grad.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        let dtype = images.dtype();
        let loss = (latents * &grad)?.sum_all()?.to_dtype(dtype)?;
        Ok(IsmStep { loss, latents_grad: grad.to_dtype(dtype)?, t, s, grad_norm })
    }

    fn check(&self, images: &Tensor, azimuths: &[f64], draws: &IsmDraws) -> Result<()> {
        let dims = images.dims();
        let &[batch, 3, height, width] = dims else {
            return Err(Error::Input(format!("ISM: images must be (batch, 3, height, width), got {dims:?}")));
        };
        if azimuths.len() != batch {
            return Err(Error::setting(
                "azimuths",
                format!("{} values", azimuths.len()),
                format!("give one per image ({batch})"),
            ));
        }
        if let Some(bad) = azimuths.iter().find(|a| !(-180.0..=180.0).contains(*a)) {
            return Err(Error::setting("azimuths", bad, "must lie in [-180, 180] degrees (0 = front)"));
        }
        let configs = self.sd.configs();
        let factor = configs.latent_factor();
        if batch == 0 || !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
            return Err(Error::Input(format!(
                "ISM: images of {width} x {height} pixels (batch {batch}): need at least one image, sides multiples of {factor}"
            )));
        }
        let latent_dims = [batch, configs.unet.in_channels, height / factor, width / factor];
        for (name, tensor) in [("noise", &draws.noise), ("vae_noise", &draws.vae_noise)] {
            if tensor.dims() != latent_dims {
                return Err(Error::setting(
                    name,
                    format!("{:?}", tensor.dims()),
                    format!("{width} x {height} images need latents of shape {latent_dims:?}"),
                ));
            }
        }
        let (ind_t, ind_prev_t) = (draws.ind_t, draws.ind_prev_t);
        if ind_t >= self.options.max_t {
            return Err(Error::setting("ind_t", ind_t, format!("must be below max_t ({})", self.options.max_t)));
        }
        if ind_prev_t > ind_t {
            return Err(Error::setting("ind_prev_t", ind_prev_t, format!("must not exceed ind_t ({ind_t})")));
        }
        Ok(())
    }

    /// `scaling * sample(VAE(2 x - 1))` of the (flipped) images, f32 (B, 4, h, w); the models
    /// run in their dtype.
    fn encode(&self, images: &Tensor, draws: &IsmDraws) -> Result<Tensor> {
        let images = if draws.flip { flip_width(images)? } else { images.clone() };
        let dtype = self.sd.dtype();
        let vae = self.sd.vae();
        let posterior = vae.encode(&((images * 2.0)? - 1.0)?.to_dtype(dtype)?)?;
        let sample = posterior.sample(&draws.vae_noise.to_dtype(dtype)?)?;
        Ok((sample.to_dtype(DType::F32)? * vae.config().scaling_factor)?)
    }

    /// `add_noise_with_cfg` for `x_s`: from `add_noise(clean, noise)` at index
    /// `max(ind_s - xs_delta_t xs_inv_steps, 0)`, eta-0 DDIM inversion steps of `xs_delta_t`
    /// (the last one shorter) up to `ind_s`, each a UNet call on the inverse prompt. At `ind_s`
    /// 0 that is one step of length 0, as there.
    fn invert_to_s(&self, clean: &Tensor, noise: &Tensor, ind_s: usize, inverse: &Tensor) -> Result<Tensor> {
        let IsmOptions { xs_delta_t, xs_inv_steps, .. } = self.options;
        let mut index = ind_s.saturating_sub(xs_delta_t.saturating_mul(xs_inv_steps));
        let batch = clean.dim(0)?;
        let mut x = self.schedule.add_noise(clean, noise, &vec![self.timestep(index); batch])?;
        for _ in 0..xs_inv_steps {
            let eps = self.unet(&x, self.timestep(index), inverse)?;
            let next = (index + xs_delta_t).min(ind_s);
            x = self.ddim.step_to(&eps, self.timestep(index), Some(self.timestep(next)), &x)?;
            index = next;
            if index == ind_s {
                break;
            }
        }
        Ok(x)
    }

    /// `uncond + guidance_scale * delta` at `(x_t, t)` from one UNet call on the batch
    /// `[negative x B, positive_b, (first negative_b, second negative_b)]`; with Perp-Neg
    /// `delta = sum_k w_kb perp(delta_kb, delta_b) + delta_b`, `delta_b` the positive's
    /// difference to the unconditional prediction
    /// (`perpneg_utils.py::weighted_perpendicular_aggregator`).
    fn guided_prediction(&self, x_t: &Tensor, t: usize, azimuths: &[f64]) -> Result<Tensor> {
        let batch = azimuths.len();
        let mut contexts = vec![self.negative.clone(); batch];
        for &azimuth in azimuths {
            contexts.push(self.blend(view_blend(azimuth))?);
        }
        let negatives: Vec<[(View, f64); 2]> = match &self.options.perp_neg {
            Some(perp_neg) => azimuths.iter().map(|&azimuth| perp_neg.negatives(azimuth)).collect(),
            None => Vec::new(),
        };
        let mut weights = Vec::new();
        if !negatives.is_empty() {
            for k in 0..2 {
                contexts.extend(negatives.iter().map(|pair| self.view(pair[k].0).clone()));
                // LucidDreamer skips the weights it deems zero.
                let column: Vec<f32> =
                    negatives.iter().map(|pair| if pair[k].1.abs() > 1e-4 { pair[k].1 as f32 } else { 0.0 }).collect();
                weights.push(Tensor::from_vec(column, (batch, 1, 1, 1), x_t.device())?);
            }
        }
        let groups = contexts.len() / batch;
        let input = x_t.repeat((groups, 1, 1, 1))?;
        let out = self.unet(&input, t, &Tensor::cat(&contexts, 0)?)?;
        let uncond = out.narrow(0, 0, batch)?;
        let delta = (out.narrow(0, batch, batch)? - &uncond)?;
        let delta = if weights.is_empty() {
            delta
        } else {
            let mut accumulated = delta.zeros_like()?;
            for (k, weight) in weights.iter().enumerate() {
                let delta_k = (out.narrow(0, (2 + k) * batch, batch)? - &uncond)?;
                accumulated = (accumulated + perpendicular(&delta_k, &delta)?.broadcast_mul(weight)?)?;
            }
            (accumulated + delta)?
        };
        Ok((uncond + (delta * self.options.guidance_scale)?)?)
    }

    /// The text features of a view prompt.
    fn view(&self, view: View) -> &Tensor {
        &self.views[view as usize]
    }

    /// `r * from + (1 - r) * to` of the view prompts' features (in f32, then the models' dtype).
    fn blend(&self, blend: ViewBlend) -> Result<Tensor> {
        let from = self.view(blend.from).to_dtype(DType::F32)?;
        let to = self.view(blend.to).to_dtype(DType::F32)?;
        Ok(((from * blend.r)? + (to * (1.0 - blend.r))?)?.to_dtype(self.sd.dtype())?)
    }

    /// The UNet's noise prediction (f32) for `x` at one `timestep` for the whole batch.
    fn unet(&self, x: &Tensor, timestep: usize, context: &Tensor) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let timesteps = Tensor::full(timestep as f32, batch, x.device())?;
        let out = self.sd.unet().forward(&x.to_dtype(self.sd.dtype())?, &timesteps, context)?;
        Ok(out.to_dtype(DType::F32)?)
    }
}

/// LucidDreamer's `self.timesteps[index]`: the DDIM timesteps over every training timestep,
/// least noisy first.
fn timestep_at(ddim: &Ddim, index: usize) -> usize {
    let timesteps = ddim.timesteps();
    timesteps[timesteps.len() - 1 - index]
}

/// `x - (<x, y> / max(|y|^2, 1e-6)) y` per sample, over all of a sample's values
/// (`perpneg_utils.py::get_perpendicular_component`); `x`, `y` (B, C, h, w).
fn perpendicular(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let per_sample = |t: Tensor| -> candle_core::Result<Tensor> { t.flatten_from(1)?.sum_keepdim(D::Minus1) };
    let dot = per_sample((x * y)?)?;
    let norm = per_sample(y.sqr()?)?.clamp(1e-6, f64::INFINITY)?;
    let coefficient = (dot / norm)?.unsqueeze(2)?.unsqueeze(3)?;
    Ok((x - y.broadcast_mul(&coefficient)?)?)
}

/// `torch.nan_to_num`: NaN to 0, infinities to the largest finite values.
fn nan_to_num(x: &Tensor) -> Result<Tensor> {
    let is_nan = x.ne(x)?;
    let finite = is_nan.where_cond(&x.zeros_like()?, x)?;
    Ok(finite.clamp(f32::MIN, f32::MAX)?)
}

/// `x` (B, C, H, W) mirrored left to right; differentiable.
fn flip_width(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(3)?;
    let reversed: Vec<u32> = (0..width as u32).rev().collect();
    Ok(x.index_select(&Tensor::new(reversed, x.device())?, 3)?)
}
