//! The matrix products of the CPU kernels of the linear layer and attention: the `gemm` crate,
//! candle's own CPU matrix product, on f32 and f64 matrices read in place through their strides.

use rayon::prelude::*;

use super::Element;

/// A matrix in a slice: entry `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(in crate::nn) struct Strided<'a, T> {
    pub values: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Output columns each thread's block of a product has at least; narrower products run on
/// gemm's own threads.
const MIN_BLOCK_COLUMNS: usize = 64;

/// `out (m, n) = [out +] lhs (m, k) * rhs (k, n)`, `out` and `lhs` row-major. With several
/// threads, each computes a block of columns single-threaded: at these layers' shapes (tens to
/// a thousand rows, a wide inner dimension) that is up to 1.6 times as fast as gemm's own
/// split over two threads.
pub(in crate::nn) fn matmul<T: Element>(
    out: &mut [T],
    add: bool,
    lhs: &[T],
    m: usize,
    k: usize,
    rhs: Strided<T>,
    n: usize,
) {
    let rhs_extent = (k - 1) * rhs.row_stride + (n - 1) * rhs.col_stride + 1;
    assert!(out.len() == m * n && lhs.len() == m * k && rhs.values.len() >= rhs_extent, "matmul: operand sizes");
    let threads = candle_core::utils::get_num_threads();
    let block = n.div_ceil(threads.max(1));
    // Raw pointers, shared between the threads, which write disjoint columns.
    let out_ptr = out.as_mut_ptr() as usize;
    let (lhs, rhs_values) = (lhs.as_ptr() as usize, rhs.values.as_ptr() as usize);
    // SAFETY (both calls): gemm reads `lhs` at `i * k + l` (i < m, l < k) and `rhs` at
    // `l * row_stride + j * col_stride` (j < n), and writes `out` at `i * n + j`, all inside
    // their slices by the asserted sizes; the blocks' columns `j0..j0 + cols` are disjoint, so
    // no two threads write one entry, and `out` is borrowed mutably for the whole call.
    let product = |j0: usize, cols: usize, parallelism| unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            (out_ptr as *mut T).add(j0),
            1,
            n as isize,
            add,
            lhs as *const T,
            1,
            k as isize,
            (rhs_values as *const T).add(j0 * rhs.col_stride),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::narrow(1.0),
            T::narrow(1.0),
            false,
            false,
            false,
            parallelism,
        )
    };
    if threads <= 1 {
        product(0, n, gemm::Parallelism::None);
    } else if block < MIN_BLOCK_COLUMNS {
        product(0, n, gemm::Parallelism::Rayon(threads));
    } else {
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let j0 = b * block;
            product(j0, block.min(n - j0), gemm::Parallelism::None);
        });
    }
}

/// `dst (m, n) = alpha * lhs (m, k) * rhs (k, n)`, single-threaded; each operand is a pointer
/// with its (row, column) strides.
///
/// # Safety
/// Every entry of the three matrices must be inside its allocation; `dst` must not overlap the
/// operands nor be accessed by anyone else during the call.
pub(in crate::nn) unsafe fn product<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    alpha: f64,
) {
    let (dst, dst_rs, dst_cs) = dst;
    let (lhs, lhs_rs, lhs_cs) = lhs;
    let (rhs, rhs_rs, rhs_cs) = rhs;
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::narrow(0.0),
        T::narrow(alpha),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
