//! Weight matrices kept smaller than f32 on the CPU: f16 values, or 8-bit values with one f16
//! scale per block of 32 along each row (ggml's `q8_0`). The linear and convolution layers
//! multiply them without ever widening a whole matrix: their products widen a panel at a time
//! into a buffer that stays in cache ([`crate::nn::cpu::gemm::matmul_packed_lhs`]), so the
//! activations stay f32 and the fast f32 kernels of every other op keep running.
//!
//! Which format a layer uses is decided when it is built: [`load_matrices_as`] runs a model's
//! constructor with a format that every [`crate::nn::Linear`] and [`crate::nn::Conv2d`] built
//! inside it reads (the constructors' signatures stay those of the diffusers layout). Each
//! matrix goes from the file into its packed form one tensor at a time, so loading never holds
//! the model in f32.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::nn::cpu::with_values;
use crate::nn::simd_fn;

/// Values per block of a [`MatrixFormat::Q8`] matrix row, each block with its own scale.
pub const Q8_BLOCK: usize = 32;

/// How the linear and convolution layers of a model keep their weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatrixFormat {
    /// As tensors of the model's dtype.
    #[default]
    Tensor,
    /// f16 values on the CPU: half the memory of f32; products in f32.
    F16,
    /// 8-bit values with an f16 scale per block of [`Q8_BLOCK`] (ggml's `q8_0`, 8.5 bits per
    /// weight), on the CPU; products in f32.
    Q8,
}

/// What the frozen models are loaded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// The dtype of the activations and of every weight kept as a tensor.
    pub dtype: DType,
    /// How the weight matrices of linear and convolution layers are kept.
    pub matrices: MatrixFormat,
}

impl From<DType> for Precision {
    /// Every weight a tensor of `dtype`.
    fn from(dtype: DType) -> Self {
        Self { dtype, matrices: MatrixFormat::Tensor }
    }
}

impl Precision {
    /// f16 weight matrices for `device`: on the CPU packed f16 matrices and f32 activations
    /// (candle's own f16 CPU ops are several times slower than f32); elsewhere f16 tensors.
    pub fn f16_on(device: &Device) -> Self {
        if device.is_cpu() {
            Self { dtype: DType::F32, matrices: MatrixFormat::F16 }
        } else {
            DType::F16.into()
        }
    }

    /// 8-bit weight matrices with f32 activations; CPU only.
    pub fn q8_on(device: &Device) -> crate::Result<Self> {
        if !device.is_cpu() {
            return Err(crate::Error::setting("dtype", "q8", "8-bit weights run on the CPU: use f16 or bf16 on CUDA"));
        }
        Ok(Self { dtype: DType::F32, matrices: MatrixFormat::Q8 })
    }

    /// The dtype whose weights files (`.safetensors` or `.fp16.safetensors`) suit this precision:
    /// packed matrices read the f16 files, half the bytes.
    pub fn file_dtype(&self) -> DType {
        match self.matrices {
            MatrixFormat::Tensor => self.dtype,
            MatrixFormat::F16 | MatrixFormat::Q8 => DType::F16,
        }
    }

    /// A short name for metadata and messages: `f32`, `f16`, `bf16`, `q8`.
    pub fn name(&self) -> String {
        match self.matrices {
            MatrixFormat::Tensor => format!("{:?}", self.dtype).to_lowercase(),
            MatrixFormat::F16 => "f16".into(),
            MatrixFormat::Q8 => "q8".into(),
        }
    }
}

thread_local! {
    static LOADING_FORMAT: Cell<MatrixFormat> = const { Cell::new(MatrixFormat::Tensor) };
}

/// Runs `build` (a model's constructor) with its linear and convolution layers keeping their
/// weight matrices in `format`; the format in effect before is restored afterwards.
pub fn load_matrices_as<R>(format: MatrixFormat, build: impl FnOnce() -> R) -> R {
    let previous = LOADING_FORMAT.with(|f| f.replace(format));
    let restore = Restore(previous);
    let result = build();
    drop(restore);
    result
}

/// Puts the loading format back, also when the constructor panics.
struct Restore(MatrixFormat);

impl Drop for Restore {
    fn drop(&mut self) {
        LOADING_FORMAT.with(|f| f.set(self.0));
    }
}

/// The weight matrix of a linear or convolution layer.
#[derive(Debug, Clone)]
pub(crate) enum MatrixWeight {
    Tensor(Tensor),
    Packed(Arc<PackedMatrix>),
}

impl MatrixWeight {
    /// Weight `name` of `shape` from `vb`, kept in the format [`load_matrices_as`] set (packed
    /// formats only on the CPU, as `rows = shape[0]` by the rest).
    pub(crate) fn load(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Self> {
        let shape = shape.into();
        let format = LOADING_FORMAT.with(Cell::get);
        if format == MatrixFormat::Tensor || !vb.device().is_cpu() {
            return Ok(Self::Tensor(vb.get(shape, name)?));
        }
        let packed = match format {
            MatrixFormat::F16 => {
                let tensor = vb.get_with_hints_dtype(shape.clone(), name, Default::default(), DType::F16)?;
                PackedMatrix::f16(tensor.flatten_all()?.to_vec1::<f16>()?, shape)
            }
            _ => {
                let tensor = vb.get_with_hints_dtype(shape.clone(), name, Default::default(), DType::F32)?;
                with_values::<f32, _>(&[&tensor], |v| PackedMatrix::q8(v[0], shape))?
            }
        };
        Ok(Self::Packed(Arc::new(packed)))
    }

    /// The matrix as a tensor (packed ones widened to f32), for the paths that have no packed
    /// kernel (gradients).
    pub(crate) fn tensor(&self) -> Result<Tensor> {
        match self {
            Self::Tensor(t) => Ok(t.clone()),
            Self::Packed(p) => p.to_tensor(),
        }
    }

    pub(crate) fn dims(&self) -> &[usize] {
        match self {
            Self::Tensor(t) => t.dims(),
            Self::Packed(p) => p.shape.dims(),
        }
    }
}

/// A tensor of `shape` in a packed format, as the row-major matrix of its first dimension by the
/// others (a convolution's `(c_out, c_in, kh, kw)` is `c_out x c_in kh kw`).
#[derive(Debug)]
pub(crate) struct PackedMatrix {
    shape: Shape,
    values: PackedValues,
}

#[derive(Debug)]
enum PackedValues {
    F16(Vec<f16>),
    /// One scale per block of [`Q8_BLOCK`] columns (the last block of a row may be shorter),
    /// and the 8-bit values, row-major.
    Q8 {
        scales: Vec<f16>,
        quants: Vec<i8>,
    },
}

impl PackedMatrix {
    fn f16(values: Vec<f16>, shape: Shape) -> Self {
        Self { shape, values: PackedValues::F16(values) }
    }

    /// Quantizes `values` as ggml's `q8_0`: per block, `scale = max |v| / 127` and
    /// `q = round(v / scale)`.
    fn q8(values: &[f32], shape: Shape) -> Self {
        let (rows, cols) = matrix_dims(&shape);
        let blocks_per_row = cols.div_ceil(Q8_BLOCK);
        let mut scales = Vec::with_capacity(rows * blocks_per_row);
        let mut quants = vec![0i8; rows * cols];
        for (row, quant_row) in values.chunks_exact(cols.max(1)).zip(quants.chunks_exact_mut(cols.max(1))) {
            for (block, quant_block) in row.chunks(Q8_BLOCK).zip(quant_row.chunks_mut(Q8_BLOCK)) {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (q, v) in quant_block.iter_mut().zip(block) {
                    *q = (v * inverse).round() as i8;
                }
                scales.push(f16::from_f32(scale));
            }
        }
        Self { shape, values: PackedValues::Q8 { scales, quants } }
    }

    /// Rows of the matrix: the first dimension.
    pub fn rows(&self) -> usize {
        matrix_dims(&self.shape).0
    }

    /// Columns of the matrix: the product of the other dimensions.
    pub fn cols(&self) -> usize {
        matrix_dims(&self.shape).1
    }

    /// The shape it was loaded as.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Widens the block `rows x cols` into `out`, row-major, `rows.len() * cols.len()` long;
    /// `cols` starts at a multiple of [`Q8_BLOCK`] and ends at one or at the last column.
    pub fn widen(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let (width, (all_rows, all_cols)) = (cols.len(), matrix_dims(&self.shape));
        assert!(
            rows.end <= all_rows
                && cols.end <= all_cols
                && cols.start.is_multiple_of(Q8_BLOCK)
                && (cols.end.is_multiple_of(Q8_BLOCK) || cols.end == all_cols)
                && out.len() == rows.len() * width,
            "packed matrix: block out of range"
        );
        let starts = rows.map(|r| r * all_cols + cols.start);
        match &self.values {
            PackedValues::F16(values) => {
                for (start, out) in starts.zip(out.chunks_exact_mut(width.max(1))) {
                    widen_f16(&values[start..start + width], out);
                }
            }
            PackedValues::Q8 { scales, quants } => {
                for (start, out) in starts.zip(out.chunks_exact_mut(width.max(1))) {
                    // Rows hold whole blocks (the last may be short), so the block index of a
                    // row's column c is row * blocks_per_row + c / Q8_BLOCK.
                    let (row, col) = (start / all_cols, start % all_cols);
                    let first_block = row * all_cols.div_ceil(Q8_BLOCK) + col / Q8_BLOCK;
                    let scales = &scales[first_block..first_block + width.div_ceil(Q8_BLOCK)];
                    widen_q8(&quants[start..start + width], scales, out);
                }
            }
        }
    }

    /// The whole matrix as an f32 tensor of the shape it was loaded as.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let (rows, cols) = matrix_dims(&self.shape);
        let mut values = vec![0f32; rows * cols];
        self.widen(0..rows, 0..cols, &mut values);
        Tensor::from_vec(values, self.shape.clone(), &Device::Cpu)
    }
}

/// A tensor of `shape` as a matrix: (first dimension, product of the others).
fn matrix_dims(shape: &Shape) -> (usize, usize) {
    let rows = shape.dims().first().copied().unwrap_or(1);
    (rows, shape.elem_count() / rows.max(1))
}

/// `out = values` in f32: eight at a time with F16C where the CPU has it (the `half` crate's
/// slice conversion calls a function per eight values: 1.6 times as long on 14.7M values).
fn widen_f16(values: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the features `widen_f16_f16c` is compiled for.
        return unsafe { widen_f16_f16c(values, out) };
    }
    values.convert_to_f32_slice(out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16_f16c(values: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    assert_eq!(values.len(), out.len(), "widen_f16: lengths");
    for (eight, wide) in values.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: eight f16 (16 bytes) are read and eight f32 written, inside the chunks.
        unsafe { _mm256_storeu_ps(wide.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(eight.as_ptr().cast()))) }
    }
    let done = values.len() / 8 * 8;
    values[done..].convert_to_f32_slice(&mut out[done..]);
}

simd_fn! {
    /// `out = scale * q` for one row's values, block by block with one scale per block.
    fn widen_q8(quants: &[i8], scales: &[f16], out: &mut [f32]) {
        for ((quant_block, out_block), scale) in quants.chunks(Q8_BLOCK).zip(out.chunks_mut(Q8_BLOCK)).zip(scales) {
            let scale = scale.to_f32();
            for (o, &q) in out_block.iter_mut().zip(quant_block) {
                *o = scale * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect()
    }

    #[test]
    fn q8_round_trip_is_within_half_a_step_of_each_block() {
        // 45 columns: a full block and a short one per row.
        let (rows, cols) = (5, 45);
        let v = values(rows * cols);
        let packed = PackedMatrix::q8(&v, Shape::from((rows, cols)));
        let mut out = vec![0f32; 2 * cols];
        packed.widen(2..4, 0..cols, &mut out);
        let mut tail = vec![0f32; 2 * (cols - Q8_BLOCK)];
        packed.widen(2..4, Q8_BLOCK..cols, &mut tail);
        for (r, (row, widened)) in v[2 * cols..4 * cols].chunks(cols).zip(out.chunks(cols)).enumerate() {
            assert_eq!(&widened[Q8_BLOCK..], &tail[r * (cols - Q8_BLOCK)..(r + 1) * (cols - Q8_BLOCK)]);
            for (block, widened) in row.chunks(Q8_BLOCK).zip(widened.chunks(Q8_BLOCK)) {
                let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (a, b) in block.iter().zip(widened) {
                    // Half a step, plus the f16 rounding of the scale (2^-11 relative) times 127.
                    assert!((a - b).abs() <= step * (0.5 + 127.0 / 2048.0), "row {r}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn f16_widens_to_the_rounded_values_and_zero_blocks_stay_zero() {
        let v = values(6 * 10);
        let halves: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let packed = PackedMatrix::f16(halves.clone(), Shape::from((6, 10)));
        let t = packed.to_tensor().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t, halves.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
        let zeros = PackedMatrix::q8(&[0.0; 64], Shape::from((2, 32)));
        assert_eq!(zeros.to_tensor().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// A linear and a convolution layer in each packed format equal the f32 layers built from
    /// their widened weights (forward, and the input gradient through the graph), on one thread
    /// (the convolution's small images, one task each) and on all.
    #[test]
    fn packed_layers_equal_dense_layers_on_the_widened_weights() {
        use crate::nn::test_values::{rel_diff, spread_tensor};
        use crate::nn::{Conv2d, Conv2dConfig, Linear};
        use candle_core::Var;
        use std::collections::HashMap;

        // Widths that are not multiples of the q8 block; on two threads each half of the 600 x 1100
        // matrix is widened in two panels of columns, the second ending at a short block.
        let (in_dim, out_dim) = (1100, 600);
        let (c_in, c_out) = (13, 40);
        let tensors = HashMap::from([
            ("lin.weight".to_string(), spread_tensor((out_dim, in_dim), 1, -0.1, 0.2, DType::F32)),
            ("lin.bias".to_string(), spread_tensor(out_dim, 2, -1.0, 2.0, DType::F32)),
            ("conv.weight".to_string(), spread_tensor((c_out, c_in, 3, 3), 3, -0.3, 0.6, DType::F32)),
            ("conv.bias".to_string(), spread_tensor(c_out, 4, -1.0, 2.0, DType::F32)),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let conv_config = Conv2dConfig { padding: 1, stride: 2 };
        for format in [MatrixFormat::F16, MatrixFormat::Q8] {
            let (lin, conv) = load_matrices_as(format, || {
                (
                    Linear::new(vb.pp("lin"), in_dim, out_dim, true).unwrap(),
                    Conv2d::new(vb.pp("conv"), c_in, c_out, 3, conv_config).unwrap(),
                )
            });
            assert!(matches!(lin.weight, MatrixWeight::Packed(_)) && matches!(conv.weight, MatrixWeight::Packed(_)));
            let dense_lin =
                Linear { weight: MatrixWeight::Tensor(lin.weight.tensor().unwrap()), bias: lin.bias.clone() };
            let dense_conv = Conv2d {
                weight: MatrixWeight::Tensor(conv.weight.tensor().unwrap()),
                bias: conv.bias.clone(),
                config: conv_config,
            };
            for rows in [3, 77] {
                {
                    let x = Var::from_tensor(&spread_tensor((rows, in_dim), 5, -1.0, 2.0, DType::F32)).unwrap();
                    let (y, expected) = (lin.forward(&x).unwrap(), dense_lin.forward(&x).unwrap());
                    assert!(rel_diff(&y, &expected) < 1e-6, "{format:?} linear");
                    let dx = y.sqr().unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
                    let dx_dense =
                        expected.sqr().unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
                    assert!(rel_diff(&dx, &dx_dense) < 1e-6, "{format:?} linear gradient");

                    let image = Var::from_tensor(&spread_tensor((2, c_in, rows % 11 + 5, 9), 6, -1.0, 2.0, DType::F32))
                        .unwrap();
                    let (y, expected) = (conv.forward(&image).unwrap(), dense_conv.forward(&image).unwrap());
                    assert!(rel_diff(&y, &expected) < 1e-6, "{format:?} conv");
                    let dx = y.sqr().unwrap().sum_all().unwrap().backward().unwrap().get(&image).unwrap().clone();
                    let dx_dense =
                        expected.sqr().unwrap().sum_all().unwrap().backward().unwrap().get(&image).unwrap().clone();
                    assert!(rel_diff(&dx, &dx_dense) < 1e-6, "{format:?} conv gradient");
                }
            }
        }
    }

    #[test]
    fn the_loading_format_is_scoped() {
        let inner = load_matrices_as(MatrixFormat::Q8, || {
            load_matrices_as(MatrixFormat::F16, || LOADING_FORMAT.with(Cell::get));
            LOADING_FORMAT.with(Cell::get)
        });
        assert_eq!(inner, MatrixFormat::Q8);
        assert_eq!(LOADING_FORMAT.with(Cell::get), MatrixFormat::Tensor);
    }
}
