//! PyTorch checkpoints in both of torch.save's formats (fixtures: tools/reference/checkpoints.py).

mod common;

use candle_core::{DType, Device};
use common::{copy_dir, fixture, load_tensors, max_abs_diff};
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::priors::celeb_basis::text_encoder_fingerprint;
use stableid::weights::{open_checkpoint, ModelDir};
use stableid::Error;

#[test]
fn both_formats_give_the_saved_tensors() {
    let expected = load_tensors("checkpoints/expected.safetensors");
    for file in ["checkpoints/zip.pth", "checkpoints/legacy.pth"] {
        let (weights, mut names) = open_checkpoint(&fixture(file), DType::F32, &Device::Cpu).unwrap();
        let mut expected_names: Vec<_> = expected.keys().cloned().collect();
        names.sort();
        expected_names.sort();
        assert_eq!(names, expected_names, "{file}");
        for (name, want) in &expected {
            // Int64 scalar, f16, f64, two tensors sharing a storage, a strided column of it.
            let got = weights.vb.get(want.dims(), name).unwrap();
            assert_eq!(got.dtype(), DType::F32, "{file}: {name} converted as asked");
            assert_eq!(max_abs_diff(&got, want), 0.0, "{file}: {name}");
        }
    }
}

#[test]
fn a_wrong_shape_names_the_tensor_and_the_file() {
    let (weights, _) = open_checkpoint(&fixture("checkpoints/legacy.pth"), DType::F32, &Device::Cpu).unwrap();
    let err = weights.build(|vb| vb.get((3, 3), "double.weight")).err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("double.weight") && msg.contains("legacy.pth"), "{msg}");
}

#[test]
fn damaged_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = std::fs::read(fixture("checkpoints/legacy.pth")).unwrap();
    let cases = [
        ("cut-in-pickle.pth", legacy[..100].to_vec(), "legacy-format"),
        ("cut-in-data.pth", legacy[..legacy.len() - 5].to_vec(), "truncated"),
        ("photo.pth", b"\xff\xd8\xff\xe0 not a checkpoint".to_vec(), "not a PyTorch checkpoint"),
    ];
    for (name, bytes, says) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = open_checkpoint(&path, DType::F32, &Device::Cpu).err().expect(name);
        assert!(matches!(err, Error::Weights { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains(says), "{name}: {msg}");
    }
}

/// A model folder whose text encoder is only a transformers `pytorch_model.bin` loads the same
/// weights as its safetensors file.
#[test]
fn model_folders_without_safetensors_read_the_pytorch_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-sd"), dir.path());
    let safetensors = dir.path().join("text_encoder/model.safetensors");
    let expected = candle_core::safetensors::load(&safetensors, &Device::Cpu).unwrap();
    std::fs::remove_file(&safetensors).unwrap();
    let model = ModelDir::resolve(dir.path().to_str().unwrap()).unwrap();
    let missing = model.weights("text_encoder", "model", DType::F32, &Device::Cpu).err().unwrap();
    assert!(missing.to_string().contains("pytorch_model.bin"), "{missing}");

    std::fs::copy(
        fixture("checkpoints/text_encoder/pytorch_model.bin"),
        dir.path().join("text_encoder/pytorch_model.bin"),
    )
    .unwrap();
    let weights = model.weights("text_encoder", "model", DType::F32, &Device::Cpu).unwrap();
    assert!(weights.path.ends_with("text_encoder/pytorch_model.bin"));
    for (name, want) in &expected {
        let got = weights.vb.get(want.dims(), name).unwrap();
        assert_eq!(max_abs_diff(&got, want), 0.0, "{name}");
    }

    // The whole pipeline loads from it, and the fingerprint that keys the celebrity-basis cache
    // and goes into identity files covers the file.
    let pipeline = StableDiffusion::load(&model, &Device::Cpu, DType::F32).unwrap();
    let fingerprint = text_encoder_fingerprint(pipeline.text_encoder_file()).unwrap();
    assert_eq!(fingerprint.len(), 64);
    let mut bytes = std::fs::read(&weights.path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights.path, bytes).unwrap();
    assert_ne!(text_encoder_fingerprint(&weights.path).unwrap(), fingerprint);
}
