//! Body poses from photos, drawn as the 18-keypoint OpenPose map a pose ControlNet reads: what
//! controlnet_aux 0.0.10's `OpenposeDetector(...)(photo, detect_resolution, image_resolution)`
//! returns with its defaults (body only).
//!
//! 1. The photo is resized so its short side is near `detect_resolution`, both sides rounded to
//!    multiples of 64 (`util.resize_image`: Lanczos when enlarging, area otherwise).
//! 2. The OpenPose body network ([`crate::models::openpose`]) runs on it scaled to 184 rows; its
//!    heat maps and part affinity fields are upsampled back, peaks found and grouped into people
//!    ([`body`]).
//! 3. The people are drawn on a black canvas of the detection size ([`draw`]), which is resized
//!    (bilinear) to the size `image_resolution` gives.
//!
//! Every resize is OpenCV's ([`opencv`]), not PIL's. The photo is read upright (its EXIF
//! orientation applied), where controlnet_aux takes the pixels as stored.
//!
//! The network's weights (`body_pose_model.pth` of lllyasviel/Annotators, CMU's OpenPose) are
//! licensed for non-commercial research only.

pub mod body;
pub mod draw;
pub mod opencv;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::models::openpose::BodyPoseModel;
use crate::weights::{Hub, ModelFiles};
use crate::{Error, Result};
use body::{find_people, network_input, upsample, BodyDetection, KEYPOINTS};
use opencv::{resize_u8, Image, Interpolation};

/// The hub repository and file of the OpenPose body weights.
pub const WEIGHTS_REPO: &str = "lllyasviel/Annotators";
pub const WEIGHTS_FILE: &str = "body_pose_model.pth";

/// How to get the weights, for messages.
pub const WEIGHTS_HINT: &str = "download body_pose_model.pth from https://huggingface.co/lllyasviel/Annotators \
     (`huggingface-cli download lllyasviel/Annotators body_pose_model.pth`; CMU's OpenPose licence: \
     non-commercial research use only)";

/// controlnet_aux's `OpenposeDetector.__call__` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoseSettings {
    /// The photo's short side for detection (rounded with the long side to multiples of 64).
    pub detect_resolution: u32,
    /// The pose map's short side (likewise rounded).
    pub image_resolution: u32,
}

impl Default for PoseSettings {
    fn default() -> Self {
        Self { detect_resolution: 512, image_resolution: 512 }
    }
}

impl PoseSettings {
    fn validate(&self) -> Result<()> {
        for (name, value) in
            [("detect_resolution", self.detect_resolution), ("image_resolution", self.image_resolution)]
        {
            if !(64..=4096).contains(&value) {
                return Err(Error::setting(name, value, "must be between 64 and 4096 pixels"));
            }
        }
        Ok(())
    }
}

/// The OpenPose body network, ready to find poses.
pub struct PoseEstimator {
    model: BodyPoseModel,
    device: Device,
    /// The weights file, for metadata.
    pub weights: PathBuf,
}

impl PoseEstimator {
    /// Loads `body_pose_model.pth` (either PyTorch format) or a safetensors conversion of it, in
    /// f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                what: "OpenPose body weights".into(),
                path: path.to_path_buf(),
                hint: WEIGHTS_HINT.into(),
            });
        }
        let model = crate::weights::weights_file(path, DType::F32, device)?.build(BodyPoseModel::new)?;
        Ok(Self { model, device: device.clone(), weights: path.to_path_buf() })
    }

    /// The weights of `lllyasviel/Annotators`, found in the hub cache or fetched into it (that
    /// file alone).
    pub fn hub_weights(hub: &Hub) -> Result<PathBuf> {
        let files = ModelFiles::new("OpenPose body weights", WEIGHTS_REPO)
            .file(WEIGHTS_FILE)
            .notice("CMU's OpenPose licence: non-commercial research use only");
        Ok(hub.resolve(WEIGHTS_REPO, &files)?.join(WEIGHTS_FILE))
    }

    /// `Body.__call__` on a photo: the network's maps upsampled, the peaks and the people.
    pub fn detect(&self, photo: &RgbImage) -> Result<BodyDetection> {
        let input = network_input(photo);
        let x = Tensor::from_vec(input.pixels.clone(), (1, 3, input.height, input.width), &self.device)?;
        let (paf, heat) = self.model.forward(&x)?;
        let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        let maps = upsample(&input, &flat(paf)?, &flat(heat)?);
        Ok(find_people(&maps))
    }
}

/// A keypoint of a person, as controlnet_aux returns it: `x`, `y` as fractions of the detection
/// image's width and height, and the heat map's value there.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Keypoint {
    pub x: f64,
    pub y: f64,
    pub score: f64,
}

/// One person found: the 18 OpenPose keypoints (nose, neck, right shoulder, elbow, wrist, left
/// shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee, ankle, right eye, left eye,
/// right ear, left ear), `None` where missing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Person {
    pub keypoints: [Option<Keypoint>; KEYPOINTS],
    /// Sum of the keypoints' and limbs' scores.
    pub total_score: f64,
    /// Keypoints found.
    pub total_parts: usize,
}

/// Keypoint names, in order.
pub const KEYPOINT_NAMES: [&str; KEYPOINTS] = [
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
];

/// The people of a detection with keypoints as fractions of the `width` x `height` image
/// (`detect_poses`).
pub fn people(detection: &BodyDetection, width: usize, height: usize) -> Vec<Person> {
    detection
        .people
        .iter()
        .map(|p| Person {
            keypoints: p.parts.map(|id| {
                id.map(|id| {
                    let peak = detection.peaks[id];
                    Keypoint { x: peak.x as f64 / width as f64, y: peak.y as f64 / height as f64, score: peak.score }
                })
            }),
            total_score: p.score,
            total_parts: p.count as usize,
        })
        .collect()
}

/// A pose map and the people drawn on it.
#[derive(Debug, Clone)]
pub struct PoseMap {
    /// The map at the size `image_resolution` gives.
    pub image: RgbImage,
    pub people: Vec<Person>,
    /// The size the people were found and drawn at (`detect_resolution`'s).
    pub detect_size: (u32, u32),
}

/// `util.resize_image`'s size: the short side scaled to `resolution`, both sides rounded to
/// multiples of 64 (NumPy's rounding, ties to even).
fn resized_size(width: u32, height: u32, resolution: u32) -> (usize, usize) {
    let k = f64::from(resolution) / f64::from(width.min(height));
    let round = |side: u32| ((f64::from(side) * k / 64.0).round_ties_even() as usize) * 64;
    (round(width), round(height))
}

/// `util.resize_image`: the photo at the size [`PoseSettings`] resolutions give.
pub fn resize_to_resolution(image: &RgbImage, resolution: u32) -> Result<RgbImage> {
    let (w, h) = resized_size(image.width(), image.height(), resolution);
    if w == 0 || h == 0 {
        return Err(Error::Input(format!(
            "a {}x{} photo is too narrow to scale its short side to {resolution} pixels",
            image.width(),
            image.height()
        )));
    }
    let k = f64::from(resolution) / f64::from(image.width().min(image.height()));
    let interpolation = if k > 1.0 { Interpolation::Lanczos4 } else { Interpolation::Area };
    Ok(to_rgb(resize_u8(&from_rgb(image), w, h, interpolation)))
}

fn from_rgb(image: &RgbImage) -> Image<u8> {
    Image { width: image.width() as usize, height: image.height() as usize, channels: 3, data: image.as_raw().clone() }
}

fn to_rgb(image: Image<u8>) -> RgbImage {
    RgbImage::from_raw(image.width as u32, image.height as u32, image.data).expect("a whole RGB image")
}

/// Draws `people` (keypoints as fractions) on a black `width` x `height` canvas, then resizes
/// the canvas as `OpenposeDetector.__call__` does for `image_resolution`.
pub fn draw_pose_map(people: &[Person], (width, height): (u32, u32), image_resolution: u32) -> RgbImage {
    let mut canvas = RgbImage::new(width, height);
    for person in people {
        draw::draw_bodypose(&mut canvas, &person.keypoints.map(|k| k.map(|k| [k.x, k.y])));
    }
    let (w, h) = resized_size(width, height, image_resolution);
    to_rgb(resize_u8(&from_rgb(&canvas), w, h, Interpolation::Linear))
}

/// The pose map of a photo: controlnet_aux's `OpenposeDetector.__call__` with `settings`. A
/// photo in which no person is found is an error.
pub fn pose_map(photo: &RgbImage, estimator: &PoseEstimator, settings: PoseSettings) -> Result<PoseMap> {
    settings.validate()?;
    let detect_image = resize_to_resolution(photo, settings.detect_resolution)?;
    let (w, h) = (detect_image.width(), detect_image.height());
    let found = people(&estimator.detect(&detect_image)?, w as usize, h as usize);
    if found.is_empty() {
        return Err(Error::Input(
            "no person found (OpenPose needs a visible body: at least four keypoints of one person)".into(),
        ));
    }
    let image = draw_pose_map(&found, (w, h), settings.image_resolution);
    Ok(PoseMap { image, people: found, detect_size: (w, h) })
}
