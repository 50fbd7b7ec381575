//! The per-step augmentation of the single training photo and its masks (docs/method.md,
//! "Augmentation"), following the published implementation (`datasets_face/face_id.py` of
//! StableIdentity, <https://github.com/qinghew/StableIdentity>):
//!
//! 1. colour jitter of the 8-bit photo with torchvision's `ColorJitter` on a PIL image: the four
//!    operations in random order, each as Pillow computes it (`ImageEnhance` blends truncated to
//!    8 bits, the hue shifted through Pillow's 8-bit HSV);
//! 2. scaling to [-1, 1];
//! 3. a horizontal flip with p = 0.5 of the image and both masks (the learner flips the ViT input
//!    when [`AugmentedSample::flipped`] is set);
//! 4. a random crop of `size - size / 4` resized back to the full size;
//! 5. a shrink to `h = H * U(0.5, 1)`, `w = h * U(0.9, 1.1)` pasted at a random place on a
//!    background of -1 (masks 0);
//! 6. the masks reduced to the latent size (`size / 8`) and thresholded at 0.5.
//!
//! Every resize is torch's `F.interpolate(mode="bicubic", align_corners=True)` as the published
//! code calls it ([`resize_bicubic`]). Like there, the resized image is not clamped: bicubic
//! overshoot may take a few values slightly beyond [-1, 1].

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::{Error, Result};

/// Downsampling factor of the VAE: the masks are reduced to the latent size.
const LATENT_FACTOR: usize = 8;

/// The training photo and its parsing masks, at the training resolution.
#[derive(Debug, Clone)]
pub struct TrainingPhoto {
    height: usize,
    width: usize,
    rgb: Vec<u8>,
    face_mask: Vec<f32>,
    hair_mask: Vec<f32>,
}

impl TrainingPhoto {
    /// `rgb`: interleaved 8-bit RGB, row-major; masks: row-major, values in {0, 1}. Both sides
    /// must be multiples of 8 (the VAE factor).
    pub fn new(height: usize, width: usize, rgb: Vec<u8>, face_mask: Vec<f32>, hair_mask: Vec<f32>) -> Result<Self> {
        if height == 0 || width == 0 || !height.is_multiple_of(LATENT_FACTOR) || !width.is_multiple_of(LATENT_FACTOR) {
            return Err(Error::Input(format!(
                "training photo {width}x{height}: both sides must be non-zero multiples of {LATENT_FACTOR}"
            )));
        }
        let pixels = height * width;
        for (what, len, expected) in [
            ("RGB data", rgb.len(), 3 * pixels),
            ("face mask", face_mask.len(), pixels),
            ("hair mask", hair_mask.len(), pixels),
        ] {
            if len != expected {
                return Err(Error::Input(format!(
                    "training photo {width}x{height}: {what} holds {len} values, expected {expected}"
                )));
            }
        }
        Ok(Self { height, width, rgb, face_mask, hair_mask })
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

/// One of `ColorJitter`'s operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}

/// Ranges of the random draws; `Default` is the published implementation's. `None` (or a flip
/// probability of 0, `crop: false`) turns a part off, for ablations.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Brightness factor range.
    pub brightness: Option<(f64, f64)>,
    /// Contrast factor range.
    pub contrast: Option<(f64, f64)>,
    /// Saturation factor range.
    pub saturation: Option<(f64, f64)>,
    /// Hue shift range, in turns of the colour wheel (within [-0.5, 0.5]).
    pub hue: Option<(f64, f64)>,
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Crop `size - size / 4` at a random place and resize back.
    pub crop: bool,
    /// Range of the pasted height as a fraction of the image height (shrink and paste).
    pub paste_scale: Option<(f64, f64)>,
    /// Range of the pasted width as a fraction of the pasted height.
    pub paste_aspect: (f64, f64),
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            brightness: Some((0.8, 1.2)),
            contrast: Some((0.8, 1.2)),
            saturation: Some((0.8, 1.2)),
            hue: Some((-0.01, 0.01)),
            flip_p: 0.5,
            crop: true,
            paste_scale: Some((0.5, 1.0)),
            paste_aspect: (0.9, 1.1),
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all: every sample is [`no_augmentation`]'s.
    pub fn disabled() -> Self {
        Self {
            brightness: None,
            contrast: None,
            saturation: None,
            hue: None,
            flip_p: 0.0,
            crop: false,
            paste_scale: None,
            paste_aspect: (1.0, 1.0),
        }
    }
}

/// Where the shrunken image lies on the canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paste {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// The random draws of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentParams {
    /// Colour operations with their factors, in the order applied.
    pub jitter: Vec<(Jitter, f64)>,
    pub flip: bool,
    /// Top-left corner of the crop, whose size is [`crop_size`].
    pub crop: Option<(usize, usize)>,
    pub paste: Option<Paste>,
}

/// Side lengths of the random crop: three quarters of the image (`size - size / 4`).
pub fn crop_size(height: usize, width: usize) -> (usize, usize) {
    (height - height / 4, width - width / 4)
}

fn uniform(rng: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

impl AugmentParams {
    /// No change: only the scaling and the mask reduction remain.
    pub fn none() -> Self {
        Self { jitter: Vec::new(), flip: false, crop: None, paste: None }
    }

    /// Draws the parameters of one sample of a `height x width` photo.
    pub fn sample(config: &AugmentConfig, height: usize, width: usize, rng: &mut impl Rng) -> Self {
        let ranges = [
            (Jitter::Brightness, config.brightness),
            (Jitter::Contrast, config.contrast),
            (Jitter::Saturation, config.saturation),
            (Jitter::Hue, config.hue),
        ];
        let mut jitter: Vec<(Jitter, f64)> =
            ranges.into_iter().filter_map(|(op, range)| range.map(|r| (op, uniform(rng, r)))).collect();
        // ColorJitter applies its operations in a random order.
        jitter.shuffle(rng);

        let flip = rng.random::<f64>() < config.flip_p;
        let crop = config.crop.then(|| {
            let (ch, cw) = crop_size(height, width);
            (rng.random_range(0..=height - ch), rng.random_range(0..=width - cw))
        });
        // Sizes truncate like the published `int(...)`; the position is numpy's `randint(H - h)`,
        // which never places the paste flush with the bottom (right) edge, and 0 when h = H.
        let paste = config.paste_scale.map(|scale| {
            let ph = ((height as f64 * uniform(rng, scale)) as usize).clamp(1, height);
            let pw = ((ph as f64 * uniform(rng, config.paste_aspect)) as usize).clamp(1, width);
            let top = if height > ph { rng.random_range(0..height - ph) } else { 0 };
            let left = if width > pw { rng.random_range(0..width - pw) } else { 0 };
            Paste { top, left, height: ph, width: pw }
        });
        Self { jitter, flip, crop, paste }
    }
}

/// One training sample.
#[derive(Debug, Clone)]
pub struct AugmentedSample {
    /// (1, 3, H, W), in [-1, 1] up to bicubic overshoot; exactly -1 outside the pasted region.
    pub image: Tensor,
    /// (1, 1, H/8, W/8), values in {0, 1}.
    pub face_mask: Tensor,
    /// (1, 1, H/8, W/8), values in {0, 1}.
    pub hair_mask: Tensor,
    /// Whether the image was flipped horizontally (the ViT input must be flipped too).
    pub flipped: bool,
}

/// Draws and applies one random augmentation.
pub fn augment(
    photo: &TrainingPhoto,
    config: &AugmentConfig,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<AugmentedSample> {
    let params = AugmentParams::sample(config, photo.height, photo.width, rng);
    apply(photo, &params, device)
}

/// The photo scaled to [-1, 1] and its masks reduced to the latent size, nothing else.
pub fn no_augmentation(photo: &TrainingPhoto, device: &Device) -> Result<AugmentedSample> {
    apply(photo, &AugmentParams::none(), device)
}

/// Planes of one size, row-major, one after the other.
struct Planes {
    count: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl Planes {
    fn resized(&self, height: usize, width: usize) -> Self {
        let data = resize_bicubic(&self.data, self.count, self.height, self.width, height, width, true);
        Self { count: self.count, height, width, data }
    }

    fn flip_horizontally(&mut self) {
        self.data.chunks_exact_mut(self.width).for_each(|row| row.reverse());
    }

    fn cropped(&self, top: usize, left: usize, height: usize, width: usize) -> Self {
        let mut data = Vec::with_capacity(self.count * height * width);
        for plane in self.data.chunks_exact(self.height * self.width) {
            for row in plane.chunks_exact(self.width).skip(top).take(height) {
                data.extend_from_slice(&row[left..left + width]);
            }
        }
        Self { count: self.count, height, width, data }
    }

    /// These planes pasted at (`top`, `left`) on planes of `height x width` filled with `background`.
    fn pasted(&self, top: usize, left: usize, height: usize, width: usize, background: f32) -> Self {
        let mut data = vec![background; self.count * height * width];
        let planes = data.chunks_exact_mut(height * width).zip(self.data.chunks_exact(self.height * self.width));
        for (canvas, plane) in planes {
            let rows = canvas.chunks_exact_mut(width).skip(top).zip(plane.chunks_exact(self.width));
            for (canvas_row, row) in rows {
                canvas_row[left..left + self.width].copy_from_slice(row);
            }
        }
        Self { count: self.count, height, width, data }
    }

    fn into_tensor(self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.data, (1, self.count, self.height, self.width), device)
    }
}

/// Applies given draws to the photo.
pub fn apply(photo: &TrainingPhoto, params: &AugmentParams, device: &Device) -> Result<AugmentedSample> {
    let (height, width) = (photo.height, photo.width);
    let pixels = height * width;

    let mut rgb = photo.rgb.clone();
    for &(op, factor) in &params.jitter {
        match op {
            Jitter::Brightness => adjust_brightness(&mut rgb, factor),
            Jitter::Contrast => adjust_contrast(&mut rgb, factor),
            Jitter::Saturation => adjust_saturation(&mut rgb, factor),
            Jitter::Hue => adjust_hue(&mut rgb, factor),
        }
    }
    // torchvision's to_tensor then normalize(0.5, 0.5), in the same f32 steps.
    let mut data = vec![0f32; 3 * pixels];
    for (c, plane) in data.chunks_exact_mut(pixels).enumerate() {
        for (out, px) in plane.iter_mut().zip(rgb.chunks_exact(3)) {
            *out = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    let mut image = Planes { count: 3, height, width, data };
    let mut masks = Planes { count: 2, height, width, data: [&photo.face_mask[..], &photo.hair_mask[..]].concat() };

    if params.flip {
        image.flip_horizontally();
        masks.flip_horizontally();
    }
    if let Some((top, left)) = params.crop {
        let (ch, cw) = crop_size(height, width);
        if top + ch > height || left + cw > width {
            return Err(Error::Input(format!("crop at ({top}, {left}) leaves the {width}x{height} photo")));
        }
        image = image.cropped(top, left, ch, cw).resized(height, width);
        masks = masks.cropped(top, left, ch, cw).resized(height, width);
    }
    if let Some(p) = params.paste {
        if p.height == 0 || p.width == 0 || p.top + p.height > height || p.left + p.width > width {
            return Err(Error::Input(format!("paste {p:?} does not fit the {width}x{height} photo")));
        }
        image = image.resized(p.height, p.width).pasted(p.top, p.left, height, width, -1.0);
        masks = masks.resized(p.height, p.width).pasted(p.top, p.left, height, width, 0.0);
    }
    let mut masks = masks.resized(height / LATENT_FACTOR, width / LATENT_FACTOR);
    masks.data.iter_mut().for_each(|m| *m = if *m >= 0.5 { 1.0 } else { 0.0 });

    let latent = masks.height * masks.width;
    let hair_mask = Planes { count: 1, height: masks.height, width: masks.width, data: masks.data.split_off(latent) };
    Ok(AugmentedSample {
        image: image.into_tensor(device)?,
        face_mask: Planes { count: 1, ..masks }.into_tensor(device)?,
        hair_mask: hair_mask.into_tensor(device)?,
        flipped: params.flip,
    })
}

// ---------------------------------------------------------------------------------------------
// Bicubic resampling

/// The 4 source indices and weights of one output position.
type Taps = ([usize; 4], [f32; 4]);

/// Keys' cubic convolution with a = -0.75, as torch computes its coefficients (in f32).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let u = 1.0 - t;
    [far(t + 1.0), near(t), near(u), far(u + 1.0)]
}

/// Source taps of every output position along one axis (torch's `area_pixel_compute_source_index`
/// with `cubic = true`, indices clamped to the border).
fn axis_taps(input: usize, output: usize, align_corners: bool) -> Vec<Taps> {
    let scale = match (align_corners, output) {
        (true, 1) => 0.0,
        (true, _) => (input - 1) as f32 / (output - 1) as f32,
        (false, _) => input as f32 / output as f32,
    };
    let last = input as i64 - 1;
    (0..output)
        .map(|i| {
            let real = if align_corners { scale * i as f32 } else { scale * (i as f32 + 0.5) - 0.5 };
            let index = (real.floor() as i64).min(last);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let indices = std::array::from_fn(|j| (index - 1 + j as i64).clamp(0, last) as usize);
            (indices, cubic_weights(t))
        })
        .collect()
}

/// Resizes `channels` row-major planes of `height x width` (one after the other) to
/// `out_height x out_width` like torch's `F.interpolate(mode="bicubic", align_corners)` (no
/// antialiasing), separably: along rows first, then along columns, the order in which torch sums.
pub fn resize_bicubic(
    src: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    align_corners: bool,
) -> Vec<f32> {
    assert_eq!(src.len(), channels * height * width, "resize_bicubic: input size");
    let x_taps = axis_taps(width, out_width, align_corners);
    let y_taps = axis_taps(height, out_height, align_corners);
    let mut rows = vec![0f32; height * out_width];
    let mut out = vec![0f32; channels * out_height * out_width];
    for (plane, out_plane) in src.chunks_exact(height * width).zip(out.chunks_exact_mut(out_height * out_width)) {
        for (row, out_row) in plane.chunks_exact(width).zip(rows.chunks_exact_mut(out_width)) {
            for (o, (ix, wx)) in out_row.iter_mut().zip(&x_taps) {
                *o = row[ix[0]] * wx[0] + row[ix[1]] * wx[1] + row[ix[2]] * wx[2] + row[ix[3]] * wx[3];
            }
        }
        for (out_row, (iy, wy)) in out_plane.chunks_exact_mut(out_width).zip(&y_taps) {
            let r: [&[f32]; 4] = std::array::from_fn(|j| &rows[iy[j] * out_width..(iy[j] + 1) * out_width]);
            for (x, o) in out_row.iter_mut().enumerate() {
                *o = r[0][x] * wy[0] + r[1][x] * wy[1] + r[2][x] * wy[2] + r[3][x] * wy[3];
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Colour jitter: torchvision's PIL path, i.e. Pillow's 8-bit arithmetic

/// Pillow's `Image.blend(degenerate, image, factor)` of one value: computed in f32, clipped and
/// truncated to 8 bits.
fn blend(degenerate: u8, value: u8, factor: f32) -> u8 {
    let v = degenerate as f32 + factor * (value as f32 - degenerate as f32);
    // `as` truncates toward zero and saturates at 0 and 255, as Pillow's clip does.
    v as u8
}

/// Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded).
fn luma(px: &[u8]) -> u8 {
    ((px[0] as u32 * 19595 + px[1] as u32 * 38470 + px[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// torchvision `adjust_brightness` (Pillow `ImageEnhance.Brightness`): blend with black.
/// `rgb` is interleaved 8-bit RGB.
pub fn adjust_brightness(rgb: &mut [u8], factor: f64) {
    let factor = factor as f32;
    rgb.iter_mut().for_each(|v| *v = blend(0, *v, factor));
}

/// torchvision `adjust_contrast` (Pillow `ImageEnhance.Contrast`): blend with the mean luma,
/// rounded to an integer.
pub fn adjust_contrast(rgb: &mut [u8], factor: f64) {
    let pixels = rgb.len() / 3;
    if pixels == 0 {
        return;
    }
    let sum: u64 = rgb.chunks_exact(3).map(|px| luma(px) as u64).sum();
    let mean = (sum as f64 / pixels as f64 + 0.5) as u8;
    let factor = factor as f32;
    rgb.iter_mut().for_each(|v| *v = blend(mean, *v, factor));
}

/// torchvision `adjust_saturation` (Pillow `ImageEnhance.Color`): blend with the pixel's luma.
pub fn adjust_saturation(rgb: &mut [u8], factor: f64) {
    let factor = factor as f32;
    for px in rgb.chunks_exact_mut(3) {
        let grey = luma(px);
        px.iter_mut().for_each(|v| *v = blend(grey, *v, factor));
    }
}

/// torchvision `adjust_hue` on a PIL image: Pillow's 8-bit HSV, the hue byte shifted by
/// `trunc(factor * 255)` with wrap-around. Even a zero shift changes colours (the HSV round trip
/// is lossy), as in the reference.
pub fn adjust_hue(rgb: &mut [u8], factor: f64) {
    let shift = (factor * 255.0) as i32 as u8;
    for px in rgb.chunks_exact_mut(3) {
        let [h, s, v] = rgb_to_hsv(px[0], px[1], px[2]);
        px.copy_from_slice(&hsv_to_rgb(h.wrapping_add(shift), s, v));
    }
}

/// Pillow's RGB -> HSV of one pixel, with its mix of f32 and f64 steps.
fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    if max == min {
        return [0, 0, max];
    }
    let range = (max - min) as f32;
    let s = range / max as f32;
    let rc = (max - r) as f32 / range;
    let gc = (max - g) as f32 / range;
    let bc = (max - b) as f32 / range;
    let h = if r == max {
        bc - gc
    } else if g == max {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let to_byte = |x: f32| ((x as f64 * 255.0) as i32).clamp(0, 255) as u8;
    [to_byte(h), to_byte(s), max]
}

/// Pillow's HSV -> RGB of one pixel.
fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let sector = h as f64 * 6.0 / 255.0;
    let i = sector.floor() as i32;
    let f = (sector - i as f64) as f32;
    let fs = (s as f64 / 255.0) as f32;
    let v64 = v as f64;
    let to_byte = |x: f64| (x.round() as i32).clamp(0, 255) as u8;
    let p = to_byte(v64 * (1.0 - fs as f64));
    let q = to_byte(v64 * (1.0 - (fs * f) as f64));
    let t = to_byte(v64 * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}
