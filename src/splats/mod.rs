//! 3D Gaussian splatting: Gaussians as candle tensors, cameras, a differentiable tile rasterizer
//! with colour, depth and transmittance outputs, the 3DGS optimiser and densification, and PLY
//! files in the layout of Inria's 3DGS.
//!
//! References: Kerbl et al., "3D Gaussian Splatting for Real-Time Radiance Field Rendering"
//! (Inria `diff-gaussian-rasterization`, `gaussian-splatting/scene/gaussian_model.py`), with
//! LucidDreamer's depth output `sum(depth alpha T)` and final transmittance; gsplat's
//! `_torch_impl.py` for the projection written plainly. Deviations are listed where they occur
//! (`rasterize/cpu.rs`: the gradient of the 0.99 opacity clamp). `tools/reference/splat.py` is
//! the dense PyTorch renderer the tests compare with.
//!
//! A render for text-to-3D:
//!
//! ```no_run
//! # fn demo(gaussians: &stableid::splats::Gaussians, camera: &stableid::splats::Camera) -> stableid::Result<()> {
//! use stableid::splats::{render, RenderOptions};
//! let view = render(gaussians, camera, &RenderOptions::default())?;
//! let (rgb, depth, transmittance) = (view.color()?, view.depth()?, view.transmittance()?);
//! // ... a loss on rgb / depth, then loss.backward(): gradients reach every Gaussian tensor,
//! // and view.footprints().mean_grads gives densification its 2D gradients.
//! # Ok(()) }
//! ```

mod camera;
mod fit;
mod gaussians;
pub mod init;
mod ply;
mod project;
pub mod rasterize;
mod train;

use candle_core::Tensor;

pub use camera::{
    cameras_extent, common_target, orbit_cameras, read_camera_entries, read_cameras_json, scene_bounds, Camera,
    CameraJson, Orbit, OrbitPosition, Vec3,
};
pub use fit::{fit, psnr, random_start, FitOptions, FitReport};
pub use gaussians::Gaussians;
pub use ply::{ply_metadata, read_ply, write_ply};
pub use project::{project, LOW_PASS, SH_C0};
pub use rasterize::{Footprints, Settings};
pub use train::{Densifier, DensifyOptions, ExponentialSchedule, LearningRates, SplatAdam, SplatAdamState};

use crate::Result;

/// How to render, besides the camera.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderOptions {
    /// Colour where nothing is drawn.
    pub background: [f64; 3],
    /// The near plane: Gaussians at or before this view depth are culled (Inria's 0.2).
    pub near: f64,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self { background: [0.0; 3], near: 0.2 }
    }
}

/// One differentiable view of a cloud.
pub struct Render {
    /// `[5, height, width]`: colour (3), depth, final transmittance.
    pub image: Tensor,
    raster: rasterize::Rasterized,
}

impl Render {
    /// `[3, height, width]`, `C + T bg`.
    pub fn color(&self) -> Result<Tensor> {
        Ok(self.image.narrow(0, 0, 3)?)
    }

    /// `[1, height, width]`: `sum(depth alpha T)` (0 where nothing is drawn).
    pub fn depth(&self) -> Result<Tensor> {
        Ok(self.image.narrow(0, 3, 1)?)
    }

    /// `[1, height, width]`: the transmittance left after the last Gaussian (1 - coverage).
    pub fn transmittance(&self) -> Result<Tensor> {
        Ok(self.image.narrow(0, 4, 1)?)
    }

    /// The colour as 8-bit RGB (clamped to `[0, 1]`, rounded).
    pub fn rgb_image(&self) -> Result<crate::io::RgbImage> {
        let color = self.color()?.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        let (_, height, width) = color.dims3()?;
        let bytes =
            (color.clamp(0f32, 1f32)? * 255.0)?.round()?.permute((1, 2, 0))?.to_dtype(candle_core::DType::U8)?;
        Ok(crate::io::RgbImage {
            width: width as u32,
            height: height as u32,
            pixels: bytes.flatten_all()?.to_vec1::<u8>()?,
        })
    }

    /// Pixel radii of the Gaussians (0: not drawn), and their 2D gradients once a loss of this
    /// render has been back-propagated.
    pub fn footprints(&self) -> Footprints {
        self.raster.footprints()
    }
}

/// Renders `gaussians` seen by `camera`: differentiable with respect to every Gaussian tensor.
pub fn render(gaussians: &Gaussians, camera: &Camera, options: &RenderOptions) -> Result<Render> {
    if gaussians.is_empty()? {
        return Err(crate::Error::Input("nothing to render: the cloud holds no Gaussians".into()));
    }
    let rows = project(gaussians, camera, options.near)?;
    let settings =
        Settings { width: camera.width, height: camera.height, background: options.background, near: options.near };
    let raster = rasterize::rasterize(&rows, settings)?;
    Ok(Render { image: raster.image.clone(), raster })
}
