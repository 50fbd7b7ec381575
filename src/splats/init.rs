//! Starting clouds, set up as 3DGS sets up Gaussians from points (`GaussianModel.create_from_pcd`):
//! each point a Gaussian with the colour given, opacity 0.1, no rotation, and an isotropic size
//! of the root mean squared distance to its three nearest neighbours (Inria's `simple-knn`
//! `distCUDA2`, floored at `1e-7` squared). Where no points are given, random ones: uniform in a
//! ball (3DGS's synthetic scenes start from a random cube), or in a head-shaped ellipsoid for
//! text-to-3D of a person (LucidDreamer starts heads from Point-E, which is not part of this project).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::camera::Vec3;
use super::gaussians::Gaussians;
use crate::{Error, Result};

/// 3DGS's initial opacity.
const INITIAL_OPACITY: f64 = 0.1;
/// `simple-knn`'s floor on the mean squared neighbour distance.
const MIN_MEAN_SQUARED_DISTANCE: f64 = 1e-7;

/// Gaussians at `points` with colours `colors` (RGB in `[0, 1]`, one per point), as 3DGS
/// initialises them.
pub fn from_points(points: &[Vec3], colors: &[Vec3], device: &Device) -> Result<Gaussians> {
    if points.is_empty() {
        return Err(Error::Input("a starting cloud needs at least one point".into()));
    }
    if colors.len() != points.len() {
        return Err(Error::Internal(format!("{} points but {} colours", points.len(), colors.len())));
    }
    if points.iter().flatten().chain(colors.iter().flatten()).any(|v| !v.is_finite()) {
        return Err(Error::Input("a starting point or colour is NaN or infinite".into()));
    }
    let n = points.len();
    let log_scales: Vec<f32> = mean_squared_neighbour_distances(points)
        .into_iter()
        .flat_map(|d2| [(0.5 * d2.max(MIN_MEAN_SQUARED_DISTANCE).ln()) as f32; 3])
        .collect();
    let opacity_logit = (INITIAL_OPACITY / (1.0 - INITIAL_OPACITY)).ln() as f32;
    let flat = |rows: &[Vec3], map: fn(f64) -> f64| rows.iter().flatten().map(|&v| map(v) as f32).collect::<Vec<_>>();
    Ok(Gaussians {
        means: Tensor::from_vec(flat(points, |v| v), (n, 3), device)?,
        log_scales: Tensor::from_vec(log_scales, (n, 3), device)?,
        rotations: Tensor::from_vec([1f32, 0.0, 0.0, 0.0].repeat(n), (n, 4), device)?,
        opacity_logits: Tensor::full(opacity_logit, n, device)?,
        sh_dc: Tensor::from_vec(flat(colors, Gaussians::rgb_to_sh), (n, 3), device)?,
        sh_rest: None,
    })
}

/// `count` Gaussians uniform in the ball of `radius` around `centre`, with colours near grey
/// (3DGS's random start uses `SH2RGB(random / 255)`, i.e. 0.5 to 0.51).
pub fn random_ball(count: usize, centre: Vec3, radius: f64, seed: u64, device: &Device) -> Result<Gaussians> {
    random_ellipsoid(count, centre, [radius; 3], seed, device)
}

/// `count` Gaussians uniform in the axis-aligned ellipsoid of `semi_axes` around `centre`, with
/// colours near grey as [`random_ball`]'s.
pub fn random_ellipsoid(count: usize, centre: Vec3, semi_axes: Vec3, seed: u64, device: &Device) -> Result<Gaussians> {
    if count == 0 {
        return Err(Error::setting("points", 0, "start from at least one Gaussian"));
    }
    if semi_axes.iter().any(|a| !(a.is_finite() && *a > 0.0)) || centre.iter().any(|c| !c.is_finite()) {
        return Err(Error::Input(format!(
            "a random starting cloud needs a finite centre and positive size (got {centre:?}, {semi_axes:?})"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut points = Vec::with_capacity(count);
    while points.len() < count {
        let unit: Vec3 = [0, 1, 2].map(|_| rng.random_range(-1.0..1.0));
        if unit.iter().map(|v| v * v).sum::<f64>() <= 1.0 {
            points.push([0, 1, 2].map(|i| centre[i] + semi_axes[i] * unit[i]));
        }
    }
    let colors: Vec<Vec3> = (0..count).map(|_| [0, 1, 2].map(|_| 0.5 + rng.random::<f64>() / 255.0)).collect();
    from_points(&points, &colors, device)
}

/// For each point, the mean squared distance to its three nearest other points (fewer when the
/// cloud has fewer; 0 for a lone point), found on a uniform grid of about two points per cell.
pub fn mean_squared_neighbour_distances(points: &[Vec3]) -> Vec<f64> {
    const NEIGHBOURS: usize = 3;
    let (low, high) = points.iter().fold(([f64::INFINITY; 3], [f64::NEG_INFINITY; 3]), |(lo, hi), p| {
        ([0, 1, 2].map(|i| lo[i].min(p[i])), [0, 1, 2].map(|i| hi[i].max(p[i])))
    });
    let volume: f64 = (0..3).map(|i| (high[i] - low[i]).max(1e-9)).product();
    let cell = (2.0 * volume / points.len() as f64).cbrt().max(1e-9);
    let key = |p: &Vec3| [0, 1, 2].map(|i| ((p[i] - low[i]) / cell).floor() as i64);
    let mut grid: HashMap<[i64; 3], Vec<usize>> = HashMap::new();
    for (index, p) in points.iter().enumerate() {
        grid.entry(key(p)).or_default().push(index);
    }
    let wanted = NEIGHBOURS.min(points.len() - 1);
    // The search never needs more rings than there are cells across the cloud.
    let max_ring = (0..3).map(|i| ((high[i] - low[i]) / cell).ceil() as i64).max().unwrap_or(0) + 1;
    points
        .par_iter()
        .enumerate()
        .map(|(index, p)| {
            if wanted == 0 {
                return 0.0;
            }
            let home = key(p);
            let mut nearest: Vec<f64> = Vec::with_capacity(wanted + 1);
            for ring in 0..=max_ring {
                for dx in -ring..=ring {
                    for dy in -ring..=ring {
                        for dz in -ring..=ring {
                            if dx.abs().max(dy.abs()).max(dz.abs()) != ring {
                                continue;
                            }
                            let Some(members) = grid.get(&[home[0] + dx, home[1] + dy, home[2] + dz]) else { continue };
                            for &other in members.iter().filter(|&&o| o != index) {
                                let q = &points[other];
                                let d2 = (0..3).map(|i| (p[i] - q[i]).powi(2)).sum::<f64>();
                                let at = nearest.partition_point(|&v| v <= d2);
                                if at < wanted {
                                    nearest.insert(at, d2);
                                    nearest.truncate(wanted);
                                }
                            }
                        }
                    }
                }
                // Points in the next ring lie at least `ring` cells away.
                let reach = ring as f64 * cell;
                if nearest.len() == wanted && nearest[wanted - 1] <= reach * reach {
                    break;
                }
            }
            nearest.iter().sum::<f64>() / wanted as f64
        })
        .collect()
}
