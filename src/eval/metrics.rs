//! The metrics of the paper's Table 1 from what the metric models made of each image (docs/eval.md
//! defines each, with what the paper confirms and what was chosen). All are percentages (x 100)
//! but FID:
//!
//! - per image: CLIP-I `100 cos(clip(image), clip(photo))`, CLIP-T `100 cos(clip(image),
//!   clip_text(prompt))`, Face Sim `100 cos(facenet(face), facenet(photo's face))` when a face is
//!   found;
//! - per pair of images of one prompt, both with a face: Face Div `100 lpips(face_a, face_b)` and
//!   Trusted Div, that distance weighted by how well the pair keeps the identity,
//!   `face_div * (max(sim_a, 0) + max(sim_b, 0)) / 200`;
//! - a row (a prompt, an identity, all identities) averages its images (Face Sim: those with a
//!   face) and its pairs.

use serde::Serialize;

/// The scores of one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScores {
    /// The image's file name (or path, for images not made by `eval`).
    pub file: String,
    /// Index of its prompt.
    pub prompt: usize,
    pub clip_i: f32,
    pub clip_t: f32,
    /// `None`: no face found.
    pub face_sim: Option<f32>,
}

/// The scores of a pair of images of one prompt, both with a face (indices into the images).
#[derive(Debug, Clone, Serialize)]
pub struct PairScores {
    pub prompt: usize,
    pub a: usize,
    pub b: usize,
    pub face_div: f32,
    pub trusted_div: f32,
}

impl PairScores {
    /// The pair `a`, `b` of `images` at LPIPS distance `lpips` between their faces.
    pub fn new(images: &[ImageScores], a: usize, b: usize, lpips: f32) -> Self {
        let face_div = 100.0 * lpips;
        let kept = |i: usize| images[i].face_sim.unwrap_or(0.0).max(0.0);
        Self { prompt: images[a].prompt, a, b, face_div, trusted_div: face_div * (kept(a) + kept(b)) / 200.0 }
    }
}

/// A row of the report: the means over a set of images and their pairs. `None` where the set
/// has no face (Face Sim) or no pair of faces (the diversities), or no reference (FID).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricRow {
    pub images: usize,
    /// Images with a face found.
    pub faces: usize,
    pub clip_i: Option<f32>,
    pub clip_t: Option<f32>,
    pub face_sim: Option<f32>,
    pub face_div: Option<f32>,
    pub trusted_div: Option<f32>,
    pub fid: Option<f64>,
}

fn mean(values: impl Iterator<Item = f32>) -> Option<f32> {
    let (sum, n) = values.fold((0f64, 0usize), |(s, n), v| (s + f64::from(v), n + 1));
    (n > 0).then(|| (sum / n as f64) as f32)
}

impl MetricRow {
    /// The means over `images` and `pairs` (FID left out).
    pub fn of<'a>(
        images: impl Iterator<Item = &'a ImageScores> + Clone,
        pairs: impl Iterator<Item = &'a PairScores> + Clone,
    ) -> Self {
        Self {
            images: images.clone().count(),
            faces: images.clone().filter(|i| i.face_sim.is_some()).count(),
            clip_i: mean(images.clone().map(|i| i.clip_i)),
            clip_t: mean(images.clone().map(|i| i.clip_t)),
            face_sim: mean(images.filter_map(|i| i.face_sim)),
            face_div: mean(pairs.clone().map(|p| p.face_div)),
            trusted_div: mean(pairs.map(|p| p.trusted_div)),
            fid: None,
        }
    }

    /// The row of prompt `prompt`.
    pub fn of_prompt(images: &[ImageScores], pairs: &[PairScores], prompt: usize) -> Self {
        Self::of(images.iter().filter(|i| i.prompt == prompt), pairs.iter().filter(|p| p.prompt == prompt))
    }
}

/// The pairs of images of the same prompt that both show a face, in order (`a < b`).
pub fn face_pairs(images: &[ImageScores]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (a, first) in images.iter().enumerate().filter(|(_, i)| i.face_sim.is_some()) {
        for (b, second) in images.iter().enumerate().skip(a + 1) {
            if second.prompt == first.prompt && second.face_sim.is_some() {
                pairs.push((a, b));
            }
        }
    }
    pairs
}
