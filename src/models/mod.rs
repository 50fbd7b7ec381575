//! The frozen networks, each loaded from its diffusers / transformers / PyTorch layout, and the
//! Stable Diffusion components they make together ([`stable_diffusion`]).
//!
//! [`Weights::build`]: crate::weights::Weights::build

pub mod blocks;
pub mod clip;
pub mod clip_text;
mod config;
pub mod controlnet;
pub mod face_parsing;
pub mod facenet;
pub mod inception;
pub mod lpips;
pub mod mtcnn;
pub mod openpose;
pub mod stable_diffusion;
pub mod text_to_video;
pub mod unet;
pub mod unet3d;
pub mod vae;
pub mod vit;

/// [`Weights::build`] with the model's linear and convolution weight matrices kept in `matrices`
/// ([`crate::nn::load_matrices_as`]).
pub(crate) fn build_packed<M>(
    weights: crate::weights::Weights,
    matrices: crate::nn::MatrixFormat,
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<M>,
) -> crate::Result<M> {
    crate::nn::load_matrices_as(matrices, || weights.build(build))
}
