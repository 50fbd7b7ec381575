//! `stableid learn` end to end on the tiny models (SD, ViT, SegFormer): learn, then generate
//! with the identity, export and inspect it; a resumed run equals an uninterrupted one; outputs
//! and checkpoints are never overwritten or mixed up silently.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixture;

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn ok(output: Output) -> Output {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Two-token names of the tiny tokenizer's vocabulary.
fn names_file(dir: &Path) -> PathBuf {
    let path = dir.join("names.txt");
    std::fs::write(&path, "great king\nnew man\nlove art\nred son\n").unwrap();
    path
}

/// `learn` on the tiny models with `extra` flags.
fn learn(dir: &Path, out: &str, extra: &[&str]) -> Output {
    learn_from(dir, &["photos/astronaut_512.jpg"], out, extra)
}

/// `learn` of the fixture photos `photos` on the tiny models with `extra` flags.
fn learn_from(dir: &Path, photos: &[&str], out: &str, extra: &[&str]) -> Output {
    let names = names_file(dir);
    let out = dir.join(out);
    let (model, vit, segformer) = (fixture("tiny-sd"), fixture("tiny-vit"), fixture("tiny-segformer"));
    let photos: Vec<PathBuf> = photos.iter().map(|p| fixture(p)).collect();
    let mut args = vec!["learn"];
    args.extend(photos.iter().map(|p| p.to_str().unwrap()));
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--face-encoder",
        vit.to_str().unwrap(),
        "--face-parser-weights",
        segformer.to_str().unwrap(),
        "--celeb-names",
        names.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    stableid(&args)
}

fn identity_tensor(path: &Path) -> Vec<f32> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    tensors["identity"].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn learn_then_generate_export_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let output = ok(learn(dir.path(), "me.safetensors", &["--steps", "2", "--json"]));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "two step lines and a summary");
    assert_eq!(lines[1]["step"], 2);
    assert!(lines[0]["loss"].as_f64().unwrap().is_finite());
    assert_eq!(lines[2]["metadata"]["steps"], "2");
    assert_eq!(lines[2]["metadata"]["seed"], "42");
    assert_eq!(lines[2]["metadata"]["loss"], "two-phase");
    assert_eq!(lines[2]["metadata"]["photo_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(lines[2]["metadata"]["token_embedding_f16_sha256"].as_str().unwrap().len(), 64);

    // The model it was learned on uses it without a word; the text-to-video model, whose text
    // encoder is the same, too.
    let identity = dir.path().join("me.safetensors");
    let images = dir.path().join("images");
    let video = ok(stableid(&[
        "video",
        "v1* v2* waving",
        "--identity",
        identity.to_str().unwrap(),
        "--model",
        fixture("tiny-video").to_str().unwrap(),
        "--frames",
        "2",
        "--steps",
        "1",
        "--format",
        "png",
        "--out",
        dir.path().join("video").to_str().unwrap(),
    ]));
    assert!(!stderr(&video).contains("another text encoder"), "{}", stderr(&video));
    let generated = ok(stableid(&[
        "generate",
        "v1* v2* as an astronaut",
        "--identity",
        identity.to_str().unwrap(),
        "--model",
        fixture("tiny-sd").to_str().unwrap(),
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        images.to_str().unwrap(),
    ]));
    assert!(images.join("00000-3.png").is_file());
    assert!(!stderr(&generated).contains("another text encoder"), "{}", stderr(&generated));

    for format in ["diffusers", "a1111"] {
        let exported = dir.path().join(format!("me-{format}.safetensors"));
        ok(stableid(&["export", identity.to_str().unwrap(), "--format", format, "--out", exported.to_str().unwrap()]));
        let tensors = candle_core::safetensors::load(&exported, &candle_core::Device::Cpu).unwrap();
        assert_eq!(tensors.len(), 1, "one two-vector embedding");
        let embedding: Vec<f32> = tensors.values().next().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(embedding, identity_tensor(&identity));
        let again =
            stableid(&["export", identity.to_str().unwrap(), "--format", format, "--out", exported.to_str().unwrap()]);
        assert!(!again.status.success() && stderr(&again).contains("--force"), "{}", stderr(&again));
    }

    let inspect = ok(stableid(&["inspect", identity.to_str().unwrap(), "--json"]));
    let summary: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(summary["shape"], serde_json::json!([2, 32]));
    assert_eq!(summary["metadata"]["format"], "stableid-identity");
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    ok(learn(dir.path(), "whole.safetensors", &["--steps", "3", "--save-every", "0"]));
    // "Killed" after step 2: a 2-step run leaves its checkpoint; resuming to 3 steps continues it.
    ok(learn(dir.path(), "split.safetensors", &["--steps", "2", "--save-every", "2"]));
    assert!(dir.path().join("split.ckpt.safetensors").is_file());
    ok(learn(dir.path(), "split.safetensors", &["--steps", "3", "--resume"]));
    assert_eq!(
        identity_tensor(&dir.path().join("whole.safetensors")),
        identity_tensor(&dir.path().join("split.safetensors")),
        "resuming must give exactly the uninterrupted result"
    );

    // A checkpoint made with other settings is refused, naming the difference.
    let refused = learn(dir.path(), "split.safetensors", &["--steps", "4", "--resume", "--seed", "7"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("seed = 42") && stderr(&refused).contains("seed = 7"), "{}", stderr(&refused));
}

#[test]
fn existing_outputs_and_checkpoints_are_never_clobbered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("me.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let refused = learn(dir.path(), "me.safetensors", &["--steps", "1"]);
    assert!(!refused.status.success() && stderr(&refused).contains("--force"), "{}", stderr(&refused));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    std::fs::remove_file(&out).unwrap();
    std::fs::write(dir.path().join("me.ckpt.safetensors"), b"an earlier run").unwrap();
    let refused = learn(dir.path(), "me.safetensors", &["--steps", "1"]);
    assert!(!refused.status.success() && stderr(&refused).contains("--resume"), "{}", stderr(&refused));
    let corrupt = learn(dir.path(), "me.safetensors", &["--steps", "1", "--resume"]);
    assert!(!corrupt.status.success() && stderr(&corrupt).contains("checkpoint"), "{}", stderr(&corrupt));
    assert!(!out.exists(), "no identity from a failed run");

    let tiny_photo = dir.path().join("tiny.png");
    image::RgbImage::new(100, 100).save(&tiny_photo).unwrap();
    let other = dir.path().join("other.safetensors");
    let args = ["learn", tiny_photo.to_str().unwrap(), "--out", other.to_str().unwrap(), "--model", "/nonexistent"];
    let small = stableid(&args);
    assert!(!small.status.success() && stderr(&small).contains("256"), "{}", stderr(&small));
}

#[test]
fn bad_settings_are_refused_before_anything_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, needle) in [
        (&["--steps", "0"][..], "--steps 0: must be at least 1"),
        (&["--lr=-1"][..], "--lr -1: must be a positive number"),
        (&["--hair-weight", "NaN"][..], "--hair-weight NaN"),
    ] {
        let refused = learn(dir.path(), "me.safetensors", flags);
        assert!(!refused.status.success(), "{flags:?}");
        let message = stderr(&refused);
        assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
        assert!(message.contains(needle), "{flags:?}: {message}");
    }
    assert!(!dir.path().join("me.safetensors").exists());
}

#[test]
fn an_unaligned_photo_is_aligned_first_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let output =
        ok(learn_from(dir.path(), &["photos/astronaut_1024x768.jpg"], "me.safetensors", &["--steps", "1", "--json"]));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["metadata"]["alignment"], "ffhq (mtcnn landmarks)");
    assert_eq!(summary["metadata"]["face"], "1");
    assert_eq!(summary["metadata"]["aligned_rgb_sha256"].as_str().unwrap().len(), 64);
    // The crop learned from, next to the identity.
    let crop = image::open(dir.path().join("me.aligned.png")).unwrap();
    assert_eq!((crop.width(), crop.height()), (512, 512));

    // As it is: no detection, no crop written.
    let output = ok(learn_from(
        dir.path(),
        &["photos/astronaut_512.jpg"],
        "as-is.safetensors",
        &["--steps", "1", "--json", "--no-align"],
    ));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["metadata"]["alignment"], "none");
    assert!(!dir.path().join("as-is.aligned.png").exists());

    // A face the photo does not have, and a photo without a face: one line each, nothing written.
    let refused = learn_from(dir.path(), &["photos/astronaut_1024x768.jpg"], "two.safetensors", &["--face", "2"]);
    assert!(!refused.status.success());
    assert_eq!(stderr(&refused).trim().lines().count(), 1, "{}", stderr(&refused));
    let refused = learn_from(dir.path(), &["photos/chelsea_300x256.png"], "cat.safetensors", &["--steps", "1"]);
    assert!(!refused.status.success() && stderr(&refused).contains("no face found"), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("or --no-align if it is an aligned head crop already"), "{}", stderr(&refused));
    assert!(!dir.path().join("two.safetensors").exists() && !dir.path().join("cat.aligned.png").exists());
}

#[test]
fn several_photos_of_one_person_make_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let photos = ["photos/astronaut_512.jpg", "photos/astronaut_1024x768.jpg", "photos/astronaut_300x400.jpg"];
    let output = ok(learn_from(dir.path(), &photos, "me.safetensors", &["--steps", "3", "--json"]));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().last().unwrap()).unwrap();
    // Every photo is named in the metadata, and each one's crop is written.
    assert_eq!(summary["metadata"]["photo_sha256"].as_str().unwrap().split(',').count(), 3);
    assert_eq!(summary["metadata"]["face"], "1,1,1");
    for i in 1..=3 {
        assert!(dir.path().join(format!("me.aligned.{i}.png")).is_file());
    }
    let several = identity_tensor(&dir.path().join("me.safetensors"));
    let one = identity_tensor(&{
        ok(learn_from(dir.path(), &photos[..1], "one.safetensors", &["--steps", "3"]));
        dir.path().join("one.safetensors")
    });
    assert_ne!(several, one, "the other photos change the identity");

    // A resumed run of several photos equals an uninterrupted one.
    ok(learn_from(dir.path(), &photos, "split.safetensors", &["--steps", "2", "--save-every", "1"]));
    ok(learn_from(dir.path(), &photos, "split.safetensors", &["--steps", "3", "--resume"]));
    assert_eq!(identity_tensor(&dir.path().join("split.safetensors")), several);
}

#[test]
fn previews_show_the_identity_as_learned_so_far_and_the_loss_curve_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let output = ok(learn(dir.path(), "me.safetensors", &["--steps", "4", "--preview-every", "2", "--json"]));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let losses: Vec<(u64, f64)> = lines
        .iter()
        .filter(|l| l["loss"].is_number())
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(losses.len(), 4);
    let previews: Vec<&serde_json::Value> = lines.iter().filter(|l| l["preview"].is_string()).collect();
    assert_eq!(previews.len(), 2, "{lines:?}");
    let text = |path: &Path| -> std::collections::HashMap<String, String> {
        stableid::io::read_png_text(path).unwrap().into_iter().collect()
    };
    for (preview, step) in previews.iter().zip(["2", "4"]) {
        let path = dir.path().join(format!("me.preview-{step}.png"));
        assert_eq!(preview["preview"].as_str().unwrap(), path.to_str().unwrap());
        let meta = text(&path);
        assert_eq!(meta["learning_step"], step);
        assert_eq!(meta["prompt"], "a photo of v1* v2*, facing to camera, best quality, ultra high res");
        assert_eq!((meta["seed"].as_str(), meta["steps"].as_str()), ("42", "25"));
    }

    // The last preview is the image `generate` makes with the finished identity, same settings.
    let out = dir.path().join("generated");
    let identity = dir.path().join("me.safetensors");
    let model = fixture("tiny-sd");
    let prompt = "a photo of v1* v2*, facing to camera, best quality, ultra high res";
    let args = ["generate", prompt, "--identity", identity.to_str().unwrap(), "--model", model.to_str().unwrap()];
    ok(stableid(&[&args[..], &["--seed", "42", "--steps", "25", "--out", out.to_str().unwrap()]].concat()));
    let pixels = |path: &Path| image::open(path).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&dir.path().join("me.preview-4.png")), pixels(&out.join("00000-42.png")));

    // The loss curve: a chart with this run's losses in its metadata.
    let curve = dir.path().join("me.loss.png");
    assert_eq!(image::image_dimensions(&curve).unwrap(), (800, 480));
    let recorded: Vec<(u64, f64)> = serde_json::from_str(&text(&curve)["losses"]).unwrap();
    assert_eq!(recorded, losses);
    assert_eq!(lines.last().unwrap()["loss_curve"].as_str().unwrap(), curve.to_str().unwrap());
}

/// Learning through f16 and 8-bit weight matrices (packed on the CPU, activations f32; the
/// gradients widen one layer at a time) follows the f32 run: the same steps from the same seed
/// give nearly the same identity (measured: f16 within 5.7e-5 of the largest value, q8 1.2e-3).
#[test]
fn packed_weights_learn_nearly_the_f32_identity() {
    let dir = tempfile::tempdir().unwrap();
    ok(learn(dir.path(), "f32.safetensors", &["--steps", "3"]));
    let full = identity_tensor(&dir.path().join("f32.safetensors"));
    let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, tolerance) in [("f16", 5e-4), ("q8", 1e-2)] {
        let name = format!("{dtype}.safetensors");
        ok(learn(dir.path(), &name, &["--steps", "3", "--dtype", dtype]));
        let packed = identity_tensor(&dir.path().join(&name));
        let diff = full.iter().zip(&packed).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        eprintln!("{dtype}: identity within {diff:.2e} of f32's (relative to its largest value)");
        assert!(diff < tolerance, "{dtype}: identity differs from f32's by {diff:.2e}");
    }
}
