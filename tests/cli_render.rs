//! `stableid render` end to end: orbit views as PNGs under free names with their cameras, a
//! 3DGS cameras.json, and one-line errors that write nothing.

mod common;

use std::process::{Command, Output};

use common::fixture;
use common::video_files::decode_mp4;
use stableid::io::read_png_text;

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn fails_with(output: &Output, needle: &str) {
    common::assert_fails_with(output, &[needle]);
}

#[test]
fn render_writes_orbit_views_under_free_names_and_reads_cameras_json() {
    let ply = fixture("splats/gaussian_model.ply").display().to_string();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let args = ["render", &ply, "--out", dir, "--views", "3", "--size", "24x16", "--background", "1,1,1", "--json"];
    let first = stableid(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let views = summary["views"].as_array().unwrap();
    assert_eq!(views.len(), 3);
    let png = out.path().join("gaussian_model.view000.png");
    let image = image::open(&png).unwrap();
    assert_eq!((image.width(), image.height()), (24, 16));
    // The camera rides along in the PNG, in the 3DGS cameras.json format.
    let text = read_png_text(&png).unwrap();
    let camera = &text.iter().find(|(k, _)| k == "camera").unwrap().1;
    let cameras = out.path().join("cameras.json");
    std::fs::write(&cameras, format!("[{camera}]")).unwrap();
    // A second run writes beside the first.
    let second = stableid(&args);
    assert!(second.status.success());
    assert!(out.path().join("gaussian_model-1.view002.png").exists());
    let from_json = stableid(&["render", &ply, "--out", dir, "--camera", cameras.to_str().unwrap()]);
    assert!(from_json.status.success(), "{}", String::from_utf8_lossy(&from_json.stderr));
    let again = image::open(out.path().join("gaussian_model-2.view000.png")).unwrap();
    assert_eq!(again.to_rgb8().as_raw().len(), 24 * 16 * 3);

    // A turntable: the views also as an MP4, which decodes to them.
    let turntable = stableid(&["render", &ply, "--out", dir, "--views", "4", "--size", "32x24", "--turntable", "6"]);
    assert!(turntable.status.success(), "{}", String::from_utf8_lossy(&turntable.stderr));
    let (frames, size, fps) = decode_mp4(&out.path().join("gaussian_model-3.turntable.mp4"));
    assert_eq!((frames.len(), size, fps), (4, (32, 24), 6.0));
    let first = image::open(out.path().join("gaussian_model-3.view000.png")).unwrap().to_rgb8();
    let mean_diff = first.as_raw().iter().zip(&frames[0]).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>()
        / frames[0].len() as f64;
    assert!(mean_diff < 20.0, "the first frame is {mean_diff} levels from its PNG on average");
}

#[test]
fn render_refuses_bad_input_in_one_line() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let ply = fixture("splats/gaussian_model.ply").display().to_string();
    let not_ply = fixture("splats/mixed.safetensors").display().to_string();
    fails_with(&stableid(&["render", &not_ply, "--out", dir]), "not a PLY file");
    fails_with(&stableid(&["render", &ply, "--out", dir, "--size", "0"]), "--size 0");
    fails_with(&stableid(&["render", &ply, "--out", dir, "--views", "0"]), "--views 0");
    fails_with(&stableid(&["render", &ply, "--out", dir, "--size", "25", "--turntable", "8"]), "even width and height");
    fails_with(&stableid(&["render", &ply, "--out", dir, "--radius", "0.01"]), "inside the scene");
    fails_with(&stableid(&["render", &ply, "--out", dir, "--up", "0,0,0"]), "--up");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "nothing written");
}
