//! `stableid generate --controlnet DIR --control-image IMAGE` end to end on the tiny models: the
//! PNG records the ControlNets, and bad ControlNet input gets a one-line error, a non-zero exit
//! and no PNG.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_fails_with, copy_dir, fixture};

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn path_of(rel: &str) -> String {
    fixture(rel).display().to_string()
}

fn pngs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map_or(0, |d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "png")).count())
}

#[test]
fn generate_with_two_controlnets_records_them_and_takes_the_control_image_size() {
    let out = tempfile::tempdir().unwrap();
    let (tiny, pose) = (path_of("tiny-sd"), path_of("controlnet/pose_75x70.png"));
    let (first, second) = (path_of("tiny-controlnet"), path_of("tiny-controlnet-2"));
    let args = [
        "generate",
        "a dancer",
        "--model",
        &tiny,
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        out.path().to_str().unwrap(),
        "--controlnet",
        &first,
        "--control-image",
        &pose,
        "--controlnet",
        &second,
        "--control-image",
        &path_of("controlnet/pose_80x72.png"),
        "--control-scale",
        "0.5",
        "--control-scale",
        "1.2",
        "--control-end",
        "0.5",
        "--control-channel-order",
        "bgr",
        "--json",
    ];
    let output = stableid(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // 75 x 70 rounded down to multiples of 8.
    assert_eq!((summary["width"].as_u64(), summary["height"].as_u64()), (Some(72), Some(64)));
    assert_eq!(summary["controlnets"][1]["scale"], 1.2);
    assert_eq!(summary["controlnets"][0]["end"], 0.5);
    assert_eq!(summary["controlnets"][1]["channel_order"], "bgr");

    let png = summary["images"][0]["path"].as_str().unwrap();
    let text = stableid::io::read_png_text(Path::new(png)).unwrap();
    let all = |k: &str| text.iter().filter(|(key, _)| key == k).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(all("controlnet"), vec![first, second]);
    assert_eq!(all("control_scale"), vec!["0.5", "1.2"]);
    assert_eq!(all("control_steps"), vec!["0-0.5", "0-0.5"]);
    let image = &all("control_image")[0];
    assert!(image.starts_with(&pose) && image.contains("sha256 ") && image.len() > pose.len() + 64, "{image}");
    assert_eq!(all("size"), vec!["72x64"]);
}

#[test]
fn bad_controlnet_input_gets_one_line_errors_and_no_png() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("out");
    let out_str = out_dir.to_str().unwrap().to_string();
    let (tiny, controlnet, pose) =
        (path_of("tiny-sd"), path_of("tiny-controlnet"), path_of("controlnet/pose_80x72.png"));
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "a dancer", "--model", &tiny, "--steps", "1", "--out", &out_str];
        args.extend_from_slice(extra);
        stableid(&args)
    };

    let not_an_image = out.path().join("pose.png");
    std::fs::write(&not_an_image, b"not a png").unwrap();
    let output = run(&["--controlnet", &controlnet, "--control-image", not_an_image.to_str().unwrap()]);
    assert_fails_with(&output, &["control image", "pose.png", "not an image"]);

    let missing = out.path().join("missing.png");
    assert_fails_with(
        &run(&["--controlnet", &controlnet, "--control-image", missing.to_str().unwrap()]),
        &["missing.png"],
    );

    assert_fails_with(&run(&["--controlnet", &controlnet]), &["0 --control-image for 1 --controlnet"]);
    assert_fails_with(
        &run(&["--controlnet", &controlnet, "--control-image", &pose, "--control-scale", "1", "--control-scale", "2"]),
        &["2 --control-scale values for 1 --controlnet"],
    );
    assert_fails_with(&run(&["--control-image", &pose]), &["1 --control-image for 0 --controlnet"]);
    assert_fails_with(
        &run(&[
            "--controlnet",
            &controlnet,
            "--control-image",
            &pose,
            "--control-start",
            "0.6",
            "--control-end",
            "0.4",
        ]),
        &["--control-end 0.4", "control_start"],
    );
    assert_fails_with(
        &run(&["--controlnet", "/no/such/controlnet", "--control-image", &pose]),
        &["/no/such/controlnet", "hub id such as thibaud/controlnet-sd21-openpose-diffusers"],
    );

    let wide = out.path().join("wide");
    copy_dir(&fixture("tiny-controlnet"), &wide);
    let config = std::fs::read_to_string(wide.join("config.json")).unwrap();
    std::fs::write(
        wide.join("config.json"),
        config.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 1024"),
    )
    .unwrap();
    assert_fails_with(
        &run(&["--controlnet", wide.to_str().unwrap(), "--control-image", &pose]),
        &["does not fit base model", "wide", "tiny-sd", "[1024]"],
    );
    assert_eq!(pngs_in(&out_dir), 0, "no PNG after a failure");

    // Out of [0, 2]: a warning, and the image is made.
    let output = run(&["--controlnet", &controlnet, "--control-image", &pose, "--control-scale", "2.5"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("warning: --control-scale 2.5"));
    assert_eq!(pngs_in(&out_dir), 1);
}

#[test]
fn pose_from_a_photo_steers_with_its_pose_map_found_before_any_denoising() {
    let dir = tempfile::tempdir().unwrap();
    let (seeing, blind) = (dir.path().join("body.safetensors"), dir.path().join("blind.safetensors"));
    // The test network "finds" people in any photo; the blind one finds nobody.
    common::pose_weights::write_test_weights(&seeing, false);
    common::pose_weights::write_test_weights(&blind, true);
    let out = dir.path().join("out");
    let (tiny, controlnet, photo) =
        (path_of("tiny-sd"), path_of("tiny-controlnet"), path_of("photos/chelsea_300x256.png"));
    let run = |weights: &Path| {
        stableid(&[
            "generate",
            "a dancer",
            "--model",
            &tiny,
            "--steps",
            "1",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--controlnet",
            &controlnet,
            "--pose-from",
            &photo,
            "--pose-model",
            weights.to_str().unwrap(),
            "--json",
        ])
    };
    let output = run(&seeing);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // The pose map of the 300x256 photo is 576x512 (controlnet_aux's 512 resolution): the image's size.
    assert_eq!((summary["width"].as_u64(), summary["height"].as_u64()), (Some(576), Some(512)));
    let png = summary["images"][0]["path"].as_str().unwrap();
    let text = stableid::io::read_png_text(Path::new(png)).unwrap();
    let image = text.iter().find(|(k, _)| k == "control_image").map(|(_, v)| v.clone()).unwrap();
    assert!(image.starts_with(&format!("pose of {photo}")), "{image}");

    let output = run(&blind);
    assert_fails_with(&output, &["--pose-from", "chelsea_300x256.png", "no person found"]);
    assert_eq!(pngs_in(&out), 1, "nothing written for the photo without a person");
    // A --pose-from takes the first ControlNet's image: counts are checked with it.
    let output = stableid(&[
        "generate",
        "a dancer",
        "--model",
        &tiny,
        "--out",
        out.to_str().unwrap(),
        "--controlnet",
        &controlnet,
        "--control-image",
        &photo,
        "--pose-from",
        &photo,
    ]);
    assert_fails_with(&output, &["1 --control-image and --pose-from for 1 --controlnet"]);
}
