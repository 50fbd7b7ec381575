//! The report of an evaluation: the table of every identity (JSON and Markdown), per prompt and
//! per image, with the time each stage took, and a contact sheet per identity (every image with
//! its scores drawn under it, in the 8x8 bitmap font of `font8x8`).

use image::{Rgb, RgbImage};
use serde::{Serialize, Serializer};

use crate::eval::metrics::{ImageScores, MetricRow, PairScores};
use crate::eval::scorer::{EvalImage, ScoredImages, Timings};
use crate::priors::photo::{resize, Filter, Weights};

impl Serialize for Timings {
    /// As a JSON object `{stage: seconds}`, in the stages' order.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(stage, seconds)| (stage, seconds)))
    }
}

/// A prompt's row.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRow {
    pub prompt: String,
    #[serde(flatten)]
    pub scores: MetricRow,
}

/// One identity's results.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityReport {
    /// Its name in the tables.
    pub label: String,
    /// The identity file, when the images were generated from one.
    pub identity: Option<String>,
    pub photo: String,
    pub images_dir: String,
    pub mean: MetricRow,
    pub prompts: Vec<PromptRow>,
    pub images: Vec<ImageScores>,
    pub pairs: Vec<PairScores>,
    /// The images in which no face was found: left out of Face Sim, Face Div and Trusted Div.
    pub images_without_face: Vec<String>,
    pub timings_s: Timings,
}

impl IdentityReport {
    pub fn new(
        label: String,
        identity: Option<String>,
        photo: String,
        images_dir: String,
        prompts: &[String],
        scored: &ScoredImages,
        timings: Timings,
    ) -> Self {
        Self {
            label,
            identity,
            photo,
            images_dir,
            mean: scored.mean.clone(),
            prompts: prompts
                .iter()
                .zip(&scored.prompts)
                .map(|(p, row)| PromptRow { prompt: p.clone(), scores: row.clone() })
                .collect(),
            images: scored.images.clone(),
            pairs: scored.pairs.clone(),
            images_without_face: scored
                .images
                .iter()
                .filter(|i| i.face_sim.is_none())
                .map(|i| i.file.clone())
                .collect(),
            timings_s: timings,
        }
    }
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How the images were made and scored (models, sampler, seeds, ...).
    pub settings: Vec<(String, String)>,
    pub identities: Vec<IdentityReport>,
    /// All identities' images and pairs together (FID: all images against the reference).
    pub all: MetricRow,
    pub timings_s: Timings,
}

/// A score with two decimals, or a dash.
fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.2}"))
}

/// The metric cells of a row: CLIP-I, CLIP-T, Face Sim, Face Div, Trusted Div.
fn metric_cells(row: &MetricRow) -> String {
    [row.clip_i, row.clip_t, row.face_sim, row.face_div, row.trusted_div].map(|v| cell(v.map(f64::from))).join(" | ")
}

impl Report {
    /// The report as Markdown: the table, the images without a face, each identity's prompts, the
    /// time per stage.
    pub fn markdown(&self) -> String {
        let mut md = String::from("# stableid eval\n\nAll values are percentages (cosine or LPIPS x 100) but FID; definitions in docs/eval.md.\n\n");
        for (key, value) in &self.settings {
            md += &format!("- {key}: {value}\n");
        }
        md += "\n| identity | images | faces | CLIP-I | CLIP-T | Face Sim | Face Div | Trusted Div | FID |\n";
        md += "|---|---|---|---|---|---|---|---|---|\n";
        let rows = self.identities.iter().map(|i| (i.label.as_str(), &i.mean));
        let all = (self.identities.len() > 1).then_some(("all", &self.all));
        for (label, row) in rows.chain(all) {
            md +=
                &format!("| {label} | {} | {} | {} | {} |\n", row.images, row.faces, metric_cells(row), cell(row.fid));
        }
        for identity in &self.identities {
            md += &format!("\n## {}\n\nPhoto {}; images in {}", identity.label, identity.photo, identity.images_dir);
            if let Some(file) = &identity.identity {
                md += &format!("; identity {file}");
            }
            md += ".\n\n";
            if !identity.images_without_face.is_empty() {
                md += &format!(
                    "No face found in {} of {} images (left out of Face Sim, Face Div, Trusted Div): {}.\n\n",
                    identity.images_without_face.len(),
                    identity.images.len(),
                    identity.images_without_face.join(", ")
                );
            }
            md += "| # | prompt | images | faces | CLIP-I | CLIP-T | Face Sim | Face Div | Trusted Div |\n";
            md += "|---|---|---|---|---|---|---|---|---|\n";
            for (i, row) in identity.prompts.iter().enumerate() {
                let prompt = row.prompt.replace('|', "\\|");
                md += &format!(
                    "| {i} | {prompt} | {} | {} | {} |\n",
                    row.scores.images,
                    row.scores.faces,
                    metric_cells(&row.scores)
                );
            }
        }
        md += "\n## Time per stage\n\n| stage | seconds |\n|---|---|\n";
        for (stage, seconds) in &self.timings_s.0 {
            md += &format!("| {stage} | {seconds:.2} |\n");
        }
        md
    }
}

/// Side of an image's thumbnail on the contact sheet.
const THUMBNAIL: u32 = 224;
/// The font's scale for the scores (16 px letters: 14 per thumbnail width).
const SCORE_SCALE: u32 = 2;
const MARGIN: u32 = 8;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const NO_FACE: Rgb<u8> = Rgb([200, 30, 30]);

/// The contact sheet of one identity's images: a row per prompt (its number and text above it),
/// each image fitted in a square with its Face Sim (or "no face"), CLIP-I and CLIP-T under it.
pub fn contact_sheet(prompts: &[String], images: &[EvalImage], scores: &[ImageScores]) -> RgbImage {
    let columns =
        (0..prompts.len()).map(|p| images.iter().filter(|i| i.prompt == p).count()).max().unwrap_or(0).max(1) as u32;
    let line = 8 * SCORE_SCALE + 2;
    let header = 8 + 4;
    let row_height = header + THUMBNAIL + 3 * line + MARGIN;
    let width = MARGIN + columns * (THUMBNAIL + MARGIN);
    let mut sheet = RgbImage::from_pixel(width, MARGIN + prompts.len() as u32 * row_height, BACKGROUND);
    let max_chars = ((width - MARGIN) / 8) as usize;
    for (p, prompt) in prompts.iter().enumerate() {
        let top = MARGIN + p as u32 * row_height;
        let title: String = format!("{p:02} {prompt}").chars().take(max_chars).collect();
        draw_text(&mut sheet, &title, MARGIN, top, 1, INK);
        for (column, (image, score)) in images.iter().zip(scores).filter(|(i, _)| i.prompt == p).enumerate() {
            let left = MARGIN + column as u32 * (THUMBNAIL + MARGIN);
            let thumbnail = fit(&image.image, THUMBNAIL);
            let (dx, dy) = ((THUMBNAIL - thumbnail.width()) / 2, (THUMBNAIL - thumbnail.height()) / 2);
            image::imageops::replace(&mut sheet, &thumbnail, i64::from(left + dx), i64::from(top + header + dy));
            let text_top = top + header + THUMBNAIL + 2;
            match score.face_sim {
                Some(sim) => draw_text(&mut sheet, &format!("Face {sim:.1}"), left, text_top, SCORE_SCALE, INK),
                None => draw_text(&mut sheet, "no face", left, text_top, SCORE_SCALE, NO_FACE),
            }
            draw_text(&mut sheet, &format!("CLIP-I {:.1}", score.clip_i), left, text_top + line, SCORE_SCALE, INK);
            draw_text(&mut sheet, &format!("CLIP-T {:.1}", score.clip_t), left, text_top + 2 * line, SCORE_SCALE, INK);
        }
    }
    sheet
}

/// `image` scaled (PIL bilinear) to fit a `side` square, its aspect kept.
fn fit(image: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let scale = f64::from(side) / f64::from(w.max(h));
    let size = |v: u32| ((f64::from(v) * scale).round() as u32).clamp(1, side);
    resize(image, size(w), size(h), Filter::Bilinear, Weights::Pil)
}

/// `text` (ASCII; other characters show as `?`) at (`x`, `y`), each 8x8 glyph scaled `scale`
/// times, clipped to the image.
fn draw_text(image: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY[if c.is_ascii() { c as usize } else { '?' as usize }];
        let left = x + i as u32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for column in 0..8 {
                if bits & (1 << column) == 0 {
                    continue;
                }
                for (dx, dy) in (0..scale).flat_map(|dx| (0..scale).map(move |dy| (dx, dy))) {
                    let (px, py) = (left + column * scale + dx, y + row as u32 * scale + dy);
                    if px < image.width() && py < image.height() {
                        image.put_pixel(px, py, color);
                    }
                }
            }
        }
    }
}
