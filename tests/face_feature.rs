//! The face-recognition feature against transformers (fixture from tools/reference/face_feature.py):
//! the ViT image processor's preprocessing of real photos (both backends, bit-exact), a tiny random
//! `ViTModel` (last_hidden_state and the CLS feature, plain and flipped), the hub's
//! `ViTForImageClassification` PyTorch layout, hub-cache resolution and the errors for wrong models.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, copy_dir, fixture, load_tensors};
use sha2::{Digest, Sha256};
use stableid::priors::face_feature::{load_face_encoder, preprocess, preprocess_with, vit_input_image, FaceEncoder};
use stableid::priors::photo::{load_photo, Photo, Weights};
use stableid::weights::Hub;
use stableid::Error;

const PARITY: &str = "parity/face_feature.safetensors";

fn metadata() -> HashMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("parity/face_feature.json")).unwrap()).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn encoder(rel: &str) -> FaceEncoder {
    load_face_encoder(fixture(rel).to_str().unwrap(), &Hub::from_env(), &Device::Cpu).unwrap()
}

fn parity_photo(meta: &HashMap<String, String>) -> Photo {
    load_photo(&fixture(&format!("photos/{}", meta["parity_photo"]))).unwrap()
}

/// The default processor's output for the parity photo, `(1, 3, 224, 224)`, from its exact levels.
fn expected_pixels(t: &HashMap<String, Tensor>) -> Tensor {
    let levels = t["vit_input_levels"].to_dtype(DType::F32).unwrap();
    ((levels - 127.5).unwrap() / 127.5).unwrap().unsqueeze(0).unwrap()
}

fn flip_width(t: &Tensor) -> Tensor {
    let w = t.dim(3).unwrap() as u32;
    let reversed = Tensor::new((0..w).rev().collect::<Vec<u32>>(), t.device()).unwrap();
    t.index_select(&reversed, 3).unwrap()
}

/// On the lossless photos (whose 512 images equal PIL's, see tests/photo.rs) the 224x224 ViT
/// input levels equal those of transformers' torchvision processor (the default) and of its PIL
/// processor (transformers 4's, the published implementation's).
#[test]
fn vit_input_equals_both_transformers_processors() {
    let meta = metadata();
    let mut names: Vec<&str> =
        meta.keys().filter_map(|k| k.strip_suffix(".vit_torchvision_sha256")).filter(|n| n.ends_with(".png")).collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    for name in names {
        let photo = load_photo(&fixture(&format!("photos/{name}"))).unwrap();
        let torchvision = vit_input_image(&photo, Weights::Torchvision);
        let pil = vit_input_image(&photo, Weights::Pil);
        assert_eq!(torchvision.dimensions(), (224, 224));
        let differing = torchvision.as_raw().iter().zip(pil.as_raw()).filter(|(a, b)| a != b).count();
        eprintln!("{name}: torchvision and PIL resizes differ in {differing} of {} samples", 224 * 224 * 3);
        assert_eq!(sha256_hex(torchvision.as_raw()), meta[&format!("{name}.vit_torchvision_sha256")], "{name}");
        assert_eq!(sha256_hex(pil.as_raw()), meta[&format!("{name}.vit_pil_sha256")], "{name}");
    }
}

#[test]
fn preprocess_matches_the_default_processor_output() {
    let meta = metadata();
    let t = load_tensors(PARITY);
    let photo = parity_photo(&meta);
    let expected = expected_pixels(&t);
    assert_close(&preprocess(&photo, false).unwrap(), &expected, 1e-5, "pixel_values");
    assert_close(&preprocess(&photo, true).unwrap(), &flip_width(&expected), 1e-5, "flipped pixel_values");
    // The PIL variant is the same up to one level (2 / 255) in a few samples.
    let pil = preprocess_with(&photo, false, Weights::Pil).unwrap();
    let diff = common::max_abs_diff(&pil, &expected);
    assert!(diff > 0.0 && diff <= 2.0 / 255.0 + 1e-6, "PIL variant differs by {diff}");
}

#[test]
fn tiny_vit_matches_transformers() {
    let meta = metadata();
    let t = load_tensors(PARITY);
    let encoder = encoder("tiny-vit");
    assert_eq!(encoder.hidden_size(), 32);
    let pixels = expected_pixels(&t);
    let hidden = encoder.model().forward(&pixels).unwrap();
    assert_close(&hidden, &t["last_hidden_state"], 1e-4, "last_hidden_state");
    let hidden = encoder.model().forward(&flip_width(&pixels)).unwrap();
    assert_close(&hidden, &t["last_hidden_state_flipped"], 1e-4, "flipped last_hidden_state");

    let photo = parity_photo(&meta);
    let cls = t["last_hidden_state"].i((0, 0)).unwrap();
    let cls_flipped = t["last_hidden_state_flipped"].i((0, 0)).unwrap();
    let feature = encoder.feature(&photo, false).unwrap();
    assert_eq!(feature.dims(), &[32]);
    assert_close(&feature, &cls, 1e-4, "CLS feature");
    assert_close(&encoder.feature(&photo, true).unwrap(), &cls_flipped, 1e-4, "flipped CLS feature");
    assert!(common::max_abs_diff(&cls, &cls_flipped) > 1e-2, "flipping must change the feature");
}

/// The hub's face-recognition checkpoint layout: `ViTForImageClassification` weights prefixed
/// `vit.`, a classifier head, no pooler, only a PyTorch `pytorch_model.bin`.
#[test]
fn classifier_checkpoint_with_vit_prefix_loads_as_the_same_encoder() {
    let meta = metadata();
    let t = load_tensors(PARITY);
    let photo = parity_photo(&meta);
    let feature = encoder("tiny-vit/hub-classifier").feature(&photo, false).unwrap();
    assert_close(&feature, &t["last_hidden_state"].i((0, 0)).unwrap(), 1e-4, "CLS feature from pytorch_model.bin");
}

#[test]
fn hub_ids_resolve_through_the_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-face-vit");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_dir(&fixture("tiny-vit/hub-classifier"), &repo.join("snapshots").join(commit));
    // Offline: the cache alone (downloads are tests/hub.rs's).
    let hub = Hub::from_env().with_cache(cache.path()).offline(true);
    let encoder = load_face_encoder("someone/tiny-face-vit", &hub, &Device::Cpu).unwrap();
    assert_eq!(encoder.hidden_size(), 32);
    match load_face_encoder("someone/not-downloaded", &hub, &Device::Cpu) {
        Err(Error::MissingFile { hint, .. }) => assert!(hint.contains("huggingface-cli download"), "{hint}"),
        other => panic!("expected a missing-model error, got {:?}", other.map(|_| ())),
    }
}

/// Copies the tiny ViT to a temporary folder with config.json edited by `edit`.
fn altered_model(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    copy_dir(&fixture("tiny-vit"), dir);
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir.to_str().unwrap().to_string()
}

#[test]
fn wrong_models_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();

    let dir = altered_model(&tmp.path().join("clip"), |c| c["model_type"] = "clip_vision_model".into());
    match load_face_encoder(&dir, &Hub::from_env(), &Device::Cpu) {
        Err(Error::UnsupportedModel(msg)) => {
            assert!(msg.contains("config.json") && msg.contains("not a ViT"), "{msg}")
        }
        other => panic!("expected an unsupported-model error, got {:?}", other.map(|_| ())),
    }

    let dir = altered_model(&tmp.path().join("wide"), |c| c["hidden_size"] = 64.into());
    match load_face_encoder(&dir, &Hub::from_env(), &Device::Cpu) {
        Err(Error::Weights { file, msg }) => {
            assert!(file.ends_with("wide/model.safetensors"), "{}", file.display());
            assert!(msg.contains("shape"), "{msg}");
        }
        other => panic!("expected a weights error, got {:?}", other.map(|_| ())),
    }

    let dir = altered_model(&tmp.path().join("quick"), |c| c["hidden_act"] = "quick_gelu".into());
    match load_face_encoder(&dir, &Hub::from_env(), &Device::Cpu) {
        Err(Error::UnsupportedModel(msg)) => assert!(msg.contains("hidden_act"), "{msg}"),
        other => panic!("expected an unsupported-model error, got {:?}", other.map(|_| ())),
    }

    // A folder whose weights are another model's (the tiny CLIP text encoder).
    let dir = altered_model(&tmp.path().join("other"), |_| {});
    std::fs::copy(fixture("tiny-sd/text_encoder/model.safetensors"), Path::new(&dir).join("model.safetensors"))
        .unwrap();
    match load_face_encoder(&dir, &Hub::from_env(), &Device::Cpu) {
        Err(Error::Weights { file, msg }) => {
            assert!(file.ends_with("other/model.safetensors"), "{}", file.display());
            assert!(msg.contains("cls_token"), "{msg}");
        }
        other => panic!("expected a weights error, got {:?}", other.map(|_| ())),
    }

    let missing = tmp.path().join("nothing-here");
    assert!(matches!(
        load_face_encoder(missing.to_str().unwrap(), &Hub::from_env(), &Device::Cpu),
        Err(Error::MissingFile { .. })
    ));
}
