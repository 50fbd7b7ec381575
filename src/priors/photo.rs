//! The identity photo: decoded, made 8-bit RGB and resized to 512x512 exactly as the StableIdentity
//! reference sees it (<https://github.com/qinghew/StableIdentity>, `datasets_face/face_id.py`).
//!
//! The reference opens the photo with PIL (`Image.open(path).convert("RGB")`) and expects it to be
//! a 512x512 aligned face already; a photo of another size is brought to 512x512 with PIL's
//! `Image.resize` default, bicubic. [`resize`] reproduces Pillow's resampler (`Resample.c`)
//! bit for bit: a separable convolution whose support grows with the downscale factor
//! (antialiasing), fixed-point weights, horizontal pass then vertical, rounding to 8 bits after each
//! pass. The same routine with torchvision's 16-bit weights gives the ViT processor's resize (see
//! [`crate::priors::face_feature`]).
//!
//! Conversions follow PIL's `convert("RGB")`: grey is replicated, alpha is dropped (not blended),
//! 16-bit samples keep their high byte (PIL does so for 16-bit RGB; for 16-bit grey PIL clips at
//! 255, which whitens the photo, so there the high byte is taken as well). Unlike the reference,
//! the EXIF orientation is applied, so a phone portrait is upright.
//!
//! A photo is bounded before it is decoded: the file's size, then the pixel count its header
//! claims ([`MAX_PHOTO_PIXELS`]) and the memory decoding it takes, so a decompression bomb or a
//! damaged header is an error at once. A large photo is reduced row by row from the decoded image,
//! never converted or copied whole.

use std::collections::VecDeque;
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::{Device, Tensor};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Side of the square image the identity is learned from.
pub const PHOTO_SIZE: u32 = 512;

/// Smallest accepted side: below it the face would have to be upscaled more than 2x.
pub const MIN_PHOTO_SIDE: u32 = 256;

/// Most pixels a photo may have (100 megapixels: 300 MB as 8-bit RGB).
pub const MAX_PHOTO_PIXELS: u64 = 100_000_000;

/// Largest photo file read, far above what a photo of [`MAX_PHOTO_PIXELS`] takes in any usual
/// format (a PNG of 100 megapixels is rarely 300 MB).
const MAX_PHOTO_FILE_BYTES: u64 = 512 << 20;

/// Most memory decoding may take: the decoded image (100 megapixels of 16-bit RGBA take 800 MB;
/// twice that while a rotation from the EXIF orientation is applied) and the decoder's buffers.
const MAX_DECODE_BYTES: u64 = 1 << 30;

/// An identity photo, 512x512 8-bit RGB, with the digest of the file it came from.
#[derive(Debug, Clone)]
pub struct Photo {
    rgb: RgbImage,
    sha256: String,
}

impl Photo {
    /// An identity photo made from an aligned crop of the file whose digest is `sha256`.
    pub fn from_crop(crop: RgbImage, sha256: String) -> Result<Self> {
        if crop.dimensions() != (PHOTO_SIZE, PHOTO_SIZE) {
            let (w, h) = crop.dimensions();
            return Err(Error::Internal(format!("a {w}x{h} crop where the learner takes {PHOTO_SIZE}x{PHOTO_SIZE}")));
        }
        Ok(Self { rgb: crop, sha256 })
    }

    /// The 512x512 RGB image (row-major, 3 bytes per pixel via `as_raw()`).
    pub fn rgb(&self) -> &RgbImage {
        &self.rgb
    }

    /// Lower-case hex SHA-256 of the source file's bytes, to record which photo an identity came from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// `(1, 3, 512, 512)` f32 on the CPU in [-1, 1], as torchvision's `ToTensor` then
    /// `Normalize(0.5, 0.5)`: the VAE's input.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(rgb_to_tensor(&self.rgb, |v| (f32::from(v) / 255.0 - 0.5) / 0.5)?)
    }
}

/// `(1, 3, h, w)` f32 tensor of `f(level)` for every sample of `image`.
pub fn rgb_to_tensor(image: &RgbImage, f: impl Fn(u8) -> f32) -> candle_core::Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut planar = vec![0f32; 3 * h * w];
    for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            planar[c * h * w + i] = f(v);
        }
    }
    Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)
}

/// Reads the photo at `path` (any format the `image` crate decodes, recognised by content),
/// converts it to 8-bit RGB and resizes it to 512x512 as PIL does.
pub fn load_photo(path: &Path) -> Result<Photo> {
    let bad = |what: String| Error::Input(format!("photo {}: {what}", path.display()));
    let bytes = read_photo_file(path).map_err(bad)?;
    let image = decode(&bytes, MIN_PHOTO_SIDE).map_err(bad)?;
    let rgb = resize_rows(
        (image.width(), image.height()),
        |y, row| row.copy_from_slice(rgb8_row(&image, y).as_raw()),
        (PHOTO_SIZE, PHOTO_SIZE),
        [0, 0, PHOTO_SIZE, PHOTO_SIZE],
        Filter::Bicubic,
        Weights::Pil,
    );
    Ok(Photo { rgb, sha256: hex_sha256(&bytes) })
}

/// Reads the photo at `path` as [`load_photo`] does (same checks, EXIF orientation applied) and
/// returns it upright at its full resolution in 8-bit RGB: the input of face detection and
/// alignment.
pub fn load_upright(path: &Path) -> Result<RgbImage> {
    Ok(load_upright_with_digest(path)?.0)
}

/// [`load_upright`], and the SHA-256 of the file (lower-case hex).
pub fn load_upright_with_digest(path: &Path) -> Result<(RgbImage, String)> {
    decode_upright(path, "photo", MIN_PHOTO_SIDE)
}

/// Reads any image (a ControlNet's control image, a pose map) as [`load_upright_with_digest`]
/// does, with no minimum size; `what` names it in errors.
pub fn load_image_with_digest(path: &Path, what: &str) -> Result<(RgbImage, String)> {
    decode_upright(path, what, 1)
}

fn decode_upright(path: &Path, what: &str, min_side: u32) -> Result<(RgbImage, String)> {
    let bad = |problem: String| Error::Input(format!("{what} {}: {problem}", path.display()));
    let bytes = read_photo_file(path).map_err(bad)?;
    let rgb = match decode(&bytes, min_side).map_err(bad)? {
        DynamicImage::ImageRgb8(rgb) => rgb,
        image => {
            let (w, h) = (image.width(), image.height());
            let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
            for y in 0..h {
                rgb.extend_from_slice(rgb8_row(&image, y).as_raw());
            }
            RgbImage::from_raw(w, h, rgb).expect("rows of the image's width")
        }
    };
    Ok((rgb, hex_sha256(&bytes)))
}

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a photo file, refused at once if it is longer than [`MAX_PHOTO_FILE_BYTES`] or
/// does not start like an image (`/dev/zero`); a device or pipe, which has no length to check, is
/// read to one byte over the limit at most.
fn read_photo_file(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read it ({e})");
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    let too_large = || {
        format!(
            "the file is larger than {} MiB, more than a photo of the largest accepted size ({} megapixels) \
             takes; reduce it first",
            MAX_PHOTO_FILE_BYTES >> 20,
            MAX_PHOTO_PIXELS / 1_000_000
        )
    };
    let len = file.metadata().map_err(cannot_read)?.len();
    if len > MAX_PHOTO_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    (&mut file).take(16).read_to_end(&mut bytes).map_err(cannot_read)?;
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if image::guess_format(&bytes).is_err() {
        return Err(not_an_image());
    }
    file.take(MAX_PHOTO_FILE_BYTES + 1 - bytes.len() as u64).read_to_end(&mut bytes).map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_PHOTO_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

fn not_an_image() -> String {
    "not an image file (no known image format recognised in its content)".into()
}

/// Decodes an image file held in memory, upright (EXIF orientation applied), after checking its
/// size from the header: at most [`MAX_PHOTO_PIXELS`], at least `min_side` on a side.
fn decode(bytes: &[u8], min_side: u32) -> std::result::Result<DynamicImage, String> {
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read it ({e})"))?;
    let Some(format) = reader.format() else {
        return Err(not_an_image());
    };
    let broken = |e: image::ImageError| format!("cannot decode it as {format:?}: {e} (is the file damaged?)");
    // The JPEG decoder fills a truncated scan with grey instead of failing (PIL refuses such a
    // file), so check that the compressed data is complete.
    if format == image::ImageFormat::Jpeg && jpeg_is_truncated(bytes) {
        return Err(
            "the JPEG data is truncated (it stops before its end-of-image marker); the file is incomplete".into()
        );
    }
    // The header is read under the memory limit (PNG's metadata chunks); the image's size is
    // checked here before the decoder is given the limits on it.
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(broken)?;
    let orientation = decoder.orientation().map_err(broken)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_PHOTO_PIXELS {
        return Err(format!(
            "the image is {w}x{h} pixels ({} megapixels), more than the limit of {} megapixels; reduce it \
             first (the identity is learned from {PHOTO_SIZE}x{PHOTO_SIZE})",
            pixels.div_ceil(1_000_000),
            MAX_PHOTO_PIXELS / 1_000_000
        ));
    }
    if w < min_side || h < min_side {
        let rotated = matches!(
            orientation,
            Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
        );
        let (w, h) = if rotated { (h, w) } else { (w, h) };
        return Err(format!(
            "the image is {w}x{h} pixels, smaller than {min_side} on a side; give a photo of at \
             least {min_side}x{min_side} (ideally {PHOTO_SIZE}x{PHOTO_SIZE}): an upscaled small \
             photo only teaches the model blur"
        ));
    }
    let copies = if matches!(orientation, Orientation::NoTransforms) { 1 } else { 2 };
    let decoded = decoder.total_bytes().saturating_mul(copies);
    limits.reserve(decoded).map_err(|_| {
        format!(
            "decoding the {w}x{h} image ({:?}) would take {} MiB, more than the limit of {} MiB; convert it \
             to 8-bit RGB or reduce it first",
            decoder.color_type(),
            decoded >> 20,
            MAX_DECODE_BYTES >> 20
        )
    })?;
    let max_side = u32::try_from(MAX_PHOTO_PIXELS / u64::from(min_side)).unwrap_or(u32::MAX);
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    decoder.set_limits(limits).map_err(broken)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(broken)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Whether a JPEG stops before the end-of-image marker (FF D9) that closes its image data.
/// The header segments are walked by their lengths up to the first scan, which skips the
/// complete JPEG thumbnail an EXIF header may embed; data appended after the end marker (motion
/// photos) does not matter. A header that cannot be walked is left to the decoder to judge.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let mut at = 2; // after the start-of-image marker
    loop {
        let Some(&[0xFF, marker]) = bytes.get(at..at + 2) else {
            return at + 2 > bytes.len();
        };
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        let Some(&[hi, lo]) = bytes.get(at + 2..at + 4) else {
            return true;
        };
        let next = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
        if marker == 0xDA {
            // Start of scan: entropy-coded data never holds FF D9 (an FF there is stuffed as FF 00).
            return !bytes.get(next..).is_some_and(|scan| scan.windows(2).any(|m| m == [0xFF, 0xD9]));
        }
        at = next;
    }
}

/// Row `y` of `image` in 8-bit RGB as PIL's `convert("RGB")` gives it (see the module doc for
/// 16-bit samples).
fn rgb8_row(image: &DynamicImage, y: u32) -> RgbImage {
    let row = image.crop_imm(0, y, image.width(), 1);
    match row {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let wide = row.to_rgb16();
            let (w, h) = wide.dimensions();
            let high: Vec<u8> = wide.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
            RgbImage::from_raw(w, h, high).expect("same dimensions")
        }
        // 8-bit grey / alpha / float: the image crate replicates grey and drops alpha like PIL.
        other => other.to_rgb8(),
    }
}

/// The resampling filters of PIL used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1 (PIL `BILINEAR`).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (PIL `BICUBIC`).
    Bicubic,
    /// Sinc windowed by a sinc 3 times wider, support 3 (PIL `LANCZOS`, once `ANTIALIAS`).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear if x < 1.0 => 1.0 - x,
            Self::Bicubic if x < 1.0 => (1.5 * x - 2.5) * x * x + 1.0,
            Self::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5,
            Self::Lanczos if x < 3.0 => sinc(x) * sinc(x / 3.0),
            _ => 0.0,
        }
    }
}

/// `sin(pi x) / (pi x)`, computed as Pillow does.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// How the filter weights are rounded to fixed point, which decides the last bit of some pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Pillow: 32-bit weights with 22 fractional bits.
    Pil,
    /// PyTorch's uint8 antialiased interpolation (torchvision's `resize` on uint8 tensors): 16-bit
    /// weights with as many fractional bits as the largest weight allows.
    Torchvision,
}

/// The input pixels and fixed-point weights that make one output pixel along one axis.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// Weights of every output position along an axis of `in_size` samples resized to `out_size`,
/// and their number of fractional bits.
fn taps(in_size: usize, out_size: usize, filter: Filter, rounding: Weights) -> (Vec<Taps>, u32) {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter by the scale factor: that is the antialiasing.
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let inv = 1.0 / filter_scale;
    let float_taps: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // `as i64` truncates toward zero, as C's (int) cast in both references.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (first..end).map(|x| filter.eval((x as f64 - center + 0.5) * inv)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (first, w)
        })
        .collect();
    let bits = match rounding {
        Weights::Pil => 22,
        Weights::Torchvision => {
            let max = float_taps.iter().flat_map(|(_, w)| w.iter().copied()).fold(0.0, f64::max);
            (0..22).find(|p| (0.5 + max * f64::from(1u32 << (p + 1))) as i64 >= 1 << 15).unwrap_or(22)
        }
    };
    let one = f64::from(1u32 << bits);
    let taps = float_taps
        .into_iter()
        .map(|(first, w)| Taps {
            first,
            weights: w.iter().map(|&v| if v < 0.0 { (v * one - 0.5) as i64 } else { (v * one + 0.5) as i64 }).collect(),
        })
        .collect();
    (taps, bits)
}

/// One output pixel: the taps' weighted sum of the RGB pixels `at(k)` (k-th tap), rounded to
/// 8 bits like both references.
fn convolve_pixel(tap: &Taps, bits: u32, out: &mut [u8], at: impl Fn(usize) -> [u8; 3]) {
    let half = 1i64 << (bits - 1);
    let mut acc = [half; 3];
    for (k, &wt) in tap.weights.iter().enumerate() {
        let px = at(k);
        for c in 0..3 {
            acc[c] += i64::from(px[c]) * wt;
        }
    }
    for c in 0..3 {
        out[c] = (acc[c] >> bits).clamp(0, 255) as u8;
    }
}

/// Resizes an RGB image to `width` x `height` with PIL's antialiased separable resampling
/// (`Image.resize`), or with PyTorch's uint8 variant of it; the result is bit-exact to either.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter, rounding: Weights) -> RgbImage {
    resize_window(image, (width, height), [0, 0, width, height], filter, rounding)
}

/// The pixels `[x0, y0, x1, y1)` of [`resize`]`(image, width, height, ..)`, computed from the input
/// pixels they need only: a small window of a large photo's resize costs the window's size.
pub fn resize_window(
    image: &RgbImage,
    (width, height): (u32, u32),
    window: [u32; 4],
    filter: Filter,
    rounding: Weights,
) -> RgbImage {
    let row_len = image.width() as usize * 3;
    resize_rows(
        image.dimensions(),
        |y, row| row.copy_from_slice(&image.as_raw()[y as usize * row_len..][..row_len]),
        (width, height),
        window,
        filter,
        rounding,
    )
}

/// The window `[x0, y0, x1, y1)` of the resize to `(width, height)` (see [`resize`]) of an image
/// of `(in_w, in_h)` whose RGB rows `read_row(y, row)` gives: rows are asked for once each, in
/// increasing order, only those the window needs. The horizontal pass runs on each row as it comes
/// and the vertical pass keeps only the rows its current output row needs, so memory stays a few
/// rows of the output whatever the input's size.
fn resize_rows(
    (in_w, in_h): (u32, u32),
    mut read_row: impl FnMut(u32, &mut [u8]),
    (width, height): (u32, u32),
    [x0, y0, x1, y1]: [u32; 4],
    filter: Filter,
    rounding: Weights,
) -> RgbImage {
    let (in_w, out_w, out_h) = (in_w as usize, width as usize, height as usize);
    let (columns, rows) = (x0 as usize..x1 as usize, y0 as usize..y1 as usize);
    let horizontal = (out_w != in_w).then(|| taps(in_w, out_w, filter, rounding));
    let mut source = vec![0u8; in_w * 3];
    // Input row `y`, resampled horizontally to the window's columns.
    let mut narrowed_row = |y: usize| {
        read_row(y as u32, &mut source);
        match &horizontal {
            None => source[columns.start * 3..columns.end * 3].to_vec(),
            Some((taps, bits)) => {
                let mut row = vec![0u8; columns.len() * 3];
                for (x, tap) in taps[columns.clone()].iter().enumerate() {
                    let px = |k: usize| source[(tap.first + k) * 3..][..3].try_into().expect("3 bytes");
                    convolve_pixel(tap, *bits, &mut row[x * 3..][..3], px);
                }
                row
            }
        }
    };
    let mut out = Vec::with_capacity(columns.len() * rows.len() * 3);
    if out_h == in_h as usize {
        for y in rows.clone() {
            out.extend(narrowed_row(y));
        }
    } else {
        let (taps, bits) = taps(in_h as usize, out_h, filter, rounding);
        // Input rows `window_start..` as narrowed, from the first the current output row needs.
        let mut window: VecDeque<Vec<u8>> = VecDeque::new();
        let mut window_start = taps[rows.clone()].first().map_or(0, |tap| tap.first);
        let mut row = vec![0u8; columns.len() * 3];
        for tap in &taps[rows.clone()] {
            while window_start + window.len() < tap.first + tap.weights.len() {
                window.push_back(narrowed_row(window_start + window.len()));
            }
            while window_start < tap.first {
                window.pop_front();
                window_start += 1;
            }
            for x in 0..columns.len() {
                let px = |k: usize| window[k][x * 3..][..3].try_into().expect("3 bytes");
                convolve_pixel(tap, bits, &mut row[x * 3..][..3], px);
            }
            out.extend_from_slice(&row);
        }
    }
    RgbImage::from_raw(x1 - x0, y1 - y0, out).expect("resampled buffer has the window's size")
}
