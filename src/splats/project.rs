//! From 3D Gaussians and a camera to the rasterizer's per-Gaussian rows, in ordinary
//! (differentiable) candle ops.
//!
//! The maths of gsplat's `_torch_impl.py` (`_quat_scale_to_covar_preci`, `_world_to_cam`,
//! `_persp_proj`, `_fully_fused_projection`) and of Inria's `computeCov3D` / `computeCov2D` /
//! `computeColorFromSH`: `Sigma = R S S^T R^T`; view-space `t = W mu + t_view`; `t.x / t.z` and
//! `t.y / t.z` clamped to `1.3 tan(fov / 2)` inside the Jacobian
//! `J = [[fx/tz, 0, -fx tx/tz^2], [0, fy/tz, -fy ty/tz^2]]`; `Sigma_2D = J W Sigma W^T J^T + 0.3 I`;
//! colour `max(SH . basis(dir) + 0.5, 0)` with `dir` from the camera centre to the mean.
//! Gaussians at or before the near plane get a placeholder depth of 1 in these formulas (so no
//! division by zero reaches the gradients) and are culled by the rasterizer, which sees their
//! true depth.

use candle_core::Tensor;

use super::camera::Camera;
use super::gaussians::Gaussians;
use super::rasterize::ROW;
use crate::Result;

pub const SH_C0: f64 = 0.282_094_791_773_878_14;
const SH_C1: f64 = 0.488_602_511_902_919_9;
const SH_C2: [f64; 5] = [
    1.092_548_430_592_079_2,
    -1.092_548_430_592_079_2,
    0.315_391_565_252_520_05,
    -1.092_548_430_592_079_2,
    0.546_274_215_296_039_6,
];
const SH_C3: [f64; 7] = [
    -0.590_043_589_926_643_5,
    2.890_611_442_640_554,
    -0.457_045_799_464_465_8,
    0.373_176_332_590_115_4,
    -0.457_045_799_464_465_8,
    1.445_305_721_320_277,
    -0.590_043_589_926_643_5,
];
/// The variance added to each 2D covariance's diagonal (Inria: at least one pixel wide).
pub const LOW_PASS: f64 = 0.3;
/// How far beyond the image (as a multiple of `tan(fov / 2)`) the Jacobian's position is clamped.
const FOV_CLAMP: f64 = 1.3;

/// Column `i` of `t` (`[N, C]`) as `[N]`.
fn col(t: &Tensor, i: usize) -> Result<Tensor> {
    Ok(t.narrow(1, i, 1)?.squeeze(1)?)
}

/// `sum_k c_k t_k` over `[N]` tensors.
fn combine(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut sum = terms[0].1.affine(terms[0].0, 0.0)?;
    for (c, t) in &terms[1..] {
        sum = (sum + t.affine(*c, 0.0)?)?;
    }
    Ok(sum)
}

/// The view-space 3D covariance of each Gaussian as `A A^T`, with `A = W R S` (`[3][3]` of
/// `[N]`): `W` the camera rotation, `R` from the normalised quaternion, `S` the scales.
fn view_factor(gaussians: &Gaussians, camera: &Camera) -> Result<[[Tensor; 3]; 3]> {
    let q = &gaussians.rotations;
    let q = q.broadcast_div(&q.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let [w, x, y, z] = [0, 1, 2, 3].map(|i| col(&q, i));
    let (w, x, y, z) = (w?, x?, y?, z?);
    let one = w.ones_like()?;
    let rot = [
        [
            combine(&[(1.0, &one), (-2.0, &(y.sqr()? + z.sqr()?)?)])?,
            combine(&[(2.0, &(&x * &y)?), (-2.0, &(&w * &z)?)])?,
            combine(&[(2.0, &(&x * &z)?), (2.0, &(&w * &y)?)])?,
        ],
        [
            combine(&[(2.0, &(&x * &y)?), (2.0, &(&w * &z)?)])?,
            combine(&[(1.0, &one), (-2.0, &(x.sqr()? + z.sqr()?)?)])?,
            combine(&[(2.0, &(&y * &z)?), (-2.0, &(&w * &x)?)])?,
        ],
        [
            combine(&[(2.0, &(&x * &z)?), (-2.0, &(&w * &y)?)])?,
            combine(&[(2.0, &(&y * &z)?), (2.0, &(&w * &x)?)])?,
            combine(&[(1.0, &one), (-2.0, &(x.sqr()? + y.sqr()?)?)])?,
        ],
    ];
    let scales = gaussians.log_scales.exp()?;
    let scales = [col(&scales, 0)?, col(&scales, 1)?, col(&scales, 2)?];
    let view = &camera.rotation;
    let mut factor: Vec<[Tensor; 3]> = Vec::with_capacity(3);
    for row in view {
        let entry = |j: usize| -> Result<Tensor> {
            let rotated = combine(&[(row[0], &rot[0][j]), (row[1], &rot[1][j]), (row[2], &rot[2][j])])?;
            Ok((rotated * &scales[j])?)
        };
        factor.push([entry(0)?, entry(1)?, entry(2)?]);
    }
    Ok(factor.try_into().expect("three rows"))
}

/// Colours `[N, 3]` from the spherical harmonics, seen from the camera centre.
fn colors(gaussians: &Gaussians, camera: &Camera) -> Result<Tensor> {
    let mut color = gaussians.sh_dc.affine(SH_C0, 0.0)?;
    if let Some(rest) = &gaussians.sh_rest {
        let centre = Tensor::new(&camera.position(), rest.device())?.to_dtype(rest.dtype())?;
        let dir = gaussians.means.broadcast_sub(&centre)?;
        let dir = dir.broadcast_div(&dir.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let (x, y, z) = (col(&dir, 0)?, col(&dir, 1)?, col(&dir, 2)?);
        let (xx, yy, zz) = (x.sqr()?, y.sqr()?, z.sqr()?);
        let (xy, yz, xz) = ((&x * &y)?, (&y * &z)?, (&x * &z)?);
        let mut basis = vec![y.affine(-SH_C1, 0.0)?, z.affine(SH_C1, 0.0)?, x.affine(-SH_C1, 0.0)?];
        if rest.dims()[1] >= 8 {
            basis.extend([
                xy.affine(SH_C2[0], 0.0)?,
                yz.affine(SH_C2[1], 0.0)?,
                combine(&[(2.0 * SH_C2[2], &zz), (-SH_C2[2], &xx), (-SH_C2[2], &yy)])?,
                xz.affine(SH_C2[3], 0.0)?,
                combine(&[(SH_C2[4], &xx), (-SH_C2[4], &yy)])?,
            ]);
        }
        if rest.dims()[1] >= 15 {
            basis.extend([
                (&y * combine(&[(3.0 * SH_C3[0], &xx), (-SH_C3[0], &yy)])?)?,
                (&xy * &z)?.affine(SH_C3[1], 0.0)?,
                (&y * combine(&[(4.0 * SH_C3[2], &zz), (-SH_C3[2], &xx), (-SH_C3[2], &yy)])?)?,
                (&z * combine(&[(2.0 * SH_C3[3], &zz), (-3.0 * SH_C3[3], &xx), (-3.0 * SH_C3[3], &yy)])?)?,
                (&x * combine(&[(4.0 * SH_C3[4], &zz), (-SH_C3[4], &xx), (-SH_C3[4], &yy)])?)?,
                (&z * combine(&[(SH_C3[5], &xx), (-SH_C3[5], &yy)])?)?,
                (&x * combine(&[(SH_C3[6], &xx), (-3.0 * SH_C3[6], &yy)])?)?,
            ]);
        }
        // [N, K, 1] * [N, K, 3] summed over K.
        let basis = Tensor::stack(&basis, 1)?.unsqueeze(2)?;
        color = (color + rest.broadcast_mul(&basis)?.sum(1)?)?;
    }
    Ok((color + 0.5)?.relu()?)
}

/// The rasterizer's rows `[N, ROW]` (see [`super::rasterize::Layout`]) for `gaussians` seen by
/// `camera`; Gaussians with a view depth at or below `near` are marked for culling.
pub fn project(gaussians: &Gaussians, camera: &Camera, near: f64) -> Result<Tensor> {
    gaussians.len()?;
    let means = &gaussians.means;
    let t_view = &camera.translation;
    let r = &camera.rotation;
    let [mx, my, mz] = [0, 1, 2].map(|i| col(means, i));
    let (mx, my, mz) = (mx?, my?, mz?);
    let view = |i: usize| -> Result<Tensor> {
        Ok(combine(&[(r[i][0], &mx), (r[i][1], &my), (r[i][2], &mz)])?.affine(1.0, t_view[i])?)
    };
    let (tx, ty, depth) = (view(0)?, view(1)?, view(2)?);
    let visible = depth.gt(near)?;
    let tz = visible.where_cond(&depth, &depth.ones_like()?)?;
    let (fx, fy) = camera.focal();
    let (cx, cy) = (camera.width as f64 / 2.0, camera.height as f64 / 2.0);
    let lim_x = FOV_CLAMP * (camera.fov_x / 2.0).tan();
    let lim_y = FOV_CLAMP * (camera.fov_y / 2.0).tan();
    let tx_clamped = ((&tx / &tz)?.clamp(-lim_x, lim_x)? * &tz)?;
    let ty_clamped = ((&ty / &tz)?.clamp(-lim_y, lim_y)? * &tz)?;
    let inv_z = tz.recip()?;
    let inv_z2 = inv_z.sqr()?;
    // J = [[fx/tz, 0, -fx tx/tz^2], [0, fy/tz, -fy ty/tz^2]]; B = J A, Sigma_2D = B B^T.
    let j02 = (tx_clamped * &inv_z2)?.affine(-fx, 0.0)?;
    let j12 = (ty_clamped * &inv_z2)?.affine(-fy, 0.0)?;
    let j00 = inv_z.affine(fx, 0.0)?;
    let j11 = inv_z.affine(fy, 0.0)?;
    let a = view_factor(gaussians, camera)?;
    let mut b0 = Vec::with_capacity(3);
    let mut b1 = Vec::with_capacity(3);
    for ((a0, a1), a2) in a[0].iter().zip(&a[1]).zip(&a[2]) {
        b0.push(((&j00 * a0)? + (&j02 * a2)?)?);
        b1.push(((&j11 * a1)? + (&j12 * a2)?)?);
    }
    let dot = |u: &[Tensor], v: &[Tensor]| -> Result<Tensor> {
        Ok(((&u[0] * &v[0])? + (&u[1] * &v[1])? + (&u[2] * &v[2])?)?)
    };
    let cov_xx = (dot(&b0, &b0)? + LOW_PASS)?;
    let cov_xy = dot(&b0, &b1)?;
    let cov_yy = (dot(&b1, &b1)? + LOW_PASS)?;
    let det = ((&cov_xx * &cov_yy)? - cov_xy.sqr()?)?;
    let conic = [(&cov_yy / &det)?, (cov_xy.neg()? / &det)?, (&cov_xx / &det)?];
    let mean_x = (&tx * &inv_z)?.affine(fx, cx)?;
    let mean_y = (&ty * &inv_z)?.affine(fy, cy)?;
    let opacity = candle_nn::ops::sigmoid(&gaussians.opacity_logits)?;
    let color = colors(gaussians, camera)?;
    let columns = [
        mean_x,
        mean_y,
        conic[0].clone(),
        conic[1].clone(),
        conic[2].clone(),
        opacity,
        col(&color, 0)?,
        col(&color, 1)?,
        col(&color, 2)?,
        depth,
    ];
    debug_assert_eq!(columns.len(), ROW);
    Ok(Tensor::stack(&columns, 1)?)
}
