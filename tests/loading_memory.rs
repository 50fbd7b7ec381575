//! Loading a model holds each tensor once: the process's peak resident memory while a 192 MiB
//! safetensors file is loaded stays below the tensors' size plus the largest tensor and a small
//! margin, for a file of the wanted dtype and for an f16 file read as f32. (candle's
//! memory-mapped reader, for comparison, keeps the mapped file resident next to the copies.)
//!
//! Layers whose weight matrices are packed (f16, q8) load from an f32 file without ever holding
//! the model in f32.
//!
//! The tests take turns (a lock): the peak is the process's.

#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use stableid::nn::{load_matrices_as, Linear, MatrixFormat};
use stableid::weights::folder_weights;

const MIB: u64 = 1 << 20;
const TENSORS: usize = 6;
/// 32 MiB of f32 per tensor.
const SHAPE: (usize, usize) = (2048, 4096);

fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

extern "C" {
    /// glibc's allocator settings.
    fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
}

/// Makes every allocation of 1 MiB or more its own mapping, returned to the system when freed:
/// otherwise glibc raises that threshold after the first large free and keeps later buffers in
/// its heap, where memory freed by one measurement hides what the next one allocates.
fn return_large_frees_to_the_system() {
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    // SAFETY: mallopt only changes the allocator's settings.
    assert_eq!(unsafe { mallopt(M_MMAP_THRESHOLD, 1 << 20) }, 1, "mallopt");
}

/// Resets the peak (VmHWM) to the current resident size.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// The peak resident memory above the memory in use before, while `load` runs and keeps what it
/// loaded.
fn peak_while<T>(load: impl FnOnce() -> T) -> u64 {
    return_large_frees_to_the_system();
    reset_peak();
    let before = status_bytes("VmRSS:");
    let tensors = load();
    let peak = status_bytes("VmHWM:");
    drop(tensors);
    peak - before
}

fn write_model(dir: &Path, dtype: DType) -> std::path::PathBuf {
    let tensors: HashMap<String, Tensor> = (0..TENSORS)
        .map(|i| {
            let t = Tensor::arange(0f32, (SHAPE.0 * SHAPE.1) as f32, &Device::Cpu).unwrap();
            (format!("layer{i}.weight"), (t.reshape(SHAPE).unwrap() + i as f64).unwrap().to_dtype(dtype).unwrap())
        })
        .collect();
    let path = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

fn load_all(vb: &VarBuilder) -> Vec<Tensor> {
    (0..TENSORS).map(|i| vb.get(SHAPE, &format!("layer{i}.weight")).unwrap()).collect()
}

/// The process's peak is shared by the tests: they measure one at a time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn loading_holds_each_tensor_once() {
    let _turn = MEASURING.lock().unwrap();
    let tensor_bytes = (SHAPE.0 * SHAPE.1 * 4) as u64;
    let loaded = TENSORS as u64 * tensor_bytes;
    // The tensors, one tensor's file bytes being converted, and 16 MiB for the rest.
    let limit = loaded + tensor_bytes + 16 * MIB;
    for (file_dtype, name) in [(DType::F32, "f32"), (DType::F16, "f16 read as f32")] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_model(dir.path(), file_dtype);
        let peak = peak_while(|| {
            let weights =
                folder_weights(dir.path(), "diffusion_pytorch_model", DType::F32, &Device::Cpu, "test").unwrap();
            load_all(&weights.vb)
        });
        // Safety: the test's own file, not modified while mapped.
        let mapped = peak_while(|| {
            load_all(&unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu) }.unwrap())
        });
        eprintln!(
            "{name}: {} MiB loaded, peak +{} MiB (candle's memory-mapped reader: +{} MiB)",
            loaded / MIB,
            peak / MIB,
            mapped / MIB
        );
        assert!(peak <= limit, "{name}: peak +{} MiB for {} MiB of tensors", peak / MIB, loaded / MIB);
    }
}

#[test]
fn packed_layers_load_without_the_f32_model() {
    let _turn = MEASURING.lock().unwrap();
    let tensor_bytes = (SHAPE.0 * SHAPE.1 * 4) as u64;
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DType::F32);
    for (format, bits_per_value) in [(MatrixFormat::F16, 16.0), (MatrixFormat::Q8, 8.5)] {
        let packed = (TENSORS * SHAPE.0 * SHAPE.1) as f64 * bits_per_value / 8.0;
        let peak = peak_while(|| {
            let weights =
                folder_weights(dir.path(), "diffusion_pytorch_model", DType::F32, &Device::Cpu, "test").unwrap();
            load_matrices_as(format, || {
                (0..TENSORS)
                    .map(|i| Linear::new(weights.vb.pp(format!("layer{i}")), SHAPE.1, SHAPE.0, false).unwrap())
                    .collect::<Vec<_>>()
            })
        });
        eprintln!("{format:?}: {} MiB packed, peak +{} MiB", packed as u64 / MIB, peak / MIB);
        // The packed layers, one tensor read in f32 being packed, 16 MiB for the rest (measured: q8
        // 51 MiB packed, peak +82 MiB; f16 96 MiB, +127 MiB).
        let limit = packed as u64 + tensor_bytes + 16 * MIB;
        assert!(peak <= limit, "{format:?}: peak +{} MiB for {} MiB packed", peak / MIB, packed as u64 / MIB);
    }
}
