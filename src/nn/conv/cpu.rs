//! The CPU convolution in f32 and f64: im2col over NCHW and matrix products with the `gemm`
//! crate ([`crate::nn::cpu::gemm`]; Caffe's `im2col` + GEMM formulation).
//!
//! The column matrix of one image has one row per `(ci, ky, kx)`, which is the kernel's own
//! contiguous `(c_out, c_in * kh * kw)` flattening, and one column per output pixel: row
//! `(ci, ky, kx)` is input plane `ci` shifted by `(ky, kx)` (and subsampled by the stride), zeros
//! where it falls in the padding. Then `y[b] (c_out x pixels) = kernel * col`, written straight
//! into the NCHW output, and the input gradient is `dcol = kernel^T * dy[b]` scatter-added back
//! into the input planes (col2im), which handles strides without dilating `dy`. A 1x1 stride-1
//! unpadded convolution needs no column matrix: `x[b]` already is one.
//!
//! The column matrix is built for a few whole output rows at a time, never more than
//! [`COLUMN_BUDGET_BYTES`], so that high-resolution layers (a 3x3 convolution over 128 channels
//! at 256x256 makes a 300 MB column matrix) do not raise the peak memory of a training step.
//!
//! Threads (candle's count): the forward builds the column matrix one input channel per rayon
//! task and lets gemm parallelise its product; the input gradient runs one task per block of
//! input channels, each multiplying its own rows of `dcol` single-threaded and adding them into
//! its own planes (see [`gradient_block_channels`]).

use std::ops::Range;

use rayon::prelude::*;

use super::ConvShape;
use crate::nn::cpu::gemm::{matmul, matmul_packed_lhs, Strided, Threads};
use crate::nn::cpu::{for_each_chunk, Element};
use crate::nn::packed::PackedMatrix;

/// The largest column matrix (one tile of output rows) built at once: the UNet's are whole at
/// 256x256 images (the largest, 320 channels at 32x32, is 11.25 MiB); smaller tiles measured no
/// faster.
const COLUMN_BUDGET_BYTES: usize = 16 << 20;

/// The multiply-adds of one image's forward (`c_in * kh * kw * out_pixels * c_out`) up to which a
/// batch runs one image per task rather than each image on all threads: below about this size
/// the per-image thread hand-offs cost more than the products (R-Net's 24x24 crops take a tenth
/// of the time this way).
const SMALL_IMAGE_WORK: usize = 1 << 22;

/// About how many column-matrix rows each task of the input gradient owns (80 channels of a 3x3
/// kernel). Narrow blocks make a task's product read a narrow band of the kernel and its col2im
/// read what its own product just wrote; this size measured fastest at Stable Diffusion's shapes
/// (deep 8x8 layers gain a fifth over one product on all threads; smaller blocks are slower).
const GRADIENT_BLOCK_ROWS: usize = 720;

/// `y = conv(x, kernel)`: `x` contiguous (batch, c_in, h, w), `kernel` contiguous
/// (c_out, c_in, kh, kw); returns contiguous (batch, c_out, out_h, out_w).
pub(super) fn forward<T: Element>(x: &[T], kernel: &[T], bias: Option<&[T]>, shape: &ConvShape) -> Vec<T> {
    assert_eq!(kernel.len(), shape.c_out * shape.c_in * shape.kh * shape.kw, "conv2d: kernel size");
    forward_tiled(
        x,
        Strided::row_major(kernel, shape.c_out, kernel.len() / shape.c_out.max(1)),
        bias,
        shape,
        COLUMN_BUDGET_BYTES,
    )
}

/// [`forward`] in f32 with a packed kernel, (c_out, c_in * kh * kw).
pub(super) fn forward_packed(x: &[f32], kernel: &PackedMatrix, bias: Option<&[f32]>, shape: &ConvShape) -> Vec<f32> {
    assert_eq!((kernel.rows(), kernel.cols()), (shape.c_out, shape.c_in * shape.kh * shape.kw), "conv2d: kernel size");
    forward_tiled(x, kernel, bias, shape, COLUMN_BUDGET_BYTES)
}

/// The kernel matrix (c_out, c_in * kh * kw) of a forward, as values or packed: what it
/// multiplies column matrices with.
trait KernelMatrix<T>: Copy + Sync {
    /// `y = kernel * rhs`, or `y += kernel * rhs` with `accumulate`, for each `(y, rhs)` (the
    /// images of a batch), `y` row-major with rows `y_row_stride` apart.
    fn times_each(
        self,
        products: &mut [(&mut [T], Strided<T>)],
        y_row_stride: usize,
        accumulate: bool,
        threads: Threads,
    );
}

impl<T: Element> KernelMatrix<T> for Strided<'_, T> {
    fn times_each(
        self,
        products: &mut [(&mut [T], Strided<T>)],
        y_row_stride: usize,
        accumulate: bool,
        threads: Threads,
    ) {
        for (y, rhs) in products {
            matmul(y, y_row_stride, accumulate, self, *rhs, threads)
        }
    }
}

impl KernelMatrix<f32> for &PackedMatrix {
    fn times_each(
        self,
        products: &mut [(&mut [f32], Strided<f32>)],
        y_row_stride: usize,
        accumulate: bool,
        threads: Threads,
    ) {
        matmul_packed_lhs(products, (y_row_stride, 1), accumulate, self, threads)
    }
}

/// The gradient with respect to `x` of [`forward`] from the gradient `dy` of its output:
/// `dy` contiguous (batch, c_out, out_h, out_w); returns contiguous (batch, c_in, h, w).
pub(super) fn input_grad<T: Element>(dy: &[T], kernel: &[T], shape: &ConvShape) -> Vec<T> {
    input_grad_tiled(dy, kernel, shape, COLUMN_BUDGET_BYTES)
}

/// [`forward`] with column matrices of at most `budget` bytes (at least one output row).
fn forward_tiled<T: Element>(
    x: &[T],
    kernel: impl KernelMatrix<T>,
    bias: Option<&[T]>,
    shape: &ConvShape,
    budget: usize,
) -> Vec<T> {
    let geometry = Geometry::new(shape);
    let Geometry { plane_in, plane_out, depth, taps, out_w, .. } = geometry;
    let ConvShape { batch, c_in, c_out, .. } = *shape;
    assert_eq!(x.len(), batch * c_in * plane_in, "conv2d: input size");
    assert!(bias.is_none_or(|b| b.len() == c_out), "conv2d: bias size");
    // Each output plane starts as its channel's bias, for the products to add onto; written by
    // all threads, as the first writes to a large buffer cost about as much as a product's.
    let mut y = vec![T::ZERO; batch * c_out * plane_out];
    if let Some(bias) = bias {
        for_each_chunk(&mut y, plane_out, |plane, values| values.fill(bias[plane % c_out]));
    }
    let accumulate = bias.is_some();
    if y.is_empty() || depth == 0 {
        return y;
    }
    if geometry.is_pointwise() {
        let mut products: Vec<_> = y
            .chunks_exact_mut(c_out * plane_out)
            .zip(x.chunks_exact(c_in * plane_in))
            .map(|(y, x)| (y, Strided::row_major(x, c_in, plane_in)))
            .collect();
        kernel.times_each(&mut products, plane_out, accumulate, Threads::All);
        return y;
    }
    if batch > 1 && depth * plane_out * c_out <= SMALL_IMAGE_WORK {
        // Many small images (a face detector's crops): one task per image, each single-threaded.
        y.par_chunks_exact_mut(c_out * plane_out).zip(x.par_chunks_exact(c_in * plane_in)).for_each_init(
            || vec![T::ZERO; depth * plane_out],
            |col, (y, x)| {
                for (col, plane) in col.chunks_exact_mut(taps * plane_out).zip(x.chunks_exact(plane_in)) {
                    geometry.im2col(plane, 0..geometry.out_h, col);
                }
                kernel.times_each(
                    &mut [(y, Strided::row_major(col, depth, plane_out))],
                    plane_out,
                    accumulate,
                    Threads::One,
                );
            },
        );
        return y;
    }
    if batch > 1 && batch * depth * plane_out * size_of::<T>() <= budget {
        // The whole batch's column matrices at once (the deep, low-resolution layers): the kernel
        // is read once for all images, and a packed kernel widened once.
        let mut cols = vec![T::ZERO; batch * depth * plane_out];
        // Planes in x and blocks of rows in cols both run (image, channel).
        cols.par_chunks_mut(taps * plane_out)
            .zip(x.par_chunks(plane_in))
            .for_each(|(col, plane)| geometry.im2col(plane, 0..geometry.out_h, col));
        let mut products: Vec<_> = y
            .chunks_exact_mut(c_out * plane_out)
            .zip(cols.chunks_exact(depth * plane_out))
            .map(|(y, col)| (y, Strided::row_major(col, depth, plane_out)))
            .collect();
        kernel.times_each(&mut products, plane_out, accumulate, Threads::All);
        return y;
    }
    let tile_rows = geometry.tile_rows::<T>(budget);
    let mut col = vec![T::ZERO; depth * tile_rows * out_w];
    for (y, x) in y.chunks_exact_mut(c_out * plane_out).zip(x.chunks_exact(c_in * plane_in)) {
        for rows in geometry.tiles(tile_rows) {
            let pixels = rows.len() * out_w;
            let col = &mut col[..depth * pixels];
            col.par_chunks_mut(taps * pixels)
                .zip(x.par_chunks(plane_in))
                .for_each(|(col, plane)| geometry.im2col(plane, rows.clone(), col));
            let y = &mut y[rows.start * out_w..];
            kernel.times_each(&mut [(y, Strided::row_major(col, depth, pixels))], plane_out, accumulate, Threads::All);
        }
    }
    y
}

/// [`input_grad`] with column matrices of at most `budget` bytes (at least one output row).
fn input_grad_tiled<T: Element>(dy: &[T], kernel: &[T], shape: &ConvShape, budget: usize) -> Vec<T> {
    let geometry = Geometry::new(shape);
    let Geometry { plane_in, plane_out, depth, taps, out_w, .. } = geometry;
    let ConvShape { batch, c_in, c_out, .. } = *shape;
    assert_eq!(dy.len(), batch * c_out * plane_out, "conv2d backward: output gradient size");
    assert_eq!(kernel.len(), c_out * depth, "conv2d backward: kernel size");
    let mut dx = vec![T::ZERO; batch * c_in * plane_in];
    if dx.is_empty() || c_out == 0 {
        return dx;
    }
    let images = dx.chunks_exact_mut(c_in * plane_in).zip(dy.chunks_exact(c_out * plane_out));
    if geometry.is_pointwise() {
        // kernel^T (c_in x c_out), read in place.
        let kernel_t = Strided { values: kernel, rows: c_in, cols: c_out, row_stride: 1, col_stride: c_in };
        for (dx, dy) in images {
            matmul(dx, plane_in, false, kernel_t, Strided::row_major(dy, c_out, plane_out), Threads::All);
        }
        return dx;
    }
    let tile_rows = geometry.tile_rows::<T>(budget);
    let mut col = vec![T::ZERO; depth * tile_rows * out_w];
    let block_channels = gradient_block_channels(c_in, taps);
    for (dx, dy) in images {
        for rows in geometry.tiles(tile_rows) {
            let pixels = rows.len() * out_w;
            let dy = &dy[rows.start * out_w..];
            let dy_tile = Strided { values: dy, rows: c_out, cols: pixels, row_stride: plane_out, col_stride: 1 };
            // A block's rows of dcol are contiguous, and so are its planes of dx: tiles overlap
            // in dx, blocks never do.
            col[..depth * pixels]
                .par_chunks_mut(block_channels * taps * pixels)
                .zip(dx.par_chunks_mut(block_channels * plane_in))
                .enumerate()
                .for_each(|(block, (col, dx))| {
                    let first_row = block * block_channels * taps;
                    // The block's rows of kernel^T ((c_in * kh * kw) x c_out), read in place.
                    let kernel_t = Strided {
                        values: &kernel[first_row..],
                        rows: col.len() / pixels,
                        cols: c_out,
                        row_stride: 1,
                        col_stride: depth,
                    };
                    matmul(col, pixels, false, kernel_t, dy_tile, Threads::One);
                    for (plane, col) in dx.chunks_exact_mut(plane_in).zip(col.chunks_exact(taps * pixels)) {
                        geometry.col2im(col, rows.clone(), plane);
                    }
                });
        }
    }
    dx
}

/// Input channels per task of the input gradient: blocks of about [`GRADIENT_BLOCK_ROWS`]
/// column-matrix rows, as many blocks as a multiple of the thread count (at least one per
/// thread) so that the threads finish together.
fn gradient_block_channels(c_in: usize, taps: usize) -> usize {
    let threads = candle_core::utils::get_num_threads();
    let blocks = threads * (c_in * taps / (threads * GRADIENT_BLOCK_ROWS)).max(1);
    c_in.div_ceil(blocks)
}

/// Where each kernel tap reads: the sizes of one convolution seen from a single input channel.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    kw: usize,
    padding: usize,
    stride: usize,
    out_h: usize,
    out_w: usize,
    /// `h * w`.
    plane_in: usize,
    /// `out_h * out_w`.
    plane_out: usize,
    /// `kh * kw`: the column-matrix rows of one input channel.
    taps: usize,
    /// `c_in * kh * kw`: the column-matrix rows, the inner dimension of the forward product.
    depth: usize,
}

impl Geometry {
    fn new(shape: &ConvShape) -> Self {
        let ConvShape { c_in, h, w, kh, kw, padding, stride, .. } = *shape;
        let (out_h, out_w) = (shape.out_h(), shape.out_w());
        Self {
            h,
            w,
            kw,
            padding,
            stride,
            out_h,
            out_w,
            plane_in: h * w,
            plane_out: out_h * out_w,
            taps: kh * kw,
            depth: c_in * kh * kw,
        }
    }

    /// A 1x1 stride-1 unpadded convolution: the input images are their own column matrices.
    fn is_pointwise(&self) -> bool {
        self.taps == 1 && self.stride == 1 && self.padding == 0
    }

    /// How many output rows make a column matrix within `budget` bytes (at least one).
    fn tile_rows<T>(&self, budget: usize) -> usize {
        let row_bytes = self.depth * self.out_w * size_of::<T>();
        (budget / row_bytes.max(1)).clamp(1, self.out_h)
    }

    /// The output rows in tiles of `tile_rows` rows.
    fn tiles(&self, tile_rows: usize) -> impl Iterator<Item = Range<usize>> {
        let out_h = self.out_h;
        (0..out_h).step_by(tile_rows).map(move |start| start..(start + tile_rows).min(out_h))
    }

    /// The input row (of `len`) that output row `out` reads through kernel tap `tap`, `None` in
    /// the padding.
    fn input_index(&self, out: usize, tap: usize, len: usize) -> Option<usize> {
        (out * self.stride + tap).checked_sub(self.padding).filter(|&i| i < len)
    }

    /// The output columns whose kernel tap `kx` reads inside the input row (not in the padding).
    fn inside_columns(&self, kx: usize) -> Range<usize> {
        let (padding, stride) = (self.padding, self.stride);
        let start = padding.saturating_sub(kx).div_ceil(stride).min(self.out_w);
        // The last one has out * stride + kx - padding <= w - 1.
        let end = match (self.w + padding).checked_sub(kx + 1) {
            Some(last) => (last / stride + 1).min(self.out_w),
            None => 0,
        };
        start..end.max(start)
    }

    /// Fills `col`, the `kh * kw` column-matrix rows (each `rows.len() * out_w` long) of one input
    /// `plane`, for output rows `rows`.
    fn im2col<T: Element>(&self, plane: &[T], rows: Range<usize>, col: &mut [T]) {
        let pixels = rows.len() * self.out_w;
        for (tap, col) in col.chunks_exact_mut(pixels).enumerate() {
            let (ky, kx) = (tap / self.kw, tap % self.kw);
            let inside = self.inside_columns(kx);
            for (oy, out_row) in rows.clone().zip(col.chunks_exact_mut(self.out_w)) {
                let Some(iy) = self.input_index(oy, ky, self.h).filter(|_| !inside.is_empty()) else {
                    out_row.fill(T::ZERO);
                    continue;
                };
                out_row[..inside.start].fill(T::ZERO);
                out_row[inside.end..].fill(T::ZERO);
                let first = inside.start * self.stride + kx - self.padding;
                let source = &plane[iy * self.w..(iy + 1) * self.w][first..];
                let out_row = &mut out_row[inside.clone()];
                if self.stride == 1 {
                    out_row.copy_from_slice(&source[..out_row.len()]);
                } else {
                    for (out, &value) in out_row.iter_mut().zip(source.iter().step_by(self.stride)) {
                        *out = value;
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: adds `col`, one input channel's column-matrix rows for
    /// output rows `rows`, into that channel's `plane` where each entry was read from.
    fn col2im<T: Element>(&self, col: &[T], rows: Range<usize>, plane: &mut [T]) {
        let pixels = rows.len() * self.out_w;
        for (tap, col) in col.chunks_exact(pixels).enumerate() {
            let (ky, kx) = (tap / self.kw, tap % self.kw);
            let inside = self.inside_columns(kx);
            if inside.is_empty() {
                continue;
            }
            for (oy, col_row) in rows.clone().zip(col.chunks_exact(self.out_w)) {
                let Some(iy) = self.input_index(oy, ky, self.h) else { continue };
                let first = inside.start * self.stride + kx - self.padding;
                let target = &mut plane[iy * self.w..(iy + 1) * self.w][first..];
                let col_row = &col_row[inside.clone()];
                // The unit-stride loop is the one the compiler vectorises.
                if self.stride == 1 {
                    for (target, &value) in target[..col_row.len()].iter_mut().zip(col_row) {
                        *target += value;
                    }
                } else {
                    for (target, &value) in target.iter_mut().step_by(self.stride).zip(col_row) {
                        *target += value;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ConvShape;
    use super::{forward, forward_tiled, input_grad, input_grad_tiled, Strided};
    use crate::nn::test_values::spread;

    fn shape(
        (batch, c_in, h, w): (usize, usize, usize, usize),
        (c_out, k): (usize, usize),
        padding: usize,
        stride: usize,
    ) -> ConvShape {
        ConvShape { batch, c_in, c_out, h, w, kh: k, kw: k, padding, stride }
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        spread(n, seed, -2.0, 4.0)
    }

    /// The convolution by its definition, one output at a time.
    fn direct(x: &[f64], kernel: &[f64], s: &ConvShape) -> Vec<f64> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut y = vec![0.0; s.batch * s.c_out * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = 0.0;
                        for ci in 0..s.c_in {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                    if (0..s.h as isize).contains(&iy) && (0..s.w as isize).contains(&ix) {
                                        let xi = ((b * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize;
                                        sum += x[xi] * kernel[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx];
                                    }
                                }
                            }
                        }
                        y[((b * s.c_out + co) * oh + oy) * ow + ox] = sum;
                    }
                }
            }
        }
        y
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(a, b)| a * b).sum()
    }

    /// `<forward(x), dy> == <x, input_grad(dy)>`: the input gradient is the adjoint of the forward.
    fn assert_adjoint(s: &ConvShape, budget: usize) {
        let x = values(s.batch * s.c_in * s.h * s.w, 1);
        let kernel = values(s.c_out * s.c_in * s.kh * s.kw, 2);
        let dy = values(s.batch * s.c_out * s.out_h() * s.out_w(), 3);
        let y = forward_tiled(&x, Strided::row_major(&kernel, s.c_out, kernel.len() / s.c_out), None, s, budget);
        let dx = input_grad_tiled(&dy, &kernel, s, budget);
        let (lhs, rhs) = (dot(&y, &dy), dot(&x, &dx));
        assert!((lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0), "{s:?}: {lhs} vs {rhs}");
    }

    /// Column matrices cut into tiles of a few output rows (the last one shorter) give the
    /// whole-image result, forward and backward.
    #[test]
    fn tiles_give_the_whole_image_result() {
        for s in [shape((2, 3, 11, 9), (4, 3), 1, 1), shape((1, 2, 13, 8), (3, 3), 1, 2)] {
            let x = values(s.batch * s.c_in * s.h * s.w, 4);
            let kernel = values(s.c_out * s.c_in * s.kh * s.kw, 5);
            let dy = values(s.batch * s.c_out * s.out_h() * s.out_w(), 6);
            let row_bytes = s.c_in * s.kh * s.kw * s.out_w() * size_of::<f64>();
            let expected = direct(&x, &kernel, &s);
            assert!(max_diff(&forward(&x, &kernel, None, &s), &expected) < 1e-12);
            let whole = input_grad(&dy, &kernel, &s);
            for tile_rows in [1, 2, 3] {
                let budget = tile_rows * row_bytes;
                let kernel_matrix = Strided::row_major(&kernel, s.c_out, kernel.len() / s.c_out);
                assert!(
                    max_diff(&forward_tiled(&x, kernel_matrix, None, &s, budget), &expected) < 1e-12,
                    "{tile_rows} rows"
                );
                assert!(max_diff(&input_grad_tiled(&dy, &kernel, &s, budget), &whole) < 1e-12, "{tile_rows} rows");
                assert_adjoint(&s, budget);
            }
        }
    }

    /// The input gradient is the adjoint of the forward over kernel sizes, paddings (including
    /// padding wider than the kernel reaches) and strides, on odd sizes, and with enough input
    /// channels for several gradient blocks whatever the thread count.
    #[test]
    fn input_grad_is_the_adjoint_of_forward() {
        for s in [
            shape((2, 3, 7, 9), (5, 3), 1, 1),
            shape((1, 4, 8, 8), (6, 3), 1, 2),
            shape((1, 3, 9, 9), (4, 3), 0, 2),
            shape((2, 2, 5, 6), (3, 3), 2, 1),
            shape((1, 2, 2, 3), (2, 5), 3, 2),
            shape((1, 3, 6, 5), (2, 4), 1, 3),
            shape((2, 170, 5, 4), (3, 3), 1, 1),
        ] {
            let x = values(s.batch * s.c_in * s.h * s.w, 7);
            let kernel = values(s.c_out * s.c_in * s.kh * s.kw, 8);
            assert!(max_diff(&forward(&x, &kernel, None, &s), &direct(&x, &kernel, &s)) < 1e-12, "{s:?}");
            assert_adjoint(&s, usize::MAX);
        }
    }

    /// A bias is written into each output plane before the products add onto it, on each path:
    /// a 1x1 product, one image per task, the whole batch's column matrices, and tiles of rows.
    #[test]
    fn bias_is_added_on_every_path() {
        for (s, budget) in [
            (shape((2, 5, 4, 3), (7, 1), 0, 1), usize::MAX),
            (shape((3, 4, 6, 5), (3, 3), 1, 1), usize::MAX),
            (shape((2, 64, 16, 16), (64, 3), 1, 1), usize::MAX),
            (shape((1, 3, 11, 9), (4, 3), 1, 2), 3 * 9 * 5 * size_of::<f64>()),
        ] {
            let x = values(s.batch * s.c_in * s.h * s.w, 14);
            let kernel = values(s.c_out * s.c_in * s.kh * s.kw, 15);
            let bias = values(s.c_out, 16);
            let plane = s.out_h() * s.out_w();
            let mut expected = direct(&x, &kernel, &s);
            for (i, y) in expected.iter_mut().enumerate() {
                *y += bias[i / plane % s.c_out];
            }
            let kernel_matrix = Strided::row_major(&kernel, s.c_out, kernel.len() / s.c_out);
            let y = forward_tiled(&x, kernel_matrix, Some(&bias), &s, budget);
            assert!(max_diff(&y, &expected) < 1e-10, "{s:?}");
        }
    }

    /// 1x1 convolutions: stride 1 unpadded is a plain product on the input; with a stride or
    /// padding it goes through the column matrix.
    #[test]
    fn pointwise_convolutions() {
        for s in
            [shape((2, 5, 4, 3), (7, 1), 0, 1), shape((1, 3, 5, 5), (2, 1), 0, 2), shape((1, 2, 3, 3), (2, 1), 1, 1)]
        {
            let x = values(s.batch * s.c_in * s.h * s.w, 9);
            let kernel = values(s.c_out * s.c_in, 10);
            assert!(max_diff(&forward(&x, &kernel, None, &s), &direct(&x, &kernel, &s)) < 1e-12, "{s:?}");
            assert_adjoint(&s, usize::MAX);
        }
    }

    /// A 3x3 stride-2 convolution (as the UNet's and the VAE's downsamplers) in f32 against the
    /// f64 definition, and its input gradient against a direct scatter of `dy`.
    #[test]
    fn stride_two_in_f32() {
        let s = shape((2, 3, 10, 7), (4, 3), 1, 2);
        let x = values(s.batch * s.c_in * s.h * s.w, 11);
        let kernel = values(s.c_out * s.c_in * 9, 12);
        let dy = values(s.batch * s.c_out * s.out_h() * s.out_w(), 13);
        let single = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
        let double = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let y = double(forward(&single(&x), &single(&kernel), None, &s));
        assert!(max_diff(&y, &direct(&x, &kernel, &s)) < 1e-4);

        // dx[b, ci, oy * 2 + ky - 1, ox * 2 + kx - 1] += dy[b, co, oy, ox] * kernel[co, ci, ky, kx].
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut expected = vec![0.0; x.len()];
        for (i, &g) in dy.iter().enumerate() {
            let (b, co, oy, ox) = (i / (s.c_out * oh * ow), i / (oh * ow) % s.c_out, i / ow % oh, i % ow);
            for (j, &k) in kernel[co * s.c_in * 9..(co + 1) * s.c_in * 9].iter().enumerate() {
                let (ci, ky, kx) = (j / 9, j / 3 % 3, j % 3);
                let (iy, ix) = ((oy * 2 + ky).wrapping_sub(1), (ox * 2 + kx).wrapping_sub(1));
                if iy < s.h && ix < s.w {
                    expected[((b * s.c_in + ci) * s.h + iy) * s.w + ix] += g * k;
                }
            }
        }
        let dx = double(input_grad(&single(&dy), &single(&kernel), &s));
        assert!(max_diff(&dx, &expected) < 1e-4);
    }
}
