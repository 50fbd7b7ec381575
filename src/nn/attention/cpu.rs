//! The f32 and f64 CPU kernels of [`super::attention`], value and input gradients: per (batch,
//! head, block of rows), gemm products reading `q`, `k`, `v` through their strides, with the
//! scale in the products' factor and the softmax and its backward run in place on the rows.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::nn::cpu::gemm::{product, product_add};
use crate::nn::cpu::{cpu_dtype, simd_fn, Disjoint, Element};

/// A batch of matrices of a 4-dimensional tensor, one per (batch, head): matrix `(b, h)` starts
/// at `start + b * batch + h * head`, its entry `(i, j)` is `i * row + j * col` further.
#[derive(Clone, Copy, Debug)]
struct Heads {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
    col: usize,
}

impl Heads {
    /// The matrices of `layout` whose head, row and column dimensions are `head_dim`, `row_dim`
    /// and 3, and batch dimension 0, checked to lie inside `len` values.
    fn of(layout: &Layout, head_dim: usize, row_dim: usize, len: usize) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let extent: usize = dims.iter().zip(stride).map(|(&d, &s)| d.saturating_sub(1) * s).sum();
        if dims.len() != 4 || dims.contains(&0) || layout.start_offset() + extent >= len {
            candle_core::bail!("attention kernel: bad layout {layout:?}")
        }
        let [batch, head, row, col] = [0, head_dim, row_dim, 3].map(|d| stride[d]);
        Ok(Self { start: layout.start_offset(), batch, head, row, col })
    }

    /// The offset of row `i` of matrix `bh` (batch-major index) of a tensor with `heads` heads.
    fn at(&self, bh: usize, heads: usize, i: usize) -> usize {
        self.start + (bh / heads) * self.batch + (bh % heads) * self.head + i * self.row
    }
}

/// Runs `task(matrix, first, len)` for blocks of `len` rows of `matrices` matrices of `rows` rows
/// each, on rayon's pool: blocks of at least [`MIN_BLOCK_ROWS`] rows and at most `max_rows`,
/// about four per thread.
fn for_each_block(matrices: usize, rows: usize, max_rows: usize, task: impl Fn(usize, usize, usize) + Sync) {
    let threads = candle_core::utils::get_num_threads();
    let per_matrix = (4 * threads).div_ceil(matrices).max(1);
    let block = rows.div_ceil(per_matrix).min(max_rows).max(MIN_BLOCK_ROWS).min(rows);
    let blocks = rows.div_ceil(block);
    let run = |t: usize| {
        let (matrix, first) = (t / blocks, (t % blocks) * block);
        task(matrix, first, block.min(rows - first));
    };
    if threads <= 1 {
        (0..matrices * blocks).for_each(run);
    } else {
        (0..matrices * blocks).into_par_iter().for_each(run);
    }
}

/// Rows of a product that one attention task handles at least.
const MIN_BLOCK_ROWS: usize = 32;

/// The most bytes of scores one forward task computes at once: its block of rows is written by
/// one product, normalised in place and read by the next, so it should stay in the cache. At
/// 512 x 512 a whole 4096 x 4096 head is 64 MiB, and a guided UNet step took 14.0 s with whole
/// heads against 12.5 s with blocks of 4 MiB (1 to 8 MiB measured within noise of it).
const SCORE_BLOCK_BYTES: usize = 4 << 20;

/// The probabilities (batch, heads, n, m), when asked to keep them, and the output of scaled
/// dot-product attention for `q` (batch, heads, n, d), `k` (batch, heads, m, d), `v` (batch,
/// heads, m, dv) and an additive `mask` broadcastable to (batch, heads, n, m). The output is laid
/// out (batch, n, heads, dv), so that merging the heads back is free. The inputs are read
/// through their strides (the heads split from a linear layer's output are transposed views);
/// per (batch, head, block of query rows), `s q k^T` is one gemm product (the scale in its
/// factor), the softmax runs in place, and `P v` is written into the output. `None` unless all
/// are CPU tensors of one dtype, f32 or f64.
pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    keep_probs: bool,
) -> Result<Option<(Option<CpuStorage>, CpuStorage)>> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    // Mismatched sizes are left to candle's matmul to report.
    if k.dims() != [b, h, m, d] || v.dims()[..2] != [b, h] || b * h * n * m * d * dv == 0 {
        return Ok(None);
    }
    match cpu_dtype(&[q, k, v]) {
        Some(DType::F32) => forward_typed::<f32>(q, k, v, mask, scale, keep_probs).map(Some),
        Some(DType::F64) => forward_typed::<f64>(q, k, v, mask, scale, keep_probs).map(Some),
        _ => Ok(None),
    }
}

/// `mask` in `T`, broadcast to `shape`, its last dimension contiguous.
fn broadcast_mask<T: Element>(mask: Option<&Tensor>, shape: (usize, usize, usize, usize)) -> Result<Option<Tensor>> {
    let Some(mask) = mask else { return Ok(None) };
    let mask = mask.to_dtype(T::DTYPE)?.to_device(&candle_core::Device::Cpu)?.broadcast_as(shape)?;
    Ok(Some(if mask.stride()[3] == 1 { mask } else { mask.contiguous()? }))
}

fn forward_typed<T: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    keep_probs: bool,
) -> Result<(Option<CpuStorage>, CpuStorage)> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    let mask = broadcast_mask::<T>(mask, (b, h, n, m))?;
    let tensors: Vec<&Tensor> = [q, k, v].into_iter().chain(mask.as_ref()).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention kernel: CPU tensors expected") };
        let values = T::values(cpu)?;
        views.push((values, Heads::of(layout, 1, 2, values.len())?));
    }
    let [(qv, qh), (kv, kh), (vv, vh)] = [views[0], views[1], views[2]];
    let mask = views.get(3).copied();
    let mut probs = if keep_probs { vec![T::ZERO; b * h * n * m] } else { Vec::new() };
    let mut out = vec![T::ZERO; b * n * h * dv];
    let (probs_ptr, out_ptr) = (Disjoint(probs.as_mut_ptr()), Disjoint(out.as_mut_ptr()));
    let max_rows = SCORE_BLOCK_BYTES / (m * size_of::<T>());
    for_each_block(b * h, n, max_rows, |bh, i0, rows| {
        let mut scratch = Vec::new();
        // The task's rows of the probabilities: its own part of `probs`, or a scratch buffer.
        let p = if keep_probs {
            // SAFETY: rows `i0..i0 + rows` of matrix `bh`, which no other task writes.
            unsafe { probs_ptr.at((bh * n + i0) * m) }
        } else {
            scratch.resize(rows * m, T::ZERO);
            scratch.as_mut_ptr()
        };
        let (q0, k0, v0) = (qh.at(bh, h, i0), kh.at(bh, h, 0), vh.at(bh, h, 0));
        // SAFETY: `Heads::of` checked that the views lie in their slices; `p` holds `rows * m`
        // values that only this task uses; the output rows `i0..i0 + rows` of head `bh % h` of
        // batch `bh / h` are written by this task only.
        unsafe {
            let (qp, kp, vp) = (qv.as_ptr().add(q0), kv.as_ptr().add(k0), vv.as_ptr().add(v0));
            product((rows, m, d), (p, m, 1), (qp, qh.row, qh.col), (kp, kh.col, kh.row), scale);
            let p_rows = std::slice::from_raw_parts_mut(p, rows * m);
            for (i, row) in p_rows.chunks_exact_mut(m).enumerate() {
                let mask_row = mask.map_or(&[][..], |(values, heads)| &values[heads.at(bh, h, i0 + i)..][..m]);
                softmax_row(row, mask_row);
            }
            let o = out_ptr.at(((bh / h) * n + i0) * h * dv + (bh % h) * dv);
            product((rows, dv, m), (o, h * dv, 1), (p, m, 1), (vp, vh.row, vh.col), 1.0);
        }
    });
    Ok((keep_probs.then(|| T::storage(probs)), T::storage(out)))
}

simd_fn! {
    /// `row + mask` (no mask when it is empty), then its softmax, in place.
    fn softmax_row<T>(row: &mut [T], mask: &[T]) {
        if !mask.is_empty() {
            for (s, &a) in row.iter_mut().zip(mask) {
                *s += a;
            }
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |max, s| max.max(s.wide()));
        let mut sums = [0.0f64; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (s, sum) in chunk.iter_mut().zip(&mut sums) {
                let e = T::exp(s.wide() - max);
                *s = T::narrow(e);
                *sum += e;
            }
        }
        for (s, sum) in chunks.into_remainder().iter_mut().zip(&mut sums) {
            let e = T::exp(s.wide() - max);
            *s = T::narrow(e);
            *sum += e;
        }
        let inv = T::narrow(1.0 / sums.iter().sum::<f64>());
        for s in row.iter_mut() {
            *s = *s * inv;
        }
    }
}

simd_fn! {
    /// The softmax backward of one row: the gradient of the probabilities `dp` becomes that of
    /// the scores, `p * (dp - sum(p * dp))`.
    fn softmax_grad_row<T>(dp: &mut [T], p: &[T]) {
        let mut dots = [0.0f64; 8];
        let full = dp.len() / 8 * 8;
        for (dp, p) in dp[..full].chunks_exact(8).zip(p[..full].chunks_exact(8)) {
            for i in 0..8 {
                dots[i] += dp[i].wide() * p[i].wide();
            }
        }
        for (j, (dp, p)) in dp[full..].iter().zip(&p[full..]).enumerate() {
            dots[j] += dp.wide() * p.wide();
        }
        let dot = T::narrow(dots.iter().sum());
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = p * (*dp - dot);
        }
    }
}

/// The gradients `[dq, dk, dv]` of [`forward`] (each where `needed`, laid out as its input,
/// contiguous) from its probabilities `probs` (batch, heads, n, m) and the output gradient `grad`
/// (batch, n, heads, dv), the layout of [`forward`]'s output: `dv = P^T dO`, `dP = dO v^T`,
/// `dS = P * (dP - rowsum(dP * P))`, `dq = s dS k`, `dk = s dS^T q`, each a gemm product per
/// (batch, head, block of rows of the result) reading its operands through their strides.
/// `None` where [`forward`] is.
pub(super) fn input_grad(
    [q, k, v]: [&Tensor; 3],
    probs: &Tensor,
    grad: &Tensor,
    scale: f64,
    needed: [bool; 3],
) -> Result<Option<[Option<CpuStorage>; 3]>> {
    match cpu_dtype(&[q, k, v, probs]) {
        Some(DType::F32) => input_grad_typed::<f32>([q, k, v], probs, grad, scale, needed).map(Some),
        Some(DType::F64) => input_grad_typed::<f64>([q, k, v], probs, grad, scale, needed).map(Some),
        _ => Ok(None),
    }
}

/// Query rows whose probabilities [`input_grad_recomputed`] recomputes at once.
const RECOMPUTED_ROWS: usize = 128;

/// [`input_grad`] without the probabilities: they are computed again from `q`, `k` and `mask`,
/// [`RECOMPUTED_ROWS`] query rows at a time, so that the backward never holds the (n x m)
/// matrices (at 512 x 512 a self-attention of the UNet's first level has 5 x 4096 x 4096 of
/// them, 335 MB, in each of five layers). Per (batch, head), in one task: for each block of rows,
/// `P` again, `dv += P^T dO`, `dS` from `dP = dO v^T`, its rows of `dq = s dS k`, and
/// `dk += s dS^T q`.
pub(super) fn input_grad_recomputed(
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
    grad: &Tensor,
    scale: f64,
    needed: [bool; 3],
) -> Result<Option<[Option<CpuStorage>; 3]>> {
    match cpu_dtype(&[q, k, v]) {
        Some(DType::F32) => input_grad_recomputed_typed::<f32>([q, k, v], mask, grad, scale, needed).map(Some),
        Some(DType::F64) => input_grad_recomputed_typed::<f64>([q, k, v], mask, grad, scale, needed).map(Some),
        _ => Ok(None),
    }
}

fn input_grad_recomputed_typed<T: Element>(
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
    grad: &Tensor,
    scale: f64,
    [need_q, need_k, need_v]: [bool; 3],
) -> Result<[Option<CpuStorage>; 3]> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    let grad = grad.to_dtype(T::DTYPE)?.to_device(&candle_core::Device::Cpu)?;
    if grad.dims() != [b, n, h, dv] || k.dims() != [b, h, m, d] {
        candle_core::bail!("attention kernel: gradient shape {:?}", grad.shape())
    }
    let mask = broadcast_mask::<T>(mask, (b, h, n, m))?;
    let tensors: Vec<&Tensor> = [q, k, v, &grad].into_iter().chain(mask.as_ref()).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (i, (storage, layout)) in guards.iter().enumerate() {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention kernel: CPU tensors expected") };
        let values = T::values(cpu)?;
        // The output gradient has its heads in dimension 2.
        let (head_dim, row_dim) = if i == 3 { (2, 1) } else { (1, 2) };
        views.push((values, Heads::of(layout, head_dim, row_dim, values.len())?));
    }
    let [(qv, qh), (kv, kh), (vv, vh), (gv, gh)] = [views[0], views[1], views[2], views[3]];
    let mask = views.get(4).copied();
    let mut dq = vec![T::ZERO; if need_q { b * h * n * d } else { 0 }];
    let mut dk = vec![T::ZERO; if need_k { b * h * m * d } else { 0 }];
    let mut dv_out = vec![T::ZERO; if need_v { b * h * m * dv } else { 0 }];
    let (dq_ptr, dk_ptr, dv_ptr) =
        (Disjoint(dq.as_mut_ptr()), Disjoint(dk.as_mut_ptr()), Disjoint(dv_out.as_mut_ptr()));
    let task = |bh: usize| {
        let mut p = vec![T::ZERO; RECOMPUTED_ROWS.min(n) * m];
        let mut ds = vec![T::ZERO; p.len()];
        // SAFETY: `Heads::of` checked that the views lie in their slices; this task alone writes
        // matrix `bh` of dq, dk and dv, and `p` and `ds` are its own.
        unsafe {
            let (kp, vp) = (kv.as_ptr().add(kh.at(bh, h, 0)), vv.as_ptr().add(vh.at(bh, h, 0)));
            for i0 in (0..n).step_by(RECOMPUTED_ROWS) {
                let rows = RECOMPUTED_ROWS.min(n - i0);
                let (p, ds) = (&mut p[..rows * m], &mut ds[..rows * m]);
                let (qp, g) = (qv.as_ptr().add(qh.at(bh, h, i0)), gv.as_ptr().add(gh.at(bh, h, i0)));
                product((rows, m, d), (p.as_mut_ptr(), m, 1), (qp, qh.row, qh.col), (kp, kh.col, kh.row), scale);
                for (i, row) in p.chunks_exact_mut(m).enumerate() {
                    let mask_row = mask.map_or(&[][..], |(values, heads)| &values[heads.at(bh, h, i0 + i)..][..m]);
                    softmax_row(row, mask_row);
                }
                if need_v {
                    let dst = dv_ptr.at(bh * m * dv);
                    product_add((m, dv, rows), (dst, dv, 1), (p.as_ptr(), 1, m), (g, gh.row, gh.col), 1.0);
                }
                if !need_q && !need_k {
                    continue;
                }
                product((rows, m, dv), (ds.as_mut_ptr(), m, 1), (g, gh.row, gh.col), (vp, vh.col, vh.row), 1.0);
                for (ds_row, p_row) in ds.chunks_exact_mut(m).zip(p.chunks_exact(m)) {
                    softmax_grad_row(ds_row, p_row);
                }
                if need_q {
                    let dst = dq_ptr.at((bh * n + i0) * d);
                    product((rows, d, m), (dst, d, 1), (ds.as_ptr(), m, 1), (kp, kh.row, kh.col), scale);
                }
                if need_k {
                    let dst = dk_ptr.at(bh * m * d);
                    product_add((m, d, rows), (dst, d, 1), (ds.as_ptr(), 1, m), (qp, qh.row, qh.col), scale);
                }
            }
        }
    };
    if candle_core::utils::get_num_threads() <= 1 {
        (0..b * h).for_each(task);
    } else {
        (0..b * h).into_par_iter().for_each(task);
    }
    let keep = |needed: bool, values: Vec<T>| needed.then(|| T::storage(values));
    Ok([keep(need_q, dq), keep(need_k, dk), keep(need_v, dv_out)])
}

fn input_grad_typed<T: Element>(
    [q, k, v]: [&Tensor; 3],
    probs: &Tensor,
    grad: &Tensor,
    scale: f64,
    [need_q, need_k, need_v]: [bool; 3],
) -> Result<[Option<CpuStorage>; 3]> {
    let ((b, h, n, d), (_, _, m, dv)) = (q.dims4()?, v.dims4()?);
    let (probs, grad) = (probs.contiguous()?, grad.to_dtype(T::DTYPE)?.to_device(&candle_core::Device::Cpu)?);
    if probs.dims() != [b, h, n, m] || grad.dims() != [b, n, h, dv] || k.dims() != [b, h, m, d] {
        candle_core::bail!("attention kernel: gradient shapes {:?}, {:?}", probs.shape(), grad.shape())
    }
    let guards: Vec<_> = [q, k, v, &probs, &grad].iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(guards.len());
    for (i, (storage, layout)) in guards.iter().enumerate() {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("attention kernel: CPU tensors expected") };
        let values = T::values(cpu)?;
        // The output gradient has its heads in dimension 2.
        let (head_dim, row_dim) = if i == 4 { (2, 1) } else { (1, 2) };
        views.push((values, Heads::of(layout, head_dim, row_dim, values.len())?));
    }
    let [(qv, qh), (kv, kh), (vv, vh), (pv, ph), (gv, gh)] = [views[0], views[1], views[2], views[3], views[4]];
    // SAFETY (all products below): `Heads::of` checked that the views lie in their slices, and
    // each task writes only its own block of rows of its own (batch, head) matrix of a fresh
    // buffer.
    let dv_out = need_v.then(|| {
        let mut dv_out = vec![T::ZERO; b * h * m * dv];
        let ptr = Disjoint(dv_out.as_mut_ptr());
        for_each_block(b * h, m, usize::MAX, |bh, j0, rows| unsafe {
            let (p, g) = (pv.as_ptr().add(ph.at(bh, h, 0) + j0 * ph.col), gv.as_ptr().add(gh.at(bh, h, 0)));
            let dst = ptr.at((bh * m + j0) * dv);
            product((rows, dv, n), (dst, dv, 1), (p, ph.col, ph.row), (g, gh.row, gh.col), 1.0);
        });
        T::storage(dv_out)
    });
    if !need_q && !need_k {
        return Ok([None, None, dv_out]);
    }
    // `dS / s`, then `dq` from its rows.
    let mut ds = vec![T::ZERO; b * h * n * m];
    let mut dq = vec![T::ZERO; if need_q { b * h * n * d } else { 0 }];
    let (ds_ptr, dq_ptr) = (Disjoint(ds.as_mut_ptr()), Disjoint(dq.as_mut_ptr()));
    for_each_block(b * h, n, usize::MAX, |bh, i0, rows| unsafe {
        let dst = ds_ptr.at((bh * n + i0) * m);
        let (g, vp) = (gv.as_ptr().add(gh.at(bh, h, i0)), vv.as_ptr().add(vh.at(bh, h, 0)));
        product((rows, m, dv), (dst, m, 1), (g, gh.row, gh.col), (vp, vh.col, vh.row), 1.0);
        let ds_rows = std::slice::from_raw_parts_mut(dst, rows * m);
        for (i, row) in ds_rows.chunks_exact_mut(m).enumerate() {
            softmax_grad_row(row, &pv[ph.at(bh, h, i0 + i)..][..m]);
        }
        if need_q {
            let kp = kv.as_ptr().add(kh.at(bh, h, 0));
            let dst = dq_ptr.at((bh * n + i0) * d);
            product((rows, d, m), (dst, d, 1), (ds_rows.as_ptr(), m, 1), (kp, kh.row, kh.col), scale);
        }
    });
    let dk = need_k.then(|| {
        let mut dk = vec![T::ZERO; b * h * m * d];
        let ptr = Disjoint(dk.as_mut_ptr());
        let ds = &ds;
        for_each_block(b * h, m, usize::MAX, |bh, j0, rows| unsafe {
            let (s, qp) = (ds.as_ptr().add(bh * n * m + j0), qv.as_ptr().add(qh.at(bh, h, 0)));
            let dst = ptr.at((bh * m + j0) * d);
            product((rows, d, n), (dst, d, 1), (s, 1, m), (qp, qh.row, qh.col), scale);
        });
        T::storage(dk)
    });
    Ok([need_q.then(|| T::storage(dq)), dk, dv_out])
}
