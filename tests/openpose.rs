//! The OpenPose body estimator against controlnet_aux 0.0.10 and OpenCV 5
//! (tools/reference/openpose.py): the network on test weights in the real layout, OpenCV's
//! resizes, `draw_bodypose`'s pixels, and the whole `OpenposeDetector.__call__` on a photo with
//! synthetic network outputs in which it finds two people.

mod common;

use candle_core::{DType, Device, Tensor};
use common::pose_weights::{test_model, write_test_weights};
use common::{assert_close, fixture, load_config, load_tensors};
use image::RgbImage;
use serde::Deserialize;
use stableid::priors::pose::body::{find_people, network_input, upsample};
use stableid::priors::pose::draw::draw_bodypose;
use stableid::priors::pose::opencv::{resize_f32, resize_u8, Image, Interpolation};
use stableid::priors::pose::{draw_pose_map, people, resize_to_resolution, PoseEstimator};

fn png(rel: &str) -> RgbImage {
    image::open(fixture(rel)).unwrap().to_rgb8()
}

/// Pixels that differ, and the first of them.
fn differing_pixels(a: &RgbImage, b: &RgbImage) -> (usize, Option<(u32, u32)>) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut first = None;
    let mut count = 0;
    for (x, y, p) in a.enumerate_pixels() {
        if p != b.get_pixel(x, y) {
            count += 1;
            first = first.or(Some((x, y)));
        }
    }
    (count, first)
}

#[test]
fn network_matches_pytorch_on_test_weights_in_the_real_layout() {
    let t = load_tensors("parity/openpose_model.safetensors");
    let model = test_model();
    for i in 0..2 {
        let (paf, heat) = model.forward(&t[&format!("input{i}")]).unwrap();
        assert_close(&paf, &t[&format!("paf{i}")], 1e-4, &format!("input {i}: part affinity fields"));
        assert_close(&heat, &t[&format!("heat{i}")], 1e-4, &format!("input {i}: heat maps"));
    }
}

#[test]
fn weights_load_from_a_file_with_the_flat_names_of_body_pose_model_pth() {
    let dir = tempfile::tempdir().unwrap();
    let photo = png("photos/chelsea_300x256.png");
    for blind in [false, true] {
        let path = dir.path().join(format!("body_pose_model_{blind}.safetensors"));
        write_test_weights(&path, blind);
        let estimator = PoseEstimator::load(&path, &Device::Cpu).unwrap();
        let from_file = estimator.detect(&photo).unwrap();
        // Without heat maps there are no peaks, hence no people.
        assert_eq!(from_file.peaks.is_empty(), blind);
        assert_eq!(from_file.people.is_empty(), blind);
    }
}

fn tensor_u8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn resizes_equal_opencv() {
    let t = load_tensors("parity/openpose_resize.safetensors");
    let cases = [
        ("area_down", Interpolation::Area),
        ("area_half", Interpolation::Area),
        ("area_mixed", Interpolation::Area),
        ("lanczos_up", Interpolation::Lanczos4),
        ("lanczos_down", Interpolation::Lanczos4),
        ("linear_up", Interpolation::Linear),
        ("linear_down", Interpolation::Linear),
    ];
    let mut failures = Vec::new();
    for (name, interpolation) in cases {
        let (input, output) = (&t[&format!("{name}.input")], &t[&format!("{name}.output")]);
        let (h, w, c) = input.dims3().unwrap();
        let (oh, ow, _) = output.dims3().unwrap();
        let src = Image { width: w, height: h, channels: c, data: tensor_u8(input) };
        let got = resize_u8(&src, ow, oh, interpolation);
        let want = tensor_u8(output);
        let diff = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        eprintln!("{name}: {diff} of {} values differ", want.len());
        if diff > 0 {
            failures.push(name);
        }
    }
    for (name, interpolation) in [
        ("map_lanczos_x8", Interpolation::Lanczos4),
        ("map_lanczos_up", Interpolation::Lanczos4),
        ("map_area_down", Interpolation::Area),
    ] {
        let (input, output) = (&t[&format!("{name}.input")], &t[&format!("{name}.output")]);
        let (h, w) = input.dims2().unwrap();
        let (oh, ow) = output.dims2().unwrap();
        let data = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = resize_f32(&Image { width: w, height: h, channels: 1, data }, ow, oh, interpolation);
        let got = Tensor::from_vec(got.data, (oh, ow), &Device::Cpu).unwrap();
        assert_close(&got, output, 1e-5, name);
    }
    assert!(failures.is_empty(), "8-bit resizes differ from OpenCV: {failures:?}");
}

#[derive(Deserialize)]
struct DrawCase {
    image: String,
    people: Vec<Vec<Option<[f64; 2]>>>,
}

#[test]
fn drawing_equals_draw_bodypose_pixel_for_pixel() {
    let cases: Vec<DrawCase> = load_config("parity/openpose_draw.json");
    for case in cases {
        let want = png(&format!("parity/{}", case.image));
        let mut canvas = RgbImage::new(want.width(), want.height());
        for person in &case.people {
            draw_bodypose(&mut canvas, &person.clone().try_into().unwrap());
        }
        let (count, first) = differing_pixels(&canvas, &want);
        assert_eq!(count, 0, "{}: {count} pixels differ, first at {first:?}", case.image);
    }
}

#[derive(Deserialize)]
struct Expected {
    keypoints: Vec<Option<[f64; 2]>>,
    total_score: f64,
    total_parts: usize,
}

#[derive(Deserialize)]
struct PipelineCase {
    detect_resolution: u32,
    image_resolution: u32,
    detect_size: [u32; 2],
    pose_map: String,
    candidate: Vec<[f64; 4]>,
    subset: Vec<Vec<f64>>,
    people: Vec<Expected>,
}

/// `OpenposeDetector.__call__` on faces_3_480x320.png with synthetic network outputs: the
/// network's input (every byte), the peaks (positions exact, scores within 1e-5: the upsampled
/// maps' f32 rounding), the people, and the pose map (every pixel).
#[test]
fn detector_equals_controlnet_aux_on_synthetic_maps() {
    let cases: Vec<PipelineCase> = load_config("parity/openpose_pipeline.json");
    let t = load_tensors("parity/openpose_pipeline.safetensors");
    let photo = png("photos/faces_3_480x320.png");
    for (i, case) in cases.iter().enumerate() {
        let what = format!("detect {} image {}", case.detect_resolution, case.image_resolution);
        let detect = resize_to_resolution(&photo, case.detect_resolution).unwrap();
        assert_eq!([detect.width(), detect.height()], case.detect_size, "{what}");
        let input = network_input(&detect);
        let want: Vec<f32> =
            tensor_u8(&t[&format!("case{i}.input_bgr")]).iter().map(|&v| f32::from(v) / 256.0 - 0.5).collect();
        assert_eq!(input.pixels.len(), want.len(), "{what}: input size");
        let differing = input.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{what}: {differing} network input values differ");

        let flat = |name: &str| {
            t[&format!("case{i}.{name}")].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let maps = upsample(&input, &flat("paf"), &flat("heat"));
        let detection = find_people(&maps);
        assert_eq!(detection.peaks.len(), case.candidate.len(), "{what}: peaks");
        let mut worst = 0f64;
        for (peak, want) in detection.peaks.iter().zip(&case.candidate) {
            assert_eq!([peak.x as f64, peak.y as f64, peak.id as f64], [want[0], want[1], want[3]], "{what}");
            worst = worst.max((peak.score - want[2]).abs());
        }
        eprintln!("{what}: {} peaks, max score diff {worst:e}", detection.peaks.len());
        assert!(worst < 1e-5, "{what}: peak scores differ by {worst}");
        assert_eq!(detection.people.len(), case.subset.len(), "{what}: people");
        for (person, row) in detection.people.iter().zip(&case.subset) {
            let parts: Vec<f64> = person.parts.iter().map(|p| p.map_or(-1.0, |id| id as f64)).collect();
            assert_eq!(parts, row[..18], "{what}");
            assert_eq!(person.count, row[19], "{what}");
            assert!((person.score - row[18]).abs() < 1e-4, "{what}: {} vs {}", person.score, row[18]);
        }
        let found = people(&detection, detect.width() as usize, detect.height() as usize);
        for (person, want) in found.iter().zip(&case.people) {
            // serde_json's float parsing may be an ulp off the JSON's digits.
            for (got, want) in person.keypoints.iter().zip(&want.keypoints) {
                let got = got.map(|k| [k.x, k.y]);
                assert_eq!(got.is_some(), want.is_some(), "{what}");
                if let (Some(g), Some(w)) = (got, want) {
                    assert!((g[0] - w[0]).abs() < 1e-12 && (g[1] - w[1]).abs() < 1e-12, "{what}: {g:?} vs {w:?}");
                }
            }
            assert_eq!(person.total_parts, want.total_parts, "{what}");
            assert!((person.total_score - want.total_score).abs() < 1e-4, "{what}");
        }
        let map = draw_pose_map(&found, (detect.width(), detect.height()), case.image_resolution);
        let (count, first) = differing_pixels(&map, &png(&format!("parity/{}", case.pose_map)));
        assert_eq!(count, 0, "{what}: {count} pose map pixels differ, first at {first:?}");
    }
}
