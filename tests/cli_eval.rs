//! `stableid eval` end to end: `learn` on the tiny models, then `eval` generates the images
//! (the tiny Stable Diffusion), scores them and writes the report; a second run reuses them. On
//! the fixed images of tests/eval_metrics.rs, `eval --images` reports the values the Python
//! computation gives. Bad inputs fail with one line: an empty image folder, an image without a
//! prompt, a photo without a face, missing weights, a folder of images made with other settings.
//!
//! The metric networks whose layer sizes are fixed (FaceNet, AlexNet, Inception-v3) run on the
//! formula weights of tests/common/formula_weights.rs, written once as safetensors files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use common::{assert_fails_with, fixture};
use stableid::models::facenet::InceptionResnetV1;
use stableid::models::inception::FidInceptionV3;
use stableid::models::lpips::Lpips;

/// The formula weights as files (FaceNet, AlexNet, Inception-v3), written once per test run.
fn weight_files() -> &'static (tempfile::TempDir, [PathBuf; 3]) {
    static FILES: OnceLock<(tempfile::TempDir, [PathBuf; 3])> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = ["facenet", "alexnet", "inception"].map(|name| dir.path().join(format!("{name}.safetensors")));
        common::formula_weights::write_safetensors(&paths[0], InceptionResnetV1::new);
        common::formula_weights::write_safetensors(&paths[1], |vb| {
            Lpips::new(vb, Lpips::shipped_heads(DType::F32, &Device::Cpu)?)
        });
        common::formula_weights::write_safetensors(&paths[2], FidInceptionV3::new);
        (dir, paths)
    })
}

/// `stableid eval` with the tiny CLIP, the formula weights and `args`; PyTorch's cache is an
/// empty folder, so that nothing is found there.
fn eval(args: &[&str]) -> Output {
    let (_, [facenet, alexnet, inception]) = weight_files();
    let empty_cache = tempfile::tempdir().unwrap();
    let mut all: Vec<String> = vec!["eval".into(), "--clip".into(), fixture("tiny-clip").display().to_string()];
    for (flag, path) in [("--facenet-weights", facenet), ("--alexnet-weights", alexnet)] {
        all.extend([flag.to_string(), path.display().to_string()]);
    }
    if args.contains(&"--fid-reference") {
        all.extend(["--inception-weights".to_string(), inception.display().to_string()]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    Command::new(env!("CARGO_BIN_EXE_stableid"))
        .args(&all)
        .env("TORCH_HOME", empty_cache.path())
        .output()
        .expect("the binary runs")
}

fn ok(output: Output) -> Output {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An identity learned on the tiny models (2 steps).
fn learn(dir: &Path) -> PathBuf {
    let names = dir.join("names.txt");
    std::fs::write(&names, "great king\nnew man\nlove art\nred son\n").unwrap();
    let out = dir.join("me.safetensors");
    let (photo, model, vit, segformer) =
        (fixture("photos/astronaut_512.jpg"), fixture("tiny-sd"), fixture("tiny-vit"), fixture("tiny-segformer"));
    let args = [
        "learn",
        s(&photo),
        "--out",
        s(&out),
        "--model",
        s(&model),
        "--face-encoder",
        s(&vit),
        "--face-parser-weights",
        s(&segformer),
        "--celeb-names",
        s(&names),
        "--steps",
        "2",
    ];
    ok(Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().unwrap());
    out
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn learn_then_eval_writes_the_report_and_a_second_run_reuses_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let identity = learn(dir.path());
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "# two prompts\na photo of v1* v2*\nv1* v2* wearing a spacesuit\n").unwrap();
    let out = dir.path().join("eval");
    let photo = fixture("photos/astronaut_512.jpg");
    let reference = fixture("eval/reference");
    let model = fixture("tiny-sd");
    let args = [
        "--identity",
        s(&identity),
        "--photo",
        s(&photo),
        "--out",
        s(&out),
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--num-images",
        "2",
        "--steps",
        "2",
        "--fid-reference",
        s(&reference),
    ];
    let output = ok(eval(&args));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("report.md") && printed.contains("contact_sheet-me.png"), "{printed}");
    let report = read_json(&out.join("report.json"));
    eprintln!("time per stage (s): {}", report["timings_s"]);
    let me = &report["identities"][0];
    assert_eq!(me["label"], "me");
    assert_eq!(me["mean"]["images"], 4);
    assert_eq!(me["prompts"].as_array().unwrap().len(), 2);
    assert_eq!(me["prompts"][1]["prompt"], "v1* v2* wearing a spacesuit");
    // The tiny model's 64x64 images show no face: counted and listed, Face Sim left out.
    let without_face = me["images_without_face"].as_array().unwrap().len();
    assert_eq!(without_face + me["mean"]["faces"].as_u64().unwrap() as usize, 4);
    assert!(me["mean"]["clip_i"].as_f64().unwrap().is_finite());
    assert!(me["mean"]["clip_t"].as_f64().unwrap().is_finite());
    assert!(me["mean"]["fid"].as_f64().unwrap().is_finite());
    for stage in ["load metric models", "generation", "face detection", "CLIP", "Inception", "total"] {
        assert!(report["timings_s"][stage].as_f64().is_some(), "time of {stage}: {}", report["timings_s"]);
    }
    let images: Vec<_> = std::fs::read_dir(out.join("me")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(images.len(), 4, "{images:?}");
    assert!(out.join("me/01-1-43.png").is_file(), "prompt 1, image 1, seed 42 + 1");
    let text = stableid::io::read_png_text(&out.join("me/01-1-43.png")).unwrap();
    assert!(text.iter().any(|(k, v)| k == "prompt" && v == "v1* v2* wearing a spacesuit"));
    assert!(text.iter().any(|(k, v)| k == "seed" && v == "43"));
    let sheet = image::open(out.join("contact_sheet-me.png")).unwrap();
    if let Some(keep) = std::env::var_os("STABLEID_KEEP_CONTACT_SHEET") {
        sheet.save(keep).unwrap();
    }
    assert!(sheet.width() > 2 * 224 && sheet.height() > 2 * 224);
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(markdown.contains("| me | 4 |") && markdown.contains("Time per stage"), "{markdown}");

    // Again: the images are reused (nothing generated), the report written beside the first.
    let before = std::fs::metadata(out.join("me/00-0-42.png")).unwrap().modified().unwrap();
    ok(eval(&args));
    assert_eq!(std::fs::metadata(out.join("me/00-0-42.png")).unwrap().modified().unwrap(), before);
    let second = read_json(&out.join("report-2.json"));
    assert!(second["timings_s"]["generation"].is_null(), "{}", second["timings_s"]);
    assert_eq!(second["identities"][0]["mean"]["clip_t"], me["mean"]["clip_t"]);

    // The folder made above, as images made before: their prompts come from their metadata.
    let folder =
        ok(eval(&["--images", s(&out.join("me")), "--photo", s(&photo), "--out", s(&dir.path().join("again"))]));
    assert!(folder.status.success());
    let again = read_json(&dir.path().join("again/report.json"));
    assert_eq!(again["identities"][0]["mean"]["clip_i"], me["mean"]["clip_i"]);

    // Other settings into the same folder: the images there are not reused, nor overwritten.
    let mut other = args.to_vec();
    let steps = other.iter().position(|a| *a == "--steps").unwrap();
    other[steps + 1] = "3";
    assert_fails_with(&eval(&other), &["00-0-42.png", "was made with other settings", "steps"]);
}

/// `eval --images` on the fixed images reports what the Python computation of the metrics gives.
#[test]
fn eval_of_the_fixed_images_reports_the_python_values() {
    let dir = tempfile::tempdir().unwrap();
    let expected: serde_json::Value = read_json(&fixture("eval/expected.json"));
    let photo = fixture(&format!("photos/{}", expected["photo"].as_str().unwrap()));
    let output = ok(eval(&[
        "--images",
        s(&fixture("eval/images")),
        "--photo",
        s(&photo),
        "--out",
        s(dir.path()),
        "--fid-reference",
        s(&fixture("eval/reference")),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("time per stage (s): {}", report["timings_s"]);
    let ours = &report["identities"][0];
    assert_eq!(ours["label"], "images");
    assert_eq!(ours["images_without_face"], serde_json::json!(["01-1.png"]));
    for key in ["clip_i", "clip_t", "face_sim", "face_div", "trusted_div"] {
        let (a, b) = (ours["mean"][key].as_f64().unwrap(), expected["mean"][key].as_f64().unwrap());
        assert!((a - b).abs() < 2e-3, "{key}: {a} vs {b}");
    }
    let (fid, want) = (ours["mean"]["fid"].as_f64().unwrap(), expected["fid"].as_f64().unwrap());
    assert!((fid - want).abs() < 1e-4 * want, "FID {fid} vs {want}");
    assert_eq!(ours["prompts"][1]["face_div"], serde_json::Value::Null, "one face in prompt 1: no pair");
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let photo = fixture("photos/astronaut_512.jpg");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_with(
        &eval(&["--images", s(&empty), "--photo", s(&photo), "--out", s(&out)]),
        &["image folder", "holds no images"],
    );
    let unlabelled = dir.path().join("unlabelled");
    std::fs::create_dir(&unlabelled).unwrap();
    std::fs::copy(fixture("photos/chelsea_300x256.png"), unlabelled.join("cat.png")).unwrap();
    assert_fails_with(
        &eval(&["--images", s(&unlabelled), "--photo", s(&photo), "--out", s(&out)]),
        &["cat.png", "records no prompt"],
    );
    assert_fails_with(
        &eval(&[
            "--images",
            s(&fixture("eval/images")),
            "--photo",
            s(&fixture("photos/chelsea_300x256.png")),
            "--out",
            s(&out),
        ]),
        &["no face found in the photo", "chelsea_300x256.png"],
    );
    assert_fails_with(
        &eval(&[
            "--images",
            s(&fixture("eval/images")),
            "--photo",
            s(&photo),
            "--out",
            s(&out),
            "--fid-reference",
            s(&empty),
        ]),
        &["FID reference folder", "holds no images"],
    );
    // No FaceNet weights given, none in PyTorch's cache: what to fetch, from where.
    let bare = Command::new(env!("CARGO_BIN_EXE_stableid"))
        .args(["eval", "--images", s(&fixture("eval/images")), "--photo", s(&photo), "--out", s(&out)])
        .args(["--clip", s(&fixture("tiny-clip"))])
        .env("TORCH_HOME", dir.path().join("torch"))
        .output()
        .unwrap();
    assert_fails_with(
        &bare,
        &["--facenet-weights", "20180402-114759-vggface2.pt", "facenet-pytorch", "never downloads"],
    );
    // CLIP neither a folder nor in the hub cache, offline (downloads are tests/hub.rs's).
    let (_, [facenet, alexnet, _]) = weight_files();
    let no_clip = Command::new(env!("CARGO_BIN_EXE_stableid"))
        .args(["eval", "--images", s(&fixture("eval/images")), "--photo", s(&photo), "--out", s(&out)])
        .args(["--facenet-weights", s(facenet), "--alexnet-weights", s(alexnet)])
        .env("HF_HUB_CACHE", dir.path().join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_fails_with(&no_clip, &["openai/clip-vit-base-patch32", "huggingface-cli download"]);
}
