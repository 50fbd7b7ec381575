//! FFHQ alignment: the square head crop StableIdentity learns from, cut from a photo at a face's
//! five landmarks.
//!
//! Reproduces the crop of NVlabs/ffhq-dataset (`download_ffhq.py`, `recreate_aligned_images`, with
//! `rotate_level=True`, no random shift, padding on), which the published StableIdentity expects
//! its photo to have gone through. The recipe's three points come from MTCNN's landmarks (see
//! [`crate::models::mtcnn::Face`]): the two eye points stand for the means of dlib's eye points,
//! the mean of the two mouth corners for the mean of dlib's points 48 and 54; the nose is unused,
//! as in the recipe. In order:
//! - an oriented square (the quad) from the eyes and the mouth, of side `qsize`;
//! - a photo much larger than the crop needs is first shrunk by an integer factor (Lanczos);
//! - the photo is cropped to the quad plus a border;
//! - where the quad leaves the photo, the photo is reflect-padded, the padding blurred and faded
//!   toward the photo's median colour (so a face cut by the border gives a plausible crop);
//! - the quad is warped to the square with PIL's `Image.transform(QUAD, BILINEAR)`.
//!
//! Each step follows PIL, numpy and scipy to the rounding (Pillow's resampler, numpy's `reflect`
//! padding, scipy's `gaussian_filter` in its `reflect` mode, float32 blending), checked against the
//! recipe in `tools/reference/align.py` by `tests/align.rs`.
//!
//! Warped to the recipe's 4096x4096 and resized down with Lanczos ([`align_warped_at`] with
//! `Some(4096)`), the crop equals the recipe's bit for bit. One deviation, in [`align`]: the quad
//! is warped to the smallest multiple of the output size that samples the photo at least once per
//! pixel (the output size itself for any face smaller than the crop), then resized down. At 512
//! that takes a 64th of the time and memory of the recipe's warp or less, and differs from the
//! recipe by a quarter of a level of 255 on average (up to 20 levels at a few sharp edges, where
//! the recipe's Lanczos resize of its bilinear upsampling rings); `tests/align.rs` measures both.

use std::ops::Range;
use std::path::Path;

use candle_core::Device;
use image::{Rgb, RgbImage};
use rayon::prelude::*;

use crate::models::mtcnn::{DetectConfig, Face, Mtcnn};
use crate::nn::simd_fn;
use crate::priors::photo::{
    hex_sha256, load_photo, load_upright_with_digest, resize, resize_window, Filter, Photo, Weights, PHOTO_SIZE,
};
use crate::{Error, Result};

/// A face cut out and aligned as FFHQ's faces are.
#[derive(Debug, Clone)]
pub struct AlignedFace {
    /// The square crop.
    pub image: RgbImage,
    /// Corners of the cropped square in the photo's pixel coordinates (`[x, y]`, the crop's
    /// top-left, bottom-left, bottom-right and top-right corners: the recipe's `quad`). They may
    /// lie outside the photo, whose missing part the crop fills by reflection.
    pub quad: [[f64; 2]; 4],
    /// The quad reaches past the photo's border (the face is cut by it): the recipe filled the
    /// missing part by reflecting the photo, blurred and faded toward its median colour.
    pub padded: bool,
}

/// Side of the aligned crop the identity is learned from.
pub const ALIGNED_SIZE: u32 = PHOTO_SIZE;

/// How a photo becomes the learner's 512 x 512 input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Detect the faces and align face `face` (numbered from 1, largest first; `None`: the
    /// largest) with the FFHQ recipe.
    Align { face: Option<usize> },
    /// The photo is an aligned head crop already: it is only resized.
    AsIs,
}

/// A photo framed for learning, and how it was framed.
pub struct FramedPhoto {
    pub photo: Photo,
    /// `None` for [`Framing::AsIs`].
    pub alignment: Option<Alignment>,
}

impl FramedPhoto {
    /// What an identity learned from this photo records of its framing: the method, the face and
    /// the SHA-256 of the crop's RGB pixels.
    pub fn provenance(&self) -> Vec<(&'static str, String)> {
        match &self.alignment {
            Some(alignment) => vec![
                ("alignment", "ffhq (mtcnn landmarks)".into()),
                ("face", alignment.face.to_string()),
                ("aligned_rgb_sha256", hex_sha256(alignment.crop.image.as_raw())),
            ],
            None => vec![("alignment", "none".into())],
        }
    }
}

/// [`FramedPhoto::provenance`] of several photos of one person: each key's values in photo order,
/// joined by commas.
pub fn provenance_of(photos: &[FramedPhoto]) -> Vec<(&'static str, String)> {
    let mut merged: Vec<(&'static str, Vec<String>)> = Vec::new();
    for (key, value) in photos.iter().flat_map(FramedPhoto::provenance) {
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some((_, values)) => values.push(value),
            None => merged.push((key, vec![value])),
        }
    }
    merged.into_iter().map(|(key, values)| (key, values.join(","))).collect()
}

/// Which face of a photo was aligned, and its crop.
pub struct Alignment {
    /// Numbered from 1, largest first.
    pub face: usize,
    pub faces_found: usize,
    pub crop: AlignedFace,
}

/// Reads the photo at `path` and frames it as `framing` says: the photo `learn` and `masks`
/// work on. `detector` (used only to align) is made once by the caller for all its photos.
pub fn frame_photo(path: &Path, framing: Framing, detector: &FaceDetector) -> Result<FramedPhoto> {
    let Framing::Align { face } = framing else {
        return Ok(FramedPhoto { photo: load_photo(path)?, alignment: None });
    };
    let (image, sha256) = load_upright_with_digest(path)?;
    let faces = detector.detect(&image)?;
    let chosen = choose_face(&faces, face, path)?;
    check_face_size(chosen, face.unwrap_or(1), path)?;
    let crop = align(&image, chosen, ALIGNED_SIZE)?;
    let alignment = Alignment { face: face.unwrap_or(1), faces_found: faces.len(), crop };
    Ok(FramedPhoto { photo: Photo::from_crop(alignment.crop.image.clone(), sha256)?, alignment: Some(alignment) })
}

/// Face detection for alignment: MTCNN on its shipped weights, facenet-pytorch's settings but for
/// the smallest face searched on large photos ([`FaceDetector::min_face_size`]). The only place
/// faces are detected (the commands that need a face call it).
pub struct FaceDetector {
    mtcnn: Mtcnn,
}

/// The smallest crop side (`qsize`, in photo pixels) a face may give: smaller faces would be
/// enlarged more than 8 times to the 512 crop, too blurred to learn a likeness from.
pub const MIN_CROP_SIDE: f64 = 64.0;

impl FaceDetector {
    pub fn shipped(device: &Device) -> Result<Self> {
        Ok(Self { mtcnn: Mtcnn::shipped(device)? })
    }

    /// The smallest face searched for in a photo of `width` x `height`: facenet-pytorch's 20 px,
    /// or a 64th of the short side, up to 48 px, on photos whose short side exceeds 1280 px. Faces below a 64th
    /// of a large photo's side are background faces, and searching for them costs most of the
    /// time (the pyramid's first level has `(12 / min_face_size)^2` of the photo's pixels: a
    /// 12-megapixel photo takes a fifth of facenet-pytorch's P-Net work).
    pub fn min_face_size(width: u32, height: u32) -> f64 {
        (f64::from(width.min(height)) / 64.0).clamp(20.0, 48.0)
    }

    /// The faces of `photo`, largest first.
    pub fn detect(&self, photo: &RgbImage) -> Result<Vec<Face>> {
        let min_face_size = Self::min_face_size(photo.width(), photo.height());
        Ok(self.mtcnn.detect(photo, &DetectConfig { min_face_size, ..DetectConfig::default() })?)
    }
}

/// An input error when `face` (number `number` of the photo at `path`) is too small to give a
/// usable crop ([`MIN_CROP_SIDE`]).
pub fn check_face_size(face: &Face, number: usize, path: &Path) -> Result<()> {
    let (_, crop_side) = ffhq_quad(face);
    if crop_side < MIN_CROP_SIDE {
        let [x1, y1, x2, y2] = face.bbox;
        return Err(Error::Face(format!(
            "face {number} of {} is too small ({:.0}x{:.0} px): its crop would be {crop_side:.0} px, \
             enlarged {:.0} times to {ALIGNED_SIZE}; use a larger or closer photo of the face",
            path.display(),
            x2 - x1,
            y2 - y1,
            f64::from(ALIGNED_SIZE) / crop_side,
        )));
    }
    Ok(())
}

/// Face `number` (1 = the largest) of `faces`, the faces found in the photo at `path`, or the
/// largest when `number` is `None`; an input error when there is no face or no such face.
pub fn choose_face<'a>(faces: &'a [Face], number: Option<usize>, path: &Path) -> Result<&'a Face> {
    if faces.is_empty() {
        return Err(Error::Face(format!(
            "no face found in {}: use a photo where the face is clearly visible",
            path.display()
        )));
    }
    let n = number.unwrap_or(1);
    if n == 0 || n > faces.len() {
        let list: Vec<String> = faces
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let [x1, y1, x2, y2] = f.bbox;
                format!("{}: {:.0}x{:.0} at ({x1:.0}, {y1:.0})", i + 1, x2 - x1, y2 - y1)
            })
            .collect();
        return Err(Error::Face(format!(
            "{} has {} face(s), numbered from 1, largest first ({}); there is no face {n}",
            path.display(),
            faces.len(),
            list.join(", ")
        )));
    }
    Ok(&faces[n - 1])
}

type Point = [f64; 2];

fn add(a: Point, b: Point) -> Point {
    [a[0] + b[0], a[1] + b[1]]
}

fn sub(a: Point, b: Point) -> Point {
    [a[0] - b[0], a[1] - b[1]]
}

fn scale(a: Point, s: f64) -> Point {
    [a[0] * s, a[1] * s]
}

fn norm(a: Point) -> f64 {
    a[0].hypot(a[1])
}

/// The recipe's quad and its side (`qsize`) for a face's landmarks.
pub fn ffhq_quad(face: &Face) -> ([Point; 4], f64) {
    let lm = face.landmarks.map(|[x, y]| [f64::from(x), f64::from(y)]);
    let eye_avg = scale(add(lm[0], lm[1]), 0.5);
    let eye_to_eye = sub(lm[1], lm[0]);
    let eye_to_mouth = sub(scale(add(lm[3], lm[4]), 0.5), eye_avg);
    // x = eye_to_eye - flipud(eye_to_mouth) * [-1, 1], the half-side along the crop's width.
    let x = [eye_to_eye[0] + eye_to_mouth[1], eye_to_eye[1] - eye_to_mouth[0]];
    let x = scale(x, 1.0 / norm(x));
    let x = scale(x, (norm(eye_to_eye) * 2.0).max(norm(eye_to_mouth) * 1.8));
    let y = [-x[1], x[0]];
    let c = add(eye_avg, scale(eye_to_mouth, 0.1));
    let quad = [sub(sub(c, x), y), add(sub(c, x), y), add(add(c, x), y), sub(add(c, x), y)];
    (quad, norm(x) * 2.0)
}

/// The `size` x `size` FFHQ crop of `face` in `photo`.
pub fn align(photo: &RgbImage, face: &Face, size: u32) -> Result<AlignedFace> {
    align_warped_at(photo, face, size, None)
}

/// [`align`] with the quad warped to `transform_size` x `transform_size` before the Lanczos resize
/// to `size` (the recipe's `transform_size`: 4096 there, which makes the crop the recipe's bit for
/// bit); `None` picks the smallest multiple of `size` that does not undersample the photo.
pub fn align_warped_at(photo: &RgbImage, face: &Face, size: u32, transform_size: Option<u32>) -> Result<AlignedFace> {
    if size == 0 {
        let problem = "the crop needs at least 1 pixel".into();
        return Err(Error::Setting { name: "size", value: "0".into(), problem });
    }
    if let Some(t) = transform_size.filter(|&t| t < size) {
        let problem = format!("the quad is warped at the crop's size ({size}) or more");
        return Err(Error::Setting { name: "transform_size", value: t.to_string(), problem });
    }
    let (photo_quad, photo_qsize) = ffhq_quad(face);
    if !(photo_qsize.is_finite() && photo_qsize >= 1.0) || photo_quad.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "the face's landmarks {:?} give no crop (its eyes and mouth are at one point)",
            face.landmarks
        )));
    }
    let (mut quad, mut qsize) = (photo_quad, photo_qsize);

    // Shrink a photo much larger than the crop: the recipe resizes the whole photo, of which only
    // the crop below is computed.
    let shrink = (qsize / f64::from(size) * 0.5).floor();
    let (mut w, mut h) = (photo.width(), photo.height());
    if shrink > 1.0 {
        let side = |v: u32| ((f64::from(v) / shrink).round_ties_even() as u32).max(1);
        (w, h) = (side(w), side(h));
        quad = quad.map(|p| scale(p, 1.0 / shrink));
        qsize /= shrink;
    }

    // Crop to the quad and a border.
    let border = ((qsize * 0.1).round_ties_even() as i64).max(3);
    let bounds = |quad: &[Point; 4]| {
        let (xs, ys) = (quad.map(|p| p[0]), quad.map(|p| p[1]));
        let min = |v: [f64; 4]| v.into_iter().fold(f64::INFINITY, f64::min).floor() as i64;
        let max = |v: [f64; 4]| v.into_iter().fold(f64::NEG_INFINITY, f64::max).ceil() as i64;
        [min(xs), min(ys), max(xs), max(ys)]
    };
    let (wi, hi) = (i64::from(w), i64::from(h));
    let [x0, y0, x1, y1] = bounds(&quad);
    let crop = [(x0 - border).max(0), (y0 - border).max(0), (x1 + border).min(wi), (y1 + border).min(hi)];
    if crop[2] <= crop[0] || crop[3] <= crop[1] {
        return Err(Error::Input(format!(
            "the face's crop {photo_quad:?} lies outside the {}x{} photo",
            photo.width(),
            photo.height()
        )));
    }
    let window = crop.map(|v| v as u32);
    let cropped = if shrink > 1.0 {
        resize_window(photo, (w, h), window, Filter::Lanczos, Weights::Pil)
    } else {
        image::imageops::crop_imm(photo, window[0], window[1], window[2] - window[0], window[3] - window[1]).to_image()
    };
    let mut img = &cropped;
    quad = quad.map(|p| sub(p, [crop[0] as f64, crop[1] as f64]));

    // Reflect-pad where the quad leaves the photo.
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let [x0, y0, x1, y1] = bounds(&quad);
    let pad = [(border - x0).max(0), (border - y0).max(0), (x1 - w + border).max(0), (y1 - h + border).max(0)];
    let padded_photo;
    let padded = pad.iter().copied().max().unwrap_or(0) > border - 4;
    if padded {
        let least = (qsize * 0.3).round_ties_even() as i64;
        let pad = pad.map(|p| p.max(least));
        padded_photo = pad_and_blur(img, pad, qsize)?;
        img = &padded_photo;
        quad = quad.map(|p| add(p, [pad[0] as f64, pad[1] as f64]));
    }

    // Warp at a multiple of the output size that samples the (shrunk) photo at least once per
    // pixel, then resize down.
    let transform_size = transform_size.unwrap_or(size * ((qsize / f64::from(size)).ceil() as u32).max(1));
    let warped = quad_transform(img, &quad, transform_size);
    let image = if transform_size > size { resize(&warped, size, size, Filter::Lanczos, Weights::Pil) } else { warped };
    Ok(AlignedFace { image, quad: photo_quad, padded })
}

/// Index `i` of a line of `n` samples extended by reflection about its end samples (numpy's
/// `reflect`: `d c b | a b c d | c b a`).
fn reflect(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let m = i.rem_euclid(2 * (n - 1));
    (if m >= n { 2 * (n - 1) - m } else { m }) as usize
}

/// Index `i` of a line of `n` samples extended by mirroring about its ends (scipy's `reflect`:
/// `c b a | a b c | c b a`).
fn mirror(i: i64, n: i64) -> usize {
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// The recipe's padding: `img` reflect-padded by `[left, top, right, bottom]`, blurred (Gaussian of
/// sigma `0.02 qsize`) increasingly toward the padded edges and blended there toward the median
/// colour; as numpy computes it (float32 pixels, a float64 mask, so each blend is done in float64
/// and stored as float32), rounded to 8 bits at the end.
fn pad_and_blur(img: &RgbImage, [left, top, right, bottom]: [i64; 4], qsize: f64) -> Result<RgbImage> {
    let (iw, ih) = (i64::from(img.width()), i64::from(img.height()));
    let (w, h) = (iw + left + right, ih + top + bottom);
    let (wu, hu) = (w as usize, h as usize);
    if wu.checked_mul(hu).and_then(|n| n.checked_mul(3)).is_none_or(|n| n > 1 << 30) {
        return Err(Error::Input(format!("the face's padded crop would be {w}x{h} pixels, too large")));
    }
    let row = wu * 3;
    let mut pixels = vec![0f32; wu * hu * 3];
    let columns: Vec<usize> = (0..w).map(|x| reflect(x - left, iw) * 3).collect();
    pixels.par_chunks_mut(row).enumerate().for_each(|(y, out)| {
        let source = &img.as_raw()[reflect(y as i64 - top, ih) * iw as usize * 3..];
        for (px, &x) in out.chunks_exact_mut(3).zip(&columns) {
            px.iter_mut().zip(&source[x..x + 3]).for_each(|(p, &v)| *p = f32::from(v));
        }
    });
    // mask = max(1 - min(x / left, (w-1-x) / right), 1 - min(y / top, (h-1-y) / bottom)); the
    // blur is blended in by (3 mask + 1) clipped to [0, 1], the median by mask clipped.
    let edge = |v: i64, n: i64, before: i64, after: i64| {
        1.0 - (v as f64 / before as f64).min((n - 1 - v) as f64 / after as f64)
    };
    let mask_x: Vec<f64> = (0..w).map(|x| edge(x, w, left, right)).collect();
    let mask_y: Vec<f64> = (0..h).map(|y| edge(y, h, top, bottom)).collect();
    // Where both masks are at most -1/3 the blur is not blended in: its values are not needed.
    let unblended = |mask: &[f64]| {
        let first = mask.iter().position(|&m| m * 3.0 + 1.0 <= 0.0).unwrap_or(mask.len());
        let end = first + mask[first..].iter().take_while(|&&m| m * 3.0 + 1.0 <= 0.0).count();
        first..end
    };
    let blurred = gaussian_blur(&pixels, wu, hu, qsize * 0.02, [unblended(&mask_x), unblended(&mask_y)]);
    pixels.par_chunks_mut(row).zip(blurred.par_chunks(row)).zip(&mask_y).for_each(|((out, blurred), &my)| {
        for ((px, b), &mx) in out.chunks_exact_mut(3).zip(blurred.chunks_exact(3)).zip(&mask_x) {
            let blend = (mx.max(my) * 3.0 + 1.0).clamp(0.0, 1.0);
            if blend > 0.0 {
                px.iter_mut().zip(b).for_each(|(v, &b)| *v = (f64::from(*v) + f64::from(b - *v) * blend) as f32);
            }
        }
    });
    let median = median_rgb(&pixels);
    pixels.par_chunks_mut(row).zip(&mask_y).for_each(|(out, &my)| {
        for (px, &mx) in out.chunks_exact_mut(3).zip(&mask_x) {
            let fade = mx.max(my).clamp(0.0, 1.0);
            px.iter_mut().zip(median).for_each(|(v, m)| *v = (f64::from(*v) + f64::from(m - *v) * fade) as f32);
        }
    });
    let bytes = pixels.iter().map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8).collect();
    Ok(RgbImage::from_raw(w as u32, h as u32, bytes).expect("w x h RGB pixels"))
}

/// scipy's `gaussian_filter(img, [sigma, sigma, 0])` on an RGB float32 image: a kernel of radius
/// `int(4 sigma + 0.5)`, rows (axis 0) then columns, each pass summed in f64 and stored as f32.
/// The pixels in columns `unneeded[0]` of rows `unneeded[1]` are left at zero, and so is what
/// only they need.
///
/// Each output row is accumulated tap by tap over whole (mirror-extended) lines, so the sums are
/// scipy's, in its order, yet vectorise; rows run in parallel (the radius reaches 100 px and more
/// on large photos).
fn gaussian_blur(pixels: &[f32], w: usize, h: usize, sigma: f64, unneeded: [Range<usize>; 2]) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let mut kernel: Vec<f64> = (0..=radius).map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp()).collect();
    let total = kernel[0] + 2.0 * kernel[1..].iter().sum::<f64>();
    kernel.iter_mut().for_each(|k| *k /= total);
    let (row, r) = (w * 3, radius as usize);
    // The column ranges of row `y` to compute, when the rows' columns `skipped` are not needed.
    let [unneeded_columns, unneeded_rows] = unneeded;
    let spans = move |y: usize, skipped: Range<usize>| -> [Range<usize>; 2] {
        if unneeded_rows.contains(&y) && skipped.start < skipped.end {
            [0..skipped.start, skipped.end..w]
        } else {
            [0..w, w..w]
        }
    };
    // The horizontal pass reads the vertical pass's values up to `radius` columns away.
    let read = unneeded_columns.start.saturating_add(r)..unneeded_columns.end.saturating_sub(r);
    let mut vertical = vec![0f32; pixels.len()];
    vertical.par_chunks_mut(row).enumerate().for_each_init(
        || vec![0f64; row],
        |acc, (y, out)| {
            for span in spans(y, read.clone()) {
                let samples = 3 * span.start..3 * span.end;
                let lines: Vec<&[f32]> = (-radius..=radius)
                    .map(|d| &pixels[mirror(y as i64 + d, h as i64) * row..][samples.clone()])
                    .collect();
                convolve(&kernel, &lines, &mut acc[samples.clone()], &mut out[samples]);
            }
        },
    );
    let mut blurred = vec![0f32; pixels.len()];
    blurred.par_chunks_mut(row).zip(vertical.par_chunks(row)).enumerate().for_each_init(
        || (vec![0f32; (w + 2 * r) * 3], vec![0f64; row]),
        |(extended, acc), (y, (out, src))| {
            for (x, e) in extended.chunks_exact_mut(3).enumerate() {
                let s = mirror(x as i64 - radius, w as i64) * 3;
                e.copy_from_slice(&src[s..s + 3]);
            }
            for span in spans(y, unneeded_columns.clone()) {
                let samples = 3 * span.start..3 * span.end;
                let lines: Vec<&[f32]> = (0..=2 * r).map(|k| &extended[3 * k..][samples.clone()]).collect();
                convolve(&kernel, &lines, &mut acc[samples.clone()], &mut out[samples]);
            }
        },
    );
    blurred
}

simd_fn! {
    /// One [`gaussian_blur`] pass for one output line: `lines[radius + d]` is the input line `d`
    /// samples away. Symmetric taps are summed as scipy does: `centre * k0 + (before_j + after_j) *
    /// k_j`, j = 1, 2, ... The line is done in blocks of [`BLUR_BLOCK`] samples, all taps per block,
    /// so that the sums stay in the L1 cache.
    fn convolve(kernel: &[f64], lines: &[&[f32]], acc: &mut [f64], out: &mut [f32]) {
        let radius = kernel.len() - 1;
        for start in (0..out.len()).step_by(BLUR_BLOCK) {
            let block = start..(start + BLUR_BLOCK).min(out.len());
            let acc = &mut acc[block.clone()];
            let centre = &lines[radius][block.clone()];
            acc.iter_mut().zip(centre).for_each(|(a, &c)| *a = f64::from(c) * kernel[0]);
            // Four taps per pass over the block: a quarter of the loads and stores of the sums,
            // each sum still taking its taps in order.
            let tap = |j: usize| (kernel[j], &lines[radius - j][block.clone()], &lines[radius + j][block.clone()]);
            let mut j = 1;
            while j + 3 <= radius {
                let [(k1, b1, f1), (k2, b2, f2), (k3, b3, f3), (k4, b4, f4)] = [tap(j), tap(j + 1), tap(j + 2), tap(j + 3)];
                for (i, a) in acc.iter_mut().enumerate() {
                    let mut sum = *a;
                    sum += (f64::from(b1[i]) + f64::from(f1[i])) * k1;
                    sum += (f64::from(b2[i]) + f64::from(f2[i])) * k2;
                    sum += (f64::from(b3[i]) + f64::from(f3[i])) * k3;
                    sum += (f64::from(b4[i]) + f64::from(f4[i])) * k4;
                    *a = sum;
                }
                j += 4;
            }
            for j in j..=radius {
                let (k, before, after) = tap(j);
                for ((a, &b), &f) in acc.iter_mut().zip(before).zip(after) {
                    *a += (f64::from(b) + f64::from(f)) * k;
                }
            }
            out[block].iter_mut().zip(acc.iter()).for_each(|(o, &a)| *o = a as f32);
        }
    }
}

/// Samples per block of [`convolve`]: 4 KiB of f64 sums.
const BLUR_BLOCK: usize = 512;

/// numpy's `median(img, axis=(0, 1))` of an RGB float32 image: per channel, the middle sample, or
/// the mean of the two middle ones.
fn median_rgb(pixels: &[f32]) -> [f32; 3] {
    std::array::from_fn(|c| {
        let mut v: Vec<f32> = pixels.iter().skip(c).step_by(3).copied().collect();
        let n = v.len();
        let (_, &mut upper, _) = v.select_nth_unstable_by(n / 2, f32::total_cmp);
        if n % 2 == 1 {
            upper
        } else {
            let lower = v[..n / 2].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (lower + upper) / 2.0
        }
    })
}

/// PIL's `img.transform((size, size), QUAD, (quad + 0.5).flatten(), BILINEAR)`: output pixel
/// centres mapped bilinearly onto the quad, sampled bilinearly with edge clamping, truncated to 8
/// bits; samples falling outside the image are black.
fn quad_transform(img: &RgbImage, quad: &[Point; 4], size: u32) -> RgbImage {
    let [nw, sw, se, ne] = quad.map(|p| add(p, [0.5, 0.5]));
    let s = 1.0 / f64::from(size);
    let ax = [nw[0], (ne[0] - nw[0]) * s, (sw[0] - nw[0]) * s, (se[0] - sw[0] - ne[0] + nw[0]) * s * s];
    let ay = [nw[1], (ne[1] - nw[1]) * s, (sw[1] - nw[1]) * s, (se[1] - sw[1] - ne[1] + nw[1]) * s * s];
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let (wf, hf) = (w as f64, h as f64);
    let raw = img.as_raw();
    let at = |x: i64, y: i64, c: usize| f64::from(raw[(y as usize * w as usize + x as usize) * 3 + c]);
    let mut out = vec![0u8; size as usize * size as usize * 3];
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        let u = (i % size as usize) as f64 + 0.5;
        let v = (i / size as usize) as f64 + 0.5;
        let sx = ax[0] + ax[1] * u + ax[2] * v + ax[3] * u * v;
        let sy = ay[0] + ay[1] * u + ay[2] * v + ay[3] * u * v;
        if !(0.0..wf).contains(&sx) || !(0.0..hf).contains(&sy) {
            continue;
        }
        let (sx, sy) = (sx - 0.5, sy - 0.5);
        let (x, y) = (sx.floor() as i64, sy.floor() as i64);
        let (dx, dy) = (sx - x as f64, sy - y as f64);
        let (x0, x1, y0) = (x.clamp(0, w - 1), (x + 1).clamp(0, w - 1), y.clamp(0, h - 1));
        for (c, out) in px.iter_mut().enumerate() {
            let lerp = |row: i64| at(x0, row, c) + (at(x1, row, c) - at(x0, row, c)) * dx;
            let top = lerp(y0);
            let bottom = if y + 1 < h { lerp(y + 1) } else { top };
            *out = (top + (bottom - top) * dy) as u8;
        }
    }
    RgbImage::from_raw(size, size, out).expect("size x size RGB pixels")
}

const BOX: Rgb<u8> = Rgb([255, 220, 0]);
const LANDMARK: Rgb<u8> = Rgb([255, 40, 40]);
const QUAD: Rgb<u8> = Rgb([40, 220, 60]);

/// The longest side of a [`preview`]: enough to check the faces, and quick to write.
pub const PREVIEW_MAX_SIDE: u32 = 1600;

/// Grey of the preview's margin: where a crop quad reaches past the photo.
const MARGIN: Rgb<u8> = Rgb([96, 96, 96]);

/// `photo` with every face's box (yellow) and landmarks (red), and the crop `quads` (green): what
/// the detector found and where the crops come from, for a person to check. Where a quad reaches
/// past the photo, the canvas extends with a grey margin that shows the quad whole: that part of
/// the crop is filled by reflection. At most [`PREVIEW_MAX_SIDE`] pixels on its longest side.
pub fn preview(photo: &RgbImage, faces: &[Face], quads: &[[Point; 4]]) -> RgbImage {
    let (pw, ph) = (f64::from(photo.width()), f64::from(photo.height()));
    let corners = quads.iter().flatten();
    let x0 = corners.clone().fold(0f64, |m, p| m.min(p[0].floor()));
    let y0 = corners.clone().fold(0f64, |m, p| m.min(p[1].floor()));
    let x1 = corners.clone().fold(pw, |m, p| m.max(p[0].ceil()));
    let y1 = corners.fold(ph, |m, p| m.max(p[1].ceil()));
    let scale = (f64::from(PREVIEW_MAX_SIDE) / (x1 - x0).max(y1 - y0)).min(1.0);
    let side = |v: f64| ((v * scale).round() as u32).max(1);
    let mut image = RgbImage::from_pixel(side(x1 - x0), side(y1 - y0), MARGIN);
    let shown =
        if scale < 1.0 { resize(photo, side(pw), side(ph), Filter::Bilinear, Weights::Pil) } else { photo.clone() };
    // x0, y0 <= 0: the photo's corner on the canvas.
    image::imageops::replace(&mut image, &shown, (-x0 * scale).round() as i64, (-y0 * scale).round() as i64);
    let at = |p: Point| [(p[0] - x0) * scale, (p[1] - y0) * scale];
    let width = (image.width().min(image.height()) as f64 / 300.0).max(1.0);
    for face in faces {
        let [x1, y1, x2, y2] = face.bbox.map(f64::from);
        let corners = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]].map(at);
        for i in 0..4 {
            draw_line(&mut image, corners[i], corners[(i + 1) % 4], width, BOX);
        }
        for p in face.landmarks {
            draw_disc(&mut image, at(p.map(f64::from)), width * 1.5, LANDMARK);
        }
    }
    for quad in quads {
        let quad = quad.map(at);
        for i in 0..4 {
            draw_line(&mut image, quad[i], quad[(i + 1) % 4], width, QUAD);
        }
    }
    image
}

/// A line `width` pixels wide from `a` to `b`, clipped to the image.
fn draw_line(image: &mut RgbImage, a: Point, b: Point, width: f64, color: Rgb<u8>) {
    let steps = ((b[0] - a[0]).hypot(b[1] - a[1]) * 2.0).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        draw_disc(image, [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t], width / 2.0, color);
    }
}

/// A filled disc of `radius` pixels (at least the pixel under `centre`), clipped to the image.
fn draw_disc(image: &mut RgbImage, centre: Point, radius: f64, color: Rgb<u8>) {
    let r = radius.max(0.5);
    let (x0, x1) = ((centre[0] - r).floor().max(0.0), (centre[0] + r).ceil().min(f64::from(image.width()) - 1.0));
    let (y0, y1) = ((centre[1] - r).floor().max(0.0), (centre[1] + r).ceil().min(f64::from(image.height()) - 1.0));
    let (mut y, r2) = (y0, r * r);
    while y <= y1 {
        let mut x = x0;
        while x <= x1 {
            if (x - centre[0]).powi(2) + (y - centre[1]).powi(2) <= r2 {
                image.put_pixel(x as u32, y as u32, color);
            }
            x += 1.0;
        }
        y += 1.0;
    }
}
