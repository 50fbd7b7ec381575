//! One training render as LucidDreamer makes it (`gaussian_renderer/__init__.py::render` with
//! training augmentations, `utils/loss_utils.py::tv_loss`): a background that is white, or with
//! probability `bg_aug_ratio` a random colour or black; scales with multiplicative noise; the
//! depth turned into a normalised disparity map.
//!
//! Deviation: LucidDreamer's disparity normalisation back-propagates through the minimum and the
//! maximum it divides by; here they are constants of the step (the map's gradient is that of the
//! disparity itself, scaled).

use candle_core::{DType, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::io::RgbImage;
use crate::splats::{render, Camera, Gaussians, Render, RenderOptions};
use crate::Result;

/// `sqrt(0.2) / 4`: the standard deviation of the scales' multiplicative noise.
const SCALE_NOISE: f64 = 0.111_803_398_874_989_48;
/// Transmittance at or below which a pixel counts as covered, for the disparity's minimum.
const COVERED: f64 = 0.1;

/// A view of the Gaussians as the outputs show them (previews, the turntable): in front of white.
pub fn view_image(gaussians: &Gaussians, camera: &Camera) -> Result<RgbImage> {
    render(gaussians, camera, &RenderOptions { background: [1.0; 3], ..RenderOptions::default() })?.rgb_image()
}

/// The colour behind a training render.
pub fn draw_background(augment_ratio: f64, rng: &mut impl Rng) -> [f64; 3] {
    if rng.random::<f64>() < augment_ratio {
        if rng.random::<f64>() < 0.5 {
            [0, 1, 2].map(|_| rng.random::<f64>())
        } else {
            [0.0; 3]
        }
    } else {
        [1.0; 3]
    }
}

/// A training render.
pub struct TrainingRender {
    /// `[3, size, size]` in [0, 1] (before clamping).
    pub color: Tensor,
    /// `[1, size, size]`: normalised disparity in [0, 1].
    pub disparity: Tensor,
    /// The noisy scales used (activated, `[N, 3]`): the scale loss's input.
    pub scales: Tensor,
    /// The render itself: its footprints carry the 2D gradients densification needs once the
    /// loss has been back-propagated.
    pub render: Render,
}

/// Renders `gaussians` from `camera` with noisy scales (`scales (1 + sqrt(0.2)/4 n)`, floored at
/// 0 as LucidDreamer clamps them) in front of `background`.
pub fn render_training_view(
    gaussians: &Gaussians,
    camera: &Camera,
    background: [f64; 3],
    rng: &mut impl Rng,
) -> Result<TrainingRender> {
    let n = gaussians.len()?;
    let noise: Vec<f32> = (0..n * 3)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            // A factor of 0 would make the log-scale -inf: keep it a tiny positive size.
            (1.0 + SCALE_NOISE * z).max(1e-6).ln() as f32
        })
        .collect();
    let device = gaussians.means.device();
    let noise = Tensor::from_vec(noise, (n, 3), device)?.to_dtype(gaussians.log_scales.dtype())?;
    let noisy = Gaussians { log_scales: (&gaussians.log_scales + noise)?, ..gaussians.clone() };
    let view = render(&noisy, camera, &RenderOptions { background, ..RenderOptions::default() })?;
    let disparity = disparity(&view.depth()?, &view.transmittance()?, camera.fov_x)?;
    Ok(TrainingRender { color: view.color()?, disparity, scales: noisy.log_scales.exp()?, render: view })
}

/// LucidDreamer's disparity: `focal / (depth + 10 T + 1e-5)` with `focal = 1 / (2 tan(fov_x / 2))`,
/// normalised by its minimum over covered pixels (T <= 0.1; over all when none is) and its
/// maximum, clamped to [0, 1].
pub fn disparity(depth: &Tensor, transmittance: &Tensor, fov_x: f64) -> Result<Tensor> {
    let focal = 1.0 / (2.0 * (fov_x / 2.0).tan());
    let raw = (((depth + (transmittance * 10.0)?)? + 1e-5)?.recip()? * focal)?;
    let values = raw.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let coverage = transmittance.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let covered_min =
        values.iter().zip(&coverage).filter(|(_, t)| **t <= COVERED).map(|(v, _)| *v).fold(f64::INFINITY, f64::min);
    let min = if covered_min.is_finite() { covered_min } else { values.iter().copied().fold(f64::INFINITY, f64::min) };
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (max - min).max(1e-12);
    Ok(((raw - min)? / span)?.clamp(0f32, 1f32)?)
}

/// LucidDreamer's total variation of `[B, C, H, W]`: `2 (mean of squared vertical differences +
/// mean of squared horizontal differences)`.
pub fn total_variation(x: &Tensor) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let vertical = (x.narrow(2, 1, height - 1)? - x.narrow(2, 0, height - 1)?)?.sqr()?.mean_all()?;
    let horizontal = (x.narrow(3, 1, width - 1)? - x.narrow(3, 0, width - 1)?)?.sqr()?.mean_all()?;
    Ok(((vertical + horizontal)? * 2.0)?)
}
