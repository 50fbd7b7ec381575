//! The evaluation models against their references (fixture from tools/reference/eval_models.py):
//! a tiny random transformers `CLIPModel` with openai/CLIP's preprocessing of real photos,
//! facenet-pytorch's `InceptionResnetV1` and its MTCNN face crops, lpips' LPIPS-Alex (shipped
//! heads) and pytorch-fid's Inception-v3 on formula weights (tests/common/formula_weights.rs) and
//! real photos, and pytorch-fid's Fréchet distance on fixed features.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, fixture, load_config, load_tensors, max_abs_diff, var_builder};
use stableid::eval::faces::largest_face_crop;
use stableid::eval::fid::frechet_distance;
use stableid::eval::{clip_input_image, clip_pixels, levels_tensor, similarity_percent};
use stableid::models::clip::{ClipConfig, ClipModel};
use stableid::models::facenet::{fixed_image_standardization, InceptionResnetV1};
use stableid::models::inception::FidInceptionV3;
use stableid::models::lpips::Lpips;
use stableid::priors::align::FaceDetector;
use stableid::priors::photo::load_upright;

const PARITY: &str = "parity/eval_models.safetensors";

fn tiny_clip() -> ClipModel {
    let cfg: ClipConfig = load_config("tiny-clip/config.json");
    ClipModel::new(var_builder(&fixture("tiny-clip/model.safetensors"), DType::F32), &cfg).unwrap()
}

fn meta() -> HashMap<String, serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture("parity/eval_models.json")).unwrap()).unwrap()
}

/// The photos named by `key` in the fixture's JSON file.
fn photos(key: &str) -> Vec<String> {
    serde_json::from_value(meta()[key].clone()).unwrap()
}

fn clip_photos() -> Vec<String> {
    photos("clip_photos")
}

/// openai/CLIP's resize and crop of real photos (portrait and landscape) equal its levels exactly.
#[test]
fn clip_preprocessing_equals_openai_transform_on_photos() {
    let t = load_tensors(PARITY);
    for (i, name) in clip_photos().iter().enumerate() {
        let photo = load_upright(&fixture(&format!("photos/{name}"))).unwrap();
        let ours = stableid::eval::levels_tensor(&clip_input_image(&photo, 224), &Device::Cpu).unwrap();
        let expected = t["clip_levels"].i(i).unwrap().to_dtype(DType::F32).unwrap().unsqueeze(0).unwrap();
        assert_eq!(max_abs_diff(&ours, &expected), 0.0, "{name}");
    }
}

#[test]
fn clip_image_and_text_features_match_transformers() {
    let t = load_tensors(PARITY);
    let clip = tiny_clip();
    let pixels = clip_photos()
        .iter()
        .map(|name| clip_pixels(&load_upright(&fixture(&format!("photos/{name}"))).unwrap(), 224, &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()
        .unwrap();
    let image = clip.image_features(&Tensor::cat(&pixels, 0).unwrap()).unwrap();
    let expected_image = &t["clip_image_embeds"];
    eprintln!("CLIP image features: max error {}", max_abs_diff(&image, expected_image));
    assert_close(&image, expected_image, 1e-4, "image features");
    let ids = t["clip_input_ids"].to_dtype(DType::U32).unwrap();
    let text = clip.text_features(&ids).unwrap();
    eprintln!("CLIP text features: max error {}", max_abs_diff(&text, &t["clip_text_embeds"]));
    assert_close(&text, &t["clip_text_embeds"], 1e-4, "text features");
    // CLIP-T of each photo with each prompt, as the reference embeddings give it.
    let ours = similarity_percent(&image, &text).unwrap();
    let reference = similarity_percent(expected_image, &t["clip_text_embeds"]).unwrap();
    for (a, b) in ours.iter().zip(&reference) {
        assert!((a - b).abs() < 1e-3, "{ours:?} vs {reference:?}");
    }
}

#[test]
fn facenet_embedding_matches_facenet_pytorch() {
    let t = load_tensors(PARITY);
    let model = InceptionResnetV1::new(common::formula_weights::var_builder()).unwrap();
    let input = fixed_image_standardization(&t["facenet_levels"]).unwrap();
    let embedding = model.forward(&input).unwrap();
    eprintln!("FaceNet embedding: max error {}", max_abs_diff(&embedding, &t["facenet_embedding"]));
    assert_close(&embedding, &t["facenet_embedding"], 1e-4, "facenet embedding");
}

#[test]
fn lpips_alex_with_shipped_heads_matches_lpips() {
    let t = load_tensors(PARITY);
    let heads = Lpips::shipped_heads(DType::F32, &Device::Cpu).unwrap();
    let lpips = Lpips::new(common::formula_weights::var_builder(), heads).unwrap();
    let distance = lpips.forward(&t["lpips_a"], &t["lpips_b"]).unwrap();
    eprintln!(
        "LPIPS: {:?} (max error {})",
        distance.to_vec1::<f32>().unwrap(),
        max_abs_diff(&distance, &t["lpips_distance"])
    );
    assert_close(&distance, &t["lpips_distance"], 1e-4, "lpips distance");
}

/// facenet-pytorch's `MTCNN(image_size=160, margin=0)` on real photos (one with three faces: the
/// largest is taken): the same box, and the same standardised 160x160 crop.
#[test]
fn facenet_crops_equal_facenet_pytorch_mtcnn_on_photos() {
    let t = load_tensors(PARITY);
    let detector = FaceDetector::shipped(&Device::Cpu).unwrap();
    for (i, name) in photos("face_crop_photos").iter().enumerate() {
        let photo = load_upright(&fixture(&format!("photos/{name}"))).unwrap();
        let found = largest_face_crop(&detector, &photo).unwrap().expect("a face");
        let expected_box = t["face_crop_boxes"].i(i).unwrap().to_vec1::<f32>().unwrap();
        for (ours, theirs) in found.face.bbox.iter().zip(&expected_box) {
            assert!((ours - theirs).abs() < 1e-3, "{name}: box {:?} vs {expected_box:?}", found.face.bbox);
        }
        let ours = fixed_image_standardization(&levels_tensor(&found.crop, &Device::Cpu).unwrap()).unwrap();
        let expected = fixed_image_standardization(&t["face_crop_levels"].i(i).unwrap().unsqueeze(0).unwrap()).unwrap();
        assert_eq!(max_abs_diff(&ours, &expected), 0.0, "{name}");
    }
}

/// pytorch-fid's `InceptionV3()` (its 299 bilinear resize, [-1, 1] scaling, FID patches, 2048-d
/// pool) on real photos of two sizes.
#[test]
fn fid_inception_features_match_pytorch_fid() {
    let t = load_tensors(PARITY);
    let model = FidInceptionV3::new(common::formula_weights::var_builder()).unwrap();
    let features = photos("fid_photos")
        .iter()
        .map(|name| {
            let photo = load_upright(&fixture(&format!("photos/{name}"))).unwrap();
            model.forward(&(levels_tensor(&photo, &Device::Cpu).unwrap() / 255.0).unwrap()).unwrap()
        })
        .collect::<Vec<_>>();
    let features = Tensor::cat(&features, 0).unwrap();
    eprintln!("Inception features: max error {}", max_abs_diff(&features, &t["fid_features"]));
    assert_close(&features, &t["fid_features"], 1e-4, "inception features");
}

/// pytorch-fid's `calculate_frechet_distance` (scipy's `sqrtm`) on fixed features, with more
/// samples than dimensions and with fewer (singular covariances), within 1e-6 relative.
#[test]
fn frechet_distance_matches_pytorch_fid() {
    let t = load_tensors(PARITY);
    let expected: HashMap<String, f64> = serde_json::from_value(meta()["frechet_distances"].clone()).unwrap();
    for (tag, want) in expected {
        let got = frechet_distance(&t[&format!("frechet_{tag}_a")], &t[&format!("frechet_{tag}_b")]).unwrap();
        eprintln!("Fréchet distance ({tag}): {got} vs {want}");
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{tag}: {got} vs {want}");
    }
    // The same set: 0, up to rounding.
    let a = &t["frechet_full_a"];
    assert!(frechet_distance(a, a).unwrap().abs() < 1e-9);
}
