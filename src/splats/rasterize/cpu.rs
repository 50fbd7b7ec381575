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
    if g.iter().any(|v| !v.is_finite()) || depth <= settings.near {
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

/// A tile's Gaussians gathered in drawing order: each row followed by the power below which
/// its alpha is surely under 1/255, and the tile-local pixel box `[x0, x1) x [y0, y1)` outside
/// which it is (so that far pixels cost nothing).
const GATHERED: usize = ROW + 5;

fn gather(params: &[f64], list: &[u32], tile: (usize, usize, usize, usize)) -> Vec<f64> {
    let (tx0, tx1, ty0, ty1) = tile;
    let mut rows = Vec::with_capacity(list.len() * GATHERED);
    for &index in list {
        let g = &params[index as usize * ROW..][..ROW];
        rows.extend_from_slice(g);
        // o exp(power) < 1/255 <=> power < -ln(255 o); a margin keeps the exact test decisive.
        let limit = (255.0 * g[Row::OPACITY]).ln() + 1e-9;
        rows.push(-limit);
        // The ellipse power >= -limit spans sqrt(2 limit cov_ii) around the centre; pixel
        // centres are at +0.5, and one pixel of margin absorbs rounding.
        let (a, b, c) = (g[Row::CONIC], g[Row::CONIC + 1], g[Row::CONIC + 2]);
        let det = a * c - b * b;
        let span = |cov: f64| if limit > 0.0 { (2.0 * limit * cov).sqrt() } else { -1.0 };
        let (span_x, span_y) = (span(c / det), span(a / det));
        let range = |centre: f64, span: f64, low: usize, high: usize| {
            if span < 0.0 {
                return (0.0, 0.0);
            }
            let first = ((centre - span - 0.5).floor() - 1.0).max(low as f64).min(high as f64);
            let last = ((centre + span - 0.5).ceil() + 2.0).max(low as f64).min(high as f64);
            ((first - low as f64), (last - low as f64))
        };
        let (x0, x1) = range(g[Row::MEAN], span_x, tx0, tx1);
        let (y0, y1) = range(g[Row::MEAN + 1], span_y, ty0, ty1);
        rows.extend_from_slice(&[x0, x1, y0, y1]);
    }
    rows
}

/// The tile-local pixel box of a gathered Gaussian.
#[inline]
fn pixel_box(g: &[f64]) -> (usize, usize, usize, usize) {
    (g[ROW + 1] as usize, g[ROW + 2] as usize, g[ROW + 3] as usize, g[ROW + 4] as usize)
}

/// `(alpha, exp(power), power derivative inputs dx, dy)` of gathered Gaussian `g` at pixel
/// centre `(px, py)`, or `None` where it is skipped.
#[inline]
fn alpha_at(g: &[f64], px: f64, py: f64) -> Option<(f64, f64, f64, f64)> {
    let dx = g[Row::MEAN] - px;
    let dy = g[Row::MEAN + 1] - py;
    let (a, b, c) = (g[Row::CONIC], g[Row::CONIC + 1], g[Row::CONIC + 2]);
    let power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy;
    if power > 0.0 || power < g[ROW] {
        return None;
    }
    let gauss = power.exp();
    let alpha = (g[Row::OPACITY] * gauss).min(MAX_ALPHA);
    (alpha >= MIN_ALPHA).then_some((alpha, gauss, dx, dy))
}

/// Per pixel of a tile, what the compositing has accumulated.
#[derive(Clone, Copy)]
struct PixelState {
    color: [f64; 3],
    depth: f64,
    transmittance: f64,
    contributed: u32,
    done: bool,
}

pub(super) fn forward(params: &[f64], settings: &Settings) -> Forward {
    let (width, height) = (settings.width, settings.height);
    let (tiles, radii) = bin(params, settings);
    // Each tile visits its Gaussians front to back, each over the pixels of its box: per pixel
    // the order, and so the arithmetic, is that of a pixel-by-pixel loop.
    let rendered: Vec<Vec<PixelState>> = tiles
        .par_iter()
        .enumerate()
        .map(|(tile, list)| {
            let bounds = tile_pixels(tile, settings);
            let (x0, x1, y0, y1) = bounds;
            let tile_width = x1 - x0;
            let start = PixelState { color: [0.0; 3], depth: 0.0, transmittance: 1.0, contributed: 0, done: false };
            let mut pixels = vec![start; tile_width * (y1 - y0)];
            let mut remaining = pixels.len();
            let rows = gather(params, list, bounds);
            for (n, g) in rows.chunks_exact(GATHERED).enumerate() {
                if remaining == 0 {
                    break;
                }
                let (bx0, bx1, by0, by1) = pixel_box(g);
                for ly in by0..by1 {
                    for lx in bx0..bx1 {
                        let pixel = &mut pixels[ly * tile_width + lx];
                        if pixel.done {
                            continue;
                        }
                        let (px, py) = ((x0 + lx) as f64 + 0.5, (y0 + ly) as f64 + 0.5);
                        let Some((alpha, ..)) = alpha_at(g, px, py) else { continue };
                        let next = pixel.transmittance * (1.0 - alpha);
                        if next < MIN_TRANSMITTANCE {
                            pixel.done = true;
                            remaining -= 1;
                            continue;
                        }
                        let weight = alpha * pixel.transmittance;
                        for (ch, value) in pixel.color.iter_mut().enumerate() {
                            *value += g[Row::COLOR + ch] * weight;
                        }
                        pixel.depth += g[Row::DEPTH] * weight;
                        pixel.transmittance = next;
                        pixel.contributed = n as u32 + 1;
                    }
                }
            }
            pixels
        })
        .collect();
    let plane = width * height;
    let bg = settings.background;
    let mut image = vec![0.0; CHANNELS * plane];
    let mut last_contributor = vec![0; plane];
    for (tile, pixels) in rendered.into_iter().enumerate() {
        let (x0, x1, y0, y1) = tile_pixels(tile, settings);
        let coords = (y0..y1).flat_map(|y| (x0..x1).map(move |x| y * width + x));
        for (pixel, state) in coords.zip(pixels) {
            let t = state.transmittance;
            let values =
                [state.color[0] + t * bg[0], state.color[1] + t * bg[1], state.color[2] + t * bg[2], state.depth, t];
            for (ch, value) in values.into_iter().enumerate() {
                image[ch * plane + pixel] = value;
            }
            last_contributor[pixel] = state.contributed;
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
            let bounds = tile_pixels(tile, settings);
            let (x0, x1, y0, y1) = bounds;
            let tile_width = x1 - x0;
            let rows = gather(params, list, bounds);
            // Per pixel: its gradients, transmittance (recovered back to front), and the colour
            // and depth composited behind the current Gaussian (without background).
            struct Back {
                grad_color: [f64; 3],
                grad_depth: f64,
                grad_final: f64,
                last: usize,
                transmittance: f64,
                behind_color: [f64; 3],
                behind_depth: f64,
            }
            let mut pixels: Vec<Back> = (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| y * width + x))
                .map(|pixel| {
                    let grad_color = [grad_image[pixel], grad_image[plane + pixel], grad_image[2 * plane + pixel]];
                    let final_t = forward.image[4 * plane + pixel];
                    // What the background and the transmittance output make of the final T.
                    let grad_final = final_t
                        * (bg[0] * grad_color[0]
                            + bg[1] * grad_color[1]
                            + bg[2] * grad_color[2]
                            + grad_image[4 * plane + pixel]);
                    Back {
                        grad_color,
                        grad_depth: grad_image[3 * plane + pixel],
                        grad_final,
                        last: forward.last_contributor[pixel] as usize,
                        transmittance: final_t,
                        behind_color: [0.0; 3],
                        behind_depth: 0.0,
                    }
                })
                .collect();
            let last = pixels.iter().map(|p| p.last).max().unwrap_or(0);
            for n in (0..last).rev() {
                let g = &rows[n * GATHERED..][..GATHERED];
                let grad = &mut grads[n * ROW..][..ROW];
                let (bx0, bx1, by0, by1) = pixel_box(g);
                for ly in by0..by1 {
                    for lx in bx0..bx1 {
                        let state = &mut pixels[ly * tile_width + lx];
                        if n >= state.last {
                            continue;
                        }
                        let (px, py) = ((x0 + lx) as f64 + 0.5, (y0 + ly) as f64 + 0.5);
                        let Some((alpha, gauss, dx, dy)) = alpha_at(g, px, py) else { continue };
                        state.transmittance /= 1.0 - alpha;
                        let transmittance = state.transmittance;
                        let weight = alpha * transmittance;
                        let mut grad_alpha = 0.0;
                        for ch in 0..3 {
                            grad[Row::COLOR + ch] += weight * state.grad_color[ch];
                            grad_alpha += (g[Row::COLOR + ch] * transmittance - state.behind_color[ch] / (1.0 - alpha))
                                * state.grad_color[ch];
                            state.behind_color[ch] += g[Row::COLOR + ch] * weight;
                        }
                        grad[Row::DEPTH] += weight * state.grad_depth;
                        grad_alpha +=
                            (g[Row::DEPTH] * transmittance - state.behind_depth / (1.0 - alpha)) * state.grad_depth;
                        state.behind_depth += g[Row::DEPTH] * weight;
                        grad_alpha -= state.grad_final / (1.0 - alpha);
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
