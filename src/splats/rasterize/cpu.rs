//! The tile rasterizer on the CPU: forward compositing and its backward, in f64, one rayon task
//! per 16x16 tile.
//!
//! Follows Inria's `diff-gaussian-rasterization` (`forward.cu` `renderCUDA`, `backward.cu`
//! `renderCUDA`): per pixel, front to back over the tile's depth-sorted Gaussians,
//! `alpha = min(0.99, o exp(power))`, Gaussians with `alpha < 1/255` skipped, compositing stopped
//! before the transmittance would fall below `1e-4`; the backward walks the same list back to
//! front, recovering each transmittance by division by `1 - alpha`. Deviation: the gradient of
//! `min(0.99, .)` is zero where the clamp holds (Inria's passes it through), as autograd and
//! finite differences have it.

use rayon::prelude::*;

use super::{Layout as Row, Settings, CHANNELS, ROW};

pub(super) const TILE: usize = 16;
const MAX_ALPHA: f64 = 0.99;
const MIN_ALPHA: f64 = 1.0 / 255.0;
const MIN_TRANSMITTANCE: f64 = 1e-4;

/// The Gaussians of each tile, front to back, and what the backward needs of the forward.
pub(super) struct Forward {
    /// Output `[CHANNELS, height, width]`: colour, depth, final transmittance.
    pub image: Vec<f64>,
    tiles: Vec<Vec<u32>>,
    /// Per pixel, how many entries of its tile's list the compositing went through.
    last_contributor: Vec<u32>,
    /// Per Gaussian, its pixel radius (0: culled).
    pub radii: Vec<u32>,
}

/// A Gaussian's radius in pixels (3 sigma of its 2D covariance, the inverse of its conic) and
/// tile rectangle `[x0, x1) x [y0, y1)`, or `None` if it is culled.
fn footprint(g: &[f64], settings: &Settings) -> Option<(u32, [usize; 4])> {
    let depth = g[Row::DEPTH];
    let (a, b, c) = (g[Row::CONIC], g[Row::CONIC + 1], g[Row::CONIC + 2]);
    if !(depth > settings.near) || g.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let det_conic = a * c - b * b;
    if det_conic <= 0.0 {
        return None;
    }
    let (cov_xx, cov_xy, cov_yy) = (c / det_conic, -b / det_conic, a / det_conic);
    let det = cov_xx * cov_yy - cov_xy * cov_xy;
    let mid = 0.5 * (cov_xx + cov_yy);
    let largest_eigenvalue = mid + (mid * mid - det).max(0.1).sqrt();
    let radius = (3.0 * largest_eigenvalue.sqrt()).ceil();
    // Inria's pixel coordinates put pixel centres at integers; ours at +0.5.
    let (x, y) = (g[Row::MEAN] - 0.5, g[Row::MEAN + 1] - 0.5);
    let grid = [settings.width.div_ceil(TILE) as f64, settings.height.div_ceil(TILE) as f64];
    let tile = |v: f64, limit: f64| (v / TILE as f64).floor().clamp(0.0, limit) as usize;
    let rect = [
        tile(x - radius, grid[0]),
        tile(x + radius + (TILE - 1) as f64, grid[0]),
        tile(y - radius, grid[1]),
        tile(y + radius + (TILE - 1) as f64, grid[1]),
    ];
    (rect[0] < rect[1] && rect[2] < rect[3] && radius > 0.0).then_some((radius as u32, rect))
}

/// Bins the Gaussians into tiles and sorts each tile's list by depth (ties by index).
fn bin(params: &[f64], settings: &Settings) -> (Vec<Vec<u32>>, Vec<u32>) {
    let tiles_x = settings.width.div_ceil(TILE);
    let tiles_y = settings.height.div_ceil(TILE);
    let footprints: Vec<_> = params.par_chunks(ROW).map(|g| footprint(g, settings)).collect();
    let mut tiles = vec![Vec::new(); tiles_x * tiles_y];
    let mut radii = vec![0; footprints.len()];
    for (index, footprint) in footprints.iter().enumerate() {
        if let Some((radius, [x0, x1, y0, y1])) = *footprint {
            radii[index] = radius;
            for ty in y0..y1 {
                for tx in x0..x1 {
                    tiles[ty * tiles_x + tx].push(index as u32);
                }
            }
        }
    }
    let depth = |i: u32| params[i as usize * ROW + Row::DEPTH];
    tiles.par_iter_mut().for_each(|list| list.sort_by(|&i, &j| depth(i).total_cmp(&depth(j)).then(i.cmp(&j))));
    (tiles, radii)
}

/// The pixel rectangle of tile `index`: `(x0, x1, y0, y1)`.
fn tile_pixels(index: usize, settings: &Settings) -> (usize, usize, usize, usize) {
    let tiles_x = settings.width.div_ceil(TILE);
    let (x0, y0) = ((index % tiles_x) * TILE, (index / tiles_x) * TILE);
    (x0, (x0 + TILE).min(settings.width), y0, (y0 + TILE).min(settings.height))
}

/// `(alpha, exp(power), power derivative inputs dx, dy)` of Gaussian `g` at pixel centre
/// `(px, py)`, or `None` where it is skipped.
#[inline]
fn alpha_at(g: &[f64], px: f64, py: f64) -> Option<(f64, f64, f64, f64)> {
    let dx = g[Row::MEAN] - px;
    let dy = g[Row::MEAN + 1] - py;
    let (a, b, c) = (g[Row::CONIC], g[Row::CONIC + 1], g[Row::CONIC + 2]);
    let power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy;
    if power > 0.0 {
        return None;
    }
    let gauss = power.exp();
    let alpha = (g[Row::OPACITY] * gauss).min(MAX_ALPHA);
    (alpha >= MIN_ALPHA).then_some((alpha, gauss, dx, dy))
}

pub(super) fn forward(params: &[f64], settings: &Settings) -> Forward {
    let (width, height) = (settings.width, settings.height);
    let (tiles, radii) = bin(params, settings);
    let rendered: Vec<(Vec<[f64; CHANNELS]>, Vec<u32>)> = tiles
        .par_iter()
        .enumerate()
        .map(|(tile, list)| {
            let (x0, x1, y0, y1) = tile_pixels(tile, settings);
            let mut pixels = Vec::with_capacity((x1 - x0) * (y1 - y0));
            let mut last = Vec::with_capacity(pixels.capacity());
            for y in y0..y1 {
                for x in x0..x1 {
                    let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                    let (mut color, mut depth, mut transmittance, mut contributed) = ([0.0; 3], 0.0, 1.0, 0);
                    for (n, &index) in list.iter().enumerate() {
                        let g = &params[index as usize * ROW..][..ROW];
                        let Some((alpha, ..)) = alpha_at(g, px, py) else { continue };
                        let next = transmittance * (1.0 - alpha);
                        if next < MIN_TRANSMITTANCE {
                            break;
                        }
                        let weight = alpha * transmittance;
                        for (ch, value) in color.iter_mut().enumerate() {
                            *value += g[Row::COLOR + ch] * weight;
                        }
                        depth += g[Row::DEPTH] * weight;
                        transmittance = next;
                        contributed = n as u32 + 1;
                    }
                    let bg = settings.background;
                    pixels.push([
                        color[0] + transmittance * bg[0],
                        color[1] + transmittance * bg[1],
                        color[2] + transmittance * bg[2],
                        depth,
                        transmittance,
                    ]);
                    last.push(contributed);
                }
            }
            (pixels, last)
        })
        .collect();
    let plane = width * height;
    let mut image = vec![0.0; CHANNELS * plane];
    let mut last_contributor = vec![0; plane];
    for (tile, (pixels, last)) in rendered.into_iter().enumerate() {
        let (x0, x1, y0, y1) = tile_pixels(tile, settings);
        let coords = (y0..y1).flat_map(|y| (x0..x1).map(move |x| y * width + x));
        for ((pixel, values), contributed) in coords.zip(pixels).zip(last) {
            for (ch, value) in values.into_iter().enumerate() {
                image[ch * plane + pixel] = value;
            }
            last_contributor[pixel] = contributed;
        }
    }
    Forward { image, tiles, last_contributor, radii }
}

/// The gradient of the loss with respect to `params` (`[N, ROW]`), given its gradient with
/// respect to the forward's output image (`[CHANNELS, height, width]`).
pub(super) fn backward(params: &[f64], settings: &Settings, forward: &Forward, grad_image: &[f64]) -> Vec<f64> {
    let width = settings.width;
    let plane = width * settings.height;
    let bg = settings.background;
    // Per tile, the gradient of each entry of its list; summed per Gaussian afterwards, in a
    // fixed order so that results do not depend on the thread count.
    let per_tile: Vec<Vec<f64>> = forward
        .tiles
        .par_iter()
        .enumerate()
        .map(|(tile, list)| {
            let mut grads = vec![0.0; list.len() * ROW];
            let (x0, x1, y0, y1) = tile_pixels(tile, settings);
            for y in y0..y1 {
                for x in x0..x1 {
                    let pixel = y * width + x;
                    let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                    let grad_color = [grad_image[pixel], grad_image[plane + pixel], grad_image[2 * plane + pixel]];
                    let grad_depth = grad_image[3 * plane + pixel];
                    let grad_final_t = grad_image[4 * plane + pixel];
                    let final_t = forward.image[4 * plane + pixel];
                    // What the background and the transmittance output make of the final T.
                    let grad_final = final_t
                        * (bg[0] * grad_color[0] + bg[1] * grad_color[1] + bg[2] * grad_color[2] + grad_final_t);
                    let mut transmittance = final_t;
                    // Colour and depth composited behind the current Gaussian (without background).
                    let (mut behind_color, mut behind_depth) = ([0.0; 3], 0.0);
                    for n in (0..forward.last_contributor[pixel] as usize).rev() {
                        let g = &params[list[n] as usize * ROW..][..ROW];
                        let Some((alpha, gauss, dx, dy)) = alpha_at(g, px, py) else { continue };
                        transmittance /= 1.0 - alpha;
                        let weight = alpha * transmittance;
                        let grad = &mut grads[n * ROW..][..ROW];
                        let mut grad_alpha = 0.0;
                        for ch in 0..3 {
                            grad[Row::COLOR + ch] += weight * grad_color[ch];
                            grad_alpha += (g[Row::COLOR + ch] * transmittance
                                - behind_color[ch] / (1.0 - alpha))
                                * grad_color[ch];
                            behind_color[ch] += g[Row::COLOR + ch] * weight;
                        }
                        grad[Row::DEPTH] += weight * grad_depth;
                        grad_alpha += (g[Row::DEPTH] * transmittance - behind_depth / (1.0 - alpha)) * grad_depth;
                        behind_depth += g[Row::DEPTH] * weight;
                        grad_alpha -= grad_final / (1.0 - alpha);
                        if g[Row::OPACITY] * gauss >= MAX_ALPHA {
                            continue;
                        }
                        grad[Row::OPACITY] += gauss * grad_alpha;
                        // d alpha / d power = alpha.
                        let grad_power = alpha * grad_alpha;
                        let (a, b, c) = (g[Row::CONIC], g[Row::CONIC + 1], g[Row::CONIC + 2]);
                        grad[Row::MEAN] -= grad_power * (a * dx + b * dy);
                        grad[Row::MEAN + 1] -= grad_power * (c * dy + b * dx);
                        grad[Row::CONIC] -= 0.5 * grad_power * dx * dx;
                        grad[Row::CONIC + 1] -= grad_power * dx * dy;
                        grad[Row::CONIC + 2] -= 0.5 * grad_power * dy * dy;
                    }
                }
            }
            grads
        })
        .collect();
    let mut grads = vec![0.0; params.len()];
    for (list, tile_grads) in forward.tiles.iter().zip(per_tile) {
        for (&index, grad) in list.iter().zip(tile_grads.chunks(ROW)) {
            for (sum, g) in grads[index as usize * ROW..][..ROW].iter_mut().zip(grad) {
                *sum += g;
            }
        }
    }
    grads
}
