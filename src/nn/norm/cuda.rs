//! Fused group and layer normalisation for CUDA: the kernels of `norm.cu`, compiled with NVRTC on
//! first use. candle has no group norm kernel, and [`super`]'s composition of its ops reads
//! and writes the activations about ten times per norm (fifteen for the backward), with row
//! reductions that run one block per row: 32 blocks for a group norm, on a GPU with 132
//! multiprocessors. These kernels read `x` twice (sums, then the result) and sum each row with
//! many blocks.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::NormSpec;

/// What the kernels need of a [`NormSpec`] for `x` and `weight`: the rows and the affine
/// layout, if these kernels handle them (CUDA, f32/f16/bf16, f32 affine, within the grid).
fn plan(x: &Tensor, weight: &Tensor, spec: &NormSpec) -> Option<(usize, KernelLayout)> {
    let (per_row, inner) = spec.split(weight.elem_count())?;
    let rows = x.elem_count() / spec.n.max(1);
    let fits = x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && weight.dtype() == DType::F32
        && rows <= MAX_ROWS
        && spec.n <= i32::MAX as usize;
    let layout =
        KernelLayout { n: spec.n as i32, groups: spec.groups as i32, per_group: per_row as i32, inner: inner as i32 };
    fits.then_some((rows, layout))
}

/// Rows are the grid's second dimension.
const MAX_ROWS: usize = 65_535;
/// Values of one row each block of the sum kernels reads.
const CHUNK: usize = 8192;
const THREADS: u32 = 256;

/// `Layout` of norm.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KernelLayout {
    n: i32,
    groups: i32,
    per_group: i32,
    inner: i32,
}

// SAFETY: a plain `repr(C)` struct of four ints, as the kernels declare it.
unsafe impl DeviceRepr for KernelLayout {}

/// `(x - mean) * rstd * weight + bias` as `spec` says; `None` where these kernels do not apply.
pub(super) fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, spec: NormSpec) -> Result<Option<Tensor>> {
    let Some((rows, layout)) = plan(x, weight, &spec) else { return Ok(None) };
    let op = Norm { rows, layout, eps: spec.eps, backward: false };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)?))
}

/// The gradient with respect to `x` of [`forward`], from the output gradient `dy`.
pub(super) fn input_grad(x: &Tensor, dy: &Tensor, weight: &Tensor, spec: NormSpec) -> Result<Option<Tensor>> {
    let Some((rows, layout)) = plan(x, weight, &spec) else { return Ok(None) };
    let op = Norm { rows, layout, eps: spec.eps, backward: true };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&dy.contiguous()?, &weight.contiguous()?, &op)?))
}

/// Forward: `(x, weight, bias)`; backward: `(x, dy, weight)`.
struct Norm {
    rows: usize,
    layout: KernelLayout,
    eps: f64,
    backward: bool,
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        if self.backward {
            "fused-norm-backward"
        } else {
            "fused-norm"
        }
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
        candle_core::bail!("the fused norm kernels run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
        c: &CudaStorage,
        c_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = [(a, a_layout), (b, b_layout), (c, c_layout)];
        let out = match a.dtype() {
            DType::F32 => self.run::<f32>("f32", args)?,
            DType::BF16 => self.run::<bf16>("bf16", args)?,
            DType::F16 => self.run::<f16>("f16", args)?,
            other => candle_core::bail!("fused norm: f32, f16 or bf16, not {other:?}"),
        };
        Ok((out, a_layout.shape().clone()))
    }
}

impl Norm {
    fn run<T: CudaDType + DeviceRepr>(&self, suffix: &str, args: [(&CudaStorage, &Layout); 3]) -> Result<CudaStorage> {
        let device = &args[0].0.device;
        let (rows, n, layout) = (self.rows, self.layout.n as usize, self.layout);
        let total = rows * n;
        // The operands in kernel order: x, then dy (backward), then the f32 affine parameters.
        let x = args[0].0.as_cuda_slice::<T>()?.slice(args[0].1.start_offset()..);
        let (sums_per_row, sum_kernel, apply_kernel) =
            if self.backward { (4, "backward_sums", "backward_apply") } else { (2, "forward_sums", "forward_apply") };
        let mut sums = device.alloc_zeros::<f64>(rows * sums_per_row)?;
        // SAFETY: the apply kernel writes every element.
        let mut out = unsafe { device.alloc::<T>(total)? };
        let sum_grid = LaunchConfig {
            grid_dim: (n.div_ceil(CHUNK) as u32, rows as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let apply_grid = LaunchConfig {
            grid_dim: (total.div_ceil(THREADS as usize).min(1 << 16) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (chunk, eps) = (CHUNK as i32, self.eps as f32);
        let wrap = candle_core::Error::wrap;
        let stream = device.cuda_stream();
        if self.backward {
            let dy = args[1].0.as_cuda_slice::<T>()?.slice(args[1].1.start_offset()..);
            let weight = f32_operand(args[2])?;
            let sum = function(device, &format!("{sum_kernel}_{suffix}"))?;
            let mut launch = stream.launch_builder(&sum);
            launch.arg(&x).arg(&dy).arg(&weight).arg(&mut sums).arg(&layout).arg(&chunk);
            // SAFETY: the arguments match backward_sums's parameters; the grid covers every row.
            unsafe { launch.launch(sum_grid) }.map_err(wrap)?;
            let apply = function(device, &format!("{apply_kernel}_{suffix}"))?;
            let mut launch = stream.launch_builder(&apply);
            launch.arg(&x).arg(&dy).arg(&weight).arg(&sums).arg(&mut out).arg(&layout).arg(&total).arg(&eps);
            // SAFETY: as above, for backward_apply (grid-stride over `total`).
            unsafe { launch.launch(apply_grid) }.map_err(wrap)?;
        } else {
            let (weight, bias) = (f32_operand(args[1])?, f32_operand(args[2])?);
            let sum = function(device, &format!("{sum_kernel}_{suffix}"))?;
            let mut launch = stream.launch_builder(&sum);
            launch.arg(&x).arg(&mut sums).arg(&layout).arg(&chunk);
            // SAFETY: the arguments match forward_sums's parameters; the grid covers every row.
            unsafe { launch.launch(sum_grid) }.map_err(wrap)?;
            let apply = function(device, &format!("{apply_kernel}_{suffix}"))?;
            let mut launch = stream.launch_builder(&apply);
            launch.arg(&x).arg(&sums).arg(&weight).arg(&bias).arg(&mut out).arg(&layout).arg(&total).arg(&eps);
            // SAFETY: as above, for forward_apply (grid-stride over `total`).
            unsafe { launch.launch(apply_grid) }.map_err(wrap)?;
        }
        drop(sums);
        Ok(CudaStorage::wrap_cuda_slice(out, device.clone()))
    }
}

fn f32_operand<'a>((storage, layout): (&'a CudaStorage, &Layout)) -> Result<CudaView<'a, f32>> {
    let slice: &CudaSlice<f32> = storage.as_cuda_slice::<f32>()?;
    Ok(slice.slice(layout.start_offset()..))
}

/// A kernel of norm.cu, compiled once per process and loaded once per device.
fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = PTX.get_or_init(|| {
        candle_core::cuda::cudarc::nvrtc::compile_ptx(include_str!("norm.cu"))
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("compiling src/nn/norm/norm.cu with NVRTC: {e:?}"))
    });
    let ptx = ptx.as_ref().map_err(|e| candle_core::Error::Msg(e.clone()))?;
    Ok(device.get_or_load_custom_func(name, "stableid_norm", ptx)?.into_cuda_function())
}

#[cfg(test)]
mod tests {
    use crate::nn::test_values::{max_diff, spread_tensor};
    use candle_core::{DType, Device, Tensor, Var};

    use super::{forward, input_grad};
    use crate::nn::norm::{group_norm, layer_norm, NormSpec};

    fn values(shape: &[usize], seed: u64) -> Tensor {
        spread_tensor(shape, seed, -1.5, 4.0, DType::F32)
    }

    /// With a CUDA build on a machine with a GPU: the fused kernels against the CPU's composite
    /// norms and their autograd, group norm (rows of 16 to 40 000 values) and layer norm, f32 and
    /// bf16.
    #[test]
    fn fused_norms_match_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: fused_norms_match_the_cpu skipped");
            return;
        };
        // (x shape, groups; 0 = layer norm over the last dimension)
        let cases: [(&[usize], usize); 4] =
            [(&[2, 8, 3, 5], 4), (&[1, 64, 25, 25], 32), (&[2, 320, 16, 16], 32), (&[3, 77, 96], 0)];
        for (i, &(dims, groups)) in cases.iter().enumerate() {
            let x = values(dims, i as u64);
            let channels = if groups == 0 { dims[dims.len() - 1] } else { dims[1] };
            let weight = (values(&[channels], 10 + i as u64) * 0.3).unwrap().affine(1.0, 1.0).unwrap();
            let bias = values(&[channels], 20 + i as u64);
            let dy = values(dims, 30 + i as u64);
            let cpu_norm = |x: &Tensor| {
                if groups == 0 {
                    layer_norm(x, &weight, &bias, 1e-5)
                } else {
                    group_norm(x, groups, &weight, &bias, 1e-5)
                }
            };
            let var = Var::from_tensor(&x).unwrap();
            let y = cpu_norm(var.as_tensor()).unwrap();
            let dx = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
            let n = if groups == 0 { channels } else { x.elem_count() / (dims[0] * groups) };
            let spec = NormSpec { n, groups: groups.max(1), eps: 1e-5 };
            let shaped = |t: &Tensor| if groups == 0 { t.clone() } else { t.reshape((1, channels, 1, 1)).unwrap() };
            let (w_gpu, b_gpu) = (shaped(&weight).to_device(&gpu).unwrap(), shaped(&bias).to_device(&gpu).unwrap());
            for (dtype, tolerance) in [(DType::F32, 2e-5), (DType::BF16, 5e-2)] {
                let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
                let back = |t: Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                let y_gpu = back(forward(&on_gpu(&x), &w_gpu, &b_gpu, spec).unwrap().expect("the kernels apply"));
                let dx_gpu =
                    back(input_grad(&on_gpu(&x), &on_gpu(&dy), &w_gpu, spec).unwrap().expect("the kernels apply"));
                let (ey, edx) = (max_diff(&y_gpu, &y), max_diff(&dx_gpu, &dx));
                let scale =
                    |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0) as f64;
                assert!(ey <= tolerance * scale(&y), "case {i} {dtype:?}: forward off by {ey}");
                assert!(edx <= tolerance * scale(&dx), "case {i} {dtype:?}: input gradient off by {edx}");
            }
        }
    }
}
