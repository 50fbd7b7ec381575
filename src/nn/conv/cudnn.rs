//! cuDNN convolutions (forward and backward-data) with the fastest algorithm per shape.
//!
//! The first convolution of each shape, direction and dtype times every algorithm cuDNN offers
//! (`cudnnFind*AlgorithmEx`, as PyTorch does with `torch.backends.cudnn.benchmark = True`) and
//! keeps the fastest that fits [`SEARCH_WORKSPACE_BYTES`], with its descriptors. One workspace
//! per device, grown to the largest chosen algorithm's need, serves every call. f32 runs on TF32
//! tensor cores where [`crate::nn::set_tf32`] allows it (the CLI's default on CUDA, as PyTorch's
//! `torch.backends.cudnn.allow_tf32`), in full f32 otherwise; f16 and bf16 accumulate in f32.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::sys;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use super::{ConvShape, Direction};

/// The most workspace an algorithm may use: larger ones are not considered.
const SEARCH_WORKSPACE_BYTES: usize = 512 << 20;

/// Runs the convolution `direction` of `shape` on contiguous `data` (`x` or `dy`) and `kernel`.
pub(super) fn run(
    shape: ConvShape,
    direction: Direction,
    data: &CudaStorage,
    data_layout: &Layout,
    kernel: &CudaStorage,
    kernel_layout: &Layout,
) -> Result<CudaStorage> {
    match data.dtype() {
        DType::F32 => run_typed::<f32>(shape, direction, data, data_layout, kernel, kernel_layout),
        DType::F16 => run_typed::<f16>(shape, direction, data, data_layout, kernel, kernel_layout),
        DType::BF16 => run_typed::<bf16>(shape, direction, data, data_layout, kernel, kernel_layout),
        other => candle_core::bail!("conv2d with cuDNN: f32, f16 or bf16, not {other:?}"),
    }
}

/// The element types cuDNN convolves here, with its name for each.
trait Element: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr {
    const DATA_TYPE: sys::cudnnDataType_t;

    /// Tensor cores for half precisions; for f32, TF32 tensor cores unless [`crate::nn::tf32`]
    /// is off.
    fn math() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

impl Element for f32 {
    const DATA_TYPE: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;

    fn math() -> sys::cudnnMathType_t {
        if crate::nn::tf32() {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }
}

impl Element for f16 {
    const DATA_TYPE: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_HALF;
}

impl Element for bf16 {
    const DATA_TYPE: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
}

fn run_typed<T: Element>(
    shape: ConvShape,
    direction: Direction,
    data: &CudaStorage,
    data_layout: &Layout,
    kernel: &CudaStorage,
    kernel_layout: &Layout,
) -> Result<CudaStorage> {
    let device = &data.device;
    let stream = device.cuda_stream();
    let data = data.as_cuda_slice::<T>()?.slice(data_layout.start_offset()..);
    let kernel = kernel.as_cuda_slice::<T>()?.slice(kernel_layout.start_offset()..);
    let out_len = match direction {
        Direction::Forward => shape.batch * shape.c_out * shape.out_h() * shape.out_w(),
        Direction::InputGrad => shape.batch * shape.c_in * shape.h * shape.w,
    };
    // SAFETY: cuDNN writes every element of the output (beta = 0) before anything reads it.
    let mut out = unsafe { device.alloc::<T>(out_len)? };

    let mut states = states();
    let state = match states.entry(device.id()) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(DeviceState::new(stream.clone())?),
    };
    let key = (shape, direction, T::DATA_TYPE as i32, T::math() as i32);
    if !state.plans.contains_key(&key) {
        let plan = Plan::find::<T>(state, device, shape, direction, &data, &kernel, &mut out)?;
        state.plans.insert(key, plan);
    }
    let plan = &state.plans[&key];
    state.workspace.ensure(device, plan.workspace_bytes)?;

    let (alpha, beta) = (1.0f32, 0.0f32);
    let (alpha, beta) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
    let (data_ptr, data_guard) = data.device_ptr(&stream);
    let (kernel_ptr, kernel_guard) = kernel.device_ptr(&stream);
    let (out_ptr, out_guard) = out.device_ptr_mut(&stream);
    let (workspace_ptr, workspace_bytes, workspace_guard) = state.workspace.pointer(&stream);
    let d = &plan.descriptors;
    // SAFETY: the descriptors describe these buffers (contiguous NCHW of `shape`, dtype `T`),
    // the workspace holds at least what the algorithm asked for, all on the handle's stream.
    let status = unsafe {
        match plan.algorithm {
            Algorithm::Forward(algorithm) => sys::cudnnConvolutionForward(
                state.handle.0,
                alpha,
                d.input,
                data_ptr as *const c_void,
                d.kernel,
                kernel_ptr as *const c_void,
                d.conv,
                algorithm,
                workspace_ptr,
                workspace_bytes,
                beta,
                d.output,
                out_ptr as *mut c_void,
            ),
            Algorithm::InputGrad(algorithm) => sys::cudnnConvolutionBackwardData(
                state.handle.0,
                alpha,
                d.kernel,
                kernel_ptr as *const c_void,
                d.output,
                data_ptr as *const c_void,
                d.conv,
                algorithm,
                workspace_ptr,
                workspace_bytes,
                beta,
                d.input,
                out_ptr as *mut c_void,
            ),
        }
    };
    status.result()?;
    drop((data_guard, kernel_guard, out_guard, workspace_guard));
    Ok(CudaStorage::wrap_cuda_slice(out, device.clone()))
}

/// What one device keeps between calls.
struct DeviceState {
    handle: Handle,
    /// By shape, direction, data type and math type.
    plans: HashMap<(ConvShape, Direction, i32, i32), Plan>,
    workspace: Workspace,
}

/// A cuDNN handle bound to candle's stream of one device.
struct Handle(sys::cudnnHandle_t);

// SAFETY: a cuDNN handle may be used from any thread, one at a time: it lives behind the
// `STATES` mutex.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and used by nothing else.
        unsafe { sys::cudnnDestroy(self.0) };
    }
}

impl DeviceState {
    fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle; the stream outlives the handle (candle's device keeps it).
        unsafe {
            sys::cudnnCreate(&mut handle).result()?;
            let handle = Handle(handle);
            sys::cudnnSetStream(handle.0, stream.cu_stream() as sys::cudaStream_t).result()?;
            Ok(Self { handle, plans: HashMap::new(), workspace: Workspace { buffer: None, stream } })
        }
    }
}

fn states() -> MutexGuard<'static, HashMap<DeviceId, DeviceState>> {
    static STATES: LazyLock<Mutex<HashMap<DeviceId, DeviceState>>> = LazyLock::new(Default::default);
    STATES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The device memory algorithms work in, grown as needed and never shrunk.
struct Workspace {
    buffer: Option<CudaSlice<u8>>,
    stream: Arc<CudaStream>,
}

impl Workspace {
    fn ensure(&mut self, device: &CudaDevice, bytes: usize) -> Result<()> {
        if self.buffer.as_ref().map_or(0, |b| b.len()) < bytes {
            self.buffer = None;
            // SAFETY: scratch memory, written by cuDNN before it reads it.
            self.buffer = Some(unsafe { device.alloc::<u8>(bytes)? });
        }
        Ok(())
    }

    /// The workspace's address and size (null and 0 when there is none yet).
    fn pointer<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (*mut c_void, usize, Option<candle_core::cuda::cudarc::driver::SyncOnDrop<'a>>) {
        match &mut self.buffer {
            Some(buffer) => {
                let len = buffer.len();
                let (ptr, guard) = buffer.device_ptr_mut(stream);
                (ptr as *mut c_void, len, Some(guard))
            }
            None => (std::ptr::null_mut(), 0, None),
        }
    }
}

/// The descriptors of one convolution shape and dtype.
struct Descriptors {
    input: sys::cudnnTensorDescriptor_t,
    output: sys::cudnnTensorDescriptor_t,
    kernel: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

// SAFETY: plain cuDNN descriptors, only used under the `STATES` mutex.
unsafe impl Send for Descriptors {}

impl Descriptors {
    fn new<T: Element>(shape: &ConvShape) -> Result<Self> {
        let int = |n: usize| n as i32;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let mut d = Self {
            input: std::ptr::null_mut(),
            output: std::ptr::null_mut(),
            kernel: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        // SAFETY: each descriptor is created before it is set; `Drop` destroys those created.
        unsafe {
            sys::cudnnCreateTensorDescriptor(&mut d.input).result()?;
            sys::cudnnCreateTensorDescriptor(&mut d.output).result()?;
            sys::cudnnCreateFilterDescriptor(&mut d.kernel).result()?;
            sys::cudnnCreateConvolutionDescriptor(&mut d.conv).result()?;
            let (b, c_in, c_out) = (int(shape.batch), int(shape.c_in), int(shape.c_out));
            sys::cudnnSetTensor4dDescriptor(d.input, nchw, T::DATA_TYPE, b, c_in, int(shape.h), int(shape.w))
                .result()?;
            sys::cudnnSetTensor4dDescriptor(
                d.output,
                nchw,
                T::DATA_TYPE,
                b,
                c_out,
                int(shape.out_h()),
                int(shape.out_w()),
            )
            .result()?;
            sys::cudnnSetFilter4dDescriptor(d.kernel, T::DATA_TYPE, nchw, c_out, c_in, int(shape.kh), int(shape.kw))
                .result()?;
            let (p, s) = (int(shape.padding), int(shape.stride));
            sys::cudnnSetConvolution2dDescriptor(
                d.conv,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .result()?;
            sys::cudnnSetConvolutionMathType(d.conv, T::math()).result()?;
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: destroys what `new` created (cuDNN accepts null descriptors here).
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.input);
            sys::cudnnDestroyTensorDescriptor(self.output);
            sys::cudnnDestroyFilterDescriptor(self.kernel);
            sys::cudnnDestroyConvolutionDescriptor(self.conv);
        }
    }
}

/// The algorithm chosen for one shape, direction and dtype.
struct Plan {
    descriptors: Descriptors,
    algorithm: Algorithm,
    workspace_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Algorithm {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    InputGrad(sys::cudnnConvolutionBwdDataAlgo_t),
}

impl Plan {
    /// Times cuDNN's algorithms on these buffers (`out` is overwritten) and keeps the fastest.
    fn find<T: Element>(
        state: &DeviceState,
        device: &CudaDevice,
        shape: ConvShape,
        direction: Direction,
        data: &impl DevicePtr<T>,
        kernel: &impl DevicePtr<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<Self> {
        let descriptors = Descriptors::new::<T>(&shape)?;
        // The search's own workspace, freed afterwards: only the chosen algorithm's need stays.
        // SAFETY: scratch memory, written by cuDNN before it reads it.
        let mut search = unsafe { device.alloc::<u8>(SEARCH_WORKSPACE_BYTES)? };
        let stream = state.workspace.stream.clone();
        let (data_ptr, data_guard) = data.device_ptr(&stream);
        let (kernel_ptr, kernel_guard) = kernel.device_ptr(&stream);
        let (out_ptr, out_guard) = out.device_ptr_mut(&stream);
        let (workspace_ptr, workspace_guard) = search.device_ptr_mut(&stream);
        let (workspace_ptr, workspace_bytes) = (workspace_ptr as *mut c_void, SEARCH_WORKSPACE_BYTES);
        let d = &descriptors;
        let mut returned = 0;
        // (algorithm, status, memory) of each result, fastest first.
        let results: Vec<(Algorithm, sys::cudnnStatus_t, usize)> = match direction {
            Direction::Forward => {
                // SAFETY: plain data, filled in by cuDNN.
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; 8];
                // SAFETY: as in `run_typed`; cuDNN fills up to `perf.len()` results.
                unsafe {
                    sys::cudnnFindConvolutionForwardAlgorithmEx(
                        state.handle.0,
                        d.input,
                        data_ptr as *const c_void,
                        d.kernel,
                        kernel_ptr as *const c_void,
                        d.conv,
                        d.output,
                        out_ptr as *mut c_void,
                        perf.len() as i32,
                        &mut returned,
                        perf.as_mut_ptr(),
                        workspace_ptr,
                        workspace_bytes,
                    )
                    .result()?;
                }
                perf[..returned as usize].iter().map(|p| (Algorithm::Forward(p.algo), p.status, p.memory)).collect()
            }
            Direction::InputGrad => {
                // SAFETY: plain data, filled in by cuDNN.
                let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; 6];
                // SAFETY: as above.
                unsafe {
                    sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                        state.handle.0,
                        d.kernel,
                        kernel_ptr as *const c_void,
                        d.output,
                        data_ptr as *const c_void,
                        d.conv,
                        d.input,
                        out_ptr as *mut c_void,
                        perf.len() as i32,
                        &mut returned,
                        perf.as_mut_ptr(),
                        workspace_ptr,
                        workspace_bytes,
                    )
                    .result()?;
                }
                perf[..returned as usize].iter().map(|p| (Algorithm::InputGrad(p.algo), p.status, p.memory)).collect()
            }
        };
        let success = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
        let Some(&(algorithm, _, workspace_bytes)) =
            results.iter().find(|(_, status, memory)| *status == success && *memory <= SEARCH_WORKSPACE_BYTES)
        else {
            candle_core::bail!("cuDNN has no algorithm for a {direction:?} convolution of {shape:?}")
        };
        drop((data_guard, kernel_guard, out_guard, workspace_guard));
        Ok(Self { descriptors, algorithm, workspace_bytes })
    }
}
