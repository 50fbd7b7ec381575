//! The cameras LucidDreamer trains and shows a head with (`scene/dataset_readers.py`
//! `rand_poses`, `GenerateRandomCameras`, `GenerateCircleCameras`; the progressive widening in
//! `train.py`), with the ranges of StableIdentity's `configs/stableid.yaml`.
//!
//! The world is z-up and every camera looks at the origin (jittered). A camera at polar angle
//! `theta` (from +z) and azimuth `phi` sits at `r (sin theta sin phi, sin theta cos phi, cos theta)`:
//! azimuth 0 looks at the front of the head from +y. Deviation: LucidDreamer builds its rotation
//! from an up vector that is jittered after orthogonalisation (so slightly non-orthonormal); here
//! the jittered up goes through [`Camera::look_at`], which orthonormalises it.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::splats::{Camera, CameraJson, Vec3};
use crate::Result;

/// How far each camera is moved at random (`jitter_center`, `jitter_target`, `jitter_up`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Jitter {
    /// The centre moves uniformly within +-half this along each axis.
    pub center: f64,
    /// The target is drawn from a normal distribution of this standard deviation per axis.
    pub target: f64,
    /// Normal noise of this standard deviation added to the up vector.
    pub up: f64,
}

/// The ranges training cameras are drawn from, and how they widen as training goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CameraRanges {
    /// Distance from the origin.
    pub radius: [f64; 2],
    /// Polar angle from +z, degrees.
    pub theta: [f64; 2],
    /// Azimuth, degrees (0: the front, from +y).
    pub phi: [f64; 2],
    /// Field of view, radians (horizontal; the images are square).
    pub fov: [f64; 2],
    /// The bounds the widening stops at.
    pub max_radius: [f64; 2],
    pub max_theta: [f64; 2],
    pub max_phi: [f64; 2],
    pub max_fov: [f64; 2],
    /// Draws cluster towards the middle of each range as `u^gamma` (`rand_cam_gamma`).
    pub gamma: f64,
    pub jitter: Option<Jitter>,
    /// Cameras drawn at once, sharing one field of view (`ModelParams.batch`).
    pub batch: usize,
}

impl Default for CameraRanges {
    /// `configs/stableid.yaml` (LucidDreamer's head ranges) and LucidDreamer's defaults.
    fn default() -> Self {
        Self {
            radius: [5.2, 5.5],
            theta: [45.0, 90.0],
            phi: [-80.0, 80.0],
            fov: [0.32, 0.60],
            max_radius: [3.5, 5.0],
            max_theta: [45.0, 90.0],
            max_phi: [-180.0, 180.0],
            max_fov: [0.16, 0.60],
            gamma: 1.5,
            jitter: Some(Jitter { center: 0.05, target: 0.05, up: 0.01 }),
            batch: 10,
        }
    }
}

/// LucidDreamer's widening factors (`scale_up_factor`, `fovy_scale_up_factor`, `phi_scale_up_factor`).
const RADIUS_FACTOR: f64 = 0.95;
const FOV_FACTORS: [f64; 2] = [0.75, 1.1];
const ANGLE_FACTOR: f64 = 1.5;

/// One training camera and where it is on the sphere (the azimuth picks the Perp-Neg view prompts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingView {
    pub camera: CameraJson,
    /// Degrees in `(-180, 180]`, 0 at the front.
    pub azimuth: f64,
    /// Polar angle, degrees.
    pub polar: f64,
    pub radius: f64,
}

impl TrainingView {
    pub fn camera(&self) -> Result<Camera> {
        Camera::from_json(&self.camera)
    }
}

/// `lower + (upper - lower) / 2 (1 +- u^gamma)`: LucidDreamer's `gen_random_pos`.
fn draw(range: [f64; 2], gamma: f64, rng: &mut impl Rng) -> f64 {
    let (mid, half) = ((range[0] + range[1]) / 2.0, (range[1] - range[0]) / 2.0);
    let magnitude = rng.random::<f64>().powf(gamma);
    let sign = if rng.random::<f64>() > 0.5 { -1.0 } else { 1.0 };
    mid + sign * magnitude * half
}

fn normal(rng: &mut impl Rng) -> f64 {
    StandardNormal.sample(rng)
}

/// Where a camera is moved from its place on the sphere: its centre, its target (the origin)
/// and its up vector (+z) are offset by these.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CameraOffsets {
    pub eye: Vec3,
    pub target: Vec3,
    pub up: Vec3,
}

impl Jitter {
    /// LucidDreamer's draws: the centre uniform in a cube of side `center`, target and up normal.
    fn draw(&self, rng: &mut impl Rng) -> CameraOffsets {
        let eye = [0, 1, 2].map(|_| rng.random::<f64>() * self.center - self.center / 2.0);
        let target = [0, 1, 2].map(|_| normal(rng) * self.target);
        let up = [0, 1, 2].map(|_| normal(rng) * self.up);
        CameraOffsets { eye, target, up }
    }
}

/// The `size` x `size` camera at `radius`, `polar` and `azimuth` (degrees) looking at the origin,
/// moved by `offsets`; `fov` in radians.
pub fn head_camera(
    radius: f64,
    polar: f64,
    azimuth: f64,
    fov: f64,
    size: usize,
    offsets: &CameraOffsets,
) -> Result<Camera> {
    let (theta, phi) = (polar.to_radians(), azimuth.to_radians());
    let eye: Vec3 = [radius * theta.sin() * phi.sin(), radius * theta.sin() * phi.cos(), radius * theta.cos()];
    let eye = [0, 1, 2].map(|i| eye[i] + offsets.eye[i]);
    let up = [0, 1, 2].map(|i| f64::from(i == 2) + offsets.up[i]);
    Camera::look_at(eye, offsets.target, up, fov, size, size)
}

impl CameraRanges {
    /// LucidDreamer's progressive relaxation, applied at each widening iteration: the radius
    /// shrinks by 0.95, the field of view's bounds move by 0.75 and 1.1, and the angles widen by
    /// 1.5, each clamped to its `max_*` bound.
    pub fn widen(&mut self) {
        self.fov =
            [(self.fov[0] * FOV_FACTORS[0]).max(self.max_fov[0]), (self.fov[1] * FOV_FACTORS[1]).min(self.max_fov[1])];
        self.radius = [
            (self.radius[0] * RADIUS_FACTOR).max(self.max_radius[0]),
            (self.radius[1] * RADIUS_FACTOR).max(self.max_radius[1]),
        ];
        self.theta = [
            (self.theta[0] / ANGLE_FACTOR).max(self.max_theta[0]),
            (self.theta[1] * ANGLE_FACTOR).min(self.max_theta[1]),
        ];
        self.phi =
            [(self.phi[0] * ANGLE_FACTOR).max(self.max_phi[0]), (self.phi[1] * ANGLE_FACTOR).min(self.max_phi[1])];
    }

    /// Whether the ranges widen at `iteration` (1-based, as LucidDreamer counts): at each
    /// multiple of `every` from `from` on.
    pub fn widens_at(iteration: usize, from: usize, every: usize) -> bool {
        iteration >= from && iteration.is_multiple_of(every.max(1))
    }

    /// The ranges in force at `iteration`: widened at every iteration up to it where
    /// [`Self::widens_at`].
    pub fn at_iteration(&self, iteration: usize, from: usize, every: usize) -> Self {
        let mut ranges = self.clone();
        let widenings = (1..=iteration).filter(|&i| Self::widens_at(i, from, every)).count();
        for _ in 0..widenings {
            ranges.widen();
        }
        ranges
    }

    /// `batch` random cameras of `size` x `size` pixels sharing one field of view.
    pub fn sample(&self, size: usize, rng: &mut impl Rng) -> Result<Vec<TrainingView>> {
        let fov = self.fov[0] + rng.random::<f64>() * (self.fov[1] - self.fov[0]);
        (0..self.batch.max(1))
            .map(|id| {
                let radius = draw(self.radius, 1.0, rng);
                let polar = draw(self.theta, self.gamma, rng);
                let azimuth = draw(self.phi, self.gamma, rng);
                let offsets = self.jitter.map(|j| j.draw(rng)).unwrap_or_default();
                let camera = head_camera(radius, polar, azimuth, fov, size, &offsets)?;
                Ok(TrainingView { camera: camera.to_json(id, ""), azimuth: wrap_degrees(azimuth), polar, radius })
            })
            .collect()
    }
}

/// An angle in degrees brought into `(-180, 180]`.
pub fn wrap_degrees(angle: f64) -> f64 {
    let wrapped = angle.rem_euclid(360.0);
    if wrapped > 180.0 {
        wrapped - 360.0
    } else {
        wrapped
    }
}

/// LucidDreamer's video cameras (`GenerateCircleCameras`): `count` views around the head at its
/// default radius 3.5, polar angle 90 degrees and field of view 0.55 rad, the first from the front.
pub fn turntable(count: usize, size: usize) -> Result<Vec<Camera>> {
    const DEFAULT_RADIUS: f64 = 3.5;
    const DEFAULT_POLAR: f64 = 90.0;
    const DEFAULT_FOV: f64 = 0.55;
    (0..count)
        .map(|k| {
            head_camera(
                DEFAULT_RADIUS,
                DEFAULT_POLAR,
                360.0 * k as f64 / count as f64,
                DEFAULT_FOV,
                size,
                &CameraOffsets::default(),
            )
        })
        .collect()
}
