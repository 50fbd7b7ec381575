//! Scaled dot-product [`attention`] as one graph node over `(q, k, v)`, keeping the
//! probabilities (on the CPU, up to 64 MiB of them; larger ones are computed again in the
//! backward, block by block): `q` is scaled rather than the (seq x seq) scores, the softmax
//! backward runs in place, and only the gradients of the inputs that need one are computed. On the CPU (f32 and
//! f64) value and gradients are gemm products per block of rows with the softmax fused in
//! (`cpu.rs`); elsewhere, candle's ops. And [`softmax_last_dim`], a softmax that candle's autograd
//! differentiates (candle's fused one carries no backward).

mod cpu;
#[cfg(all(test, feature = "cuda"))]
mod cuda_checks;

use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp2, Layout, MetalStorage, Result, Shape, Tensor, WithDType, D,
};

use super::compute_dtype;
use super::node::{frozen, Precomputed};
use super::profile;
use crate::nn::cpu::cpu_tensor;

/// Softmax over the last dimension, built from differentiable ops (usable on trainable inputs).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Scaled dot-product attention on `(batch, heads, seq, head_dim)` tensors; `mask` is added to
/// the scores (use large negative values to hide positions). Scores and softmax are computed in
/// `compute_dtype` of `q` (pass `q` and `k` in f32 to upcast a half-precision model's
/// attention), except on CUDA: there a half-precision product gives half-precision scores either
/// way, and candle's CUDA softmax computes in f32 inside, so the scores and probabilities stay
/// in half precision, sparing two conversions of the (seq x seq) matrices and half of what the
/// backward keeps (the backward computes in f32); the result has the dtype of `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    attention_keeping(q, k, v, mask, KEPT_PROBS_BYTES)
}

/// The most bytes of probabilities the CPU kernel keeps for the backward; larger ones (the
/// self-attentions over many latents) are computed again in the backward, block by block.
const KEPT_PROBS_BYTES: usize = 64 << 20;

/// [`attention`], keeping the CPU kernel's probabilities for the backward up to `kept_bytes`.
fn attention_keeping(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, kept_bytes: usize) -> Result<Tensor> {
    profile::timed("attention", q.device(), || {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        if !frozen([mask]) {
            return composite_attention(q, k, v, mask, scale);
        }
        let tracked = !frozen([Some(q), Some(k), Some(v)]);
        let ((b, h, n, _), (m, dv)) = (q.dims4()?, (k.dim(2)?, v.dim(3)?));
        let keep = tracked && b * h * n * m * q.dtype().size_in_bytes() <= kept_bytes;
        let kernel = cpu::forward(&q.detach(), &k.detach(), &v.detach(), mask, scale, keep)?;
        if let Some((probs, out)) = kernel {
            // The kernel's output is laid out (batch, n, heads, dv): viewed as (batch, heads, n, dv).
            let heads_last = Shape::from((b, n, h, dv));
            let out = if tracked {
                let kept = match probs {
                    Some(probs) => KernelProbs::Kept(cpu_tensor(probs, (b, h, n, m))?),
                    None => KernelProbs::Recomputed { mask: mask.cloned() },
                };
                let out = Precomputed::computed(out, heads_last);
                q.apply_op3(k, v, AttentionNode { out, probs: Probs::Kernel(kept), scale })?
            } else {
                cpu_tensor(out, heads_last)?
            };
            return out.transpose(1, 2);
        }
        if !tracked {
            return Ok(attention_probs_and_output(q, k, v, mask, scale)?.1);
        }
        let (probs, out) = attention_probs_and_output(&q.detach(), &k.detach(), &v.detach(), mask, scale)?;
        q.apply_op3(k, v, AttentionNode { out: Precomputed::new(out, None), probs: Probs::Composite(probs), scale })
    })
}

/// The attention probabilities (in the compute dtype) and output.
fn attention_probs_and_output(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let compute = if q.device().is_cuda() { q.dtype() } else { compute_dtype(q.dtype()) };
    let scores = (q * scale)?.matmul(&k.contiguous()?.t()?)?.to_dtype(compute)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(compute)?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
    Ok((probs, out))
}

/// Attention from differentiable ops, for a trainable mask.
fn composite_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let compute = compute_dtype(q.dtype());
    let scores = (q * scale)?.matmul(&k.contiguous()?.t()?)?.to_dtype(compute)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(compute)?)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.to_dtype(v.dtype())?.matmul(&v.contiguous()?)
}

/// The softmax backward along rows, in place on the CPU: the gradient of the probabilities `dp`
/// becomes that of the scores, `p * (dp - sum(p * dp))` (one pass, no allocation).
struct SoftmaxGradInPlace;

impl InplaceOp2 for SoftmaxGradInPlace {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(&self, dp: &mut CpuStorage, dp_layout: &Layout, p: &CpuStorage, p_layout: &Layout) -> Result<()> {
        match (dp, p) {
            (CpuStorage::F32(dp), CpuStorage::F32(p)) => softmax_grad_rows(dp, dp_layout, p, p_layout),
            (CpuStorage::F64(dp), CpuStorage::F64(p)) => softmax_grad_rows(dp, dp_layout, p, p_layout),
            _ => candle_core::bail!("softmax-grad: f32 or f64 tensors of one dtype expected"),
        }
    }
}

fn softmax_grad_rows<T: WithDType>(dp: &mut [T], dp_layout: &Layout, p: &[T], p_layout: &Layout) -> Result<()> {
    let (Some((dp_start, dp_end)), Some((p_start, p_end))) =
        (dp_layout.contiguous_offsets(), p_layout.contiguous_offsets())
    else {
        candle_core::bail!("softmax-grad: contiguous tensors expected")
    };
    let (dp, p) = (&mut dp[dp_start..dp_end], &p[p_start..p_end]);
    let width = *dp_layout.dims().last().unwrap_or(&1);
    let rows_per_thread = (dp.len() / width.max(1)).div_ceil(candle_core::utils::get_num_threads()).max(1);
    std::thread::scope(|scope| {
        for (dp, p) in dp.chunks_mut(rows_per_thread * width).zip(p.chunks(rows_per_thread * width)) {
            scope.spawn(move || {
                for (dp, p) in dp.chunks_mut(width).zip(p.chunks(width)) {
                    let mut dot = T::from_f64(0.0);
                    for (&p, &dp) in p.iter().zip(dp.iter()) {
                        dot += p * dp;
                    }
                    for (dp, &p) in dp.iter_mut().zip(p) {
                        *dp = p * (*dp - dot);
                    }
                }
            });
        }
    });
    Ok(())
}

/// `P * (dP - rowsum(dO * O))` from candle ops, where [`SoftmaxGradInPlace`] does not run.
fn softmax_grad_composite(probs: &Tensor, d_probs: &Tensor, grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    let row_dot = (grad * out)?.sum_keepdim(D::Minus1)?;
    d_probs.broadcast_sub(&row_dot)? * probs
}

/// Attention as one node over `(q, k, v)`, with what its backward needs of the probabilities.
struct AttentionNode {
    out: Precomputed,
    probs: Probs,
    scale: f64,
}

enum Probs {
    /// [`cpu::forward`] computed the value, laid out (batch, n, heads, dv): the backward is
    /// [`cpu::input_grad`] or [`cpu::input_grad_recomputed`].
    Kernel(KernelProbs),
    /// Candle's ops computed the value; the probabilities in the compute dtype.
    Composite(Tensor),
}

enum KernelProbs {
    Kept(Tensor),
    /// Too large to keep: computed again from `q`, `k` and the mask.
    Recomputed {
        mask: Option<Tensor>,
    },
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "frozen-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.hand_over()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.out.hand_over()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.out.hand_over()
    }

    /// With `S = s q k^T + mask`, `P = softmax(S)`, `O = P v`: `dv = P^T dO`, `dP = dO v^T`,
    /// `dS = P * (dP - rowsum(dP * P))` (in one pass on the CPU; elsewhere with
    /// `rowsum(dP * P) = rowsum(dO * O)`, a (seq x head_dim) product), `dq = s dS k`,
    /// `dk = s dS^T q`; only for the inputs that need a gradient.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::timed("attention backward", q.device(), || {
            let probs = match &self.probs {
                Probs::Kernel(kept) => {
                    let needed = [q.track_op(), k.track_op(), v.track_op()];
                    let grads = match kept {
                        KernelProbs::Kept(probs) => cpu::input_grad([q, k, v], probs, grad, self.scale, needed)?,
                        KernelProbs::Recomputed { mask } => {
                            cpu::input_grad_recomputed([q, k, v], mask.as_ref(), grad, self.scale, needed)?
                        }
                    };
                    let Some([dq, dk, dv]) = grads else {
                        candle_core::bail!("attention backward: the CPU kernel's node has non-CPU inputs")
                    };
                    let grad_of = |g: Option<CpuStorage>, x: &Tensor| g.map(|g| cpu_tensor(g, x.shape())).transpose();
                    return Ok((grad_of(dq, q)?, grad_of(dk, k)?, grad_of(dv, v)?));
                }
                Probs::Composite(probs) => probs,
            };
            let compute = compute_dtype(probs.dtype());
            let probs = probs.to_dtype(compute)?;
            let grad_c = grad.to_dtype(compute)?;
            let dv = if v.track_op() { Some(probs.t()?.matmul(&grad_c)?.to_dtype(v.dtype())?) } else { None };
            if !q.track_op() && !k.track_op() {
                return Ok((None, None, dv));
            }
            let v_c = v.detach().to_dtype(compute)?.contiguous()?;
            // `dS / s`: the scale goes onto the (seq x head_dim) products, not the (seq x seq) matrix.
            let d_probs = grad_c.matmul(&v_c.t()?)?;
            let d_scores = if d_probs.device().is_cpu() && matches!(compute, DType::F32 | DType::F64) {
                // `d_probs` is this function's own: it becomes `dS` in place.
                d_probs.inplace_op2(&probs, &SoftmaxGradInPlace)?;
                d_probs
            } else {
                softmax_grad_composite(&probs, &d_probs, &grad_c, &out.detach().to_dtype(compute)?)?
            };
            let dq = if q.track_op() {
                let k_c = k.detach().to_dtype(compute)?.contiguous()?;
                Some((d_scores.matmul(&k_c)? * self.scale)?.to_dtype(q.dtype())?)
            } else {
                None
            };
            let dk = if k.track_op() {
                let q_c = q.detach().to_dtype(compute)?.contiguous()?;
                Some((d_scores.t()?.matmul(&q_c)? * self.scale)?.to_dtype(k.dtype())?)
            } else {
                None
            };
            Ok((dq, dk, dv))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::nn::test_values::{max_diff, rel_diff, spread_tensor};
    use candle_core::{DType, Device, Tensor};

    use candle_core::Var;

    use super::{
        attention_keeping, attention_probs_and_output, composite_attention, softmax_grad_composite, SoftmaxGradInPlace,
    };

    fn values(shape: (usize, usize), seed: u64) -> Tensor {
        spread_tensor(shape, seed, -2.0, 4.0, DType::F64)
    }

    /// The attention backward's softmax step: in place on the CPU, composite elsewhere.
    #[test]
    fn composite_softmax_gradient_matches_the_in_place_one() {
        let (q, k, v) = (values((5, 4), 4).reshape((1, 1, 5, 4)).unwrap(), values((6, 4), 5), values((6, 4), 6));
        let (k, v) = (k.reshape((1, 1, 6, 4)).unwrap(), v.reshape((1, 1, 6, 4)).unwrap());
        let (probs, out) = attention_probs_and_output(&q, &k, &v, None, 0.5).unwrap();
        let grad = values((5, 4), 7).reshape((1, 1, 5, 4)).unwrap();
        let d_probs = grad.matmul(&v.t().unwrap()).unwrap();
        let composite = softmax_grad_composite(&probs, &d_probs, &grad, &out).unwrap();
        d_probs.inplace_op2(&probs, &SoftmaxGradInPlace).unwrap();
        assert!(max_diff(&d_probs, &composite) < 1e-14);
    }

    /// `(batch, seq, heads, head_dim)` values viewed as `(batch, heads, seq, head_dim)`, as the
    /// models split heads.
    fn split_heads(batch: usize, seq: usize, heads: usize, head_dim: usize, seed: u64, dtype: DType) -> Var {
        let t = values((batch * seq, heads * head_dim), seed).to_dtype(dtype).unwrap();
        Var::from_tensor(&t.reshape((batch, seq, heads, head_dim)).unwrap()).unwrap()
    }

    /// The value and the gradients of `sum(attention * dy)` with respect to the tracked ones of
    /// `q`, `k`, `v` (given as `(batch, seq, heads, head_dim)` variables).
    fn attention_and_grads(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        vars: [&Var; 3],
        tracked: [bool; 3],
        dy: &Tensor,
    ) -> (Tensor, Vec<Option<Tensor>>) {
        let inputs: Vec<Tensor> = vars
            .iter()
            .zip(tracked)
            .map(|(v, t)| {
                let t = if t { v.as_tensor().clone() } else { v.as_tensor().detach() };
                t.transpose(1, 2).unwrap()
            })
            .collect();
        let out = f(&inputs[0], &inputs[1], &inputs[2]);
        if !tracked.contains(&true) {
            return (out, vec![None; 3]);
        }
        let grads = (&out * dy).unwrap().sum_all().unwrap().backward().unwrap();
        (out.detach(), vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect())
    }

    /// The CPU attention kernels against the composite attention (candle's matmul, softmax and
    /// autograd): values and gradients, f32 and f64, self- and cross-attention, with a mask,
    /// with each input tracked or not, the probabilities kept or computed again in the backward,
    /// and sizes that split into several blocks of rows (130 query rows: two recomputed blocks).
    #[test]
    fn attention_kernels_match_the_composite_attention() {
        for dtype in [DType::F32, DType::F64] {
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
            for (batch, heads, n, m, head_dim, masked) in
                [(2, 3, 70, 70, 8, false), (1, 2, 130, 45, 16, false), (2, 4, 77, 77, 8, true), (1, 1, 5, 3, 4, true)]
            {
                let q = split_heads(batch, n, heads, head_dim, 1, dtype);
                let k = split_heads(batch, m, heads, head_dim, 2, dtype);
                let v = split_heads(batch, m, heads, head_dim, 3, dtype);
                // A causal mask (as the text encoder's) broadcast over batch and heads.
                let mask = masked.then(|| {
                    let causal: Vec<f64> =
                        (0..n * m).map(|i| if i % m > i / m { f64::NEG_INFINITY } else { 0.0 }).collect();
                    Tensor::from_vec(causal, (n, m), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
                });
                let dy = values((batch * heads * n, head_dim), 4).to_dtype(dtype).unwrap();
                let dy = dy.reshape((batch, heads, n, head_dim)).unwrap();
                let scale = 1.0 / (head_dim as f64).sqrt();
                for tracked in [[true; 3], [false, true, true], [true, false, false], [false; 3]] {
                    for kept_bytes in [usize::MAX, 0] {
                        let kernel = |q: &Tensor, k: &Tensor, v: &Tensor| {
                            attention_keeping(q, k, v, mask.as_ref(), kept_bytes).unwrap()
                        };
                        let composite = |q: &Tensor, k: &Tensor, v: &Tensor| {
                            composite_attention(q, k, v, mask.as_ref(), scale).unwrap()
                        };
                        let (out, grads) = attention_and_grads(kernel, [&q, &k, &v], tracked, &dy);
                        let (out_ref, grads_ref) = attention_and_grads(composite, [&q, &k, &v], tracked, &dy);
                        let recomputed = kept_bytes == 0;
                        let case = format!(
                        "{dtype:?} {batch}x{heads}x{n}x{m}x{head_dim} mask {masked} {tracked:?} recomputed {recomputed}"
                    );
                        assert!(rel_diff(&out, &out_ref) < tolerance, "{case}: value {:e}", rel_diff(&out, &out_ref));
                        for (i, (g, g_ref)) in grads.iter().zip(&grads_ref).enumerate() {
                            match (g, g_ref) {
                                (Some(g), Some(g_ref)) => {
                                    let diff = rel_diff(g, g_ref);
                                    assert!(diff < 10.0 * tolerance, "{case}: gradient {i} {diff:e}");
                                }
                                (None, None) => {}
                                _ => panic!("{case}: gradient {i} present in one only"),
                            }
                        }
                    }
                }
            }
        }
    }
}
