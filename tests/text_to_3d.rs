//! Text-to-3D: the camera ranges and their widening against `configs/stableid.yaml`'s numbers,
//! the disparity and total-variation terms against their formulas, the training loop on the tiny
//! models (a resumed run equals an uninterrupted one; the scale loss falls), and `stableid 3d`
//! end to end with its one-line errors.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::fixture;
use rand::SeedableRng;
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::pipelines::text_to_3d::views::{disparity, total_variation};
use stableid::pipelines::text_to_3d::{
    head_cloud, turntable, CameraRanges, Start, Text3dCheckpoint, Text3dOutcome, Text3dRun, Text3dSettings,
};
use stableid::splats::Gaussians;
use stableid::weights::ModelDir;
use std::path::Path;

fn tiny() -> String {
    fixture("tiny-sd").display().to_string()
}

#[test]
fn cameras_follow_the_head_config() {
    let ranges = CameraRanges::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut azimuth_fraction = 0.0;
    let mut count = 0.0;
    for _ in 0..200 {
        let batch = ranges.sample(64, &mut rng).unwrap();
        assert_eq!(batch.len(), 10);
        let fov = batch[0].camera().unwrap().fov_x;
        assert!((0.32..=0.60).contains(&fov), "{fov}");
        for view in &batch {
            let camera = view.camera().unwrap();
            assert!((camera.fov_x - fov).abs() < 1e-12, "a batch shares one field of view");
            assert!((5.2..=5.5).contains(&view.radius));
            assert!((45.0..=90.0).contains(&view.polar));
            assert!((-80.0..=80.0).contains(&view.azimuth));
            // It looks at the origin, up to the jitter.
            let p = camera.position();
            let distance = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
            let toward: f64 = (0..3).map(|i| -p[i] / distance * camera.rotation[2][i]).sum();
            assert!(toward > 0.995, "the camera looks away from the head ({toward})");
            azimuth_fraction += view.azimuth.abs() / 80.0;
            count += 1.0;
        }
    }
    // gamma 1.5 draws |u|^1.5: a mean of 1/2.5 of the half range, not uniform's 1/2.
    let mean = azimuth_fraction / count;
    assert!((mean - 0.4).abs() < 0.025, "mean |azimuth| is {mean} of the half range");

    // LucidDreamer's widening at 500, 1000, 1500 ...
    let at = |iteration| ranges.at_iteration(iteration, 500, 500);
    assert_eq!(at(499), ranges);
    let first = at(500);
    assert_eq!(first.phi, [-120.0, 120.0]);
    assert!((first.radius[0] - 4.94).abs() < 1e-12 && (first.radius[1] - 5.225).abs() < 1e-12);
    assert!((first.fov[0] - 0.24).abs() < 1e-12 && (first.fov[1] - 0.60).abs() < 1e-12);
    assert_eq!(first.theta, [45.0, 90.0]);
    let later = at(1500);
    assert_eq!(later.phi, [-180.0, 180.0]);
    assert!((later.fov[0] - 0.16).abs() < 1e-12, "floored at 0.16: {:?}", later.fov);
    assert!((later.radius[1] - 5.0).abs() < 1e-12, "floored at 5.0: {:?}", later.radius);
    assert!((at(5000).radius[0] - 3.5).abs() < 1e-12);

    // The video cameras: the first from the front (+y), at radius 3.5, eye level.
    let video = turntable(4, 32).unwrap();
    let front = video[0].position();
    assert!(front[0].abs() < 1e-9 && (front[1] - 3.5).abs() < 1e-9 && front[2].abs() < 1e-9, "{front:?}");
    let side = video[1].position();
    assert!((side[0] - 3.5).abs() < 1e-9, "azimuth 90 is +x: {side:?}");
}

#[test]
fn disparity_and_total_variation_follow_lucid_dreamer() {
    let depth = Tensor::new(&[[[2.0f32, 4.0], [0.0, 3.0]]], &Device::Cpu).unwrap();
    let transmittance = Tensor::new(&[[[0.0f32, 0.05], [1.0, 0.5]]], &Device::Cpu).unwrap();
    let fov: f64 = 0.5;
    let focal = 1.0 / (2.0 * (fov / 2.0).tan());
    let raw: Vec<f64> = [(2.0, 0.0), (4.0, 0.05), (0.0, 1.0), (3.0, 0.5)]
        .iter()
        .map(|(d, t): &(f64, f64)| focal / (d + 10.0 * t + 1e-5))
        .collect();
    // Minimum over covered pixels (T <= 0.1): the first two; maximum over all.
    let (min, max) = (raw[0].min(raw[1]), raw.iter().cloned().fold(f64::MIN, f64::max));
    let expected: Vec<f64> = raw.iter().map(|v| ((v - min) / (max - min)).clamp(0.0, 1.0)).collect();
    let got = disparity(&depth, &transmittance, fov).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} vs {expected:?}");
    }

    let x = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().sqr().unwrap().reshape((2, 1, 3, 4)).unwrap();
    let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let at = |b: usize, h: usize, w: usize| f64::from(values[b * 12 + h * 4 + w]);
    let (mut vertical, mut horizontal) = (0.0, 0.0);
    for b in 0..2 {
        for h in 0..3 {
            for w in 0..4 {
                if h + 1 < 3 {
                    vertical += (at(b, h + 1, w) - at(b, h, w)).powi(2);
                }
                if w + 1 < 4 {
                    horizontal += (at(b, h, w + 1) - at(b, h, w)).powi(2);
                }
            }
        }
    }
    let expected = 2.0 * (vertical / 16.0 + horizontal / 18.0);
    let got = f64::from(total_variation(&x).unwrap().to_scalar::<f32>().unwrap());
    assert!((got - expected).abs() < 1e-3 * expected, "{got} vs {expected}");
}

/// The loop's settings for a few iterations on the tiny models: small renders, early
/// densification, a checkpoint every 3 iterations.
fn short_settings(iterations: usize) -> Text3dSettings {
    let mut settings = Text3dSettings::new("a head, wearing a hat").with_iterations(iterations);
    settings.size = 32;
    settings.views_per_iteration = 2;
    settings.densify_from = 2;
    settings.densify_every = 4;
    settings.densify_until = iterations;
    settings.opacity_reset_every = 5;
    settings.widen_from = 4;
    settings.widen_every = 4;
    settings
}

fn run(
    sd: &StableDiffusion,
    settings: &Text3dSettings,
    checkpoint: &std::path::Path,
    start: Start,
    stop_after: Option<usize>,
) -> (Text3dOutcome, Vec<f64>) {
    let run = Text3dRun {
        sd,
        identities: &[],
        settings: settings.clone(),
        checkpoint: checkpoint.to_path_buf(),
        checkpoint_every: 3,
    };
    let stop = AtomicBool::new(false);
    let mut scale_losses = Vec::new();
    let outcome = run
        .run(start, &stop, &mut |report, _| {
            assert!(report.ism_grad_norm.is_finite() && report.ism_grad_norm > 0.0);
            scale_losses.push(report.scale_loss);
            if Some(report.iteration) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        })
        .unwrap();
    (outcome, scale_losses)
}

fn parts(gaussians: &Gaussians) -> Vec<Vec<f32>> {
    gaussians.parts().iter().map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one_and_the_scales_shrink() {
    let sd = StableDiffusion::load(&ModelDir::local(Path::new(&tiny())), &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = short_settings(10);
    let start = || Start::Cloud(head_cloud(150, 1, &Device::Cpu).unwrap());

    let (whole, scale_losses) = run(&sd, &settings, &dir.path().join("a.safetensors"), start(), None);
    let Text3dOutcome::Finished(whole) = whole else { panic!("the run finished") };
    assert!(
        scale_losses.last().unwrap() < scale_losses.first().unwrap(),
        "the scale loss should fall: {scale_losses:?}"
    );

    let checkpoint = dir.path().join("b.safetensors");
    let (first, _) = run(&sd, &settings, &checkpoint, start(), Some(7));
    let Text3dOutcome::Interrupted { iteration, .. } = first else { panic!("the run stopped") };
    assert_eq!(iteration, 7);
    let saved = Text3dCheckpoint::load(&checkpoint).unwrap();
    assert_eq!(saved.iteration, 7);
    let (rest, _) = run(&sd, &settings, &checkpoint, Start::Resume(Box::new(saved)), None);
    let Text3dOutcome::Finished(resumed) = rest else { panic!("the resumed run finished") };
    assert_eq!(parts(&whole), parts(&resumed), "resuming changes nothing");

    // Another prompt cannot resume this checkpoint.
    let mut other = settings.clone();
    other.prompt = "another prompt".into();
    let saved = Text3dCheckpoint::load(&checkpoint).unwrap();
    let refused = Text3dRun { sd: &sd, identities: &[], settings: other, checkpoint, checkpoint_every: 0 }.run(
        Start::Resume(Box::new(saved)),
        &AtomicBool::new(false),
        &mut |_, _| Ok(()),
    );
    let message = refused.err().expect("refused").to_string();
    assert!(message.contains("prompt"), "{message}");

    // Broken numbers stop the run with a message, before any step is taken on them.
    let mut broken = head_cloud(150, 1, &Device::Cpu).unwrap();
    broken.log_scales = (broken.log_scales * f64::NAN).unwrap();
    let stopped = Text3dRun {
        sd: &sd,
        identities: &[],
        settings: settings.clone(),
        checkpoint: dir.path().join("c.safetensors"),
        checkpoint_every: 0,
    }
    .run(Start::Cloud(broken), &AtomicBool::new(false), &mut |_, _| Ok(()));
    let message = stopped.err().expect("stopped").to_string();
    assert!(message.contains("NaN or infinite at iteration 1"), "{message}");
}

fn stableid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stableid")).args(args).output().expect("the binary runs")
}

#[test]
fn three_d_writes_splats_views_and_video_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("id.safetensors");
    let tensor = Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("identity", tensor)].into_iter().collect(), &identity).unwrap();
    let (identity, model) = (identity.display().to_string(), tiny());
    let out = dir.path().join("me3d").display().to_string();
    let base = [
        "3d",
        "v1* v2* wearing a hat",
        "--identity",
        &identity,
        "--model",
        &model,
        "--size",
        "32",
        "--points",
        "120",
        "--turntable-views",
        "4",
        "--fps",
        "4",
        "--out",
        &out,
    ];
    let with = |extra: &[&'static str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| stableid(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let output = run(with(&["--iterations", "4", "--preview-every", "2", "--json"]));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "four iterations and the result");
    assert_eq!(lines[3]["iteration"], 4);
    let result = &lines[4];
    assert_eq!(result["views"].as_array().unwrap().len(), 5, "4 PNGs and the MP4");
    let splats = std::path::Path::new(&out).join("splats.ply");
    let metadata = stableid::splats::ply_metadata(&splats).unwrap();
    assert!(metadata.iter().any(|(k, v)| k == "prompt" && v == "v1* v2* wearing a hat"));
    assert!(stableid::splats::read_ply(&splats, &Device::Cpu).is_ok());
    let (frames, size, _) = common::video_files::decode_mp4(&std::path::Path::new(&out).join("splats.turntable.mp4"));
    assert_eq!((frames.len(), size), (4, (32, 32)));
    assert!(std::path::Path::new(&out).join("preview.iter00002.png").exists());
    assert!(!std::path::Path::new(&out).join("checkpoint.safetensors").exists(), "a finished run leaves no checkpoint");

    common::assert_fails_with(&run(with(&["--iterations", "4"])), &["already exists"]);
    let other = dir.path().join("other").display().to_string();
    let refuse = |extra: &[&str], needle: &str| {
        let args: Vec<&str> = ["3d", "v1* v2*", "--model", &model, "--out", &other]
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        common::assert_fails_with(&stableid(&args), &[needle]);
    };
    refuse(&["--size", "36"], "multiple of 8");
    refuse(&["--resume"], "no checkpoint");
    refuse(&["--identity", "/nonexistent.safetensors"], "nonexistent");
    assert!(!std::path::Path::new(&other).join("splats.ply").exists(), "nothing written");

    // Without placeholders the identity is unused: a warning, not an error.
    let plain = dir.path().join("plain").display().to_string();
    let output = stableid(&[
        "3d",
        "a hat",
        "--identity",
        &identity,
        "--model",
        &model,
        "--size",
        "32",
        "--points",
        "60",
        "--iterations",
        "1",
        "--turntable-views",
        "2",
        "--out",
        &plain,
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("has no v1* v2*"));
}
