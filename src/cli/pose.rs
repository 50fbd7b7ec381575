//! `stableid pose`: the OpenPose body map of photos, as controlnet_aux draws it, for a pose
//! ControlNet.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use stableid::io::write_png;
use stableid::priors::photo::load_upright_with_digest;
use stableid::priors::pose::{pose_map, PoseEstimator, PoseMap, PoseSettings, KEYPOINT_NAMES, WEIGHTS_HINT};
use stableid::weights::Hub;

use super::check_writable;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid pose dancer.jpg --out pose.png --pose-model body_pose_model.pth\n  \
    stableid pose a.jpg b.jpg --out poses --json\n\n\
    Writes the 18-keypoint OpenPose map (controlnet_aux's draw_bodypose: limbs at 0.6 intensity, joints\n\
    of radius 4, black background). With one photo and an --out ending in .png, that file; otherwise\n\
    DIR/STEM.pose.png. Existing files are never replaced: NAME-1.png, NAME-2.png, ... are used instead.\n\n\
    Weights: the OpenPose body model, body_pose_model.pth from https://huggingface.co/lllyasviel/Annotators\n\
    (without --pose-model it is taken from the hub cache, or downloaded into it: that one file, 200 MB).\n\
    CMU's OpenPose licence allows NON-COMMERCIAL RESEARCH USE ONLY.")]
pub struct PoseArgs {
    /// The photos (JPEG, PNG, ...; a JPEG's EXIF orientation is applied).
    #[arg(required = true)]
    pub photos: Vec<PathBuf>,
    /// The PNG to write (one photo), or a folder for STEM.pose.png files (created if missing).
    #[arg(long, default_value = "poses")]
    pub out: PathBuf,
    /// body_pose_model.pth (or a safetensors conversion) [default: that of lllyasviel/Annotators, from the hub].
    #[arg(long)]
    pub pose_model: Option<PathBuf>,
    /// The photo's short side for detection (rounded, with the long side, to multiples of 64).
    #[arg(long, default_value_t = 512)]
    pub detect_resolution: u32,
    /// The pose map's short side (rounded likewise).
    #[arg(long, default_value_t = 512)]
    pub image_resolution: u32,
    /// Print the people and their keypoints (fractions of the width and height) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PoseArgs, hub: &Hub) -> Result<()> {
    let settings = PoseSettings { detect_resolution: args.detect_resolution, image_resolution: args.image_resolution };
    let weights = match &args.pose_model {
        Some(path) => path.clone(),
        None => PoseEstimator::hub_weights(hub)
            .with_context(|| format!("OpenPose body weights: pass --pose-model FILE, or {WEIGHTS_HINT}"))?,
    };
    let estimator = PoseEstimator::load(&weights, &Device::Cpu)?;
    // Every photo is read and its pose found before anything is written: a bad photo writes
    // nothing.
    let mut done = Vec::new();
    for path in &args.photos {
        let (photo, sha256) = load_upright_with_digest(path)?;
        let map = pose_map(&photo, &estimator, settings).with_context(|| format!("photo {}", path.display()))?;
        done.push((path, sha256, map));
    }
    let single_file = args.photos.len() == 1 && args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let dir = if single_file { args.out.parent().unwrap_or(Path::new("")).to_path_buf() } else { args.out.clone() };
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create output folder {}", dir.display()))?;
    check_writable(&dir)?;

    let mut summary = Vec::new();
    for (photo, sha256, map) in &done {
        let wanted = if single_file {
            args.out.clone()
        } else {
            let stem = photo.file_stem().map_or_else(|| "photo".into(), |s| s.to_string_lossy().into_owned());
            dir.join(format!("{stem}.pose.png"))
        };
        let path = free_name(&wanted);
        let people = people_json(map);
        let text = [
            ("photo", photo.display().to_string()),
            ("photo_sha256", sha256.clone()),
            ("estimator", "OpenPose body (controlnet_aux 0.0.10 OpenposeDetector, body only)".into()),
            ("pose_model", estimator.weights.display().to_string()),
            ("detect_resolution", settings.detect_resolution.to_string()),
            ("image_resolution", settings.image_resolution.to_string()),
            ("people", people.to_string()),
        ];
        write_png(&path, &(&map.image).into(), &text)?;
        summary.push(serde_json::json!({
            "photo": photo,
            "path": path,
            "width": map.image.width(),
            "height": map.image.height(),
            "detect_size": [map.detect_size.0, map.detect_size.1],
            "people": people,
        }));
    }
    if args.json {
        println!("{}", serde_json::json!({ "poses": summary }));
    } else {
        for entry in &summary {
            println!("{}", entry["path"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// `wanted`, or the first of NAME-1.EXT, NAME-2.EXT, ... that does not exist.
fn free_name(wanted: &Path) -> PathBuf {
    let stem = wanted.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let ext = wanted.extension().map_or_else(|| "png".into(), |e| e.to_string_lossy().into_owned());
    (0..)
        .map(|k| if k == 0 { wanted.to_path_buf() } else { wanted.with_file_name(format!("{stem}-{k}.{ext}")) })
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .expect("a free name")
}

/// The people with named keypoints: `[x, y, score]` as fractions of the width and height, `null`
/// where missing.
fn people_json(map: &PoseMap) -> serde_json::Value {
    map.people
        .iter()
        .map(|p| {
            let keypoints: serde_json::Map<String, serde_json::Value> = KEYPOINT_NAMES
                .iter()
                .zip(&p.keypoints)
                .map(|(name, k)| {
                    (name.to_string(), k.map_or(serde_json::Value::Null, |k| serde_json::json!([k.x, k.y, k.score])))
                })
                .collect();
            serde_json::json!({ "keypoints": keypoints, "total_score": p.total_score, "total_parts": p.total_parts })
        })
        .collect()
}
