//! The matrix products of the CPU kernels (convolution, linear layer, attention): the `gemm`
//! crate, candle's own CPU matrix product, on f32 and f64 matrices read in place through their
//! strides, so that transposed or strided operands are never copied.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{Disjoint, Element};
use crate::nn::packed::{PackedMatrix, Q8_BLOCK};

/// Output columns each thread's block of a [`Threads::ColumnBlocks`] product has at least;
/// narrower products run on gemm's own threads.
const MIN_BLOCK_COLUMNS: usize = 64;

/// A matrix inside a slice: entry `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(in crate::nn) struct Strided<'a, T> {
    pub values: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Strided<'a, T> {
    /// `values` as a `rows` x `cols` row-major matrix.
    pub fn row_major(values: &'a [T], rows: usize, cols: usize) -> Self {
        Self { values, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// One past the last offset of an entry: `values` must be at least this long.
    fn extent(&self) -> usize {
        extent(self.rows, self.cols, self.row_stride, self.col_stride)
    }
}

/// One past the last offset of an entry of a `rows` x `cols` matrix with these strides.
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// How a [`matmul`] uses candle's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::nn) enum Threads {
    /// The calling thread only (the caller runs products side by side).
    One,
    /// gemm's own split of the product over all threads.
    All,
    /// All threads, each computing a block of output columns single-threaded: at the linear
    /// layers' shapes (tens to a thousand rows, a wide inner dimension) that is up to 1.6 times as
    /// fast as gemm's own split over two threads. With blocks narrower than
    /// [`MIN_BLOCK_COLUMNS`], gemm's own split.
    ColumnBlocks,
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` with `accumulate`; `dst` row-major with rows
/// `dst_row_stride` apart (a block of a wider matrix).
pub(in crate::nn) fn matmul<T: Element>(
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Strided<T>,
    rhs: Strided<T>,
    threads: Threads,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions");
    assert!(dst_row_stride >= n, "matmul: destination rows overlap");
    let dst_extent = extent(m, n, dst_row_stride, 1);
    assert!(
        dst.len() >= dst_extent && lhs.values.len() >= lhs.extent() && rhs.values.len() >= rhs.extent(),
        "matmul: operand sizes"
    );
    let dst = Disjoint(dst.as_mut_ptr());
    // SAFETY: the asserts above keep every offset gemm reads (lhs, rhs) or writes (dst) inside
    // its slice: a block of columns `j0..j0 + cols` (within `0..n`) starts `j0` entries into dst
    // and `j0 * col_stride` into rhs. dst's entries are distinct (rows at least n apart, unit
    // column stride), dst, a `&mut`, aliases neither operand, and the blocks' columns are
    // disjoint, so no two threads write one entry.
    let block = |j0: usize, cols: usize, parallelism| unsafe {
        product_into(
            (m, cols, k),
            (dst.at(j0), dst_row_stride, 1),
            accumulate,
            (lhs.values.as_ptr(), lhs.row_stride, lhs.col_stride),
            (rhs.values.as_ptr().add(j0 * rhs.col_stride), rhs.row_stride, rhs.col_stride),
            1.0,
            parallelism,
        )
    };
    match threads {
        Threads::One => block(0, n, Parallelism::None),
        Threads::All => block(0, n, all_threads()),
        Threads::ColumnBlocks => {
            let threads = candle_core::utils::get_num_threads();
            let width = n.div_ceil(threads.max(1));
            if threads <= 1 {
                block(0, n, Parallelism::None);
            } else if width < MIN_BLOCK_COLUMNS {
                block(0, n, Parallelism::Rayon(threads));
            } else {
                (0..n.div_ceil(width)).into_par_iter().for_each(|b| {
                    let j0 = b * width;
                    block(j0, width.min(n - j0), Parallelism::None);
                });
            }
        }
    }
}

/// gemm's parallelism over candle's thread count.
fn all_threads() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// `dst (m, n) = alpha * lhs (m, k) * rhs (k, n)`, single-threaded; each operand is a pointer
/// with its (row, column) strides.
///
/// # Safety
/// Every entry of the three matrices must be inside its allocation; `dst` must not overlap the
/// operands nor be accessed by anyone else during the call.
pub(in crate::nn) unsafe fn product<T: Element>(
    dims: (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    alpha: f64,
) {
    product_into(dims, dst, false, lhs, rhs, alpha, Parallelism::None)
}

/// `dst (m, n) += alpha * lhs (m, k) * rhs (k, n)`, single-threaded, as [`product`].
///
/// # Safety
/// As [`product`]'s.
pub(in crate::nn) unsafe fn product_add<T: Element>(
    dims: (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    alpha: f64,
) {
    product_into(dims, dst, true, lhs, rhs, alpha, Parallelism::None)
}

/// `dst (m, n) = [dst +] scale * lhs (m, k) * rhs (k, n)`; each operand is a pointer with its
/// (row, column) strides.
///
/// # Safety
/// As [`product`]'s, with `dst`'s entries distinct.
unsafe fn product_into<T: Element>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut T, usize, usize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
    scale: f64,
    parallelism: Parallelism,
) {
    // T is f32 or f64 (`Element`), both of which gemm supports. gemm computes
    // `dst = alpha * dst + beta * lhs * rhs`, alpha unused when it does not read dst.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { T::ONE } else { T::ZERO },
        T::narrow(scale),
        false,
        false,
        false,
        parallelism,
    )
}

/// The widened block of a packed matrix that one product reads: about this many bytes of f32,
/// so that it stays in the cache between being written and being read.
const PANEL_BYTES: usize = 1 << 20;

/// `dst (m, n) [+]= lhs (m, k) * rhs (k, n)` for a packed `lhs` and each `(dst, rhs)` of
/// `products` (the images of a batch), entry `(i, j)` of a `dst` at `i * row_stride + j *
/// col_stride` (a row-major or a transposed block).
///
/// The rows of `lhs` are split over the threads (one block each), and each thread walks its
/// block in panels of columns (a multiple of [`Q8_BLOCK`], about [`PANEL_BYTES`] widened): a
/// panel is widened into a buffer and multiplied by the matching rows of each `rhs`, summing into
/// `dst`. gemm thus packs each part of `rhs` once per thread, as one product over the whole
/// matrix would, while the widened values never leave the cache.
pub(in crate::nn) fn matmul_packed_lhs(
    products: &mut [(&mut [f32], Strided<f32>)],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &PackedMatrix,
    threads: Threads,
) {
    let (m, k) = (lhs.rows(), lhs.cols());
    let products: Vec<(Disjoint<f32>, Strided<f32>)> = products
        .iter_mut()
        .map(|(dst, rhs)| {
            let n = rhs.cols;
            assert_eq!(rhs.rows, k, "matmul: inner dimensions");
            assert!(dst_rs >= n * dst_cs || dst_cs >= m * dst_rs, "matmul: destination entries overlap");
            assert!(
                dst.len() >= extent(m, n, dst_rs, dst_cs) && rhs.values.len() >= rhs.extent(),
                "matmul: operand sizes"
            );
            (Disjoint(dst.as_mut_ptr()), *rhs)
        })
        .collect();
    if m == 0 || products.is_empty() {
        return;
    }
    let threads = match threads {
        Threads::One => 1,
        Threads::All | Threads::ColumnBlocks => candle_core::utils::get_num_threads().clamp(1, m),
    };
    let block_rows = m.div_ceil(threads);
    let panel_cols = (PANEL_BYTES / (4 * block_rows)).next_multiple_of(Q8_BLOCK).min(k.max(1));
    let run = |block: usize, widened: &mut Vec<f32>| {
        let rows = block * block_rows..((block + 1) * block_rows).min(m);
        for start in (0..k).step_by(panel_cols) {
            let cols = start..(start + panel_cols).min(k);
            widened.resize(rows.len() * cols.len(), 0.0);
            lhs.widen(rows.clone(), cols.clone(), widened);
            for (dst, rhs) in &products {
                // SAFETY: the asserts above keep every entry of a dst's rows `rows` (within
                // `0..m`) inside it and distinct, and every entry of rhs's rows `cols` inside
                // rhs; blocks write disjoint rows; each dst, a `&mut`, aliases no operand; the
                // widened buffer holds exactly the panel's `rows x cols` values.
                unsafe {
                    product_into(
                        (rows.len(), rhs.cols, cols.len()),
                        (dst.at(rows.start * dst_rs), dst_rs, dst_cs),
                        accumulate || start > 0,
                        (widened.as_ptr(), cols.len(), 1),
                        (rhs.values.as_ptr().add(start * rhs.row_stride), rhs.row_stride, rhs.col_stride),
                        1.0,
                        Parallelism::None,
                    )
                }
            }
        }
    };
    if threads == 1 {
        run(0, &mut Vec::new());
    } else {
        (0..m.div_ceil(block_rows)).into_par_iter().for_each_init(Vec::new, |widened, block| run(block, widened));
    }
}
