//! Differentiable ops whose backward computes only what training through frozen models needs.
//!
//! candle's autograd computes, for every `matmul`, `conv2d` and binary op, the gradient of both
//! operands, even when one is a frozen constant: for a frozen UNet that is about a third more
//! backward work, and every such gradient is kept in the `GradStore` until it is dropped
//! (docs/candle.md, sections 3 and 5). The ops here are candle custom ops whose backward returns the
//! input gradient only, and whose graph node keeps only what that gradient needs:
//!
//! - [`linear`]: `dx = dy W`, no `dW`, no `db` (on the CPU, one `gemm` call for `x W^T + b`,
//!   [`super::cpu_kernels::linear`]);
//! - [`conv2d`]: value and input gradient from [`super::conv`] (im2col + gemm on the CPU,
//!   cuDNN with the fastest algorithm per shape on CUDA), no kernel gradient;
//! - [`group_norm`], [`layer_norm`]: one node per norm; the backward recomputes the
//!   statistics from the input instead of keeping five intermediate tensors (fused kernels for
//!   f32 / f64 on the CPU, [`super::cpu_kernels`], and on CUDA);
//! - [`attention`]: one node keeping the probabilities; `q` is scaled rather than the
//!   (seq x seq) scores, the softmax backward runs in place, and only the gradients of the
//!   inputs that need one are computed;
//! - [`add`]: `a + b` with a frozen `b` (e.g. the time embedding), without a gradient for `b`;
//! - [`silu`], [`gelu_erf`], [`geglu`]: one node each, value and derivative computed in one pass
//!   over the input on the CPU by [`super::cpu_kernels`] (candle's own backward of these takes
//!   about ten passes and, for GEGLU, pads both halves back to full size).
//!
//! Each op computes its value on detached inputs, with ordinary candle ops or the CPU kernels,
//! then hands it to the custom op, adding the bias on the way, so that there is no extra copy.
//! When no input is tracked (inference) the plain value is returned and no graph is built; when
//! a weight is trainable (a `Var`, or computed from one) the op falls back to candle's own
//! differentiable ops.

use std::sync::Mutex;

use super::cpu_kernels::{self, Activation};
use super::{conv, profile};

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Device, InplaceOp2, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, WithDType, D,
};

/// The precision norms and softmax compute in: half precisions are upcast to f32 (their range
/// is too small for variances and exponentials); f32 and f64 are kept.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Whether none of `tensors` needs a gradient.
fn frozen<'a>(tensors: impl IntoIterator<Item = Option<&'a Tensor>>) -> bool {
    tensors.into_iter().flatten().all(|t| !t.track_op())
}

/// `x W^T + b` for `x` (rows, in), `weight` (out, in), `bias` (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    profile::timed("linear", x.device(), || {
        if frozen([Some(weight), bias]) {
            if let Some(y) = cpu_kernels::linear(&x.detach(), weight, bias)? {
                let shape = Shape::from((x.dim(0)?, weight.dim(0)?));
                if !x.track_op() {
                    return cpu_tensor(y, shape);
                }
                return x.apply_op1(Node::computed(y, shape, LinearGrad { weight: weight.clone() }));
            }
        }
        let value = |x: &Tensor| x.matmul(&weight.t()?);
        if !x.track_op() || !frozen([Some(weight), bias]) {
            let y = value(x)?;
            return match bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let grad = LinearGrad { weight: weight.clone() };
        x.apply_op1(Node::new(value(&x.detach())?, bias.cloned(), grad))
    })
}

/// `torch.nn.functional.conv2d` with square padding and stride, no dilation, one group;
/// `x` (batch, in, h, w), `weight` (out, in, kh, kw), `bias` (out).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    profile::timed("conv2d", x.device(), || {
        let channel_bias = |b: &Tensor| b.reshape((b.dim(0)?, 1, 1));
        if !frozen([Some(weight), bias]) {
            let y = x.conv2d(weight, padding, stride, 1, 1)?;
            return match bias {
                Some(b) => y.broadcast_add(&channel_bias(b)?),
                None => Ok(y),
            };
        }
        let y = conv::forward(x, weight, padding, stride)?;
        let bias = bias.map(channel_bias).transpose()?;
        if !x.track_op() {
            return match bias {
                Some(b) => y.broadcast_add(&b),
                None => Ok(y),
            };
        }
        let (_, _, h, w) = x.dims4()?;
        let grad = Conv2dGrad { weight: weight.clone(), padding, stride, input_size: (h, w) };
        x.apply_op1(Node::new(y, bias, grad))
    })
}

/// Group normalisation of `x` (batch, channels, ...) with a per-channel affine map; statistics
/// and the affine map in [`compute_dtype`], the result in the dtype of `x`.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: input {:?} does not split into {groups} groups of channels", x.shape())
    }
    let mut channel = vec![1; dims.len()];
    channel[1] = dims[1];
    let stats_shape = vec![dims[0], groups, x.elem_count() / (dims[0] * groups)];
    norm(x, stats_shape, groups, &weight.reshape(channel.as_slice())?, &bias.reshape(channel.as_slice())?, eps)
}

/// Layer normalisation over the last dimension; statistics and the affine map in
/// [`compute_dtype`], the result in the dtype of `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let stats_shape = x.dims().to_vec();
    norm(x, stats_shape, 1, weight, bias, eps)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance, as PyTorch's norms).
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// A normalisation: `x` viewed as rows of `n` values, each row normalised, then value `col` of
/// row `row` scaled and shifted by channel `(row % groups) * (channels / groups) + col / inner`
/// with `inner = n * groups / channels` (group norm: `channels / groups` channels of `h * w`
/// values per row; layer norm: one group, a channel per value).
#[derive(Debug, Clone, Copy)]
pub(super) struct NormSpec {
    pub n: usize,
    pub groups: usize,
    pub eps: f64,
}

impl NormSpec {
    /// `(channels per row, values per channel)` for an affine map of `channels`, if it fits.
    pub(super) fn split(&self, channels: usize) -> Option<(usize, usize)> {
        let per_row = channels / self.groups.max(1);
        let fits = self.groups > 0 && channels.is_multiple_of(self.groups) && per_row > 0;
        (fits && self.n.is_multiple_of(per_row)).then(|| (per_row, self.n / per_row))
    }
}

/// Normalises `x` viewed as `stats_shape` over its last dimension, then `* weight + bias`
/// (both broadcastable to `x`, in the compute dtype; `groups` consecutive rows of `stats_shape`
/// share none of their channels, 1 for a layer norm).
fn norm(
    x: &Tensor,
    stats_shape: Vec<usize>,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    profile::timed("norm", x.device(), || {
        let (dtype, compute) = (x.dtype(), weight.dtype());
        let n = *stats_shape.last().expect("a norm has a dimension to normalise");
        let spec = NormSpec { n, groups, eps };
        let scaled = |x: &Tensor| {
            normalize_last_dim(&x.to_dtype(compute)?.reshape(stats_shape.as_slice())?, eps)?
                .reshape(x.shape())?
                .broadcast_mul(weight)
        };
        if !frozen([Some(weight), Some(bias)]) {
            return scaled(x)?.broadcast_add(bias)?.to_dtype(dtype);
        }
        #[cfg(feature = "cuda")]
        if let Some(y) = super::norm_cuda::forward(&x.detach(), weight, bias, spec)? {
            if !x.track_op() {
                return Ok(y);
            }
            return x.apply_op1(Node::new(y, None, NormGrad { stats_shape, weight: weight.clone(), spec }));
        }
        if let Some(y) = cpu_kernels::norm(&x.detach(), weight, bias, spec)? {
            if !x.track_op() {
                return cpu_tensor(y, x.shape());
            }
            let grad = NormGrad { stats_shape, weight: weight.clone(), spec };
            return x.apply_op1(Node::computed(y, x.shape().clone(), grad));
        }
        if !x.track_op() {
            return scaled(x)?.broadcast_add(bias)?.to_dtype(dtype);
        }
        let scaled_x = scaled(&x.detach())?;
        let grad = NormGrad { stats_shape, weight: weight.clone(), spec };
        let node = if compute == dtype {
            Node::new(scaled_x, Some(bias.clone()), grad)
        } else {
            Node::new(scaled_x.broadcast_add(bias)?.to_dtype(dtype)?, None, grad)
        };
        x.apply_op1(node)
    })
}

/// `a + b` where `b` broadcasts to the shape of `a`: when `b` is frozen and `a` is tracked, the
/// backward passes the gradient to `a` only.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.track_op() || b.track_op() {
        return a.broadcast_add(b);
    }
    a.apply_op1(Node::new(a.detach(), Some(b.clone()), AddGrad))
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::Silu, |x| x.silu(), SiluGrad)
}

/// The exact (erf) GELU, `x * Phi(x)`, as PyTorch's default `gelu`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::GeluErf, |x| x.gelu_erf(), GeluErfGrad)
}

/// diffusers' GEGLU activation: `a * gelu_erf(gate)` where `a` and `gate` are the first and
/// second halves of the last dimension of `h`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: odd last dimension {width}")
    }
    let half = width / 2;
    let value = |h: &Tensor| h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?;
    activation(h, Activation::Geglu, value, GegluGrad)
}

/// An activation node: the value from [`cpu_kernels`] for f32 and f64 CPU tensors, from
/// `composite` (candle ops) elsewhere.
fn activation<G: InputGrad>(
    x: &Tensor,
    kind: Activation,
    composite: impl Fn(&Tensor) -> Result<Tensor>,
    grad: G,
) -> Result<Tensor> {
    profile::timed("activation", x.device(), || {
        if let Some(y) = cpu_kernels::activation(&x.detach(), kind)? {
            let mut dims = x.dims().to_vec();
            if kind == Activation::Geglu {
                *dims.last_mut().expect("geglu has a last dimension") /= 2;
            }
            if !x.track_op() {
                return cpu_tensor(y, dims);
            }
            return x.apply_op1(Node::computed(y, dims.into(), grad));
        }
        if !x.track_op() {
            return composite(x);
        }
        x.apply_op1(Node::new(composite(&x.detach())?, None, grad))
    })
}

/// A tensor on the CPU holding `values`.
pub(super) fn cpu_tensor(values: CpuStorage, shape: impl Into<Shape>) -> Result<Tensor> {
    match values {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        other => candle_core::bail!("cpu kernel: unexpected {:?} values", other.dtype()),
    }
}

/// Softmax over the last dimension, built from differentiable ops (usable on trainable inputs).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Scaled dot-product attention on `(batch, heads, seq, head_dim)` tensors; `mask` is added to
/// the scores (use large negative values to hide positions). Scores and softmax are computed in
/// [`compute_dtype`] of `q` (pass `q` and `k` in f32 to upcast a half-precision model's
/// attention), except on CUDA: there a half-precision product gives half-precision scores either
/// way, and candle's CUDA softmax computes in f32 inside, so the scores and probabilities stay
/// in half precision, sparing two conversions of the (seq x seq) matrices and half of what the
/// backward keeps (the backward computes in f32); the result has the dtype of `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    profile::timed("attention", q.device(), || {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        if !frozen([mask]) {
            return composite_attention(q, k, v, mask, scale);
        }
        let tracked = !frozen([Some(q), Some(k), Some(v)]);
        let kernel = cpu_kernels::attention(&q.detach(), &k.detach(), &v.detach(), mask, scale, tracked)?;
        if let Some((probs, out)) = kernel {
            let ((b, h, n, _), (m, dv)) = (q.dims4()?, (k.dim(2)?, v.dim(3)?));
            // The kernel's output is laid out (batch, n, heads, dv): viewed as (batch, heads, n, dv).
            let heads_last = Shape::from((b, n, h, dv));
            let out = match probs {
                Some(probs) if tracked => {
                    let probs = cpu_tensor(probs, (b, h, n, m))?;
                    let node =
                        AttentionNode { out: Precomputed::computed(out, heads_last), probs, scale, kernel: true };
                    q.apply_op3(k, v, node)?
                }
                _ => cpu_tensor(out, heads_last)?,
            };
            return out.transpose(1, 2);
        }
        if !tracked {
            return Ok(attention_probs_and_output(q, k, v, mask, scale)?.1);
        }
        let (probs, out) = attention_probs_and_output(&q.detach(), &k.detach(), &v.detach(), mask, scale)?;
        q.apply_op3(k, v, AttentionNode { out: Precomputed::new(out, None), probs, scale, kernel: false })
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

/// The value of a node, computed outside the graph before the custom op runs, plus an optional
/// `addend` broadcast onto it (a bias): the custom op's forward only performs that addition (or a
/// copy, with no addend), producing the storage the node owns. A value computed by
/// [`cpu_kernels`] is handed over as it is.
struct Precomputed {
    value: Mutex<Option<Value>>,
    addend: Option<Tensor>,
}

enum Value {
    Tensor(Tensor),
    Cpu(CpuStorage, Shape),
}

impl Precomputed {
    fn new(value: Tensor, addend: Option<Tensor>) -> Self {
        Self { value: Mutex::new(Some(Value::Tensor(value))), addend }
    }

    /// A value that [`cpu_kernels`] computed.
    fn computed(values: CpuStorage, shape: Shape) -> Self {
        Self { value: Mutex::new(Some(Value::Cpu(values, shape))), addend: None }
    }

    fn hand_over<S: Backend>(&self) -> Result<(S, Shape)> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("precomputed op value: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("precomputed op value used twice".into()))?;
        let value = match value {
            Value::Tensor(value) => value,
            Value::Cpu(values, shape) => return Ok((S::from_cpu(values)?, shape)),
        };
        let (storage, layout) = value.storage_and_layout();
        let storage = S::of(&storage)?;
        let out = match &self.addend {
            Some(addend) => {
                let (a_storage, a_layout) = addend.storage_and_layout();
                let a_layout = a_layout.broadcast_as(layout.shape())?;
                storage.binary_impl::<Add>(S::of(&a_storage)?, layout, &a_layout)?
            }
            None => storage.affine(layout, 1.0, 0.0)?,
        };
        Ok((out, layout.shape().clone()))
    }
}

/// The backend storage behind a `Storage`, for code generic over devices.
trait Backend: BackendStorage {
    fn of(storage: &Storage) -> Result<&Self>;
    fn from_cpu(values: CpuStorage) -> Result<Self>;
}

macro_rules! backend {
    ($storage:ty, $variant:ident) => {
        impl Backend for $storage {
            fn of(storage: &Storage) -> Result<&Self> {
                match storage {
                    Storage::$variant(s) => Ok(s),
                    _ => Err(candle_core::Error::Msg("precomputed op value: device mismatch".into())),
                }
            }

            fn from_cpu(values: CpuStorage) -> Result<Self> {
                match Storage::Cpu(values) {
                    Storage::$variant(s) => Ok(s),
                    _ => Err(candle_core::Error::Msg("precomputed op value: device mismatch".into())),
                }
            }
        }
    };
}
backend!(CpuStorage, Cpu);
backend!(CudaStorage, Cuda);
backend!(MetalStorage, Metal);

/// The input gradient of a one-input node.
trait InputGrad: Send + Sync + 'static {
    const NAME: &'static str;
    /// What [`profile`] calls the backward.
    const BACKWARD: &'static str;
    /// `x` is the (detached) input, `grad` the gradient of the output.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// A one-input node: precomputed value, backward to the input only.
struct Node<G> {
    out: Precomputed,
    grad: G,
}

impl<G: InputGrad> Node<G> {
    fn new(value: Tensor, addend: Option<Tensor>, grad: G) -> Self {
        Self { out: Precomputed::new(value, addend), grad }
    }

    /// A node whose value [`cpu_kernels`] computed.
    fn computed(values: CpuStorage, shape: Shape, grad: G) -> Self {
        Self { out: Precomputed::computed(values, shape), grad }
    }
}

impl<G: InputGrad> CustomOp1 for Node<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.hand_over()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.out.hand_over()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.out.hand_over()
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached, so that the backward computation builds no graph of its own.
        profile::timed(G::BACKWARD, arg.device(), || Ok(Some(self.grad.input_grad(&arg.detach(), grad)?)))
    }
}

struct LinearGrad {
    weight: Tensor,
}

impl InputGrad for LinearGrad {
    const NAME: &'static str = "frozen-linear";
    const BACKWARD: &'static str = "linear backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match cpu_kernels::linear_input_grad(grad, &self.weight)? {
            Some(dx) => cpu_tensor(dx, x.shape()),
            None => grad.contiguous()?.matmul(&self.weight),
        }
    }
}

struct Conv2dGrad {
    weight: Tensor,
    padding: usize,
    stride: usize,
    input_size: (usize, usize),
}

impl InputGrad for Conv2dGrad {
    const NAME: &'static str = "frozen-conv2d";
    const BACKWARD: &'static str = "conv2d backward";

    fn input_grad(&self, _: &Tensor, grad: &Tensor) -> Result<Tensor> {
        conv::input_grad(grad, &self.weight, self.input_size, self.padding, self.stride)
    }
}

struct NormGrad {
    stats_shape: Vec<usize>,
    weight: Tensor,
    spec: NormSpec,
}

impl InputGrad for NormGrad {
    const NAME: &'static str = "frozen-norm";
    const BACKWARD: &'static str = "norm backward";

    /// With `x^ = (x - mean) * r`, `r = 1 / sqrt(var + eps)` and `g = dy * weight`:
    /// `dx = r * (g - mean(g) - x^ * mean(g * x^))`, the means over each normalised group.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dx) = super::norm_cuda::input_grad(x, grad, &self.weight, self.spec)? {
            return Ok(dx);
        }
        if let Some(dx) = cpu_kernels::norm_input_grad(x, grad, &self.weight, self.spec)? {
            return cpu_tensor(dx, x.shape());
        }
        let compute = self.weight.dtype();
        let shape = self.stats_shape.as_slice();
        let x_c = x.to_dtype(compute)?.reshape(shape)?;
        let centered = x_c.broadcast_sub(&x_c.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.spec.eps)?.sqrt()?.recip()?;
        let x_hat = centered.broadcast_mul(&r)?;
        let g = grad.to_dtype(compute)?.broadcast_mul(&self.weight)?.reshape(shape)?;
        let projection = (&g * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx =
            g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?.sub(&x_hat.broadcast_mul(&projection)?)?.broadcast_mul(&r)?;
        dx.reshape(x.shape())?.to_dtype(x.dtype())
    }
}

struct AddGrad;

impl InputGrad for AddGrad {
    const NAME: &'static str = "add-frozen";
    const BACKWARD: &'static str = "add backward";

    fn input_grad(&self, _: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Ok(grad.clone())
    }
}

/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `cdf(x)` and `pdf(x)` as tensors, for the composite backwards.
fn normal_cdf_pdf_tensors(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI;
    Ok((cdf?, pdf?))
}

pub(super) struct SiluGrad;

impl InputGrad for SiluGrad {
    const NAME: &'static str = "silu";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(x, grad, Activation::Silu)?.map_or_else(|| self.composite(x, grad), Ok)
    }
}

impl SiluGrad {
    /// `dy * s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
    pub(super) fn composite(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let s = (x.neg()?.exp()? + 1.0)?.recip()?;
        grad * (&s * ((x * (1.0 - &s)?)? + 1.0)?)?
    }
}

pub(super) struct GeluErfGrad;

impl InputGrad for GeluErfGrad {
    const NAME: &'static str = "gelu-erf";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(x, grad, Activation::GeluErf)?.map_or_else(|| self.composite(x, grad), Ok)
    }
}

impl GeluErfGrad {
    /// `dy * (cdf(x) + x * pdf(x))`.
    pub(super) fn composite(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (cdf, pdf) = normal_cdf_pdf_tensors(x)?;
        grad * (cdf + (x * pdf)?)?
    }
}

pub(super) struct GegluGrad;

impl InputGrad for GegluGrad {
    const NAME: &'static str = "geglu";
    const BACKWARD: &'static str = "activation backward";

    fn input_grad(&self, h: &Tensor, grad: &Tensor) -> Result<Tensor> {
        cpu_grad(h, grad, Activation::Geglu)?.map_or_else(|| self.composite(h, grad), Ok)
    }
}

impl GegluGrad {
    /// `[da, dgate] = [dy * gelu(gate), dy * a * (cdf(gate) + gate * pdf(gate))]`.
    pub(super) fn composite(&self, h: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let half = grad.dim(D::Minus1)?;
        let (a, gate) = (h.narrow(D::Minus1, 0, half)?, h.narrow(D::Minus1, half, half)?);
        let (cdf, pdf) = normal_cdf_pdf_tensors(&gate)?;
        let da = (grad * (&gate * &cdf)?)?;
        let dgate = ((grad * a)? * (cdf + (gate * pdf)?)?)?;
        Tensor::cat(&[da, dgate], D::Minus1)
    }
}

/// The input gradient of an activation by [`cpu_kernels`], `None` where it does not run.
fn cpu_grad(x: &Tensor, grad: &Tensor, kind: Activation) -> Result<Option<Tensor>> {
    cpu_kernels::activation_grad(x, grad, kind)?.map(|dx| cpu_tensor(dx, x.shape())).transpose()
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

/// Attention as one node over `(q, k, v)`, keeping the probabilities for the backward.
struct AttentionNode {
    out: Precomputed,
    probs: Tensor,
    scale: f64,
    /// Whether [`cpu_kernels::attention`] computed the value, laid out (batch, n, heads, dv):
    /// the backward is then [`cpu_kernels::attention_grad`].
    kernel: bool,
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
            if self.kernel {
                let needed = [q.track_op(), k.track_op(), v.track_op()];
                let Some([dq, dk, dv]) = cpu_kernels::attention_grad([q, k, v], &self.probs, grad, self.scale, needed)?
                else {
                    candle_core::bail!("attention backward: the CPU kernel's node has non-CPU inputs")
                };
                let grad_of = |g: Option<CpuStorage>, x: &Tensor| g.map(|g| cpu_tensor(g, x.shape())).transpose();
                return Ok((grad_of(dq, q)?, grad_of(dk, k)?, grad_of(dv, v)?));
            }
            let compute = compute_dtype(self.probs.dtype());
            let probs = self.probs.to_dtype(compute)?;
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
    use crate::nn::test_values::{max_diff, spread_tensor};
    use candle_core::{DType, Device, Tensor};

    use candle_core::Var;

    use super::{
        attention, attention_probs_and_output, composite_attention, cpu_grad, softmax_grad_composite, Activation,
        GegluGrad, GeluErfGrad, SiluGrad, SoftmaxGradInPlace,
    };

    fn values(shape: (usize, usize), seed: u64) -> Tensor {
        spread_tensor(shape, seed, -2.0, 4.0, DType::F64)
    }

    /// The composite backwards (other devices and dtypes) against the one-pass CPU kernels.
    #[test]
    fn composite_activation_gradients_match_the_cpu_kernels() {
        let (x, g) = (values((3, 8), 1), values((3, 8), 2));
        let silu = cpu_grad(&x, &g, Activation::Silu).unwrap().unwrap();
        assert!(max_diff(&silu, &SiluGrad.composite(&x, &g).unwrap()) < 1e-14);
        let gelu = cpu_grad(&x, &g, Activation::GeluErf).unwrap().unwrap();
        assert!(max_diff(&gelu, &GeluErfGrad.composite(&x, &g).unwrap()) < 1e-14);
        let h = values((3, 16), 3);
        let geglu = cpu_grad(&h, &g, Activation::Geglu).unwrap().unwrap();
        assert_eq!(geglu.dims(), &[3, 16]);
        assert!(max_diff(&geglu, &GegluGrad.composite(&h, &g).unwrap()) < 1e-14);
        // Half precisions take the composite path.
        assert!(cpu_grad(&x.to_dtype(DType::F16).unwrap(), &g, Activation::Silu).unwrap().is_none());
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

    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        max_diff(&a, &b) / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0)
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
    /// with each input tracked or not, and sizes that split into several blocks of rows.
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
                    let kernel = |q: &Tensor, k: &Tensor, v: &Tensor| attention(q, k, v, mask.as_ref()).unwrap();
                    let composite = |q: &Tensor, k: &Tensor, v: &Tensor| {
                        composite_attention(q, k, v, mask.as_ref(), scale).unwrap()
                    };
                    let (out, grads) = attention_and_grads(kernel, [&q, &k, &v], tracked, &dy);
                    let (out_ref, grads_ref) = attention_and_grads(composite, [&q, &k, &v], tracked, &dy);
                    let case = format!("{dtype:?} {batch}x{heads}x{n}x{m}x{head_dim} mask {masked} {tracked:?}");
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
