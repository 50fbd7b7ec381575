//! The splatting engine against the dense PyTorch renderer (`tools/reference/splat.py`, fixtures
//! `tests/fixtures/splats/`), against finite differences, on a fitting run, and on PLY files.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, load_tensors};
use stableid::splats::{
    fit, psnr, read_ply, render, write_ply, Camera, FitOptions, Gaussians, OrbitPosition, RenderOptions,
};

/// A place on an orbit around the origin, z up.
fn orbit(radius: f64, elevation: f64, azimuth: f64) -> OrbitPosition {
    OrbitPosition { target: [0.0; 3], up: [0.0, 0.0, 1.0], radius, elevation, azimuth }
}

/// A fixture scene: its Gaussians (as `Var`s in `dtype`), camera and render options.
fn scene(name: &str, dtype: DType) -> (HashMap<String, Tensor>, Vec<Var>, Gaussians, Camera, RenderOptions) {
    let t = load_tensors(&format!("splats/{name}.safetensors"));
    let mut names = vec!["means", "log_scales", "quats", "opacity_logits", "sh_dc"];
    if t.contains_key("sh_rest") {
        names.push("sh_rest");
    }
    let vars: Vec<Var> = names.iter().map(|n| Var::from_tensor(&t[*n].to_dtype(dtype).unwrap()).unwrap()).collect();
    let gaussians = Gaussians::from_parts(vars.iter().map(|v| v.as_tensor().clone()).collect()).unwrap();
    let (_, height, width) = t["image"].dims3().unwrap();
    let rows = |name: &str| t[name].to_vec2::<f64>().unwrap();
    let r = rows("camera_R");
    let translation = t["camera_t"].to_vec1::<f64>().unwrap();
    let fov = t["camera_fov"].to_vec1::<f64>().unwrap();
    let camera = Camera {
        rotation: [0, 1, 2].map(|i| [r[i][0], r[i][1], r[i][2]]),
        translation: [translation[0], translation[1], translation[2]],
        fov_x: fov[0],
        fov_y: fov[1],
        width,
        height,
    };
    let bg = t["background"].to_vec1::<f64>().unwrap();
    let options = RenderOptions { background: [bg[0], bg[1], bg[2]], near: 0.2 };
    (t, vars, gaussians, camera, options)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn renders_match_the_dense_reference_in_f64_and_f32() {
    for name in ["mixed", "sh3", "opaque"] {
        for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let (t, _, gaussians, camera, options) = scene(name, dtype);
            let view = render(&gaussians, &camera, &options).unwrap();
            let err = max_abs_diff(&view.image, &t["image"]);
            eprintln!("{name} {dtype:?}: max |image - reference| = {err:.2e}");
            assert!(err < tolerance, "{name} {dtype:?}: colour/depth/transmittance differ by {err}");
            let radii = t["radii"].to_vec1::<f64>().unwrap();
            let ours = view.footprints().radii;
            let same = radii.iter().zip(&ours).filter(|(r, o)| **r as u32 == **o).count();
            assert_eq!(same, radii.len(), "{name} {dtype:?}: radii differ");
        }
    }
}

#[test]
fn gradients_match_the_reference_autograd() {
    for name in ["mixed", "sh3", "opaque"] {
        let (t, vars, gaussians, camera, options) = scene(name, DType::F64);
        let view = render(&gaussians, &camera, &options).unwrap();
        let loss = (&view.image * &t["loss_weights"]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let names = ["means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"];
        for (var, name_) in vars.iter().zip(names) {
            let ours = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {name_}"));
            let reference = &t[&format!("grad_{name_}")];
            let err = max_abs_diff(ours, reference) / max_abs(reference).max(1.0);
            eprintln!("{name} d/d{name_}: max relative error {err:.2e}");
            assert!(err < 1e-8, "{name}: gradient of {name_} off by {err} (relative to its largest entry)");
        }
        // The pixel-centre gradients densification reads are there after the backward pass.
        let mean_grads = view.footprints().mean_grads.expect("2D gradients after backward");
        assert_eq!(mean_grads.len(), gaussians.means.dims()[0]);
        assert!(mean_grads.iter().any(|g| g[0] != 0.0));
    }
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    // "opaque" stops compositing early in most pixels; "sh3" has view-dependent colours.
    for name in ["sh3", "opaque"] {
        finite_differences(name);
    }
}

fn finite_differences(name: &str) {
    let (t, vars, gaussians, camera, options) = scene(name, DType::F64);
    let weights = &t["loss_weights"];
    let loss_of = |g: &Gaussians| -> f64 {
        let view = render(g, &camera, &options).unwrap();
        (&view.image * weights).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let grads = {
        let view = render(&gaussians, &camera, &options).unwrap();
        (&view.image * weights).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    let (mut checked, mut discontinuous) = (0, 0);
    for (group, var) in vars.iter().enumerate() {
        let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Every 7th parameter of the group: several hundred checks in all.
        for index in (group..values.len()).step_by(7) {
            let shifted = |delta: f64| {
                let mut v = values.clone();
                v[index] += delta;
                let mut parts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
                parts[group] = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
                loss_of(&Gaussians::from_parts(parts).unwrap())
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            // The renderer is discontinuous where a pixel crosses a Gaussian's 3-sigma tile
            // rectangle or a threshold (alpha 1/255, T 1e-4): there a central difference
            // changes with its step. Such parameters are counted, not compared.
            let finer = (shifted(eps / 10.0) - shifted(-eps / 10.0)) / (0.2 * eps);
            checked += 1;
            if (numeric - finer).abs() > 1e-3 * numeric.abs().max(1.0) {
                discontinuous += 1;
                continue;
            }
            let err = (numeric - grad[index]).abs() / numeric.abs().max(grad[index].abs()).max(1.0);
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{name} group {group} parameter {index}: finite difference {numeric}, autograd {}",
                grad[index]
            );
        }
    }
    eprintln!("{name}: worst relative error against finite differences: {worst:.2e} ({discontinuous} of {checked} parameters at a discontinuity)");
    assert!(discontinuous * 50 <= checked, "{name}: {discontinuous} of {checked} parameters at a discontinuity");
}

/// Random Gaussians in a unit ball, in f32.
fn random_cloud(count: usize, seed: u64, scale: f64) -> Gaussians {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform =
        |n: usize, low: f64, high: f64| -> Vec<f32> { (0..n).map(|_| rng.random_range(low..high) as f32).collect() };
    let device = Device::Cpu;
    Gaussians {
        means: Tensor::from_vec(uniform(count * 3, -0.8, 0.8), (count, 3), &device).unwrap(),
        log_scales: Tensor::from_vec(uniform(count * 3, (0.5 * scale).ln(), (1.5 * scale).ln()), (count, 3), &device)
            .unwrap(),
        rotations: Tensor::from_vec(uniform(count * 4, -1.0, 1.0), (count, 4), &device).unwrap(),
        opacity_logits: Tensor::from_vec(uniform(count, -1.0, 3.0), count, &device).unwrap(),
        sh_dc: Tensor::from_vec(uniform(count * 3, -1.7, 1.7), (count, 3), &device).unwrap(),
        sh_rest: None,
    }
}

#[test]
fn fitting_recovers_a_small_scene() {
    const MIN_PSNR: f64 = 26.0;
    let truth = random_cloud(40, 1, 0.15);
    let cameras: Vec<Camera> =
        (0..4).map(|k| Camera::orbit(&orbit(3.0, 20.0, 90.0 * k as f64), 0.8, 32, 32).unwrap()).collect();
    let options = RenderOptions { background: [1.0; 3], near: 0.2 };
    let views: Vec<(Camera, Tensor)> =
        cameras.iter().map(|c| (c.clone(), render(&truth, c, &options).unwrap().color().unwrap())).collect();
    let start = random_cloud(80, 2, 0.1);
    let mut fit_options = FitOptions::new(300, 1.0);
    fit_options.render = options;
    fit_options.rates.means.start = 0.005;
    fit_options.rates.means.end = 0.0005;
    fit_options.rates.sh_dc = stableid::splats::ExponentialSchedule::constant(0.02);
    fit_options.rates.opacity_logits = stableid::splats::ExponentialSchedule::constant(0.05);
    fit_options.rates.log_scales = stableid::splats::ExponentialSchedule::constant(0.01);
    fit_options.densify = None;
    let before: f64 = views
        .iter()
        .map(|(c, target)| psnr(&render(&start, c, &options).unwrap().color().unwrap(), target).unwrap())
        .sum::<f64>()
        / 4.0;
    let (fitted, report) = fit(&start, &views, &fit_options, |_, _| {}).unwrap();
    let after: f64 = views
        .iter()
        .map(|(c, target)| psnr(&render(&fitted, c, &options).unwrap().color().unwrap(), target).unwrap())
        .sum::<f64>()
        / 4.0;
    eprintln!(
        "PSNR {before:.2} dB -> {after:.2} dB after {} iterations ({} Gaussians)",
        report.losses.len(),
        report.count
    );
    assert!(after > MIN_PSNR, "fitting reached {after:.2} dB, expected above {MIN_PSNR}");
}

#[test]
fn densification_clones_splits_and_prunes() {
    let truth = random_cloud(30, 3, 0.15);
    let cameras: Vec<Camera> =
        (0..3).map(|k| Camera::orbit(&orbit(3.0, 10.0, 120.0 * k as f64), 0.8, 24, 24).unwrap()).collect();
    let options = RenderOptions { background: [0.0; 3], near: 0.2 };
    let views: Vec<(Camera, Tensor)> =
        cameras.iter().map(|c| (c.clone(), render(&truth, c, &options).unwrap().color().unwrap())).collect();
    let mut fit_options = FitOptions::new(60, 1.0);
    fit_options.render = options;
    fit_options.densify_from = 5;
    fit_options.densify_until = 50;
    fit_options.densify_every = 10;
    fit_options.opacity_reset_every = 1000;
    let start = random_cloud(10, 4, 0.3);
    let (fitted, report) = fit(&start, &views, &fit_options, |_, _| {}).unwrap();
    eprintln!("densification: 10 -> {} Gaussians", report.count);
    assert_ne!(report.count, 10, "densification changed nothing");
    assert_eq!(fitted.len().unwrap(), report.count);
}

#[test]
fn ply_round_trip_is_exact() {
    let (_, _, gaussians, _, _) = scene("sh3", DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.ply");
    write_ply(&path, &gaussians, &[]).unwrap();
    let back = read_ply(&path, &Device::Cpu).unwrap();
    for (a, b) in gaussians.parts().into_iter().zip(back.parts()) {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
}

#[test]
fn a_ply_written_by_the_3dgs_code_loads() {
    let expected = load_tensors("splats/gaussian_model.safetensors");
    let loaded = read_ply(&fixture("splats/gaussian_model.ply"), &Device::Cpu).unwrap();
    assert_eq!(loaded.sh_degree(), 1);
    let pairs = [
        (&loaded.means, "means"),
        (&loaded.log_scales, "log_scales"),
        (&loaded.rotations, "rotations"),
        (&loaded.opacity_logits, "opacity_logits"),
        (&loaded.sh_dc, "sh_dc"),
        (loaded.sh_rest.as_ref().unwrap(), "sh_rest"),
    ];
    for (ours, name) in pairs {
        assert_eq!(ours.dims(), expected[name].dims(), "{name}");
        assert_eq!(max_abs_diff(ours, &expected[name]), 0.0, "{name}");
    }
}

fn ply_error(header_properties: &[&str], rows: &[Vec<f32>]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.ply");
    let mut bytes = format!("ply\nformat binary_little_endian 1.0\nelement vertex {}\n", rows.len()).into_bytes();
    for p in header_properties {
        bytes.extend(format!("property float {p}\n").bytes());
    }
    bytes.extend(b"end_header\n");
    for row in rows {
        for v in row {
            bytes.extend(v.to_le_bytes());
        }
    }
    std::fs::write(&path, bytes).unwrap();
    read_ply(&path, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn bad_plys_are_refused_with_one_line_saying_why() {
    let full = [
        "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1",
        "rot_2", "rot_3",
    ];
    // A point cloud, not Gaussians.
    let err = ply_error(&["x", "y", "z", "red"], &[vec![0.0; 4]]);
    assert!(err.contains("missing vertex properties f_dc_0 f_dc_1 f_dc_2 opacity scale_0"), "{err}");
    let err = ply_error(&full, &[]);
    assert!(err.contains("no Gaussians"), "{err}");
    let mut row = vec![0.0; full.len()];
    row[0] = f32::NAN;
    row[7] = f32::INFINITY;
    let err = ply_error(&full, &[row.clone(), vec![0.0; full.len()]]);
    assert!(err.contains("2 parameters are NaN or infinite"), "{err}");
    let missing = tempfile::tempdir().unwrap();
    let err = read_ply(&missing.path().join("none.ply"), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn degenerate_cameras_and_sizes_are_refused() {
    let err = Camera::look_at([0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], 0.8, 16, 16).unwrap_err().to_string();
    assert!(err.contains("eye and the target coincide"), "{err}");
    let err = Camera::look_at([0.0, 0.0, 3.0], [0.0; 3], [0.0, 0.0, 1.0], 0.8, 16, 16).unwrap_err().to_string();
    assert!(err.contains("parallel to the up vector"), "{err}");
    let err = Camera::look_at([0.0, 3.0, 0.0], [0.0; 3], [0.0, 0.0, 1.0], 0.8, 0, 16).unwrap_err().to_string();
    assert!(err.contains("at least one pixel"), "{err}");
    let empty = random_cloud(1, 0, 0.1);
    let empty = Gaussians::from_parts(empty.parts().into_iter().map(|t| t.narrow(0, 0, 0).unwrap()).collect()).unwrap();
    let camera = Camera::orbit(&orbit(3.0, 0.0, 0.0), 0.8, 8, 8).unwrap();
    let err = render(&empty, &camera, &RenderOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no Gaussians"), "{err}");
    let means = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let orbit = stableid::splats::Orbit {
        views: 4,
        radius: Some(0.5),
        elevation: 0.0,
        fov: 40.0,
        width: 8,
        height: 8,
        up: [0.0, 0.0, 1.0],
    };
    let err = stableid::splats::orbit_cameras(&means, &orbit).unwrap_err().to_string();
    assert!(err.contains("inside the scene"), "{err}");
}

#[test]
fn a_camera_survives_the_3dgs_json_format() {
    let camera =
        Camera::orbit(&OrbitPosition { target: [0.1, 0.2, 0.3], ..orbit(4.0, 25.0, 70.0) }, 0.7, 40, 30).unwrap();
    let back = Camera::from_json(&camera.to_json(0, "a.png")).unwrap();
    for i in 0..3 {
        assert!((camera.translation[i] - back.translation[i]).abs() < 1e-12);
        for j in 0..3 {
            assert!((camera.rotation[i][j] - back.rotation[i][j]).abs() < 1e-12);
        }
    }
    assert!((camera.fov_x - back.fov_x).abs() < 1e-12 && (camera.fov_y - back.fov_y).abs() < 1e-12);
}

#[test]
fn starting_clouds_follow_3dgs() {
    use rand::{Rng, SeedableRng};
    use stableid::splats::init;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Clustered and spread points, so that the grid search meets empty and crowded cells.
    let mut points: Vec<[f64; 3]> = (0..400).map(|_| [0, 1, 2].map(|_| rng.random_range(-1.0..1.0))).collect();
    points.extend((0..200).map(|_| [0, 1, 2].map(|_| rng.random_range(0.3..0.35))));
    points.push([9.0, 9.0, 9.0]);
    let grid = init::mean_squared_neighbour_distances(&points);
    for (i, p) in points.iter().enumerate() {
        let mut d2: Vec<f64> = points
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, q)| (0..3).map(|k| (p[k] - q[k]).powi(2)).sum())
            .collect();
        d2.sort_by(f64::total_cmp);
        let brute = d2[..3].iter().sum::<f64>() / 3.0;
        assert!((grid[i] - brute).abs() <= 1e-12 * brute.max(1.0), "point {i}: grid {} brute force {brute}", grid[i]);
    }
    let colors = vec![[0.2, 0.5, 0.9]; points.len()];
    let gaussians = init::from_points(&points, &colors, &Device::Cpu).unwrap();
    let log_scales = gaussians.log_scales.to_vec2::<f32>().unwrap();
    assert!((f64::from(log_scales[7][2]) - 0.5 * grid[7].ln()).abs() < 1e-5);
    let opacity = gaussians.opacity_logits.to_vec1::<f32>().unwrap()[0];
    assert!((1.0 / (1.0 + (-opacity).exp()) - 0.1).abs() < 1e-6, "3DGS starts at opacity 0.1");
    let dc = gaussians.sh_dc.to_vec2::<f32>().unwrap();
    assert!((f64::from(dc[0][2]) * stableid::splats::SH_C0 + 0.5 - 0.9).abs() < 1e-6);

    let ball = init::random_ball(500, [1.0, 2.0, 3.0], 0.5, 1, &Device::Cpu).unwrap();
    let means = ball.means.to_vec2::<f32>().unwrap();
    let distance = |m: &Vec<f32>| ((m[0] - 1.0).powi(2) + (m[1] - 2.0).powi(2) + (m[2] - 3.0).powi(2)).sqrt();
    assert!(means.iter().all(|m| distance(m) <= 0.5 + 1e-6));
    // Uniform in volume: the inner half-radius ball holds about an eighth.
    let inner = means.iter().filter(|m| distance(m) < 0.25).count();
    assert!((35..=95).contains(&inner), "{inner} of 500 in the inner ball");
    assert!(init::random_ball(0, [0.0; 3], 1.0, 1, &Device::Cpu).is_err());
    assert!(init::from_points(&[[f64::NAN, 0.0, 0.0]], &[[0.5; 3]], &Device::Cpu).is_err());
}

#[test]
fn cameras_on_an_orbit_look_at_its_centre() {
    use stableid::splats::{cameras_extent, common_target};
    let centre = [0.3, -0.2, 0.5];
    let cameras: Vec<Camera> = (0..5)
        .map(|k| {
            let position = OrbitPosition {
                target: centre,
                up: [0.0, 0.0, 1.0],
                radius: 4.0,
                elevation: 10.0 * k as f64,
                azimuth: 70.0 * k as f64,
            };
            Camera::orbit(&position, 0.7, 16, 16).unwrap()
        })
        .collect();
    let target = common_target(&cameras).unwrap();
    assert!((0..3).all(|i| (target[i] - centre[i]).abs() < 1e-9), "{target:?}");
    let extent = cameras_extent(&cameras);
    assert!(extent > 0.0 && extent <= 1.1 * 8.0, "{extent}");
    assert!(common_target(&cameras[..1]).is_err(), "one camera has no point to look at");
}
