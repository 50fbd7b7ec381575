//! 2-D convolution: the layer [`Conv2d`] and its op [`conv2d`], one graph node whose backward
//! computes the input gradient only, no kernel gradient. The value and the input gradient run on
//! the fastest path their device has:
//!
//! - CPU, f32 and f64: [`cpu`], im2col over NCHW and one matrix product per image with the `gemm`
//!   crate (candle's CPU convolution transposes to NHWC and multiplies in small tiles, about three
//!   times slower than PyTorch's oneDNN at Stable Diffusion's shapes);
//! - CUDA with the `cudnn` feature: [`cudnn`], cuDNN's forward and backward-data convolutions
//!   with the fastest algorithm for each shape, found once and cached (as PyTorch's
//!   `torch.backends.cudnn.benchmark`), and one workspace reused (candle's cuDNN call picks an
//!   algorithm by heuristics and allocates and zeroes a workspace on every call: about nine
//!   times PyTorch's time on an H200);
//! - anything else: candle's `conv2d`, and the input gradient as a stride-1 `conv2d` of the
//!   dilated output gradient with the flipped kernel.
//!
//! Neither builds a graph: [`conv2d`] makes them one differentiable node.

mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;

use std::sync::Arc;

use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::compute_dtype;
use super::node::{frozen, InputGrad, Node};
use super::packed::{MatrixWeight, PackedMatrix};
use super::profile;
use crate::nn::cpu::{cpu_dtype, cpu_tensor, with_values, Element};

/// The settings of a convolution, as candle-nn's `Conv2dConfig` without what these convolutions
/// do not have (dilation, groups): the same `padding` and `stride` on both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

impl Default for Conv2dConfig {
    /// Stride 1, no padding.
    fn default() -> Self {
        Self { padding: 0, stride: 1 }
    }
}

/// 2-D convolution with square kernels, as `torch.nn.Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub(in crate::nn) weight: MatrixWeight,
    pub(in crate::nn) bias: Option<Tensor>,
    pub(in crate::nn) config: Conv2dConfig,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let weight = MatrixWeight::load(&vb, (out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_channels, "bias")?);
        Ok(Self { weight, bias, config })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            MatrixWeight::Tensor(weight) => conv2d(x, weight, self.bias.as_ref(), self.config),
            MatrixWeight::Packed(weight) => packed_conv2d(x, weight, self.bias.as_ref(), self.config),
        }
    }
}

/// [`conv2d`] with a packed kernel, for f32 CPU inputs; the input gradient widens the kernel.
fn packed_conv2d(
    x: &Tensor,
    kernel: &Arc<PackedMatrix>,
    bias: Option<&Tensor>,
    config: Conv2dConfig,
) -> Result<Tensor> {
    profile::timed("conv2d", x.device(), || {
        let dims = x.dims4()?;
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!(
                "conv2d: a packed kernel convolves f32 CPU inputs, not {:?} on {:?}",
                x.dtype(),
                x.device().location()
            )
        }
        if !frozen([bias]) {
            candle_core::bail!("conv2d: packed kernels are for frozen models; this bias is trained")
        }
        let shape = ConvShape::from_dims(dims, kernel.shape().dims4()?, config)?;
        check_bias(bias, shape.c_out)?;
        let x_value = x.detach();
        let mut tensors = vec![&x_value];
        tensors.extend(bias);
        let y = with_values::<f32, _>(&tensors, |v| cpu::forward_packed(v[0], kernel, v.get(1).copied(), &shape))?;
        let y = CpuStorage::F32(y);
        if !x.track_op() {
            return cpu_tensor(y, shape.output_dims());
        }
        let grad = Conv2dGrad { weight: MatrixWeight::Packed(kernel.clone()), config, input_size: (dims.2, dims.3) };
        x.apply_op1(Node::computed(y, shape.output_dims().into(), grad))
    })
}

/// `torch.nn.functional.conv2d` with square padding and stride, no dilation, one group;
/// `x` (batch, in, h, w), `weight` (out, in, kh, kw), `bias` (out).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, config: Conv2dConfig) -> Result<Tensor> {
    profile::timed("conv2d", x.device(), || {
        let channel_bias = |b: &Tensor| b.reshape((b.dim(0)?, 1, 1));
        if !frozen([Some(weight), bias]) {
            let y = x.conv2d(weight, config.padding, config.stride, 1, 1)?;
            return match bias {
                Some(b) => y.broadcast_add(&channel_bias(b)?),
                None => Ok(y),
            };
        }
        let y = forward(x, weight, bias, config)?;
        if !x.track_op() {
            return Ok(y);
        }
        let (_, _, h, w) = x.dims4()?;
        let grad = Conv2dGrad { weight: MatrixWeight::Tensor(weight.clone()), config, input_size: (h, w) };
        x.apply_op1(Node::new(y, None, grad))
    })
}

struct Conv2dGrad {
    /// Packed kernels are widened only when the gradient is computed, one layer at a time.
    weight: MatrixWeight,
    config: Conv2dConfig,
    input_size: (usize, usize),
}

impl InputGrad for Conv2dGrad {
    const NAME: &'static str = "frozen-conv2d";
    const BACKWARD: &'static str = "conv2d backward";

    fn input_grad(&self, _: &Tensor, grad: &Tensor) -> Result<Tensor> {
        input_grad(grad, &self.weight.tensor()?, self.input_size, self.config)
    }
}

/// The sizes of one convolution: `x` (batch, c_in, h, w), kernel (c_out, c_in, kh, kw), the same
/// padding and stride on both axes, no dilation, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
}

impl ConvShape {
    fn new(input: (usize, usize, usize, usize), kernel: &Tensor, config: Conv2dConfig) -> Result<Self> {
        Self::from_dims(input, kernel.dims4()?, config)
    }

    /// As [`ConvShape::new`], from the kernel's dims (c_out, c_in, kh, kw).
    fn from_dims(
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
        config: Conv2dConfig,
    ) -> Result<Self> {
        let (batch, c_in, h, w) = input;
        let Conv2dConfig { padding, stride } = config;
        let (c_out, kernel_c_in, kh, kw) = kernel;
        if kernel_c_in != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the kernel {kernel_c_in}")
        }
        if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: a {kh}x{kw} kernel with padding {padding}, stride {stride} on a {h}x{w} input")
        }
        Ok(Self { batch, c_in, c_out, h, w, kh, kw, padding, stride })
    }

    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    fn input_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.c_in, self.h, self.w)
    }

    fn output_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.c_out, self.out_h(), self.out_w())
    }
}

/// Which of the two computations a [`ConvOp`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    /// `y = conv(x, kernel)`.
    Forward,
    /// `dx` from `dy`: the gradient of the forward with respect to its input.
    InputGrad,
}

/// `conv2d(x, kernel) + bias` (bias (c_out)); no graph. On the CPU the bias is written into the
/// output before the products add onto it, rather than added in a second pass over a copy.
fn forward(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, config: Conv2dConfig) -> Result<Tensor> {
    let shape = ConvShape::new(x.dims4()?, kernel, config)?;
    check_bias(bias, shape.c_out)?;
    let (x, kernel) = (x.detach(), kernel.detach());
    let mut tensors = vec![&x, &kernel];
    tensors.extend(bias);
    let cpu_value = match cpu_dtype(&tensors) {
        Some(DType::F32) => Some(with_values::<f32, _>(&tensors, |v| CpuStorage::F32(cpu_forward(v, &shape)))?),
        Some(DType::F64) => Some(with_values::<f64, _>(&tensors, |v| CpuStorage::F64(cpu_forward(v, &shape)))?),
        _ => None,
    };
    if let Some(y) = cpu_value {
        return cpu_tensor(y, shape.output_dims());
    }
    let y = if has_fast_path(&x) {
        let op = ConvOp { shape, direction: Direction::Forward };
        x.contiguous()?.apply_op2_no_bwd(&kernel.contiguous()?, &op)?
    } else {
        x.conv2d(&kernel, config.padding, config.stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((shape.c_out, 1, 1))?),
        None => Ok(y),
    }
}

/// [`cpu::forward`] on `[x, kernel]` or `[x, kernel, bias]`.
fn cpu_forward<T: Element>(values: &[&[T]], shape: &ConvShape) -> Vec<T> {
    cpu::forward(values[0], values[1], values.get(2).copied(), shape)
}

fn check_bias(bias: Option<&Tensor>, c_out: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [c_out] => {
            candle_core::bail!("conv2d: bias {:?} for {c_out} output channels", b.shape())
        }
        _ => Ok(()),
    }
}

/// The gradient with respect to `x` of `conv2d(x, kernel)`, `x` being `input_size` high and wide,
/// from the gradient `dy` of its output; no graph.
fn input_grad(dy: &Tensor, kernel: &Tensor, input_size: (usize, usize), config: Conv2dConfig) -> Result<Tensor> {
    let (batch, _, _, _) = dy.dims4()?;
    let c_in = kernel.dim(1)?;
    let shape = ConvShape::new((batch, c_in, input_size.0, input_size.1), kernel, config)?;
    if dy.dims4()? != shape.output_dims() {
        candle_core::bail!("conv2d backward: output gradient {:?}, expected {:?}", dy.shape(), shape.output_dims())
    }
    if has_fast_path(dy) {
        let op = ConvOp { shape, direction: Direction::InputGrad };
        return dy.contiguous()?.apply_op2_no_bwd(&kernel.contiguous()?, &op);
    }
    flipped_kernel_input_grad(&dy.detach(), &kernel.detach(), &shape)
}

fn has_fast_path(x: &Tensor) -> bool {
    match x.device() {
        Device::Cpu => matches!(x.dtype(), DType::F32 | DType::F64),
        Device::Cuda(_) => cfg!(feature = "cudnn") && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16),
        _ => false,
    }
}

/// A convolution as a candle op on contiguous `(data, kernel)`: `data` is `x` for the forward and
/// `dy` for the input gradient.
struct ConvOp {
    shape: ConvShape,
    direction: Direction,
}

impl ConvOp {
    fn out_dims(&self) -> (usize, usize, usize, usize) {
        match self.direction {
            Direction::Forward => self.shape.output_dims(),
            Direction::InputGrad => self.shape.input_dims(),
        }
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.direction {
            Direction::Forward => "conv2d",
            Direction::InputGrad => "conv2d-input-grad",
        }
    }

    fn cpu_fwd(&self, data: &CpuStorage, d: &Layout, kernel: &CpuStorage, k: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (data, kernel) {
            (CpuStorage::F32(data), CpuStorage::F32(kernel)) => CpuStorage::F32(self.cpu(data, d, kernel, k)),
            (CpuStorage::F64(data), CpuStorage::F64(kernel)) => CpuStorage::F64(self.cpu(data, d, kernel, k)),
            _ => candle_core::bail!("conv2d on the CPU: f32 or f64, both operands of one dtype"),
        };
        Ok((out, Shape::from(self.out_dims())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        data: &CudaStorage,
        d: &Layout,
        kernel: &CudaStorage,
        k: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = cudnn::run(self.shape, self.direction, data, d, kernel, k)?;
        Ok((out, Shape::from(self.out_dims())))
    }

    #[cfg(not(feature = "cudnn"))]
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        candle_core::bail!("conv2d: this build has no cuDNN (the `cudnn` feature)")
    }
}

impl ConvOp {
    fn cpu<T: Element>(&self, data: &[T], d: &Layout, kernel: &[T], k: &Layout) -> Vec<T> {
        let data = &data[d.start_offset()..d.start_offset() + d.shape().elem_count()];
        let kernel = &kernel[k.start_offset()..k.start_offset() + k.shape().elem_count()];
        match self.direction {
            Direction::Forward => cpu::forward(data, kernel, None, &self.shape),
            Direction::InputGrad => cpu::input_grad(data, kernel, &self.shape),
        }
    }
}

/// `dx[i] = sum_k dy[(i + p - k) / s] w[k]` (terms with a whole index): with `dy` dilated by the
/// stride (zeros between rows and columns), that is a stride-1 correlation with the flipped
/// kernel, in/out channels swapped, padded by `k - 1 - p` before and by what makes the size come
/// out right after (cropped where those are negative). Flipping the kernel is the same as
/// flipping `dy` (its padding swapped) and the result: whichever is smaller is flipped, the
/// kernel at high resolutions, the activations in the deep low-resolution layers. Half
/// precisions are computed in f32.
fn flipped_kernel_input_grad(dy: &Tensor, kernel: &Tensor, shape: &ConvShape) -> Result<Tensor> {
    let dtype = dy.dtype();
    let compute = compute_dtype(dtype);
    let (grad, weight) = (dy.to_dtype(compute)?, kernel.to_dtype(compute)?);
    let ConvShape { batch: b, c_in, c_out, h, w, kh, kw, padding, stride } = *shape;
    let (oh, ow) = (shape.out_h(), shape.out_w());
    let p = padding as isize;
    let before = [kh as isize - 1 - p, kw as isize - 1 - p];
    let dilated = [(oh - 1) * stride + 1, (ow - 1) * stride + 1];
    let after = [(h + kh - 1 - dilated[0]) as isize - before[0], (w + kw - 1 - dilated[1]) as isize - before[1]];
    let flip_activations = kh * kw > 1 && b * (c_out * oh * ow + c_in * h * w) < weight.elem_count();
    let (grad, before, after) = if flip_activations { (flip_hw(&grad)?, after, before) } else { (grad, before, after) };
    let kernel = if flip_activations || kh * kw == 1 { weight } else { flip_hw(&weight)? };
    let kernel = kernel.transpose(0, 1)?.contiguous()?;
    let grad = dilate(&grad, stride)?;
    let same = before[0];
    let dx = if same >= 0 && [before[1], after[0], after[1]].iter().all(|&n| n == same) {
        grad.conv2d(&kernel, same as usize, 1, 1, 1)?
    } else {
        let grad = pad_or_crop(&grad, 2, before[0], after[0])?;
        pad_or_crop(&grad, 3, before[1], after[1])?.conv2d(&kernel, 0, 1, 1, 1)?
    };
    let dx = if flip_activations { flip_hw(&dx)? } else { dx };
    dx.to_dtype(dtype)
}

/// Reverses the last two axes of a 4-D tensor (a 180 degree rotation of each map).
fn flip_hw(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let reversed: Vec<u32> = (0..(h * w) as u32).rev().collect();
    let reversed = Tensor::new(reversed, x.device())?;
    x.contiguous()?.reshape((b, c, h * w))?.index_select(&reversed, 2)?.reshape((b, c, h, w))
}

/// Adds `before` / `after` zeros along `dim`, or removes that many entries where negative.
fn pad_or_crop(x: &Tensor, dim: usize, before: isize, after: isize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let start = (-before).max(0) as usize;
    let end = len - (-after).max(0) as usize;
    x.narrow(dim, start, end - start)?.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)
}

/// `(b, c, h, w)` -> `(b, c, (h - 1) * s + 1, (w - 1) * s + 1)` with `s - 1` zeros between rows
/// and between columns.
fn dilate(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    let zeros = x.zeros_like()?;
    let mut columns = vec![x.clone()];
    columns.extend(std::iter::repeat_n(zeros.clone(), s - 1));
    let x = Tensor::stack(&columns, 4)?.reshape((b, c, h, w * s))?.narrow(3, 0, (w - 1) * s + 1)?;
    let zeros = x.zeros_like()?;
    let mut rows = vec![x];
    rows.extend(std::iter::repeat_n(zeros, s - 1));
    Tensor::stack(&rows, 3)?.reshape((b, c, h * s, (w - 1) * s + 1))?.narrow(2, 0, (h - 1) * s + 1)
}

#[cfg(test)]
mod tests {
    use crate::nn::test_values::{max_diff, spread_tensor};
    use candle_core::{DType, Tensor};

    use super::{flipped_kernel_input_grad, forward, input_grad, Conv2dConfig, ConvShape};

    fn values(dims: (usize, usize, usize, usize), seed: u64) -> Tensor {
        spread_tensor(dims, seed, -2.0, 4.0, DType::F64)
    }

    /// The fast CPU path against candle's convolution (forward) and against the flipped-kernel
    /// formulation (input gradient), over kernel sizes, paddings, strides and odd sizes.
    #[test]
    fn cpu_path_matches_candle() {
        let cases = [
            (2, 3, 5, 9, 7, 3, 1, 1),
            (1, 4, 6, 8, 8, 3, 1, 2),
            (2, 5, 3, 7, 9, 1, 0, 1),
            (1, 3, 4, 9, 9, 3, 0, 2),
            (1, 2, 3, 6, 5, 3, 2, 1),
            (3, 6, 2, 4, 4, 1, 0, 2),
        ];
        for (i, &(b, c_in, c_out, h, w, k, padding, stride)) in cases.iter().enumerate() {
            let x = values((b, c_in, h, w), i as u64);
            let kernel = values((c_out, c_in, k, k), 100 + i as u64);
            let config = Conv2dConfig { padding, stride };
            let shape = ConvShape::new((b, c_in, h, w), &kernel, config).unwrap();
            let expected = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            for dtype in [DType::F64, DType::F32] {
                let (x, kernel) = (x.to_dtype(dtype).unwrap(), kernel.to_dtype(dtype).unwrap());
                let y = forward(&x, &kernel, None, config).unwrap().to_dtype(DType::F64).unwrap();
                let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                assert!(max_diff(&y, &expected) < tolerance, "case {i} {dtype:?}: forward");
                let bias = spread_tensor(c_out, 300 + i as u64, -2.0, 4.0, dtype);
                let y = forward(&x, &kernel, Some(&bias), config).unwrap().to_dtype(DType::F64).unwrap();
                let biased =
                    expected.broadcast_add(&bias.to_dtype(DType::F64).unwrap().reshape((c_out, 1, 1)).unwrap());
                assert!(max_diff(&y, &biased.unwrap()) < tolerance, "case {i} {dtype:?}: forward with bias");

                let dy = values(shape.output_dims(), 200 + i as u64).to_dtype(dtype).unwrap();
                let dx = input_grad(&dy, &kernel, (h, w), config).unwrap().to_dtype(DType::F64).unwrap();
                let reference = flipped_kernel_input_grad(
                    &dy.to_dtype(DType::F64).unwrap(),
                    &kernel.to_dtype(DType::F64).unwrap(),
                    &shape,
                )
                .unwrap();
                assert!(max_diff(&dx, &reference) < tolerance, "case {i} {dtype:?}: input gradient");
            }
        }
    }

    /// A non-contiguous input (a transposed view) gives the same result as its contiguous copy.
    #[test]
    fn strided_inputs_are_read_correctly() {
        let x = values((1, 3, 6, 5), 7).transpose(2, 3).unwrap();
        let kernel = values((4, 3, 3, 3), 8);
        let y = forward(&x, &kernel, None, Conv2dConfig { padding: 1, stride: 1 }).unwrap();
        let expected = x.contiguous().unwrap().conv2d(&kernel, 1, 1, 1, 1).unwrap();
        assert!(max_diff(&y, &expected) < 1e-12);
    }

    /// With a CUDA build on a machine with a GPU: cuDNN's results against the CPU's, in f32 (TF32
    /// tensor cores allowed, as PyTorch's default) and bf16, forward and input gradient.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cudnn_path_matches_the_cpu() {
        use candle_core::Device;
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: cudnn_path_matches_the_cpu skipped");
            return;
        };
        let cases = [
            (2, 3, 5, 9, 7, 3, 1, 1),
            (1, 64, 32, 32, 32, 3, 1, 1),
            (1, 32, 64, 16, 16, 3, 1, 2),
            (2, 64, 96, 8, 8, 1, 0, 1),
        ];
        for (i, &(b, c_in, c_out, h, w, k, padding, stride)) in cases.iter().enumerate() {
            let x = values((b, c_in, h, w), i as u64).to_dtype(DType::F32).unwrap();
            let kernel = (values((c_out, c_in, k, k), 100 + i as u64) / (c_in * k * k) as f64).unwrap();
            let kernel = kernel.to_dtype(DType::F32).unwrap();
            let config = Conv2dConfig { padding, stride };
            let shape = ConvShape::new((b, c_in, h, w), &kernel, config).unwrap();
            let dy = values(shape.output_dims(), 200 + i as u64).to_dtype(DType::F32).unwrap();
            let y = forward(&x, &kernel, None, config).unwrap();
            let dx = input_grad(&dy, &kernel, (h, w), config).unwrap();
            for (dtype, relative) in [(DType::F32, 5e-3), (DType::BF16, 3e-2)] {
                let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
                let back = |t: Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                let y_gpu = back(forward(&on_gpu(&x), &on_gpu(&kernel), None, config).unwrap());
                let dx_gpu = back(input_grad(&on_gpu(&dy), &on_gpu(&kernel), (h, w), config).unwrap());
                for (name, got, expected) in [("forward", &y_gpu, &y), ("input gradient", &dx_gpu, &dx)] {
                    let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                    let diff = max_diff(got, expected);
                    assert!(diff <= relative * scale, "case {i} {dtype:?} {name}: {diff} vs scale {scale}");
                }
            }
        }
    }
}
