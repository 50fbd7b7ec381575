//! The identity metrics of the paper's Table 1 (definitions and choices: docs/eval.md): the
//! preprocessing of each metric model (CLIP's here, FaceNet's face crops in [`faces`]), the
//! metrics as functions of the models' outputs ([`metrics`], [`fid`]), the models together
//! ([`scorer`]) and the report ([`report`]).

pub mod faces;
pub mod fid;
pub mod images;
pub mod metrics;
pub mod report;
pub mod scorer;

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

use crate::models::clip::cosine_similarity;
use crate::priors::photo::{resize, Filter, Weights};

/// CLIP's normalisation (openai/CLIP `_transform`).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// openai/CLIP's `_transform` on an RGB image: PIL bicubic resize of the short side to `size`
/// (the long side `int(size * long / short)`, as torchvision's `Resize(size)`), a `size` x `size`
/// centre crop (offsets rounded half to even, as torchvision's `CenterCrop`), the 8-bit levels.
pub fn clip_input_image(image: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let long_side = |long: u32, short: u32| (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
    let (rw, rh) = if w <= h { (size, long_side(h, w)) } else { (long_side(w, h), size) };
    let resized = resize(image, rw, rh, Filter::Bicubic, Weights::Pil);
    let offset = |extra: u32| {
        // round(extra / 2) with Python's ties-to-even.
        let half = extra / 2;
        if extra % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        }
    };
    image::imageops::crop_imm(&resized, offset(rw - size), offset(rh - size), size, size).to_image()
}

/// The CLIP model input (1, 3, size, size) of an image: [`clip_input_image`], scaled to [0, 1]
/// and normalised with CLIP's mean and standard deviation.
pub fn clip_pixels(image: &RgbImage, size: u32, device: &Device) -> Result<Tensor> {
    let levels = levels_tensor(&clip_input_image(image, size), device)?;
    let mean = Tensor::from_slice(&CLIP_MEAN, (1, 3, 1, 1), device)?;
    let std = Tensor::from_slice(&CLIP_STD, (1, 3, 1, 1), device)?;
    (levels / 255.0)?.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// 8-bit RGB levels as an f32 (1, 3, h, w) tensor.
pub fn levels_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    Tensor::from_vec(image.as_raw().clone(), (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(0)
}

/// CLIP-I, CLIP-T and Face Sim of one image: the cosine of two embeddings times 100 (the paper
/// reports percentages), per row of `a` and `b` (batch, dim).
pub fn similarity_percent(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    (cosine_similarity(a, b)? * 100.0)?.to_vec1()
}
