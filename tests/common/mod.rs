//! Helpers shared by the integration tests: fixture paths, loading, and tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

pub mod bad_inputs;
pub mod formula_weights;
pub mod hub_server;
pub mod pose_weights;
pub mod video_files;

/// Path of a file or folder under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of a fixture safetensors file, on the CPU, as saved.
pub fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", path.display()))
}

/// A fixture JSON file (a model's `config.json`), parsed.
pub fn load_config<C: DeserializeOwned>(rel: &str) -> C {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// A CPU `VarBuilder` over a safetensors file, memory-mapped, in `dtype`: pass it with a config
/// to a model's `new(vb, &config)`.
pub fn var_builder(weights: &Path, dtype: DType) -> VarBuilder<'static> {
    // SAFETY: the mapping is sound while the file stays unchanged. It lives as long as the
    // returned VarBuilder (tensors are copied out of it when a model loads them), and no test
    // changes a weights file while a VarBuilder over it is alive.
    unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }
        .unwrap_or_else(|e| panic!("cannot map {}: {e}", weights.display()))
}

/// Maximum absolute difference between two tensors of the same shape (compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts `|actual - expected| <= tol * max(1, max|expected|)`: absolute for values of order
/// one, relative where values are large.
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: f32, what: &str) {
    let diff = max_abs_diff(actual, expected);
    let scale = max_abs(expected).max(1.0);
    assert!(
        diff <= tol * scale,
        "{what}: max abs diff {diff:e} exceeds {tol:e} x {scale} (shape {:?})",
        expected.dims()
    );
    eprintln!("{what}: max abs diff {diff:e} (scale {scale})");
}

/// `assert_close` at 1e-4, and also within 1e-4 of the largest expected value: for outputs much
/// smaller than one (the tiny SD UNet's are ~0.06, ISM's gradients ~0.005), where an absolute
/// 1e-4 alone would hide errors.
pub fn assert_parity(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_close(actual, expected, 1e-4, what);
    let (diff, scale) = (max_abs_diff(actual, expected), max_abs(expected));
    assert!(diff <= 1e-4 * scale, "{what}: max abs diff {diff:e} exceeds 1e-4 x {scale}");
}

/// Copies a folder tree (e.g. the tiny model, to alter it in a test).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Asserts a failed run with a one-line error containing every `needle`.
pub fn assert_fails_with(output: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected failure, got success; stderr: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "error should mention {needle:?}: {stderr}");
    }
}
