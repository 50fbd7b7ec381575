//! `stableid pose` end to end on the OpenPose network with test weights (tests/common/pose_weights.rs):
//! the random network "finds" people in noise, which exercises writing the map; the blind one
//! (no heat maps) finds nobody, which must be a one-line error that writes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fixture;
use common::pose_weights::write_test_weights;
use stableid::io::read_png_text;

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn photo(name: &str) -> String {
    fixture(&format!("photos/{name}")).display().to_string()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn writes_the_pose_map_with_metadata_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("body.safetensors");
    write_test_weights(&weights, false);
    let out = dir.path().join("out");
    let target = out.join("pose.png");
    let (weights, target_s) = (weights.to_str().unwrap(), target.to_str().unwrap());
    let cat = photo("chelsea_300x256.png");
    let output = stableid(&["pose", &cat, "--out", target_s, "--pose-model", weights, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let entry = &summary["poses"][0];
    assert_eq!(entry["path"].as_str().unwrap(), target_s);
    // 300x256 -> short side 512, sides rounded to multiples of 64: 576x512.
    assert_eq!((entry["width"].as_u64(), entry["height"].as_u64()), (Some(576), Some(512)));
    let people = entry["people"].as_array().unwrap();
    assert!(!people.is_empty());
    assert!(people[0]["keypoints"].as_object().unwrap().contains_key("left_ankle"));
    let image = image::open(&target).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (576, 512));
    assert!(image.pixels().any(|p| p.0 != [0, 0, 0]), "something is drawn");
    let text = read_png_text(&target).unwrap();
    for key in ["photo", "photo_sha256", "pose_model", "detect_resolution", "people"] {
        assert!(text.iter().any(|(k, _)| k == key), "{key} missing from {text:?}");
    }

    // Again, at another map size: a new name, the first file untouched.
    let before = std::fs::read(&target).unwrap();
    let output = stableid(&["pose", &cat, "--out", target_s, "--pose-model", weights, "--image-resolution", "256"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).trim().ends_with("pose-1.png"));
    assert_eq!(std::fs::read(&target).unwrap(), before);
    // 576 x 256 / 512 = 288 = 4.5 x 64, which NumPy rounds to even: 256.
    assert_eq!(image::open(out.join("pose-1.png")).unwrap().width(), 256);
}

#[test]
fn a_photo_without_a_person_is_a_one_line_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("blind.safetensors");
    write_test_weights(&weights, true);
    let out = dir.path().join("out");
    let cat = photo("chelsea_300x256.png");
    let output = stableid(&["pose", &cat, "--out", out.to_str().unwrap(), "--pose-model", weights.to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("chelsea_300x256.png") && message.contains("no person found"), "{message}");
    assert!(!out.exists() || file_count(&out) == 0);
}

#[test]
fn bad_inputs_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let cat = photo("chelsea_300x256.png");

    let missing = dir.path().join("body_pose_model.pth");
    let output = stableid(&["pose", &cat, "--out", out, "--pose-model", missing.to_str().unwrap()]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.trim().lines().count() == 1, "{message}");
    assert!(message.contains("lllyasviel/Annotators") && message.contains("non-commercial"), "{message}");

    let weights = dir.path().join("body.safetensors");
    write_test_weights(&weights, false);
    let not_a_photo = dir.path().join("notes.jpg");
    std::fs::write(&not_a_photo, b"not an image").unwrap();
    let output =
        stableid(&["pose", not_a_photo.to_str().unwrap(), "--out", out, "--pose-model", weights.to_str().unwrap()]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.trim().lines().count() == 1, "{message}");
    assert!(message.contains("notes.jpg"), "{message}");

    let output =
        stableid(&["pose", &cat, "--out", out, "--pose-model", weights.to_str().unwrap(), "--detect-resolution", "8"]);
    let message = stderr(&output);
    assert!(!output.status.success() && message.contains("--detect-resolution 8"), "{message}");
    assert!(!Path::new(out).exists());

    let help = stableid(&["pose", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("NON-COMMERCIAL RESEARCH USE ONLY") && help.contains("lllyasviel/Annotators"), "{help}");
}
