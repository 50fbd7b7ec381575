//! The frozen networks, each loaded from its diffusers / transformers / PyTorch layout, and the
//! Stable Diffusion components they make together ([`stable_diffusion`]).

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
