//! PyTorch checkpoints in both of torch.save's formats (fixtures: tools/reference/checkpoints.py),
//! and the damaged and malicious ones of issue 18, written by the test.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::bad_inputs::{
    legacy_checkpoint, state_dict_pickle, zip_checkpoint, Pickler, PidField, TensorSpec, LEGACY_PID, ZIP_PID,
};
use common::{copy_dir, fixture, load_tensors, max_abs_diff};
use stableid::models::stable_diffusion::StableDiffusion;
use stableid::priors::celeb_basis::text_encoder_fingerprint;
use stableid::weights::{open_checkpoint, ModelDir, Weights};
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
    let model = ModelDir::local(dir.path());
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

/// A 2x3 matrix and a strided view of its middle column, in one storage.
fn matrix_and_column() -> Vec<TensorSpec<'static>> {
    vec![
        TensorSpec { name: "matrix", key: "0", offset: 0, shape: vec![2, 3], strides: vec![3, 1] },
        TensorSpec { name: "column", key: "0", offset: 1, shape: vec![2], strides: vec![3] },
    ]
}

const STORAGE: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];

/// Both formats of a checkpoint of `tensors` over [`STORAGE`], as (name, bytes).
fn both_formats(tensors: &[TensorSpec], nested: bool) -> [(&'static str, Vec<u8>); 2] {
    let storages: [(&str, &[f32]); 1] = [("0", &STORAGE)];
    [
        ("legacy.pth", legacy_checkpoint(&state_dict_pickle(tensors, &LEGACY_PID, nested), &storages)),
        ("zip.pth", zip_checkpoint(&state_dict_pickle(tensors, &ZIP_PID, nested), &storages)),
    ]
}

fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> stableid::Result<(Weights, Vec<String>)> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    open_checkpoint(&path, DType::F32, &Device::Cpu)
}

/// The message of the `Error::Weights` opening `bytes` as `name` gives; it names the file.
fn weights_error(dir: &Path, name: &str, bytes: &[u8]) -> String {
    match open_bytes(dir, name, bytes) {
        Err(err @ Error::Weights { .. }) => {
            let msg = err.to_string();
            assert!(msg.contains(name) && !msg.contains('\n'), "{msg}");
            msg
        }
        Err(other) => panic!("{name}: expected a weights error, got {other:?}"),
        Ok((_, names)) => panic!("{name}: opened, with tensors {names:?}"),
    }
}

/// Training checkpoints keep the state dict under `state_dict`: both formats read it.
#[test]
fn a_state_dict_under_state_dict_loads_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    for nested in [false, true] {
        for (name, bytes) in both_formats(&matrix_and_column(), nested) {
            let (weights, mut names) = open_bytes(dir.path(), name, &bytes).unwrap();
            names.sort();
            assert_eq!(names, ["column", "matrix"], "{name}, nested {nested}");
            let matrix = weights.vb.get((2, 3), "matrix").unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(matrix, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "{name}, nested {nested}");
            let column = weights.vb.get(2, "column").unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(column, [2.0, 5.0], "{name}, nested {nested}");
        }
    }
}

/// Sizes, strides and offsets that do not fit the storage (r559_half_leg_leg3int.pth of issue 18
/// has a stride of i64::MAX) are errors naming the file and the tensor, in both formats.
#[test]
fn layouts_outside_their_storage_name_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = |offset: i64, shape: Vec<i64>, strides: Vec<i64>| {
        vec![TensorSpec { name: "cp.resnet.conv1.weight", key: "0", offset, shape, strides }]
    };
    let cases = [
        ("stride-max", matrix(0, vec![2, 3], vec![i64::MAX, 1]), "lies outside its storage"),
        ("stride-overflow", matrix(0, vec![3, 3], vec![i64::MAX / 2 + 1, 1]), "lies outside its storage"),
        ("offset-max", matrix(i64::MAX, vec![2, 3], vec![3, 1]), "lies outside its storage"),
        ("offset-past", matrix(1, vec![2, 3], vec![3, 1]), "lies outside its storage"),
        ("numel-overflow", matrix(0, vec![1 << 32, 1 << 32, 0], vec![1, 1, 1]), "lies outside its storage"),
        ("expanded", matrix(0, vec![1000, 3], vec![0, 1]), "repeat elements"),
        ("negative-stride", matrix(0, vec![2, 3], vec![-3, 1]), "unexpected stride"),
        ("negative-size", matrix(0, vec![-2, 3], vec![3, 1]), "unexpected size"),
        ("negative-offset", matrix(-1, vec![2, 3], vec![3, 1]), "unexpected storage offset"),
        ("rank-mismatch", matrix(0, vec![2, 3], vec![1]), "2 sizes but 1 strides"),
    ];
    for (case, tensors, says) in cases {
        for (format, bytes) in both_formats(&tensors, false) {
            let name = format!("{case}-{format}");
            let msg = weights_error(dir.path(), &name, &bytes);
            assert!(msg.contains("cp.resnet.conv1.weight") && msg.contains(says), "{msg}");
        }
    }
    // A tensor whose storage is not in the file.
    let mut missing = matrix_and_column();
    missing[1].key = "7";
    for (format, bytes) in both_formats(&missing, false) {
        let msg = weights_error(dir.path(), &format!("missing-storage-{format}"), &bytes);
        assert!(msg.contains("tensor column: ") && msg.contains('7'), "{msg}");
    }
}

/// min_pickle_4tuple_persid.pth of issue 18: a storage reference of 4 fields, not 5, which
/// made candle's pickle reader panic.
#[test]
fn malformed_storage_references_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = matrix_and_column();
    let storages: [(&str, &[f32]); 1] = [("0", &STORAGE)];
    let four_fields = [PidField::Key, PidField::Location];
    let files = [
        ("min_pickle_4tuple_persid.pth", zip_checkpoint(&state_dict_pickle(&tensors, &four_fields, false), &storages)),
        ("legacy_4tuple.pth", legacy_checkpoint(&state_dict_pickle(&tensors, &four_fields, false), &storages)),
    ];
    for (name, bytes) in files {
        let msg = weights_error(dir.path(), name, &bytes);
        assert!(msg.contains("tensor matrix: its storage reference is not (\"storage\", storage type"), "{msg}");
    }
}

/// Nothing in a checkpoint is ever executed: a pickle calling `os.system` (as a tensor, as the
/// whole object, in both formats and bare) only names the call, and the opcodes that build
/// arbitrary objects are refused.
#[test]
fn nothing_in_a_checkpoint_is_executed() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let system = || {
        let mut p = Pickler::new();
        p.global("os", "system").op(b"(").str(&command).op(b"tR");
        p
    };
    let evil_entry = {
        let mut p = Pickler::new();
        p.op(b"}(").str("weight").op(&system().0[2..]).op(b"u");
        p.stop()
    };
    let evil_root = system().stop();
    let tensor_and_evil_entry = {
        let mut p = Pickler::new();
        p.op(b"}(").str("evil").op(&system().0[2..]);
        p.str("matrix").tensor(&matrix_and_column()[0], &ZIP_PID).op(b"u");
        p.stop()
    };
    // INST, OBJ and STACK_GLOBAL, which Python's unpickler would run.
    let inst = Pickler::new().op(b"(").str(&command).op(b"ios\nsystem\n").stop();
    let obj = Pickler::new().op(b"(").global("os", "system").str(&command).op(b"o").stop();
    let stack_global = Pickler::new().str("os").str("system").op(&[0x93]).op(b"(").str(&command).op(b"tR").stop();

    let storages: [(&str, &[f32]); 1] = [("0", &STORAGE)];
    let mut refused = 0;
    for (case, pickle) in
        [("entry", &evil_entry), ("root", &evil_root), ("inst", &inst), ("obj", &obj), ("stack-global", &stack_global)]
    {
        for (format, bytes) in [
            ("zip", zip_checkpoint(pickle, &storages)),
            ("legacy", legacy_checkpoint(pickle, &storages)),
            ("bare", pickle.clone()),
        ] {
            let msg = weights_error(dir.path(), &format!("{case}-{format}.pth"), &bytes);
            eprintln!("{case}, {format}: {msg}");
            refused += 1;
        }
    }
    assert_eq!(refused, 15);
    // A state dict with a tensor beside the call loads the tensor and ignores the call.
    let (_, names) =
        open_bytes(dir.path(), "tensor-and-call.pth", &zip_checkpoint(&tensor_and_evil_entry, &storages)).unwrap();
    assert_eq!(names, ["matrix"]);
    assert!(!marker.exists(), "a pickle ran a command");
}

/// A pickle is run for a bounded number of opcodes (4194304), so a file cannot make the reader
/// work or allocate without bound.
#[test]
fn endless_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let endless = [0x80, 2].repeat((1 << 22) + 1);
    let storages: [(&str, &[f32]); 1] = [("0", &STORAGE)];
    for (name, bytes) in [
        ("endless.pth", zip_checkpoint(&endless, &storages)),
        ("endless-legacy.pth", legacy_checkpoint(&endless, &storages)),
    ] {
        let msg = weights_error(dir.path(), name, &bytes);
        assert!(msg.contains("runs more than 4194304 opcodes"), "{msg}");
    }
}
