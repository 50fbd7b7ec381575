//! `stableid align` end to end: crops and previews written under free names, the JSON summary,
//! face choice in a group photo, and one-line errors that write nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fixture;
use stableid::io::read_png_text;

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn photo(name: &str) -> String {
    fixture(&format!("photos/{name}")).display().to_string()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn aligns_the_largest_face_and_never_overwrites() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let astronaut = photo("astronaut_1024x768.jpg");
    let summary = json(&stableid(&["align", &astronaut, "--out", dir, "--json"]));
    let entry = &summary["photos"][0];
    assert_eq!(entry["faces"].as_array().unwrap().len(), 1);
    assert!(entry["faces"][0]["score"].as_f64().unwrap() > 0.99);
    let crop = entry["aligned"][0]["path"].as_str().unwrap();
    assert!(crop.ends_with("astronaut_1024x768.aligned.png"), "{crop}");
    assert_eq!(entry["aligned"][0]["quad"].as_array().unwrap().len(), 4);
    let image = image::open(crop).unwrap();
    assert_eq!((image.width(), image.height()), (512, 512));
    let preview = entry["preview"].as_str().unwrap();
    assert_eq!(image::open(preview).unwrap().width(), 1024);
    let text = read_png_text(Path::new(crop)).unwrap();
    assert!(text.iter().any(|(k, v)| k == "quad" && v.starts_with("[[")), "{text:?}");
    let text = read_png_text(Path::new(preview)).unwrap();
    assert!(text.iter().any(|(k, v)| k == "faces" && v.contains("score")), "{text:?}");

    // Again: new names, the first files untouched.
    let before = std::fs::read(crop).unwrap();
    let output = stableid(&["align", &astronaut, "--out", dir]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("astronaut_1024x768-1.aligned.png") && printed.contains("-1.preview.png"), "{printed}");
    assert_eq!(std::fs::read(crop).unwrap(), before);
    assert_eq!(files(out.path()).len(), 4);
}

#[test]
fn a_group_photo_gives_the_face_asked_for() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let group = photo("faces_3_480x320.png");
    let default = stableid(&["align", &group, "--out", dir]);
    assert!(default.status.success());
    assert!(String::from_utf8_lossy(&default.stderr).contains("3 faces found, aligning the largest"));

    let second = json(&stableid(&["align", &group, "--face", "2", "--out", dir, "--json"]));
    let faces = &second["photos"][0]["faces"];
    assert_eq!(second["photos"][0]["aligned"][0]["face"], 2);
    // Largest first.
    let area = |f: &serde_json::Value| {
        let b: Vec<f64> = f["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        (b[2] - b[0]) * (b[3] - b[1])
    };
    assert!(area(&faces[0]) > area(&faces[1]) && area(&faces[1]) > area(&faces[2]));

    // The third face (31x39 px) would give a 59 px crop: --all-faces skips it and says so.
    let all = stableid(&["align", &group, "--all-faces", "--out", dir]);
    assert!(String::from_utf8_lossy(&all.stderr).contains("faces [3] are too small to align, skipped"));
    let all = json(&stableid(&["align", &group, "--all-faces", "--out", dir, "--json"]));
    let names: Vec<&str> =
        all["photos"][0]["aligned"].as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2);
    assert!(names[1].ends_with("faces_3_480x320-3.face2.aligned.png"), "{names:?}");
    assert_eq!(all["photos"][0]["faces"].as_array().unwrap().len(), 3);
}

/// Asserts a failed run with a one-line error containing every `needle`, and nothing written.
fn assert_fails_writing_nothing(output: &Output, out: &Path, needles: &[&str]) {
    common::assert_fails_with(output, needles);
    assert!(!out.exists() || files(out).is_empty(), "{:?}", files(out));
}

#[test]
fn no_face_or_no_such_face_is_a_one_line_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = out.to_str().unwrap();
    // A photo without a face after one with a face: nothing of either is written.
    let cat = photo("chelsea_300x256.png");
    let output = stableid(&["align", &photo("astronaut_1024x768.jpg"), &cat, "--out", dir]);
    assert_fails_writing_nothing(&output, &out, &["no face found in", "chelsea_300x256.png", "clearly visible"]);
    let output = stableid(&["align", &photo("faces_3_480x320.png"), "--face", "4", "--out", dir]);
    assert_fails_writing_nothing(&output, &out, &["faces_3_480x320.png has 3 face(s)", "no face 4"]);
    let output = stableid(&["align", &photo("faces_3_480x320.png"), "--face", "3", "--out", dir]);
    assert_fails_writing_nothing(&output, &out, &["face 3 of", "is too small (31x39 px)", "crop would be 59 px"]);
    let output = stableid(&["align", tmp.path().to_str().unwrap(), "--out", dir]);
    assert_fails_writing_nothing(&output, &out, &["photo", "cannot read it"]);
}
