//! The images an evaluation scores: those it generates (their names, seeds, and whether one
//! already in the folder can be reused), or a folder of images made before, each carrying its
//! prompt in its PNG metadata; and the images of a FID reference folder.

use std::path::{Path, PathBuf};

use crate::eval::scorer::EvalImage;
use crate::identity::Identity;
use crate::io::read_png_text;
use crate::priors::photo::{hex_sha256, load_image_with_digest};
use crate::tokenizer::placeholder_token;
use crate::{Error, Result};

/// The 40 test prompts of the published StableIdentity test notebook, with their source.
pub const PUBLISHED_PROMPTS: &str = include_str!("../../assets/eval_prompts.txt");

/// The prompts of a prompts file: one per line, `#` comments and blank lines skipped. An input
/// error when there is none, or when one lacks the identity's `v1* v2*` (`source` names the file).
pub fn parse_prompts(text: &str, source: &str) -> Result<Vec<String>> {
    let pair = format!("{} {}", placeholder_token(0), placeholder_token(1));
    let prompts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if prompts.is_empty() {
        return Err(Error::Input(format!("{source} holds no prompt (one per line; # starts a comment)")));
    }
    if let Some((i, prompt)) = prompts.iter().enumerate().find(|(_, p)| !p.contains(&pair)) {
        return Err(Error::Input(format!(
            "prompt {} of {source} ({prompt:?}) has no {pair}: each evaluation prompt shows the identity",
            i + 1
        )));
    }
    Ok(prompts)
}

/// The extensions of the image files read from a folder.
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// One image to generate: prompt `prompt`'s image `index`, from `seed`, written as `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedImage {
    pub prompt: usize,
    pub index: usize,
    pub seed: u64,
    pub file: String,
}

/// The images of an evaluation: `num_images` per prompt, image `k` of every prompt from seed
/// `seed + k` (every prompt and identity sees the same noises), named `PP-K-SEED.png`.
pub fn plan_images(prompts: usize, num_images: usize, seed: u64) -> Vec<PlannedImage> {
    (0..prompts)
        .flat_map(|prompt| {
            (0..num_images).map(move |index| {
                let seed = seed + index as u64;
                PlannedImage { prompt, index, seed, file: format!("{prompt:02}-{index}-{seed}.png") }
            })
        })
        .collect()
}

/// The setting keys that need not match for an image to be reused: the identity's path (its
/// digest is compared) and the software's version.
const NOT_COMPARED: [&str; 2] = ["identity", "Software"];

/// Whether the image at `path` can be reused for `settings` (as `GenerateRequest::settings`
/// gives them, with the identity's digest): `false` when there is no file, `true` when it carries
/// the same settings, an input error naming the first difference otherwise (another run's image:
/// it is never overwritten).
pub fn reusable(path: &Path, settings: &[(&str, String)]) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let existing = read_png_text(path)?;
    for (key, value) in settings.iter().filter(|(k, _)| !NOT_COMPARED.contains(k)) {
        let found = existing.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if found != Some(value.as_str()) {
            return Err(Error::Input(format!(
                "{} was made with other settings ({key} {}, not {value}): evaluate into another folder, or remove it",
                path.display(),
                found.map_or_else(|| "not recorded".to_string(), |v| format!("{v:?}")),
            )));
        }
    }
    Ok(true)
}

/// The SHA-256 of an identity's vectors (as little-endian f32), which the images made with it
/// record.
pub fn identity_digest(identity: &Identity) -> Result<String> {
    let values = identity.embeddings.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    Ok(hex_sha256(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()))
}

/// The image files of `dir` (by extension), sorted by name; an input error when there is none.
pub fn image_files(dir: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Input(format!("{what} {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
        })
        .collect();
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{what} {} holds no images ({})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    files.sort();
    Ok(files)
}

/// The images of a folder made before, each with the prompt its PNG metadata records (`prompt`,
/// as `stableid generate` and `stableid eval` write it): the prompts in order of first
/// appearance, and the images. An input error for an empty folder or an image without a prompt.
pub fn read_generated(dir: &Path) -> Result<(Vec<String>, Vec<EvalImage>)> {
    let mut prompts: Vec<String> = Vec::new();
    let mut images = Vec::new();
    for path in image_files(dir, "image folder")? {
        let prompt = read_png_text(&path)
            .ok()
            .and_then(|text| text.into_iter().find(|(k, _)| k == "prompt").map(|(_, v)| v))
            .ok_or_else(|| {
                Error::Input(format!(
                    "{} records no prompt (a PNG text chunk `prompt`, as stableid generate writes): CLIP-T and \
                     Face Div need each image's prompt",
                    path.display()
                ))
            })?;
        let index = prompts.iter().position(|p| *p == prompt).unwrap_or_else(|| {
            prompts.push(prompt);
            prompts.len() - 1
        });
        let (image, _) = load_image_with_digest(&path, "image")?;
        images.push(EvalImage { file: file_name(&path), prompt: index, image });
    }
    Ok((prompts, images))
}

/// The images of a FID reference folder (any sizes); an input error with fewer than 2.
pub fn read_reference(dir: &Path) -> Result<Vec<image::RgbImage>> {
    let files = image_files(dir, "FID reference folder")?;
    if files.len() < 2 {
        return Err(Error::Input(format!(
            "FID reference folder {} holds 1 image: FID compares distributions and needs at least 2 (the paper's \
             reference has thousands)",
            dir.display()
        )));
    }
    files.iter().map(|p| load_image_with_digest(p, "reference image").map(|(image, _)| image)).collect()
}

/// The file name of `path`, as text.
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}
