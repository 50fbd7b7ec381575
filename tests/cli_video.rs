//! `stableid video` end to end on the tiny text-to-video model (tests/fixtures/tiny-video, from
//! tools/reference/unet3d.py) with an identity: MP4 (decoded back here with OpenH264 and the `mp4`
//! crate's reader: frame count, size, frame rate, frames within codec error of the PNG frames),
//! GIF and PNG frames, each with a sidecar JSON; bad input gets a one-line error and no file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::video_files::decode_mp4;
use common::{assert_fails_with, fixture};

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

fn write_identity(dir: &Path, width: usize) -> PathBuf {
    let path = dir.join(format!("id{width}.safetensors"));
    let tensor = candle_core::Tensor::randn(0f32, 1.0, (2, width), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("identity", tensor)].into_iter().collect(), &path).unwrap();
    path
}

/// Runs `video` with the identity in `format`, returning the path it printed.
fn make_video(out: &Path, identity: &Path, format: &str) -> PathBuf {
    let model = fixture("tiny-video").display().to_string();
    let output = stableid(&[
        "video",
        "v1* v2* is cooking, face to the camera",
        "--model",
        &model,
        "--identity",
        identity.to_str().unwrap(),
        "--frames",
        "5",
        "--fps",
        "6",
        "--width",
        "32",
        "--height",
        "24",
        "--steps",
        "2",
        "--seed",
        "4",
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

#[test]
fn video_with_an_identity_in_each_format_and_the_mp4_decodes_to_the_png_frames() {
    let dir = tempfile::tempdir().unwrap();
    let identity = write_identity(dir.path(), 32);
    let out = dir.path().join("videos");

    let png_dir = make_video(&out, &identity, "png");
    let mut frame_files: Vec<_> = std::fs::read_dir(&png_dir).unwrap().map(|e| e.unwrap().path()).collect();
    frame_files.sort();
    assert_eq!(frame_files.len(), 5);
    let png_frames: Vec<Vec<u8>> = frame_files
        .iter()
        .map(|p| {
            let image = image::open(p).unwrap().to_rgb8();
            assert_eq!(image.dimensions(), (32, 24));
            image.into_raw()
        })
        .collect();

    let mp4 = make_video(&out, &identity, "mp4");
    assert_eq!(mp4.extension().unwrap(), "mp4");
    let (frames, size, fps) = decode_mp4(&mp4);
    assert_eq!((frames.len(), size), (5, (32, 24)));
    assert!((fps - 6.0).abs() < 1e-6, "frame rate {fps}");
    // Codec error: the tiny random model's frames are noise-like, the hardest content for 4:2:0
    // chroma and quantisation; measured about 15 levels on average.
    for (i, (decoded, png)) in frames.iter().zip(&png_frames).enumerate() {
        let mean = decoded.iter().zip(png).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>() / png.len() as f64;
        assert!(mean < 20.0, "frame {i}: mean absolute difference {mean} levels");
    }

    let gif = make_video(&out, &identity, "gif");
    let decoder =
        image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap())).unwrap();
    let gif_frames = image::AnimationDecoder::into_frames(decoder).collect_frames().unwrap();
    assert_eq!(gif_frames.len(), 5);

    // Never overwrites: each run takes the next number; each has its settings beside it.
    let names: Vec<String> =
        [&png_dir, &mp4, &gif].iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["00000-4", "00001-4.mp4", "00002-4.gif"]);
    for path in [&png_dir, &mp4, &gif] {
        let sidecar: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        assert_eq!(sidecar["prompt"], "v1* v2* is cooking, face to the camera");
        assert_eq!(sidecar["seed"], "4");
        assert_eq!(sidecar["fps"], "6");
        assert_eq!(sidecar["sampler"], "ddim");
        assert_eq!(sidecar["frames"], "5");
    }
}

#[test]
fn bad_video_input_gets_one_line_errors_and_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("videos");
    let model = fixture("tiny-video").display().to_string();
    let base = |extra: &[&str]| {
        let mut args =
            vec!["video", "v1* v2* waving", "--model", &model, "--steps", "1", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        stableid(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>())
    };
    let narrow = write_identity(dir.path(), 16);
    let fine = write_identity(dir.path(), 32);
    assert_fails_with(&base(&["--frames", "0", "--identity", fine.to_str().unwrap()]), &["frames", "at least 1"]);
    assert_fails_with(&base(&["--width", "30", "--identity", fine.to_str().unwrap()]), &["width", "multiple of 8"]);
    assert_fails_with(&base(&["--identity", narrow.to_str().unwrap()]), &["16-wide", "32 wide"]);
    assert_fails_with(&base(&["--fps", "0", "--identity", fine.to_str().unwrap()]), &["--fps"]);
    let image_model = fixture("tiny-sd").display().to_string();
    assert_fails_with(
        &stableid(&["video", "a cat", "--model", &image_model, "--out", out.to_str().unwrap()]),
        &["UNet2DConditionModel", "UNet3DConditionModel"],
    );
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "nothing written");
}
