//! `cv2.resize` as OpenCV 5 computes it on the CPU, for the calls controlnet_aux's OpenPose makes:
//! 8-bit colour images and float32 one-channel maps, with `INTER_AREA`, `INTER_LINEAR` and
//! `INTER_LANCZOS4` (`modules/imgproc/src/resize.cpp`).
//!
//! OpenCV's rules, which differ from PIL's (`crate::priors::photo::resize`):
//! - a destination pixel `d` maps to the source position `(d + 0.5) * scale - 0.5` (computed in
//!   f64, rounded to f32), whose floor is the first tap and whose fraction sets the weights; the
//!   kernel keeps its width when shrinking (no antialiasing), and samples past the border repeat
//!   the border pixel;
//! - 8-bit images use weights rounded to 11-bit fixed point in both directions, sums in integers
//!   and one rounding shift at the end; `INTER_LINEAR` rounds as OpenCV's SIMD code does, from
//!   inputs reduced by 4 bits (`linear_vertical_u8`);
//! - `INTER_AREA` when shrinking averages the source cells each destination pixel covers (their
//!   fractions at the cell edges) in f32; an exact integer factor of 2 averages 2x2 blocks with
//!   integer rounding; when enlarging in either direction it is a bilinear resize with OpenCV's
//!   area coefficients.
//! - equal sizes copy the image.

/// An interleaved image: `height` rows of `width` pixels of `channels` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Image<T> {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<T>,
}

/// `cv2.INTER_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Linear,
    Area,
    Lanczos4,
}

/// `INTER_RESIZE_COEF_BITS`: fixed-point weights of 8-bit resizes.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// OpenCV's `cvRound` of an f32: nearest, ties to even.
fn round_f32(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn saturate_u8(x: i64) -> u8 {
    x.clamp(0, 255) as u8
}

/// `saturate_cast<short>(w * 2048)`.
fn fixed(weight: f32) -> i32 {
    round_f32(weight * COEF_SCALE).clamp(i16::MIN as i32, i16::MAX as i32)
}

/// OpenCV's `interpolateLanczos4`: the eight weights of taps `-3..=4` at fraction `x`, in f32 and
/// normalised to sum 1 (a tap at distance 0 gets all the weight).
fn lanczos4_weights(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] =
        [[1.0, 0.0], [-S45, -S45], [0.0, 1.0], [S45, -S45], [-1.0, 0.0], [S45, S45], [0.0, -1.0], [-S45, S45]];
    let y0 = -(x as f64 + 3.0) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut weights = [0f32; 8];
    let mut sum = 0f32;
    for (i, w) in weights.iter_mut().enumerate() {
        let distance = x + 3.0 - i as f32;
        *w = if distance.abs() >= 1e-6 {
            let y = -(distance as f64) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *w;
    }
    let inverse = 1.0 / sum;
    weights.map(|w| w * inverse)
}

/// The taps of one axis: for each destination index, the first source index (before clamping)
/// and the weights.
struct Taps {
    first: Vec<i64>,
    weights: Vec<Vec<f32>>,
}

/// `resizeGeneric_`'s tables along one axis of `src_len` -> `dst_len`. Along rows (`columns`
/// false) bilinear taps past the border keep their weights and fetch the border row twice, as
/// OpenCV does; along columns they collapse onto the border pixel with weights (1, 0).
fn taps(src_len: usize, dst_len: usize, interpolation: Interpolation, columns: bool) -> Taps {
    let inv_scale = dst_len as f64 / src_len as f64;
    let scale = 1.0 / inv_scale;
    let (mut first, mut weights) = (Vec::with_capacity(dst_len), Vec::with_capacity(dst_len));
    for d in 0..dst_len {
        let (mut s, mut f) = if interpolation == Interpolation::Area {
            let s = (d as f64 * scale).floor() as i64;
            let f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
            (s, if f <= 0.0 { 0.0 } else { f - f.floor() })
        } else {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as i64, f - s)
        };
        match interpolation {
            Interpolation::Lanczos4 => {
                weights.push(lanczos4_weights(f).to_vec());
                first.push(s - 3);
            }
            Interpolation::Linear | Interpolation::Area => {
                if columns && s < 0 {
                    (s, f) = (0, 0.0);
                }
                if columns && s >= src_len as i64 - 1 {
                    (s, f) = (src_len as i64 - 1, 0.0);
                }
                weights.push(vec![1.0 - f, f]);
                first.push(s);
            }
        }
    }
    Taps { first, weights }
}

fn clamp_index(i: i64, len: usize) -> usize {
    i.clamp(0, len as i64 - 1) as usize
}

/// `cv2.resize(src, (width, height), interpolation)` of an 8-bit image.
pub fn resize_u8(src: &Image<u8>, width: usize, height: usize, interpolation: Interpolation) -> Image<u8> {
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    let (scale_x, scale_y) = (src.width as f64 / width as f64, src.height as f64 / height as f64);
    match interpolation {
        Interpolation::Area if scale_x >= 1.0 && scale_y >= 1.0 => {
            if scale_x == 2.0 && scale_y == 2.0 {
                return halve_u8(src);
            }
            let out = area(src, width, height, f32::from);
            let data = out.data.into_iter().map(|v| saturate_u8(round_f32(v) as i64)).collect();
            Image { width, height, channels: out.channels, data }
        }
        Interpolation::Linear if scale_x == 2.0 && scale_y == 2.0 => halve_u8(src),
        _ => separable_u8(src, width, height, interpolation),
    }
}

/// `cv2.resize` of a float32 image.
pub fn resize_f32(src: &Image<f32>, width: usize, height: usize, interpolation: Interpolation) -> Image<f32> {
    if (width, height) == (src.width, src.height) {
        return src.clone();
    }
    let (scale_x, scale_y) = (src.width as f64 / width as f64, src.height as f64 / height as f64);
    if interpolation == Interpolation::Area && scale_x >= 1.0 && scale_y >= 1.0 {
        return area(src, width, height, |v| v);
    }
    let (tx, ty) = (taps(src.width, width, interpolation, true), taps(src.height, height, interpolation, false));
    let c = src.channels;
    // Rows resized horizontally, sums in f32 in tap order, as `HResize*` do.
    let horizontal: Vec<Vec<f32>> = (0..src.height)
        .map(|y| {
            let row = &src.data[y * src.width * c..][..src.width * c];
            let mut out = vec![0f32; width * c];
            for (d, (&s0, w)) in tx.first.iter().zip(&tx.weights).enumerate() {
                for ch in 0..c {
                    let mut sum = 0f32;
                    for (k, &wk) in w.iter().enumerate() {
                        sum += row[clamp_index(s0 + k as i64, src.width) * c + ch] * wk;
                    }
                    out[d * c + ch] = sum;
                }
            }
            out
        })
        .collect();
    let mut data = vec![0f32; width * height * c];
    for (d, (&s0, w)) in ty.first.iter().zip(&ty.weights).enumerate() {
        let out = &mut data[d * width * c..][..width * c];
        for (k, &wk) in w.iter().enumerate() {
            let row = &horizontal[clamp_index(s0 + k as i64, src.height)];
            for (o, &v) in out.iter_mut().zip(row) {
                *o = if k == 0 { v * wk } else { *o + v * wk };
            }
        }
    }
    Image { width, height, channels: c, data }
}

/// The 8-bit generic path: 11-bit weights, integer sums.
fn separable_u8(src: &Image<u8>, width: usize, height: usize, interpolation: Interpolation) -> Image<u8> {
    let (tx, ty) = (taps(src.width, width, interpolation, true), taps(src.height, height, interpolation, false));
    let c = src.channels;
    let fixed_weights = |t: &Taps| -> Vec<Vec<i64>> {
        t.weights.iter().map(|w| w.iter().map(|&v| i64::from(fixed(v))).collect()).collect()
    };
    let (wx, wy) = (fixed_weights(&tx), fixed_weights(&ty));
    let horizontal: Vec<Vec<i64>> = (0..src.height)
        .map(|y| {
            let row = &src.data[y * src.width * c..][..src.width * c];
            let mut out = vec![0i64; width * c];
            for (d, (&s0, w)) in tx.first.iter().zip(&wx).enumerate() {
                for ch in 0..c {
                    out[d * c + ch] = w
                        .iter()
                        .enumerate()
                        .map(|(k, &wk)| i64::from(row[clamp_index(s0 + k as i64, src.width) * c + ch]) * wk)
                        .sum();
                }
            }
            out
        })
        .collect();
    let mut data = vec![0u8; width * height * c];
    for (d, (&s0, w)) in ty.first.iter().zip(&wy).enumerate() {
        let rows: Vec<&[i64]> = (0..w.len()).map(|k| &horizontal[clamp_index(s0 + k as i64, src.height)][..]).collect();
        let out = &mut data[d * width * c..][..width * c];
        if interpolation == Interpolation::Lanczos4 {
            for (x, o) in out.iter_mut().enumerate() {
                let sum: i64 = rows.iter().zip(w).map(|(row, &wk)| row[x] * wk).sum();
                *o = saturate_u8((sum + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS));
            }
        } else {
            linear_vertical_u8(rows[0], rows[1], w[0], w[1], out);
        }
    }
    Image { width, height, channels: c, data }
}

/// `VResizeLinear` for 8-bit images as OpenCV's SIMD code computes it, for every value (measured:
/// the exact `(S0 * b0 + S1 * b1 + 2^21) >> 22` differs from OpenCV in a tenth of them): inputs
/// reduced by 4 bits to 16-bit lanes, products keeping their high half, then
/// `(hi(S0 * b0) + hi(S1 * b1) + 2) >> 2`.
fn linear_vertical_u8(s0: &[i64], s1: &[i64], b0: i64, b1: i64, out: &mut [u8]) {
    let lane = |s: i64| (s >> 4).clamp(i16::MIN as i64, i16::MAX as i64);
    for ((o, &a), &b) in out.iter_mut().zip(s0).zip(s1) {
        *o = saturate_u8((((lane(a) * b0) >> 16) + ((lane(b) * b1) >> 16) + 2) >> 2);
    }
}

/// `resizeAreaFast_` for a factor of exactly 2: each pixel is the mean of a 2x2 block, rounded
/// half up (`(a + b + c + d + 2) >> 2`, OpenCV's SIMD path).
fn halve_u8(src: &Image<u8>) -> Image<u8> {
    let (width, height, c) = (src.width / 2, src.height / 2, src.channels);
    let at = |x: usize, y: usize, ch: usize| u32::from(src.data[(y * src.width + x) * c + ch]);
    let mut data = Vec::with_capacity(width * height * c);
    for y in 0..height {
        for x in 0..width {
            for ch in 0..c {
                let sum = at(2 * x, 2 * y, ch)
                    + at(2 * x + 1, 2 * y, ch)
                    + at(2 * x, 2 * y + 1, ch)
                    + at(2 * x + 1, 2 * y + 1, ch);
                data.push(((sum + 2) >> 2) as u8);
            }
        }
    }
    Image { width, height, channels: c, data }
}

/// One source cell's share of a destination pixel along an axis.
struct Share {
    dst: usize,
    src: usize,
    weight: f32,
}

/// `computeResizeAreaTab`: the shares of `src_len` cells in `dst_len` pixels (f64 geometry, f32
/// weights; slivers under 1e-3 of a cell are dropped).
fn area_shares(src_len: usize, dst_len: usize) -> Vec<Share> {
    let scale = src_len as f64 / dst_len as f64;
    let mut shares = Vec::new();
    for d in 0..dst_len {
        let start = d as f64 * scale;
        let end = start + scale;
        let cell = scale.min(src_len as f64 - start);
        let last = (end.floor() as i64).min(src_len as i64 - 1);
        let first = (start.ceil() as i64).min(last);
        if first as f64 - start > 1e-3 {
            shares.push(Share { dst: d, src: first as usize - 1, weight: ((first as f64 - start) / cell) as f32 });
        }
        for s in first..last {
            shares.push(Share { dst: d, src: s as usize, weight: (1.0 / cell) as f32 });
        }
        if end - last as f64 > 1e-3 {
            let weight = ((end - last as f64).min(1.0).min(cell) / cell) as f32;
            shares.push(Share { dst: d, src: last as usize, weight });
        }
    }
    shares
}

/// `resizeArea_`: rows are accumulated in f32 as OpenCV does (`buf += S * alpha`, then
/// `sum += beta * buf`); returns the f32 sums, which the caller rounds for 8-bit images.
fn area<T: Copy>(src: &Image<T>, width: usize, height: usize, to_f32: impl Fn(T) -> f32) -> Image<f32> {
    let c = src.channels;
    let (xs, ys) = (area_shares(src.width, width), area_shares(src.height, height));
    let mut data = vec![0f32; width * height * c];
    let mut buf = vec![0f32; width * c];
    let mut started = vec![false; height];
    for y in &ys {
        buf.fill(0.0);
        let row = &src.data[y.src * src.width * c..][..src.width * c];
        for x in &xs {
            for ch in 0..c {
                buf[x.dst * c + ch] += to_f32(row[x.src * c + ch]) * x.weight;
            }
        }
        let out = &mut data[y.dst * width * c..][..width * c];
        for (o, &b) in out.iter_mut().zip(&buf) {
            *o = if started[y.dst] { *o + y.weight * b } else { y.weight * b };
        }
        started[y.dst] = true;
    }
    Image { width, height, channels: c, data }
}
