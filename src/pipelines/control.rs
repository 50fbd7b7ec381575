//! ControlNet guidance for text-to-image, as diffusers' `StableDiffusionControlNetPipeline`
//! (`pipelines/controlnet/pipeline_controlnet.py`) and `MultiControlNetModel` do it.
//!
//! - The control image is made RGB and resized to the output size with PIL's Lanczos filter
//!   (diffusers' `VaeImageProcessor` with `do_normalize=False`), then scaled to [0, 1]. Without a
//!   given size the output takes the (first) control image's, each side rounded down to a
//!   multiple of 8. One deviation: diffusers resizes before converting to RGB, so a transparent
//!   image is resampled with premultiplied alpha there; here the alpha is dropped first.
//! - Step `i` of `n` uses a ControlNet only while `i / n >= start` and `(i + 1) / n <= end`
//!   (`controlnet_keep`); its residuals are scaled by its `scale`. Several ControlNets' residuals
//!   are summed.
//! - Guess mode with classifier-free guidance runs the ControlNets on the conditional half only
//!   and adds nothing to the unconditional half.
//!
//! A ControlNet that a step does not use is not run at all: diffusers runs it and multiplies its
//! residuals by 0, which adds exact zeros.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::models::controlnet::{ChannelOrder, ControlNetModel, ControlScale};
use crate::models::unet::AdditionalResiduals;
use crate::priors::photo::{load_image_with_digest, resize, rgb_to_tensor, Filter, Weights};
use crate::{Error, Result};

/// How strongly a ControlNet steers unless told otherwise (diffusers' `controlnet_conditioning_scale`).
pub const DEFAULT_CONTROL_SCALE: f64 = 1.0;

/// A control image as read, before it is resized to the output.
#[derive(Debug, Clone)]
pub struct ControlImage {
    pub rgb: image::RgbImage,
    /// Where it came from (a path), for the metadata.
    pub source: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

impl ControlImage {
    /// Reads an image file (EXIF orientation applied, made 8-bit RGB).
    pub fn read(path: &Path) -> Result<Self> {
        let (rgb, sha256) = load_image_with_digest(path, "control image")?;
        Ok(Self { rgb, source: path.display().to_string(), sha256 })
    }

    /// The output size (width, height) this image gives when none is asked for: its own, each side
    /// rounded down to a multiple of `multiple` (diffusers' `get_default_height_width`).
    pub fn default_size(&self, multiple: usize) -> (usize, usize) {
        let round = |side: u32| side as usize - side as usize % multiple;
        (round(self.rgb.width()), round(self.rgb.height()))
    }

    /// (1, 3, height, width) f32 in [0, 1] on the CPU: the image resized as diffusers' control
    /// image processor does (PIL Lanczos), each level divided by 255.
    pub fn to_tensor(&self, width: usize, height: usize) -> Result<Tensor> {
        let resized = resize(&self.rgb, width as u32, height as u32, Filter::Lanczos, Weights::Pil);
        Ok(rgb_to_tensor(&resized, |v| f32::from(v) / 255.0)?)
    }
}

/// Checks a ControlNet's scale and step window (`start` < `end` within [0, 1], as diffusers
/// requires): cheap, to run before any model loads.
pub fn check_control_settings(scale: f64, start: f64, end: f64) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::setting("control_scale", scale, "must be a finite number"));
    }
    if !(0.0..1.0).contains(&start) {
        return Err(Error::setting("control_start", start, "must be at least 0 and below 1"));
    }
    if !(end > start && end <= 1.0) {
        return Err(Error::setting("control_end", end, format!("must be above control_start ({start}) and at most 1")));
    }
    Ok(())
}

/// One ControlNet steering a generation.
#[derive(Debug, Clone)]
pub struct Control {
    pub controlnet: Arc<ControlNetModel>,
    /// What the user called the ControlNet (hub id or path), for the metadata.
    pub controlnet_name: String,
    /// (1, 3, height, width) RGB in [0, 1], the output's size ([`ControlImage::to_tensor`]).
    pub image: Tensor,
    pub image_source: String,
    pub image_sha256: String,
    /// Multiplies the residuals (diffusers' `controlnet_conditioning_scale`).
    pub scale: f64,
    /// The fraction of the steps at which the ControlNet starts and stops steering
    /// (`control_guidance_start` / `end`).
    pub start: f64,
    pub end: f64,
    /// The channel order the ControlNet is given the image in: its config's unless overridden.
    pub channel_order: ChannelOrder,
}

impl Control {
    /// `controlnet` steering with `image` at the output size `width` x `height`, at full strength
    /// over all steps, in the channel order of the ControlNet's config.
    pub fn new(
        controlnet: Arc<ControlNetModel>,
        controlnet_name: &str,
        image: &ControlImage,
        width: usize,
        height: usize,
    ) -> Result<Self> {
        let channel_order = controlnet.config().controlnet_conditioning_channel_order;
        Ok(Self {
            controlnet,
            controlnet_name: controlnet_name.to_string(),
            image: image.to_tensor(width, height)?,
            image_source: image.source.clone(),
            image_sha256: image.sha256.clone(),
            scale: DEFAULT_CONTROL_SCALE,
            start: 0.0,
            end: 1.0,
            channel_order,
        })
    }

    /// Checks the settings against the output size.
    pub(crate) fn validate(&self, width: usize, height: usize) -> Result<()> {
        check_control_settings(self.scale, self.start, self.end)?;
        if self.image.dims() != [1, 3, height, width] {
            return Err(Error::setting(
                "control_image",
                format!("{:?}", self.image.dims()),
                format!("must be prepared at the output size: (1, 3, {height}, {width})"),
            ));
        }
        Ok(())
    }

    /// Whether step `step` of `steps` uses this ControlNet (diffusers' `controlnet_keep`).
    pub fn steers_step(&self, step: usize, steps: usize) -> bool {
        let (begin, finish) = (step as f64 / steps as f64, (step + 1) as f64 / steps as f64);
        !(begin < self.start || finish > self.end)
    }

    /// The metadata of this control, as (key, value) text.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("controlnet", self.controlnet_name.clone()),
            ("control_image", format!("{} (sha256 {})", self.image_source, self.image_sha256)),
            ("control_scale", self.scale.to_string()),
            ("control_steps", format!("{}-{}", self.start, self.end)),
            ("control_channel_order", self.channel_order.to_string()),
        ]
    }
}

/// What the ControlNets see at each step: the images in the model's dtype, batched as the
/// UNet's input is.
pub(crate) struct ControlInputs<'a> {
    controls: &'a [Control],
    /// One per control: the image as the ControlNet is given it, batched.
    images: Vec<Tensor>,
    guess_mode: bool,
    guided: bool,
}

impl<'a> ControlInputs<'a> {
    /// `guess_mode` as asked for; a first ControlNet with `global_pool_conditions` implies it, as
    /// in diffusers.
    pub fn new(controls: &'a [Control], guess_mode: bool, guided: bool, device: &Device, dtype: DType) -> Result<Self> {
        let guess_mode = guess_mode || controls.first().is_some_and(|c| c.controlnet.config().global_pool_conditions);
        let images = controls
            .iter()
            .map(|control| {
                let mut image = control.image.to_device(device)?.to_dtype(dtype)?;
                // The model reverses the image itself when its config says `bgr`; another order
                // asked for is one more reversal.
                if control.channel_order != control.controlnet.config().controlnet_conditioning_channel_order {
                    image = image.index_select(&Tensor::new(&[2u32, 1, 0], image.device())?, 1)?;
                }
                // Guess mode with guidance runs the ControlNet on the conditional half only.
                if guided && !guess_mode {
                    image = Tensor::cat(&[&image, &image], 0)?;
                }
                Ok(image)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { controls, images, guess_mode, guided })
    }

    /// The summed residuals of the ControlNets steering step `step` of `steps`, for the UNet
    /// input `model_input` (the unconditional then the conditional half when guided) at
    /// `timesteps` with `context`; `None` when none steers this step.
    pub fn residuals(
        &self,
        step: usize,
        steps: usize,
        model_input: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Option<AdditionalResiduals>> {
        let conditional_only = self.guess_mode && self.guided;
        let (input, t, context) = if conditional_only {
            (model_input.narrow(0, 1, 1)?, timesteps.narrow(0, 1, 1)?, context.narrow(0, 1, 1)?)
        } else {
            (model_input.clone(), timesteps.clone(), context.clone())
        };
        let mut sum: Option<AdditionalResiduals> = None;
        for (control, image) in self.controls.iter().zip(&self.images) {
            if !control.steers_step(step, steps) {
                continue;
            }
            let scale = ControlScale { conditioning_scale: control.scale, guess_mode: self.guess_mode };
            let residuals = control.controlnet.forward(&input, &t, &context, image, scale)?;
            sum = Some(match sum {
                None => residuals,
                Some(sum) => AdditionalResiduals {
                    down: sum
                        .down
                        .iter()
                        .zip(&residuals.down)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                    mid: (sum.mid + residuals.mid)?,
                },
            });
        }
        let Some(sum) = sum else { return Ok(None) };
        if !conditional_only {
            return Ok(Some(sum));
        }
        // Nothing is added to the unconditional half.
        let with_zeros = |r: &Tensor| Tensor::cat(&[&r.zeros_like()?, r], 0);
        Ok(Some(AdditionalResiduals {
            down: sum.down.iter().map(with_zeros).collect::<candle_core::Result<_>>()?,
            mid: with_zeros(&sum.mid)?,
        }))
    }
}
