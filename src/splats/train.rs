//! Optimising Gaussians as 3DGS does (`gaussian-splatting/scene/gaussian_model.py`,
//! `train.py`): Adam over six parameter groups with their own learning rates (the position's
//! decaying exponentially), densification by the accumulated 2D gradient of each Gaussian's
//! centre (clone the small, split the large), pruning and opacity reset.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::gaussians::Gaussians;
use super::rasterize::Footprints;
use crate::{Error, Result};

/// A learning rate moving from `start` to `end` log-linearly over `steps` steps, then staying
/// at `end` (3DGS `get_expon_lr_func` without its delay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialSchedule {
    pub start: f64,
    pub end: f64,
    pub steps: usize,
}

impl ExponentialSchedule {
    pub fn constant(rate: f64) -> Self {
        Self { start: rate, end: rate, steps: 1 }
    }

    pub fn at(&self, step: usize) -> f64 {
        let t = (step as f64 / self.steps.max(1) as f64).clamp(0.0, 1.0);
        (self.start.ln() * (1.0 - t) + self.end.ln() * t).exp()
    }
}

/// The learning rate of each group, in the order of [`Gaussians::parts`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningRates {
    pub means: ExponentialSchedule,
    pub log_scales: ExponentialSchedule,
    pub rotations: ExponentialSchedule,
    pub opacity_logits: ExponentialSchedule,
    pub sh_dc: ExponentialSchedule,
    pub sh_rest: ExponentialSchedule,
}

impl LearningRates {
    /// 3DGS's defaults (`arguments/__init__.py`), the position's scaled by the scene extent.
    pub fn gaussian_splatting(extent: f64, steps: usize) -> Self {
        Self {
            means: ExponentialSchedule { start: 1.6e-4 * extent, end: 1.6e-6 * extent, steps },
            log_scales: ExponentialSchedule::constant(0.005),
            rotations: ExponentialSchedule::constant(0.001),
            opacity_logits: ExponentialSchedule::constant(0.025),
            sh_dc: ExponentialSchedule::constant(0.0025),
            sh_rest: ExponentialSchedule::constant(0.0025 / 20.0),
        }
    }

    fn of_group(&self, group: usize) -> ExponentialSchedule {
        [self.means, self.log_scales, self.rotations, self.opacity_logits, self.sh_dc, self.sh_rest][group]
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
/// 3DGS's Adam epsilon.
const EPSILON: f64 = 1e-15;

/// Adam over the Gaussian groups, with moments that follow the Gaussians through densification
/// and pruning (new Gaussians start with zero moments, as in 3DGS).
pub struct SplatAdam {
    vars: Vec<Var>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: usize,
    rates: LearningRates,
}

impl SplatAdam {
    /// Trainable copies of `gaussians`.
    pub fn new(gaussians: &Gaussians, rates: LearningRates) -> Result<Self> {
        gaussians.len()?;
        let vars = gaussians
            .parts()
            .into_iter()
            .map(|t| Var::from_tensor(&t.detach()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let zeros = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { first: zeros.clone(), second: zeros, vars, step: 0, rates })
    }

    /// The trainable Gaussians: render these, back-propagate, then call [`Self::step`].
    pub fn gaussians(&self) -> Result<Gaussians> {
        Gaussians::from_parts(self.vars.iter().map(|v| v.as_tensor().clone()).collect())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// Everything a checkpoint needs to continue exactly where this optimiser is.
    pub fn state(&self) -> SplatAdamState {
        SplatAdamState {
            values: self.vars.iter().map(|v| v.as_tensor().detach()).collect(),
            first: self.first.clone(),
            second: self.second.clone(),
            step: self.step,
        }
    }

    /// The optimiser of a [`Self::state`], with `rates`.
    pub fn from_state(state: SplatAdamState, rates: LearningRates) -> Result<Self> {
        let gaussians = Gaussians::from_parts(state.values)?;
        let count = gaussians.parts().len();
        let fits = |moments: &[Tensor]| {
            moments.len() == count && moments.iter().zip(gaussians.parts()).all(|(m, v)| m.dims() == v.dims())
        };
        if !fits(&state.first) || !fits(&state.second) {
            return Err(Error::Input("optimiser state: the moments do not match the Gaussians".into()));
        }
        let vars = gaussians.parts().into_iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, first: state.first, second: state.second, step: state.step, rates })
    }

    /// One Adam step on the gradients in `grads`; groups without a gradient stay as they are.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (correction1, correction2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for group in 0..self.vars.len() {
            let Some(grad) = grads.get(self.vars[group].as_tensor()) else { continue };
            let rate = self.rates.of_group(group).at(self.step - 1);
            self.first[group] = ((&self.first[group] * BETA1)? + (grad * (1.0 - BETA1))?)?;
            self.second[group] = ((&self.second[group] * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?;
            let denominator = ((&self.second[group] / correction2)?.sqrt()? + EPSILON)?;
            let update = ((&self.first[group] / correction1)? / denominator)?;
            let value = (self.vars[group].as_tensor() - (update * rate)?)?;
            self.vars[group].set(&value)?;
        }
        Ok(())
    }

    /// Keeps the Gaussians at `keep` (in that order), then appends `extension` with zero moments.
    pub fn replace(&mut self, keep: &[u32], extension: Option<&Gaussians>) -> Result<()> {
        let device = self.vars[0].device().clone();
        let index = Tensor::new(keep, &device)?;
        let extension_parts = extension.map(|g| g.parts());
        for group in 0..self.vars.len() {
            let select = |t: &Tensor| t.index_select(&index, 0);
            let (mut value, mut first, mut second) =
                (select(self.vars[group].as_tensor())?, select(&self.first[group])?, select(&self.second[group])?);
            if let Some(parts) = &extension_parts {
                let added = parts[group].to_dtype(value.dtype())?.to_device(&device)?;
                let zeros = added.zeros_like()?;
                value = Tensor::cat(&[&value, &added], 0)?;
                first = Tensor::cat(&[&first, &zeros], 0)?;
                second = Tensor::cat(&[&second, &zeros], 0)?;
            }
            self.vars[group] = Var::from_tensor(&value)?;
            self.first[group] = first;
            self.second[group] = second;
        }
        Ok(())
    }

    /// 3DGS's opacity reset: every opacity to at most `max_opacity`, their moments to zero.
    pub fn reset_opacity(&mut self, max_opacity: f64) -> Result<()> {
        const OPACITY: usize = 3;
        let logit = (max_opacity / (1.0 - max_opacity)).ln();
        let value = self.vars[OPACITY].as_tensor().minimum(logit)?;
        self.vars[OPACITY] = Var::from_tensor(&value)?;
        self.first[OPACITY] = value.zeros_like()?;
        self.second[OPACITY] = value.zeros_like()?;
        Ok(())
    }
}

/// What [`SplatAdam::state`] captures: per group (in the order of [`Gaussians::parts`]) the
/// values and Adam's two moments, and the steps taken.
pub struct SplatAdamState {
    pub values: Vec<Tensor>,
    pub first: Vec<Tensor>,
    pub second: Vec<Tensor>,
    pub step: usize,
}

/// 3DGS's densification settings (`OptimizationParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DensifyOptions {
    /// The scene's extent (3DGS: 1.1 x the largest camera distance from the cameras' centre).
    pub extent: f64,
    /// Mean 2D gradient norm (in Inria's normalised units, see [`Densifier::record`]) above
    /// which a Gaussian is cloned or split (3DGS: 0.0002).
    pub grad_threshold: f64,
    /// Gaussians larger than this fraction of the extent are split, smaller ones cloned (0.01).
    pub percent_dense: f64,
    /// Gaussians less opaque than this are pruned (0.005).
    pub min_opacity: f64,
    /// When set, Gaussians wider than this many pixels on screen, or larger than a tenth of the
    /// extent in the world, are pruned (3DGS: 20, after the first opacity reset).
    pub max_screen_size: Option<f64>,
}

impl DensifyOptions {
    pub fn gaussian_splatting(extent: f64) -> Self {
        Self { extent, grad_threshold: 0.0002, percent_dense: 0.01, min_opacity: 0.005, max_screen_size: None }
    }
}

/// The statistics densification accumulates between two densification steps.
pub struct Densifier {
    pub options: DensifyOptions,
    grad_sum: Vec<f64>,
    views: Vec<f64>,
    max_radius: Vec<f64>,
    rng: StdRng,
}

impl Densifier {
    pub fn new(options: DensifyOptions, count: usize, seed: u64) -> Self {
        Self {
            options,
            grad_sum: vec![0.0; count],
            views: vec![0.0; count],
            max_radius: vec![0.0; count],
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The accumulated statistics, per Gaussian: summed 2D gradient norms, views counted, largest
    /// screen radius (for a checkpoint).
    pub fn statistics(&self) -> [&[f64]; 3] {
        [&self.grad_sum, &self.views, &self.max_radius]
    }

    /// Puts back statistics of [`Self::statistics`].
    pub fn restore_statistics(&mut self, statistics: [Vec<f64>; 3]) -> Result<()> {
        let [grad_sum, views, max_radius] = statistics;
        if grad_sum.len() != views.len() || views.len() != max_radius.len() {
            return Err(Error::Input("densification statistics of different lengths".into()));
        }
        (self.grad_sum, self.views, self.max_radius) = (grad_sum, views, max_radius);
        Ok(())
    }

    /// Restarts the random samples of splits from `seed` (a resumable run reseeds before each
    /// densification, so that its samples do not depend on where it was interrupted).
    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Adds one back-propagated view: the norm of each drawn Gaussian's 2D gradient, in Inria's
    /// units (pixels scaled by half the image size, as its `means2D` are normalised device
    /// coordinates), and its largest radius.
    pub fn record(&mut self, footprints: &Footprints, width: usize, height: usize) -> Result<()> {
        let grads = footprints
            .mean_grads
            .as_ref()
            .ok_or_else(|| Error::Internal("densification statistics recorded before the backward pass".into()))?;
        if grads.len() != self.grad_sum.len() || footprints.radii.len() != self.grad_sum.len() {
            return Err(Error::Internal("densification statistics for another number of Gaussians".into()));
        }
        for (i, (&radius, grad)) in footprints.radii.iter().zip(grads).enumerate() {
            if radius > 0 {
                let (gx, gy) = (grad[0] * width as f64 / 2.0, grad[1] * height as f64 / 2.0);
                self.grad_sum[i] += (gx * gx + gy * gy).sqrt();
                self.views[i] += 1.0;
                self.max_radius[i] = self.max_radius[i].max(radius as f64);
            }
        }
        Ok(())
    }

    /// Clones and splits the Gaussians whose mean 2D gradient reached the threshold, prunes the
    /// transparent (and, with `max_screen_size`, the oversized) ones, and restarts the
    /// statistics. Returns the new count.
    pub fn densify_and_prune(&mut self, adam: &mut SplatAdam) -> Result<usize> {
        let o = self.options;
        let g = adam.gaussians()?;
        let n = g.len()?;
        let cpu = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
            let t = t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
            Ok(if t.rank() == 1 {
                t.to_vec1::<f64>()?.into_iter().map(|v| vec![v]).collect()
            } else {
                t.flatten_from(1)?.to_vec2::<f64>()?
            })
        };
        let (means, log_scales, rotations, opacities) =
            (cpu(&g.means)?, cpu(&g.log_scales)?, cpu(&g.rotations)?, cpu(&g.opacity_logits)?);
        let max_scale = |i: usize| log_scales[i].iter().cloned().fold(f64::MIN, f64::max).exp();
        let dense_size = o.percent_dense * o.extent;
        let selected = |i: usize| self.views[i] > 0.0 && self.grad_sum[i] / self.views[i] >= o.grad_threshold;
        let clones: Vec<u32> =
            (0..n).filter(|&i| selected(i) && max_scale(i) <= dense_size).map(|i| i as u32).collect();
        let splits: Vec<usize> = (0..n).filter(|&i| selected(i) && max_scale(i) > dense_size).collect();
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let pruned = |i: usize| {
            let small = sigmoid(opacities[i][0]) < o.min_opacity;
            let big =
                o.max_screen_size.is_some_and(|limit| self.max_radius[i] > limit || max_scale(i) > 0.1 * o.extent);
            small || big
        };
        // Split: two samples from each large Gaussian, 1.6 times smaller (3DGS: N = 2, / (0.8 N)).
        const SAMPLES: usize = 2;
        let mut split_means = Vec::new();
        let mut split_sources = Vec::new();
        for &i in &splits {
            let rotation = quaternion_matrix(&rotations[i]);
            for _ in 0..SAMPLES {
                let local: Vec<f64> = (0..3)
                    .map(|k| {
                        let z: f64 = StandardNormal.sample(&mut self.rng);
                        log_scales[i][k].exp() * z
                    })
                    .collect();
                split_means
                    .extend((0..3).map(|r| means[i][r] + (0..3).map(|c| rotation[r][c] * local[c]).sum::<f64>()));
                split_sources.push(i as u32);
            }
        }
        // New Gaussians: the clones, then the split samples; originals that split go.
        let dtype = g.means.dtype();
        let device = g.means.device().clone();
        let mut sources = clones.clone();
        sources.extend(&split_sources);
        let extension = if sources.is_empty() {
            None
        } else {
            let index = Tensor::new(sources.as_slice(), &device)?;
            let mut parts: Vec<Tensor> = g
                .parts()
                .into_iter()
                .map(|t| t.detach().index_select(&index, 0))
                .collect::<candle_core::Result<_>>()?;
            if !split_sources.is_empty() {
                let c = clones.len();
                let count = split_sources.len();
                let new_means =
                    Tensor::from_vec(split_means, (count, 3), &Device::Cpu)?.to_dtype(dtype)?.to_device(&device)?;
                parts[0] = Tensor::cat(&[&parts[0].narrow(0, 0, c)?, &new_means], 0)?;
                let shrunk = (parts[1].narrow(0, c, count)? - (0.8 * SAMPLES as f64).ln())?;
                parts[1] = Tensor::cat(&[&parts[1].narrow(0, 0, c)?, &shrunk], 0)?;
            }
            Some(Gaussians::from_parts(parts)?)
        };
        let mut split_mask = vec![false; n];
        for &i in &splits {
            split_mask[i] = true;
        }
        let keep: Vec<u32> = (0..n).filter(|&i| !split_mask[i] && !pruned(i)).map(|i| i as u32).collect();
        // Newly added Gaussians are pruned by opacity too (their statistics are empty).
        let extension = match extension {
            Some(ext) => {
                let opacity = ext.opacity_logits.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec1::<f64>()?;
                let kept: Vec<u32> =
                    (0..opacity.len()).filter(|&j| sigmoid(opacity[j]) >= o.min_opacity).map(|j| j as u32).collect();
                let index = Tensor::new(kept.as_slice(), &device)?;
                (!kept.is_empty())
                    .then(|| {
                        Gaussians::from_parts(
                            ext.parts()
                                .into_iter()
                                .map(|t| t.index_select(&index, 0))
                                .collect::<candle_core::Result<_>>()?,
                        )
                    })
                    .transpose()?
            }
            None => None,
        };
        adam.replace(&keep, extension.as_ref())?;
        let count = adam.gaussians()?.len()?;
        if count == 0 {
            return Err(Error::Numeric(
                "densification pruned every Gaussian: lower min_opacity or check the inputs".into(),
            ));
        }
        self.grad_sum = vec![0.0; count];
        self.views = vec![0.0; count];
        self.max_radius = vec![0.0; count];
        Ok(count)
    }
}

/// The rotation matrix of quaternion `(w, x, y, z)`, normalised.
fn quaternion_matrix(q: &[f64]) -> [[f64; 3]; 3] {
    let norm = q.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    let [w, x, y, z] = [q[0] / norm, q[1] / norm, q[2] / norm, q[3] / norm];
    [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
}
