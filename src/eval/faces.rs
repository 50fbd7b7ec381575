//! The face crops Face Sim and Face Div compare: what facenet-pytorch's
//! `MTCNN(image_size=160, margin=0)` returns for an image (FastComposer's protocol), the largest
//! face found by [`FaceDetector`] (MTCNN on facenet-pytorch's weights and settings) cut out by
//! `extract_face`.
//!
//! Deviation: on photos whose short side exceeds 1280 px, the detector searches faces from a 64th
//! of that side up ([`FaceDetector::min_face_size`]) rather than from 20 px; generated images
//! (512 px) are searched exactly as facenet-pytorch does.

use image::RgbImage;

use crate::models::facenet::FACENET_INPUT_SIZE;
use crate::models::mtcnn::Face;
use crate::priors::align::FaceDetector;
use crate::priors::photo::{resize, Filter, Weights};
use crate::Result;

/// A face found in an image and its FaceNet input crop.
#[derive(Debug, Clone)]
pub struct FaceCrop {
    pub face: Face,
    /// [`FACENET_INPUT_SIZE`] square, 8-bit levels.
    pub crop: RgbImage,
}

/// facenet-pytorch's `extract_face(image, box, 160, margin=0)` on a PIL image: the box truncated
/// to whole pixels inside the image (`int(max(x1, 0))`, ..., `int(min(x2, width))`), that region
/// resized to 160 x 160 with PIL's bilinear filter. `None` for a box with no pixel inside.
pub fn facenet_crop(image: &RgbImage, face: &Face) -> Option<RgbImage> {
    let [x1, y1, x2, y2] = face.bbox;
    let (w, h) = image.dimensions();
    // `as u32` truncates toward zero like Python's `int` (the values are clamped to >= 0 first).
    let (left, top) = (x1.max(0.0) as u32, y1.max(0.0) as u32);
    let (right, bottom) = (x2.min(w as f32).max(0.0) as u32, y2.min(h as f32).max(0.0) as u32);
    if right <= left || bottom <= top {
        return None;
    }
    let region = image::imageops::crop_imm(image, left, top, right - left, bottom - top).to_image();
    let size = FACENET_INPUT_SIZE as u32;
    Some(resize(&region, size, size, Filter::Bilinear, Weights::Pil))
}

/// The largest face of `image` with its crop (`select_largest=True`), or `None` when no face is
/// found.
pub fn largest_face_crop(detector: &FaceDetector, image: &RgbImage) -> Result<Option<FaceCrop>> {
    let Some(face) = detector.detect(image)?.into_iter().next() else { return Ok(None) };
    Ok(facenet_crop(image, &face).map(|crop| FaceCrop { face, crop }))
}
