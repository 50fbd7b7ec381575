//! Bad sizes, counts and files never abort, hang or do damage (issue 18): flag and config numbers
//! that would size huge buffers, identities holding NaN, special and oversized files, outputs
//! that are not regular files and very long prompts each get a one-line error at once. Every
//! input is made here; the cases are those of `shared/bad-inputs/README.md` for this half.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{copy_dir, fixture};
use serde_json::{json, Value};
use stableid::error::ErrorKind;
use stableid::identity::checkpoint::Checkpoint;
use stableid::identity::Identity;
use stableid::models::face_parsing::segformer::SegformerConfig;
use stableid::models::stable_diffusion::SdConfigs;
use stableid::pipelines::{read_latents, GenerateRequest};

/// A refusal comes at once: the cases that aborted or ran for minutes must answer within this.
const AT_ONCE: Duration = Duration::from_secs(10);

fn stableid(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    // Without RUST_BACKTRACE, which makes candle append a backtrace to its errors.
    let output = Command::new(env!("CARGO_BIN_EXE_stableid"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the binary runs");
    (output, start.elapsed())
}

/// Runs `args` and asserts a clean refusal: exit code 1 or 2 (no abort, no panic), at once, with
/// one line on stderr that contains every needle. Returns that line.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let (output, took) = stableid(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(1 | 2)),
        "{args:?}: expected exit code 1 or 2, got {:?}: {stderr}",
        output.status
    );
    assert!(took < AT_ONCE, "{args:?}: took {took:?}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: the error should mention {needle:?}: {stderr}");
    }
    lines[0].to_string()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A copy of the tiny model with `key` of the JSON file `file` set to `value`.
fn tiny_model_with(dir: &Path, file: &str, key: &str, value: Value) -> PathBuf {
    let model = dir.join(format!("model-{}-{key}", file.replace('/', "-")));
    copy_dir(&fixture("tiny-sd"), &model);
    let path = model.join(file);
    let mut config: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.insert(key.into(), value);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    model
}

/// An identity file of the tiny model's width holding `values` (2 x 32).
fn identity_file(dir: &Path, name: &str, values: Vec<f32>) -> PathBuf {
    let path = dir.join(name);
    let tensor = Tensor::from_vec(values, (2, 32), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("identity", tensor)].into_iter().collect(), &path).unwrap();
    path
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
    assert!(status.success());
}

#[test]
fn huge_image_sizes_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tiny = fixture("tiny-sd");
    for (width, height) in [("4294967296", "64"), ("65536", "65536"), ("1048576", "8")] {
        let args = ["generate", "a cat", "--model", path_str(&tiny), "--width", width, "--height", height];
        refused(&[&args[..], &["--out", path_str(&out)]].concat(), &[&format!("--width {width}"), "latents", "16 GiB"]);
    }
    let args = ["generate", "a cat", "--model", path_str(&tiny), "--width", "8", "--height", "1048576"];
    refused(&[&args[..], &["--out", path_str(&out)]].concat(), &["--height 1048576", "at most 65536 latents"]);
    assert!(!out.exists(), "a refused request created its output folder");

    // The bound: 65,536 latents, 2048 x 2048 pixels for Stable Diffusion; no overflow anywhere.
    let configs = SdConfigs::sd21_base();
    assert!(GenerateRequest::new("a cat", 2048, 2048).validate(&configs).is_ok());
    assert!(GenerateRequest::new("a cat", 8, 8 * 65536).validate(&configs).is_ok());
    for (width, height) in [(2048, 2056), (usize::MAX & !7, usize::MAX & !7), (8, 8 * 65537)] {
        let err = GenerateRequest::new("a cat", width, height).validate(&configs).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input, "{err}");
        assert!(err.to_string().contains("at most 65536 latents"), "{err}");
    }
}

#[test]
fn config_numbers_that_size_buffers_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases = [
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(1_000_000_000_000u64),
            "num_train_timesteps 1000000000000",
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(1_000_000_000u64),
            "num_train_timesteps 1000000000",
        ),
        ("scheduler/scheduler_config.json", "steps_offset", json!(u64::MAX), "steps_offset 18446744073709551615"),
        ("scheduler/scheduler_config.json", "beta_end", json!(1.5), "beta_end 1.5"),
        ("scheduler/scheduler_config.json", "trained_betas", json!(vec![-0.5; 1000]), "trained_betas[0] = -0.5"),
        ("tokenizer/tokenizer_config.json", "model_max_length", json!(1_000_000_000u64), "model_max_length 1000000000"),
        // Within the tokenizer's own bound, but more than the text encoder's 77 positions.
        ("tokenizer/tokenizer_config.json", "model_max_length", json!(78), "model_max_length 78"),
        (
            "unet/config.json",
            "layers_per_block",
            json!(1_000_000_000_000_000u64),
            "layers_per_block` = 1000000000000000",
        ),
        ("unet/config.json", "sample_size", json!(1u64 << 40), "sample_size"),
        ("unet/config.json", "block_out_channels", json!(vec![8; 70]), "`block_out_channels` = [70 entries] has more"),
        ("vae/config.json", "block_out_channels", json!(vec![8; 70]), "`block_out_channels` = [70 entries] has more"),
    ];
    for (file, key, value, needle) in cases {
        let model = tiny_model_with(dir.path(), file, key, value);
        let args = ["generate", "a cat", "--model", path_str(&model), "--steps", "1", "--out", path_str(&out)];
        refused(&args, &[needle, file]);
    }

    // SegFormer's class names made from `num_labels` alone.
    let config: SegformerConfig = serde_json::from_value(json!({ "num_labels": 1_000_000_000_000_000u64 })).unwrap();
    let err = config.class_names().unwrap_err().to_string();
    assert!(err.contains("num_labels: 1000000000000000 classes"), "{err}");
}

#[test]
fn long_prompts_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tiny = fixture("tiny-sd");
    let word = "a".repeat(120_000);
    let args = ["generate", &word, "--model", path_str(&tiny), "--out", path_str(&out)];
    let line = refused(&args, &["the prompt \"aaaa", "(120000 characters)", "longer than 10000 characters"]);
    assert!(line.len() < 400, "the message quotes the whole prompt: {} characters", line.len());
    let args = ["generate", "a cat", "--negative-prompt", &word, "--model", path_str(&tiny), "--out", path_str(&out)];
    refused(&args, &["--negative-prompt", "(120000 characters)"]);
}

#[test]
fn identities_with_nan_or_infinite_values_are_refused_but_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let mut values = vec![0.5f32; 64];
    values[3] = f32::NAN;
    values[40] = f32::NEG_INFINITY;
    let identity = identity_file(dir.path(), "diverged.safetensors", values);
    let id = path_str(&identity);
    let tiny = fixture("tiny-sd");
    let out = dir.path().join("out");

    let needles = ["diverged.safetensors", "2 of its 64 values are NaN or infinite"];
    refused(&["generate", "v1* v2*", "--model", path_str(&tiny), "--identity", id, "--out", path_str(&out)], &needles);
    let exported = dir.path().join("exported.safetensors");
    refused(&["export", id, "--format", "a1111", "--out", path_str(&exported)], &needles);
    assert!(!exported.exists());

    let (output, _) = stableid(&["inspect", id]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("not usable: 2 of its 64 values are NaN or infinite"), "{stdout}");
    let (output, _) = stableid(&["inspect", id, "--json"]);
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["non_finite_values"], 2);

    let err = Identity::load(&identity).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    assert_eq!(Identity::load_unchecked(&identity).unwrap().non_finite_values().unwrap(), 2);
}

#[test]
fn special_oversized_and_truncated_input_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixture("tiny-sd");
    let out = dir.path().join("out");
    let generate_with = |flag: &str, file: &Path, needles: &[&str]| {
        let args = ["generate", "v1* v2*", "--model", path_str(&tiny), flag, path_str(file), "--out", path_str(&out)];
        refused(&args, needles);
    };

    // A sound latents file is read, as f32.
    let latents = dir.path().join("latents.safetensors");
    let tensor = Tensor::ones((1, 4, 8, 8), candle_core::DType::F64, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("latents", tensor)].into_iter().collect(), &latents).unwrap();
    let read = read_latents(&latents).unwrap();
    assert_eq!((read.dims(), read.dtype()), (&[1, 4, 8, 8][..], candle_core::DType::F32));

    let zero = Path::new("/dev/zero");
    generate_with("--identity", zero, &["identity file /dev/zero", "a character device, not a regular file"]);
    generate_with("--initial-latents", zero, &["initial latents /dev/zero", "a character device"]);
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    generate_with("--identity", &fifo, &["a fifo, not a regular file"]);
    generate_with("--identity", dir.path(), &["a folder, not a regular file"]);

    // Larger than any identity: a sparse file, refused from its size alone.
    let large = dir.path().join("large.safetensors");
    std::fs::File::create(&large).unwrap().set_len(17 << 20).unwrap();
    generate_with("--identity", &large, &["17825792 bytes, more than the 16 MiB"]);
    generate_with("--initial-latents", &large, &["initial latents", "more than the 16 MiB"]);

    // A header that promises more data than the file holds, and one longer than the file.
    let good = identity_file(dir.path(), "good.safetensors", vec![0.5; 64]);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4]).unwrap();
    generate_with("--identity", &truncated, &["not a safetensors file", "its header describes"]);
    let mut long_header = bytes.clone();
    long_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&truncated, &long_header).unwrap();
    generate_with("--identity", &truncated, &["not a safetensors file", "a header of 18446744073709551615 bytes"]);

    // A config that is a device.
    let model = dir.path().join("model");
    copy_dir(&tiny, &model);
    std::fs::remove_file(model.join("unet/config.json")).unwrap();
    std::os::unix::fs::symlink(zero, model.join("unet/config.json")).unwrap();
    let args = ["generate", "a cat", "--model", path_str(&model), "--out", path_str(&out)];
    refused(&args, &["unet/config.json", "a character device"]);

    // The celebrity names file is read right after the photo, before any model.
    let photo = fixture("photos/astronaut_512.jpg");
    let identity_out = dir.path().join("me.safetensors");
    let args = ["learn", path_str(&photo), "--out", path_str(&identity_out), "--celeb-names", "/dev/zero"];
    refused(&args, &["celebrity names file /dev/zero", "a character device"]);

    // Learner checkpoints.
    for (file, needle) in [(zero, "a character device"), (truncated.as_path(), "not a safetensors file")] {
        let err = Checkpoint::load(file).err().unwrap().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn outputs_never_replace_what_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let identity = identity_file(dir.path(), "me.safetensors", vec![0.5; 64]);
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let export_to = |out: &Path, needles: &[&str]| {
        refused(&["export", path_str(&identity), "--format", "a1111", "--out", path_str(out), "--force"], needles);
    };

    let folder = outputs.join("folder");
    std::fs::create_dir(&folder).unwrap();
    export_to(&folder, &["cannot write", "it is a folder", "only replace regular files"]);
    assert!(folder.is_dir());

    let fifo = outputs.join("fifo");
    mkfifo(&fifo);
    export_to(&fifo, &["it is a fifo"]);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));

    // A link is not replaced, nor is the file it points to (outside the output folder) written.
    let target = dir.path().join("elsewhere.txt");
    std::fs::write(&target, "keep me").unwrap();
    let link = outputs.join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    export_to(&link, &["it is a symbolic link"]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");

    // A device node (as /dev/full is), made here so that a failure could only replace this one.
    let device = outputs.join("null");
    if Command::new("mknod").arg(&device).args(["c", "1", "3"]).status().is_ok_and(|s| s.success()) {
        export_to(&device, &["it is a character device"]);
        let file_type = std::fs::symlink_metadata(&device).unwrap().file_type();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&file_type));
        std::fs::remove_file(&device).unwrap();
    }

    // A regular file is replaced, and no temporary file is left anywhere.
    let regular = outputs.join("regular.safetensors");
    std::fs::write(&regular, "old").unwrap();
    let (output, _) =
        stableid(&["export", path_str(&identity), "--format", "a1111", "--out", path_str(&regular), "--force"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(Identity::load(&regular).is_ok());
    let mut names: Vec<_> =
        std::fs::read_dir(&outputs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["fifo", "folder", "link.safetensors", "regular.safetensors"]);
}
