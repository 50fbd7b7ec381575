//! The rasterizer as a candle custom op: projected Gaussians in, a differentiable image of
//! colour, depth and final transmittance out.
//!
//! The projection (3D to 2D, covariance, colour from SH) is made of ordinary candle ops
//! ([`super::project`]), so candle differentiates it; this op composites the projected Gaussians
//! and back-propagates to them. Its input packs, per Gaussian, the [`Layout`] columns. Its output
//! is `[5, height, width]`: colour `C + T bg` (3), depth `sum(depth alpha T)` (as LucidDreamer's
//! fork of the Inria rasterizer) and final transmittance `T`.
//!
//! Only the CPU kernel (`cpu.rs`) exists: a tensor on another device is copied to the CPU, drawn,
//! and the image copied back (candle's `to_device` is differentiable), so CUDA is correct but
//! slow until CUDA kernels are written and tested on a GPU.

mod cpu;

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout as TensorLayout, Result, Shape, Tensor};

/// The columns of the rasterizer's input, one row per Gaussian.
pub struct Layout;

impl Layout {
    /// Pixel coordinates of the centre `(x, y)`; pixel `(i, j)` covers `[i, i+1) x [j, j+1)`.
    pub const MEAN: usize = 0;
    /// The inverse 2D covariance `(a, b, c)`: `power = -(a dx^2 + c dy^2) / 2 - b dx dy`.
    pub const CONIC: usize = 2;
    /// Opacity in `[0, 1]`.
    pub const OPACITY: usize = 5;
    /// Colour (3).
    pub const COLOR: usize = 6;
    /// View-space depth; a Gaussian at or before the near plane is culled.
    pub const DEPTH: usize = 9;
}

/// Columns per Gaussian.
pub const ROW: usize = 10;
/// Output channels: colour (3), depth, final transmittance.
pub const CHANNELS: usize = 5;

/// What a rasterization needs besides the Gaussians.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub width: usize,
    pub height: usize,
    /// Colour where nothing is drawn, composited as `C + T bg`.
    pub background: [f64; 3],
    /// Gaussians with a depth at or below this are culled (Inria: 0.2).
    pub near: f64,
}

/// Per-Gaussian results of a rasterization that are not part of the differentiable image.
#[derive(Debug, Clone, Default)]
pub struct Footprints {
    /// Radius in pixels (3 sigma); 0 for a culled Gaussian.
    pub radii: Vec<u32>,
    /// After the backward pass: `d loss / d (x, y)` of each Gaussian's pixel centre, `[N, 2]`,
    /// what densification accumulates.
    pub mean_grads: Option<Vec<[f64; 2]>>,
}

/// The rasterizer node: keeps the tile lists of its forward for its backward.
struct Rasterize {
    settings: Settings,
    forward: Mutex<Option<cpu::Forward>>,
    footprints: Arc<Mutex<Footprints>>,
}

fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| candle_core::Error::Msg("rasterizer: poisoned lock".into()))
}

fn wide(storage: &CpuStorage, layout: &TensorLayout) -> Result<Vec<f64>> {
    let values: Vec<f64> = match storage {
        CpuStorage::F32(v) => v.iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => v.clone(),
        other => candle_core::bail!("rasterizer: f32 or f64 Gaussians only, not {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(values[start..end].to_vec()),
        None => candle_core::bail!("rasterizer: the Gaussians must be contiguous"),
    }
}

impl CustomOp1 for Rasterize {
    fn name(&self) -> &'static str {
        "splat-rasterize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &TensorLayout) -> Result<(CpuStorage, Shape)> {
        let params = wide(storage, layout)?;
        let forward = cpu::forward(&params, &self.settings);
        let image = match storage.dtype() {
            DType::F32 => CpuStorage::F32(forward.image.iter().map(|&v| v as f32).collect()),
            _ => CpuStorage::F64(forward.image.clone()),
        };
        lock(&self.footprints)?.radii = forward.radii.clone();
        *lock(&self.forward)? = Some(forward);
        Ok((image, Shape::from((CHANNELS, self.settings.height, self.settings.width))))
    }

    fn bwd(&self, params: &Tensor, _image: &Tensor, grad_image: &Tensor) -> Result<Option<Tensor>> {
        let forward = lock(&self.forward)?;
        let forward =
            forward.as_ref().ok_or_else(|| candle_core::Error::Msg("rasterizer: backward before forward".into()))?;
        let values = params.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let grad_image = grad_image.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let grads = cpu::backward(&values, &self.settings, forward, &grad_image);
        lock(&self.footprints)?.mean_grads =
            Some(grads.chunks(ROW).map(|g| [g[Layout::MEAN], g[Layout::MEAN + 1]]).collect());
        let grads = Tensor::from_vec(grads, params.shape(), &Device::Cpu)?.to_dtype(params.dtype())?;
        Ok(Some(grads))
    }
}

/// A rendered image and the per-Gaussian results beside it.
pub struct Rasterized {
    /// `[5, height, width]`: colour (3), depth, final transmittance; differentiable.
    pub image: Tensor,
    footprints: Arc<Mutex<Footprints>>,
}

impl Rasterized {
    /// Radii, and after `backward` the pixel-centre gradients.
    pub fn footprints(&self) -> Footprints {
        self.footprints.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// Composites `params` (`[N, ROW]`, f32 or f64, laid out as [`Layout`]) into an image.
pub fn rasterize(params: &Tensor, settings: Settings) -> Result<Rasterized> {
    let (_, columns) = params.dims2()?;
    if columns != ROW {
        candle_core::bail!("rasterizer: {columns} columns per Gaussian, expected {ROW}");
    }
    let device = params.device().clone();
    let footprints = Arc::new(Mutex::new(Footprints::default()));
    let op = Rasterize { settings, forward: Mutex::new(None), footprints: footprints.clone() };
    let image = params.to_device(&Device::Cpu)?.contiguous()?.apply_op1(op)?.to_device(&device)?;
    Ok(Rasterized { image, footprints })
}
