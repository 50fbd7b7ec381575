//! Fitting Gaussians to images seen from known cameras with an L1 loss: the plain 3DGS loop
//! (without its SSIM term), used by the tests and by `stableid splat-fit`.

use candle_core::Tensor;

use super::camera::{common_target, Camera};
use super::gaussians::Gaussians;
use super::train::{Densifier, DensifyOptions, LearningRates, SplatAdam};
use super::{render, RenderOptions};
use crate::{Error, Result};

/// How to fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    pub iterations: usize,
    pub rates: LearningRates,
    pub render: RenderOptions,
    /// Densification and pruning every `densify_every` iterations from `densify_from` until
    /// `densify_until`, opacity reset every `opacity_reset_every`; `None`: a fixed set.
    pub densify: Option<DensifyOptions>,
    pub densify_from: usize,
    pub densify_until: usize,
    pub densify_every: usize,
    pub opacity_reset_every: usize,
    pub seed: u64,
}

impl FitOptions {
    /// 3DGS's schedule scaled to `iterations` (its defaults: 30,000 iterations, densification
    /// from 500 to 15,000 every 100, opacity reset every 3,000); short runs densify no more often
    /// than every 10 iterations, so that the Gaussians move between two densifications.
    pub fn new(iterations: usize, extent: f64) -> Self {
        Self {
            iterations,
            rates: LearningRates::gaussian_splatting(extent, iterations),
            render: RenderOptions::default(),
            densify: Some(DensifyOptions::gaussian_splatting(extent)),
            densify_from: iterations / 60,
            densify_until: iterations / 2,
            densify_every: (iterations / 300).max(10),
            opacity_reset_every: (iterations / 10).max(1),
            seed: 0,
        }
    }
}

/// What a fit did.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// L1 loss per iteration.
    pub losses: Vec<f64>,
    /// Final number of Gaussians.
    pub count: usize,
}

/// Peak signal-to-noise ratio of `image` against `target` (values in `[0, 1]`), in dB.
pub fn psnr(image: &Tensor, target: &Tensor) -> Result<f64> {
    let mse = (image - target)?.sqr()?.mean_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    Ok(-10.0 * mse.max(1e-20).log10())
}

/// Fits `initial` to `views` (camera, `[3, height, width]` target), one view per iteration in
/// turn; `progress` is called after each iteration with its index and loss.
pub fn fit(
    initial: &Gaussians,
    views: &[(Camera, Tensor)],
    options: &FitOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<(Gaussians, FitReport)> {
    if views.is_empty() {
        return Err(Error::Input("fitting needs at least one view".into()));
    }
    for (camera, target) in views {
        if target.dims() != [3, camera.height, camera.width] {
            return Err(Error::Input(format!(
                "a target image has shape {:?}, its camera sees {}x{} (expected [3, height, width])",
                target.dims(),
                camera.width,
                camera.height
            )));
        }
    }
    let mut adam = SplatAdam::new(initial, options.rates)?;
    let mut densifier = options.densify.map(|d| Densifier::new(d, initial.len().unwrap_or(0), options.seed));
    let mut losses = Vec::with_capacity(options.iterations);
    for iteration in 0..options.iterations {
        let (camera, target) = &views[iteration % views.len()];
        let gaussians = adam.gaussians()?;
        let view = render(&gaussians, camera, &options.render)?;
        let loss = (view.color()? - target.to_dtype(view.image.dtype())?)?.abs()?.mean_all()?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Numeric(format!(
                "the loss became {value} at iteration {iteration}: lower the learning rates"
            )));
        }
        let grads = loss.backward()?;
        adam.step(&grads)?;
        losses.push(value);
        progress(iteration, value);
        let Some(densifier) = densifier.as_mut() else { continue };
        let step = iteration + 1;
        if step >= options.densify_until {
            continue;
        }
        densifier.record(&view.footprints(), camera.width, camera.height)?;
        if step > options.densify_from && step % options.densify_every == 0 {
            densifier.options.max_screen_size = (step > options.opacity_reset_every).then_some(20.0);
            densifier.densify_and_prune(&mut adam)?;
        }
        if step % options.opacity_reset_every == 0 {
            adam.reset_opacity(0.01)?;
        }
    }
    let gaussians = adam.gaussians()?;
    let count = gaussians.len()?;
    Ok((
        Gaussians::from_parts(gaussians.parts().into_iter().map(|t| t.detach()).collect())?,
        FitReport { losses, count },
    ))
}

/// A random starting cloud for fitting views of one object: `count` Gaussians uniform in the
/// largest ball around the point the cameras look at ([`common_target`]) that every camera sees
/// whole.
pub fn random_start(cameras: &[Camera], count: usize, seed: u64, device: &candle_core::Device) -> Result<Gaussians> {
    let target = common_target(cameras)?;
    let radius = cameras
        .iter()
        .map(|camera| {
            let position = camera.position();
            let distance = (0..3).map(|i| (position[i] - target[i]).powi(2)).sum::<f64>().sqrt();
            distance * (camera.fov_x.min(camera.fov_y) / 2.0).sin()
        })
        .fold(f64::INFINITY, f64::min);
    super::init::random_ball(count, target, radius, seed, device)
}
