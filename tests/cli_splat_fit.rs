//! `stableid splat-fit` end to end: the views `render` writes (cameras carried as PNG text) fitted
//! back from a random start, a 3DGS cameras.json as the cameras' other source, settings in the
//! PLY's header, and one-line errors that write nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use stableid::splats::{init, ply_metadata, read_ply, write_ply};

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn succeeds(output: &Output) {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A small scene of coloured, fairly opaque blobs inside the unit ball, written as a PLY.
fn write_scene(path: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let points: Vec<[f64; 3]> = (0..24).map(|_| [0, 1, 2].map(|_| rng.random_range(-0.6..0.6))).collect();
    let colors: Vec<[f64; 3]> = (0..24).map(|_| [0, 1, 2].map(|_| rng.random_range(0.0..1.0))).collect();
    let mut scene = init::from_points(&points, &colors, &Device::Cpu).unwrap();
    scene.opacity_logits = Tensor::full(2f32, 24, &Device::Cpu).unwrap();
    scene.log_scales = (scene.log_scales + 0.3).unwrap();
    write_ply(path, &scene, &[]).unwrap();
}

#[test]
fn splat_fit_recovers_rendered_views_from_a_random_start() {
    const MIN_PSNR: f64 = 19.0;
    const MIN_GAIN: f64 = 6.0;
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("truth.ply");
    write_scene(&truth);
    let views = dir.path().join("views");
    let (truth_arg, views_arg) = (truth.to_str().unwrap(), views.to_str().unwrap());
    succeeds(&stableid(&[
        "render",
        truth_arg,
        "--out",
        views_arg,
        "--views",
        "6",
        "--size",
        "32",
        "--background",
        "1,1,1",
    ]));
    let mut images: Vec<String> =
        std::fs::read_dir(&views).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    images.sort();
    let fitted = dir.path().join("fitted.ply");
    let fitted_arg = fitted.to_str().unwrap();
    let start = dir.path().join("start.ply");
    let fit_args = |out: &str, iterations: &str| -> Vec<String> {
        let mut args = vec!["splat-fit".to_string()];
        args.extend(images.iter().cloned());
        args.extend(
            ["--out", out, "--points", "300", "--iterations", iterations, "--background", "1,1,1", "--json"]
                .map(String::from),
        );
        args
    };
    let run = |args: &[String]| -> serde_json::Value {
        let output = stableid(&args.iter().map(String::as_str).collect::<Vec<_>>());
        succeeds(&output);
        serde_json::from_slice(&output.stdout).unwrap()
    };
    // Where it starts: the same random cloud after one iteration.
    let before = run(&fit_args(start.to_str().unwrap(), "1"))["psnr"].as_f64().unwrap();
    let args = fit_args(fitted_arg, "300");
    let report = run(&args);
    let psnr = report["psnr"].as_f64().unwrap();
    eprintln!("splat-fit: from {before:.2} dB: {report}");
    assert!(
        psnr > MIN_PSNR && psnr > before + MIN_GAIN,
        "the fit went from {before:.2} to {psnr:.2} dB over its views, expected above {MIN_PSNR} and {MIN_GAIN} dB better"
    );
    let gaussians = read_ply(&fitted, &Device::Cpu).unwrap();
    assert_eq!(gaussians.len().unwrap() as u64, report["gaussians"].as_u64().unwrap());
    let metadata = ply_metadata(&fitted).unwrap();
    let value = |key: &str| metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!(value("iterations").as_deref(), Some("300"));
    assert_eq!(value("start").as_deref(), Some("300 random points"));

    // Never overwritten; nothing else written.
    common::assert_fails_with(&stableid(&args.iter().map(String::as_str).collect::<Vec<_>>()), &["already exists"]);

    // The same cameras from a cameras.json (as 3DGS writes it), continuing from the fit.
    let entries: Vec<String> = images
        .iter()
        .map(|image| {
            let text = stableid::io::read_png_text(Path::new(image)).unwrap();
            text.into_iter().find(|(k, _)| k == "camera").unwrap().1
        })
        .collect();
    let cameras = dir.path().join("cameras.json");
    std::fs::write(&cameras, format!("[{}]", entries.join(","))).unwrap();
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let mut plain_args: Vec<String> = vec!["splat-fit".into()];
    for image in &images {
        // Plain PNGs without the camera text: the cameras.json must supply them.
        let plain = copies.join(Path::new(image).file_name().unwrap());
        image::open(image).unwrap().save(&plain).unwrap();
        plain_args.push(plain.display().to_string());
    }
    let refined = dir.path().join("refined.ply").display().to_string();
    let cameras_arg = cameras.display().to_string();
    plain_args.extend(
        ["--cameras", &cameras_arg, "--init", fitted_arg, "--iterations", "30", "--no-densify", "--out", &refined]
            .map(String::from),
    );
    plain_args.extend(["--background", "1,1,1", "--json"].map(String::from));
    let args: Vec<&str> = plain_args.iter().map(String::as_str).collect();
    let output = stableid(&args);
    succeeds(&output);
    let again: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(again["gaussians"], report["gaussians"], "no densification: the count stays");
    assert!(again["psnr"].as_f64().unwrap() > MIN_PSNR);
}

#[test]
fn splat_fit_refuses_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ply").display().to_string();
    let plain = dir.path().join("plain.png");
    image::RgbImage::new(16, 16).save(&plain).unwrap();
    let plain = plain.display().to_string();
    common::assert_fails_with(&stableid(&["splat-fit", &plain, "--out", &out]), &["carries no camera", "--cameras"]);
    let cameras = dir.path().join("cameras.json");
    let entry = |name: &str, width: usize| {
        format!(
            r#"{{"id":0,"img_name":"{name}","width":{width},"height":16,"position":[0,0,-3],"rotation":[[1,0,0],[0,1,0],[0,0,1]],"fx":20,"fy":20}}"#
        )
    };
    std::fs::write(&cameras, format!("[{}]", entry("other", 16))).unwrap();
    let cameras_arg = cameras.display().to_string();
    common::assert_fails_with(
        &stableid(&["splat-fit", &plain, "--cameras", &cameras_arg, "--out", &out]),
        &["no camera named plain"],
    );
    std::fs::write(&cameras, format!("[{}]", entry("plain", 20))).unwrap();
    common::assert_fails_with(
        &stableid(&["splat-fit", &plain, "--cameras", &cameras_arg, "--out", &out]),
        &["16x16 but its camera sees 20x16"],
    );
    std::fs::write(&cameras, format!("[{}]", entry("plain", 16))).unwrap();
    // One camera: no point to look at, so no random start.
    common::assert_fails_with(
        &stableid(&["splat-fit", &plain, "--cameras", &cameras_arg, "--out", &out]),
        &["viewing axes do not meet"],
    );
    common::assert_fails_with(
        &stableid(&["splat-fit", &plain, "--cameras", &cameras_arg, "--out", &out, "--iterations", "0"]),
        &["--iterations"],
    );
    assert!(!Path::new(&out).exists(), "nothing written");
}
