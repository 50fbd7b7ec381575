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

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Side of the square image the identity is learned from.
pub const PHOTO_SIZE: u32 = 512;

/// Smallest accepted side: below it the face would have to be upscaled more than 2x.
pub const MIN_PHOTO_SIDE: u32 = 256;

/// An identity photo, 512x512 8-bit RGB, with the digest of the file it came from.
#[derive(Debug, Clone)]
pub struct Photo {
    rgb: RgbImage,
    sha256: String,
}

impl Photo {
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
pub(crate) fn rgb_to_tensor(image: &RgbImage, f: impl Fn(u8) -> f32) -> candle_core::Result<Tensor> {
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
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    if bytes.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    let image = decode(&bytes).map_err(bad)?;
    let (w, h) = (image.width(), image.height());
    if w < MIN_PHOTO_SIDE || h < MIN_PHOTO_SIDE {
        return Err(bad(format!(
            "the image is {w}x{h} pixels, smaller than {MIN_PHOTO_SIDE} on a side; give a photo of at \
             least {MIN_PHOTO_SIDE}x{MIN_PHOTO_SIDE} (ideally {PHOTO_SIZE}x{PHOTO_SIZE}): an upscaled small \
             photo only teaches the model blur"
        )));
    }
    let rgb = resize(&to_rgb8(image), PHOTO_SIZE, PHOTO_SIZE, Filter::Bicubic, Weights::Pil);
    Ok(Photo { rgb, sha256: hex_sha256(&bytes) })
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes an image file held in memory, upright (EXIF orientation applied).
fn decode(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read it ({e})"))?;
    let Some(format) = reader.format() else {
        return Err("not an image file (no known image format recognised in its content)".into());
    };
    let broken = |e: image::ImageError| format!("cannot decode it as {format:?}: {e} (is the file damaged?)");
    // The JPEG decoder fills a truncated scan with grey instead of failing (PIL refuses such a
    // file), so check that the compressed data is complete.
    if format == image::ImageFormat::Jpeg && jpeg_is_truncated(bytes) {
        return Err(
            "the JPEG data is truncated (it stops before its end-of-image marker); the file is incomplete".into()
        );
    }
    let mut decoder = reader.into_decoder().map_err(broken)?;
    let orientation = decoder.orientation().map_err(broken)?;
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

/// 8-bit RGB as PIL's `convert("RGB")` gives it (see the module doc for 16-bit samples).
fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let wide = image.to_rgb16();
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
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear if x < 1.0 => 1.0 - x,
            Self::Bicubic if x < 1.0 => (1.5 * x - 2.5) * x * x + 1.0,
            Self::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5,
            _ => 0.0,
        }
    }
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

/// One resampling pass over an interleaved RGB image of `dims` (width, height), along the rows
/// (`horizontal`) or the columns, to `out_len` samples; rounds to 8 bits like both references.
fn convolve(src: &[u8], dims: (usize, usize), out_len: usize, horizontal: bool, taps: &[Taps], bits: u32) -> Vec<u8> {
    let (w, h) = dims;
    let (out_w, out_h) = if horizontal { (out_len, h) } else { (w, out_len) };
    let mut out = vec![0u8; out_w * out_h * 3];
    let half = 1i64 << (bits - 1);
    for y in 0..out_h {
        for x in 0..out_w {
            // Pixel index of the first tap, and the step between taps.
            let (tap, first, step) = if horizontal {
                let t = &taps[x];
                (t, y * w + t.first, 1)
            } else {
                let t = &taps[y];
                (t, t.first * w + x, w)
            };
            for c in 0..3 {
                let acc = tap
                    .weights
                    .iter()
                    .enumerate()
                    .fold(half, |acc, (k, &wt)| acc + i64::from(src[(first + k * step) * 3 + c]) * wt);
                out[(y * out_w + x) * 3 + c] = (acc >> bits).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Resizes an RGB image to `width` x `height` with PIL's antialiased separable resampling
/// (`Image.resize`), or with PyTorch's uint8 variant of it; the result is bit-exact to either.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter, rounding: Weights) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let mut data = image.as_raw().clone();
    let mut w = in_w;
    if out_w != in_w {
        let (t, bits) = taps(in_w, out_w, filter, rounding);
        data = convolve(&data, (in_w, in_h), out_w, true, &t, bits);
        w = out_w;
    }
    if out_h != in_h {
        let (t, bits) = taps(in_h, out_h, filter, rounding);
        data = convolve(&data, (w, in_h), out_h, false, &t, bits);
    }
    RgbImage::from_raw(width, height, data).expect("resampled buffer has the output size")
}
