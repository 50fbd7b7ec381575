//! `stableid generate` end to end on the tiny model folder: PNGs with their settings in the
//! metadata, hub-cache resolution, and one-line errors with a non-zero exit for bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::bad_inputs::{
    jpeg_claiming, legacy_checkpoint, png_claiming, state_dict_pickle, write_flat_png, zip_checkpoint, PidField,
    TensorSpec, LEGACY_PID,
};
use common::{assert_fails_with, copy_dir, fixture};

fn stableid(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stableid"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn tiny() -> String {
    fixture("tiny-sd").display().to_string()
}

#[test]
fn generate_writes_pngs_with_settings_and_is_reproducible() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let args = [
        "generate",
        "a photo of a lighthouse",
        "--model",
        &tiny(),
        "--steps",
        "3",
        "--seed",
        "5",
        "--out",
        out_dir,
        "--json",
    ];
    let first = stableid(&args, &[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let path = summary["images"][0]["path"].as_str().unwrap().to_string();
    assert!(path.ends_with("00000-5.png"), "{path}");
    assert_eq!(summary["width"], 64, "default size comes from the model config");

    let text = stableid::io::read_png_text(Path::new(&path)).unwrap();
    let get = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a photo of a lighthouse"));
    assert_eq!(get("seed").as_deref(), Some("5"));
    assert_eq!(get("steps").as_deref(), Some("3"));
    assert_eq!(get("guidance").as_deref(), Some("8.5"));
    assert_eq!(get("sampler").as_deref(), Some("dpm++"));

    // Same seed again: a new file (never overwritten) with the same bytes.
    let second = stableid(&args, &[]);
    assert!(second.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    let path2 = summary["images"][0]["path"].as_str().unwrap().to_string();
    assert!(path2.ends_with("00001-5.png"), "{path2}");
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&path2).unwrap());
}

#[test]
fn generate_with_identity_and_several_images() {
    let out = tempfile::tempdir().unwrap();
    let identity = out.path().join("id.safetensors");
    let tensor = candle_core::Tensor::randn(0f32, 1.0, (2, 32), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("identity", tensor)].into_iter().collect(), &identity).unwrap();
    let images = out.path().join("images");
    let output = stableid(
        &[
            "generate",
            "v1* v2* as an astronaut",
            "--model",
            &tiny(),
            "--steps",
            "2",
            "--seed",
            "9",
            "--num-images",
            "2",
            "--sampler",
            "euler",
            "--identity",
            identity.to_str().unwrap(),
            "--out",
            images.to_str().unwrap(),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut names: Vec<_> =
        std::fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["00000-9.png", "00001-10.png"]);
}

#[test]
fn hub_ids_resolve_through_the_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-sd");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_dir(&fixture("tiny-sd"), &repo.join("snapshots").join(commit));
    let out = cache.path().join("out");
    let args = [
        "generate",
        "a cat",
        "--model",
        "someone/tiny-sd",
        "--steps",
        "1",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let output = stableid(&args, &[("HF_HUB_CACHE", cache.path())]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let missing = stableid(
        &["generate", "a cat", "--model", "someone/absent", "--out", out.to_str().unwrap(), "--offline"],
        &[("HF_HUB_CACHE", cache.path())],
    );
    assert_fails_with(&missing, &["someone/absent", "huggingface-cli download"]);
}

#[test]
fn bad_input_gets_one_line_errors_and_no_partial_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let tiny = tiny();

    let r = stableid(&["generate", "a cat", "--model", &tiny, "--width", "60", "--out", out_s], &[]);
    assert_fails_with(&r, &["--width 60", "multiple of 8"]);

    let r = stableid(&["generate", "a cat", "--model", "/no/such/model", "--out", out_s], &[]);
    assert_fails_with(&r, &["/no/such/model"]);

    let r = stableid(&["generate", "a photo of v1* v2*", "--model", &tiny, "--steps", "1", "--out", out_s], &[]);
    assert_fails_with(&r, &["--identity"]);

    let bad_identity = dir.path().join("bad.safetensors");
    let tensor = candle_core::Tensor::zeros((3, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("identity", tensor)].into_iter().collect(), &bad_identity).unwrap();
    let r = stableid(
        &["generate", "v1* v2*", "--model", &tiny, "--identity", bad_identity.to_str().unwrap(), "--out", out_s],
        &[],
    );
    assert_fails_with(&r, &["bad.safetensors", "[3, 32]"]);

    let not_safetensors = dir.path().join("junk.safetensors");
    std::fs::write(&not_safetensors, b"definitely not a tensor file").unwrap();
    let r = stableid(
        &["generate", "v1* v2*", "--model", &tiny, "--identity", not_safetensors.to_str().unwrap(), "--out", out_s],
        &[],
    );
    assert_fails_with(&r, &["junk.safetensors", "not a safetensors file"]);

    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, b"").unwrap();
    let r = stableid(&["generate", "a cat", "--model", &tiny, "--out", a_file.join("sub").to_str().unwrap()], &[]);
    assert_fails_with(&r, &["cannot create output folder"]);

    let r = stableid(&["generate", "a cat", "--model", &tiny, "--device", "cuda", "--out", out_s], &[]);
    if !cfg!(feature = "cuda") {
        assert_fails_with(&r, &["CUDA", "--features cuda"]);
    }

    // Nothing was written by any failed run.
    let leftovers: Vec<_> =
        std::fs::read_dir(&out).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "failed runs left files: {leftovers:?}");
}

#[test]
fn masks_writes_overlay_and_mask_pngs() {
    let out = tempfile::tempdir().unwrap();
    let photo = fixture("photos/astronaut_512.jpg");
    let segformer = fixture("tiny-segformer");
    let args = [
        "masks",
        photo.to_str().unwrap(),
        "--face-parser-weights",
        segformer.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--json",
    ];
    let output = stableid(&args, &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for name in ["astronaut_512-overlay.png", "astronaut_512-face.png", "astronaut_512-hair.png"] {
        let path = out.path().join(name);
        let decoded = image::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((decoded.width(), decoded.height()), (512, 512), "{name}");
    }
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(summary.to_string().contains("face"), "{summary}");
}

/// The bad files of issue 18 (written by the test): photos whose headers claim huge images and
/// damaged face-parser checkpoints each give a one-line error and exit code 1, at once, from
/// `masks` and `learn`.
#[test]
fn huge_photos_and_damaged_checkpoints_get_one_line_errors_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let png = std::fs::read(fixture("photos/chelsea_300x256.png")).unwrap();
    let jpeg = std::fs::read(fixture("photos/astronaut_300x400.jpg")).unwrap();
    let flat = dir.path().join("flat_40000x40000.png");
    write_flat_png(&flat, 40_000, 40_000);
    let photos = [
        write("ihdr_100000x100000.png", png_claiming(&png, 100_000, 100_000)),
        write("ihdr_1x4294967295.png", png_claiming(&png, 1, u32::MAX)),
        write("sof_65535x65535.jpg", jpeg_claiming(&jpeg, 65_535, 65_535, false)),
        write("sofprog_65535.jpg", jpeg_claiming(&jpeg, 65_535, 65_535, true)),
        flat,
    ];
    let out = dir.path().join("out");
    let identity = dir.path().join("id.safetensors");
    let tiny = tiny();
    let exits_at_once = |args: &[&str], needles: &[&str]| {
        let start = std::time::Instant::now();
        let output = stableid(args, &[]);
        let elapsed = start.elapsed();
        assert_fails_with(&output, needles);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        // The work takes milliseconds; the bound leaves room for a busy machine.
        assert!(elapsed < std::time::Duration::from_secs(5), "{args:?} took {elapsed:?}");
    };
    for photo in &photos {
        let (path, name) = (photo.to_str().unwrap(), photo.file_name().unwrap().to_str().unwrap());
        exits_at_once(&["masks", path, "--out", out.to_str().unwrap()], &[name, "limit of 100 megapixels"]);
        exits_at_once(
            &["learn", path, "--out", identity.to_str().unwrap(), "--model", &tiny],
            &[name, "limit of 100 megapixels"],
        );
    }

    let tensor =
        |strides| TensorSpec { name: "cp.resnet.conv1.weight", key: "0", offset: 0, shape: vec![2, 3], strides };
    let storages: [(&str, &[f32]); 1] = [("0", &[0.0; 6])];
    let pid_of_4 = [PidField::Key, PidField::Location];
    let checkpoints = [
        write(
            "min_pickle_4tuple_persid.pth",
            zip_checkpoint(&state_dict_pickle(&[tensor(vec![3, 1])], &pid_of_4, false), &storages),
        ),
        write(
            "r559_half_leg_leg3int.pth",
            legacy_checkpoint(&state_dict_pickle(&[tensor(vec![i64::MAX, 1])], &LEGACY_PID, false), &storages),
        ),
    ];
    let photo = fixture("photos/astronaut_512.jpg");
    for checkpoint in &checkpoints {
        let name = checkpoint.file_name().unwrap().to_str().unwrap();
        let (photo, weights, out) = (photo.to_str().unwrap(), checkpoint.to_str().unwrap(), out.to_str().unwrap());
        let args = ["masks", photo, "--face-parser", "bisenet", "--face-parser-weights", weights, "--out", out];
        exits_at_once(&args, &[name, "cp.resnet.conv1.weight"]);
    }
    assert!(!identity.exists());
}
