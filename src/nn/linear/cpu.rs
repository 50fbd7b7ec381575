//! The f32 and f64 CPU kernels of the linear layer: the value and the input gradient are `gemm`
//! products (candle's own matrix product) split by output columns over the threads
//! ([`Threads::ColumnBlocks`]), with the bias written into the output first rather than added in
//! a second pass over it.

use candle_core::{CpuStorage, DType, Result, Tensor};

use rayon::prelude::*;

use crate::nn::activation::geglu_rows;
use crate::nn::cpu::gemm::{matmul, matmul_packed_lhs, Strided, Threads};
use crate::nn::cpu::{cpu_dtype, for_each_chunk, with_values, Element};
use crate::nn::packed::PackedMatrix;

/// `x W^T + b` for `x` (rows, in), `weight` (out, in), `bias` (out) by [`matmul`]: `W^T` is
/// read through its strides, and the bias rows are written into the output first, for the
/// product to add onto (no separate pass over the output). `None` unless all are non-empty
/// CPU tensors of one dtype, f32 or f64.
pub(super) fn forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<CpuStorage>> {
    let Some(((rows, in_dim, out_dim), tensors)) = operands(x, weight, bias)? else { return Ok(None) };
    match cpu_dtype(&tensors) {
        Some(DType::F32) => with_values::<f32, _>(&tensors, |v| forward_typed(v, rows, in_dim, out_dim)).map(Some),
        Some(DType::F64) => with_values::<f64, _>(&tensors, |v| forward_typed(v, rows, in_dim, out_dim)).map(Some),
        _ => Ok(None),
    }
}

/// The sizes `(rows, in, out)` of `x W^T + b` and its operands `[x, weight]` or `[x, weight, bias]`.
type Operands<'a> = ((usize, usize, usize), Vec<&'a Tensor>);

/// The [`Operands`] of a product the kernels take; `None` for mismatched sizes (left to candle's
/// matmul to report) or an empty product.
fn operands<'a>(x: &'a Tensor, weight: &'a Tensor, bias: Option<&'a Tensor>) -> Result<Option<Operands<'a>>> {
    let ((rows, x_in), (out_dim, in_dim)) = (x.dims2()?, weight.dims2()?);
    if x_in != in_dim || bias.is_some_and(|b| b.dims() != [out_dim]) || rows * out_dim * in_dim == 0 {
        return Ok(None);
    }
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    Ok(Some(((rows, in_dim, out_dim), tensors)))
}

fn forward_typed<T: Element>(values: &[&[T]], rows: usize, in_dim: usize, out_dim: usize) -> CpuStorage {
    let (x, weight) = (values[0], values[1]);
    let (mut out, add) = match values.get(2) {
        Some(bias) => (repeat_rows(bias, rows), true),
        None => (vec![T::ZERO; rows * out_dim], false),
    };
    // `W^T` (in_dim, out_dim): row stride 1, column stride in_dim.
    let rhs = Strided { values: weight, rows: in_dim, cols: out_dim, row_stride: 1, col_stride: in_dim };
    matmul(&mut out, out_dim, add, Strided::row_major(x, rows, in_dim), rhs, Threads::ColumnBlocks);
    T::storage(out)
}

/// Rows of one block of [`forward_geglu`]: enough that re-reading the weight for each block costs
/// a few percent of the block's product.
const GEGLU_BLOCK_ROWS: usize = 512;

/// Blocks per thread that [`forward_geglu`] needs at least: with fewer, threads wait on the last
/// blocks, and the whole product split by columns is faster (Stable Diffusion's UNet at 256 x 256,
/// 2048 rows, took 3.0 s a step by blocks against 2.8 s).
const GEGLU_MIN_BLOCKS_PER_THREAD: usize = 4;

/// `geglu(x W^T + b)` for `x` (rows, in), `weight` (2 * half, in), `bias` (2 * half): each block
/// of rows is multiplied into a buffer of its own thread and reduced by GEGLU into the output, so
/// the product, twice the output's width, is never stored whole (the video UNet's 32768 x 2560
/// is 335 MB written and read back). `None` where [`forward`] is, for an odd width, or for too
/// few rows to give each thread [`GEGLU_MIN_BLOCKS_PER_THREAD`] blocks.
pub(super) fn forward_geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<CpuStorage>> {
    let threads = candle_core::utils::get_num_threads().max(1);
    if x.dim(0)? < GEGLU_MIN_BLOCKS_PER_THREAD * threads * GEGLU_BLOCK_ROWS {
        return Ok(None);
    }
    forward_geglu_blocks(x, weight, bias, GEGLU_BLOCK_ROWS)
}

/// [`forward_geglu`] by blocks of `block_rows` rows, whatever the number of rows.
fn forward_geglu_blocks(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    block_rows: usize,
) -> Result<Option<CpuStorage>> {
    let Some(((rows, in_dim, width), tensors)) = operands(x, weight, bias)? else { return Ok(None) };
    if width % 2 != 0 {
        return Ok(None);
    }
    let shape = (rows, in_dim, width, block_rows);
    match cpu_dtype(&tensors) {
        Some(DType::F32) => with_values::<f32, _>(&tensors, |v| geglu_typed(v, shape)).map(Some),
        Some(DType::F64) => with_values::<f64, _>(&tensors, |v| geglu_typed(v, shape)).map(Some),
        _ => Ok(None),
    }
}

/// `shape`: rows, in, width, rows of a block.
fn geglu_typed<T: Element>(
    values: &[&[T]],
    (rows, in_dim, width, block_rows): (usize, usize, usize, usize),
) -> CpuStorage {
    let (x, weight, bias) = (values[0], values[1], values.get(2));
    let half = width / 2;
    let rhs = Strided { values: weight, rows: in_dim, cols: width, row_stride: 1, col_stride: in_dim };
    let mut out = vec![T::ZERO; rows * half];
    out.par_chunks_mut(block_rows * half).enumerate().for_each_init(Vec::new, |product, (block, out)| {
        let first = block * block_rows;
        let block_rows = out.len() / half;
        let x = Strided::row_major(&x[first * in_dim..], block_rows, in_dim);
        product.clear();
        match bias {
            Some(bias) => (0..block_rows).for_each(|_| product.extend_from_slice(bias)),
            None => product.resize(block_rows * width, T::ZERO),
        }
        matmul(product, width, bias.is_some(), x, rhs, Threads::One);
        geglu_rows(product, half, out);
    });
    T::storage(out)
}

/// `row` repeated `rows` times, written by all threads: the first writes to a large new buffer
/// cost about as much as the product's own (its pages are mapped then), so they are shared out.
fn repeat_rows<T: Element>(row: &[T], rows: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; rows * row.len()];
    for_each_chunk(&mut out, row.len(), |_, chunk| chunk.copy_from_slice(row));
    out
}

/// [`forward`] with a packed weight (out, in) for an f32 `x` (rows, in): computed as
/// `y^T = W x^T` ([`matmul_packed_lhs`] widens `W` panel by panel), written through `y`'s
/// transposed strides.
pub(super) fn forward_packed(x: &Tensor, weight: &PackedMatrix, bias: Option<&Tensor>) -> Result<CpuStorage> {
    let (rows, in_dim) = x.dims2()?;
    let out_dim = weight.rows();
    let mut tensors = vec![x];
    tensors.extend(bias);
    with_values::<f32, _>(&tensors, |v| {
        let (mut y, add) = match v.get(1) {
            Some(bias) => (repeat_rows(bias, rows), true),
            None => (vec![0f32; rows * out_dim], false),
        };
        // x^T (in_dim, rows): row stride 1, column stride in_dim.
        let x_t = Strided { values: v[0], rows: in_dim, cols: rows, row_stride: 1, col_stride: in_dim };
        matmul_packed_lhs(&mut [(&mut y, x_t)], (1, out_dim), add, weight, Threads::ColumnBlocks);
        CpuStorage::F32(y)
    })
}

/// The input gradient of [`forward`], `dy W` for `dy` (rows, out) and `weight` (out, in); `None`
/// where [`forward`] is.
pub(super) fn input_grad(dy: &Tensor, weight: &Tensor) -> Result<Option<CpuStorage>> {
    let ((rows, dy_out), (out_dim, in_dim)) = (dy.dims2()?, weight.dims2()?);
    if dy_out != out_dim || rows * out_dim * in_dim == 0 {
        return Ok(None);
    }
    match cpu_dtype(&[dy, weight]) {
        Some(DType::F32) => {
            with_values::<f32, _>(&[dy, weight], |v| input_grad_typed(v, rows, out_dim, in_dim)).map(Some)
        }
        Some(DType::F64) => {
            with_values::<f64, _>(&[dy, weight], |v| input_grad_typed(v, rows, out_dim, in_dim)).map(Some)
        }
        _ => Ok(None),
    }
}

fn input_grad_typed<T: Element>(values: &[&[T]], rows: usize, out_dim: usize, in_dim: usize) -> CpuStorage {
    let mut dx = vec![T::ZERO; rows * in_dim];
    let (dy, weight) = (Strided::row_major(values[0], rows, out_dim), Strided::row_major(values[1], out_dim, in_dim));
    matmul(&mut dx, in_dim, false, dy, weight, Threads::ColumnBlocks);
    T::storage(dx)
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::{forward, forward_geglu, forward_geglu_blocks, input_grad};
    use crate::nn::cpu::cpu_tensor;
    use crate::nn::test_values::{rel_diff, tolerance, transposed_values};

    #[test]
    fn linear_matches_matmul() {
        for dtype in [DType::F32, DType::F64] {
            // Non-contiguous `x` and `dy`; a narrow product (on gemm's threads) and a wide one
            // (split by columns), sizes that are not multiples of gemm's blocks.
            for (rows, in_dim, out_dim) in [(37, 19, 23), (37, 301, 259)] {
                let x = transposed_values(&[rows, in_dim], 7, dtype);
                let weight = transposed_values(&[in_dim, out_dim], 8, dtype).t().unwrap().contiguous().unwrap();
                let bias = transposed_values(&[out_dim, 1], 9, dtype).reshape(out_dim).unwrap();
                let product = x.matmul(&weight.t().unwrap()).unwrap();
                let tol = tolerance(dtype) / 10.0;
                let y = cpu_tensor(forward(&x, &weight, Some(&bias)).unwrap().unwrap(), (rows, out_dim)).unwrap();
                assert!(rel_diff(&y, &product.broadcast_add(&bias).unwrap()) < tol);
                let y = cpu_tensor(forward(&x, &weight, None).unwrap().unwrap(), (rows, out_dim)).unwrap();
                assert!(rel_diff(&y, &product) < tol);
                let dy = transposed_values(&[rows, out_dim], 10, dtype);
                let dx = cpu_tensor(input_grad(&dy, &weight).unwrap().unwrap(), (rows, in_dim)).unwrap();
                assert!(rel_diff(&dx, &dy.matmul(&weight).unwrap()) < tol);
            }
        }
        // Mismatched sizes are left to candle.
        let (x, w) = (transposed_values(&[3, 4], 1, DType::F32), transposed_values(&[5, 3], 2, DType::F32));
        assert!(forward(&x, &w, None).unwrap().is_none());
        assert!(input_grad(&x, &w).unwrap().is_none());
    }

    /// GEGLU by blocks of rows (one block, and three with a short last) equals GEGLU of the
    /// whole product, with and without a bias.
    #[test]
    fn geglu_by_blocks_matches_geglu_of_the_product() {
        for dtype in [DType::F32, DType::F64] {
            for (rows, in_dim, width) in [(3, 5, 8), (1100, 37, 46)] {
                let x = transposed_values(&[rows, in_dim], 11, dtype);
                let weight = transposed_values(&[in_dim, width], 12, dtype).t().unwrap().contiguous().unwrap();
                let bias = transposed_values(&[width, 1], 13, dtype).reshape(width).unwrap();
                for bias in [Some(&bias), None] {
                    let product = cpu_tensor(forward(&x, &weight, bias).unwrap().unwrap(), (rows, width)).unwrap();
                    let fused = forward_geglu_blocks(&x, &weight, bias, 512).unwrap().unwrap();
                    let fused = cpu_tensor(fused, (rows, width / 2)).unwrap();
                    assert!(rel_diff(&fused, &crate::nn::geglu(&product).unwrap()) < tolerance(dtype) / 10.0);
                }
            }
        }
        // An odd width has no halves; too few rows for every thread's blocks are left to the
        // whole product.
        let (x, w) = (transposed_values(&[3, 4], 1, DType::F32), transposed_values(&[5, 4], 2, DType::F32));
        assert!(forward_geglu_blocks(&x, &w, None, 512).unwrap().is_none());
        let (x, w) = (transposed_values(&[1100, 4], 1, DType::F32), transposed_values(&[6, 4], 2, DType::F32));
        assert!(forward_geglu(&x, &w, None).unwrap().is_none());
    }
}
