//! The graph node every op of [`super`] builds: a value computed outside the graph, handed to
//! candle as a custom op whose backward computes the input gradient only.
//!
//! Each op computes its value on detached inputs, with ordinary candle ops or the CPU kernels,
//! then hands it to the custom op, adding the bias on the way, so that there is no extra copy.
//! When no input is tracked (inference) the plain value is returned and no graph is built; when
//! a weight is trainable (a `Var`, or computed from one) the op falls back to candle's own
//! differentiable ops ([`frozen`] tells which).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor};

use super::profile;

/// Whether none of `tensors` needs a gradient.
pub(super) fn frozen<'a>(tensors: impl IntoIterator<Item = Option<&'a Tensor>>) -> bool {
    tensors.into_iter().flatten().all(|t| !t.track_op())
}

/// The value of a node, computed outside the graph before the custom op runs, plus an optional
/// `addend` broadcast onto it (a bias): the custom op's forward only performs that addition (or a
/// copy, with no addend), producing the storage the node owns. A value computed by a CPU kernel
/// is handed over as it is.
pub(super) struct Precomputed {
    value: Mutex<Option<Value>>,
    addend: Option<Tensor>,
}

enum Value {
    Tensor(Tensor),
    Cpu(CpuStorage, Shape),
}

impl Precomputed {
    pub(super) fn new(value: Tensor, addend: Option<Tensor>) -> Self {
        Self { value: Mutex::new(Some(Value::Tensor(value))), addend }
    }

    /// A value that a CPU kernel computed.
    pub(super) fn computed(values: CpuStorage, shape: Shape) -> Self {
        Self { value: Mutex::new(Some(Value::Cpu(values, shape))), addend: None }
    }

    pub(super) fn hand_over<S: Backend>(&self) -> Result<(S, Shape)> {
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
pub(super) trait Backend: BackendStorage {
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
pub(super) trait InputGrad: Send + Sync + 'static {
    const NAME: &'static str;
    /// What [`profile`] calls the backward.
    const BACKWARD: &'static str;
    /// `x` is the (detached) input, `grad` the gradient of the output.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// A one-input node: precomputed value, backward to the input only.
pub(super) struct Node<G> {
    out: Precomputed,
    grad: G,
}

impl<G: InputGrad> Node<G> {
    pub(super) fn new(value: Tensor, addend: Option<Tensor>, grad: G) -> Self {
        Self { out: Precomputed::new(value, addend), grad }
    }

    /// A node whose value a CPU kernel computed.
    pub(super) fn computed(values: CpuStorage, shape: Shape, grad: G) -> Self {
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
