//! The frozen networks, each loaded from its diffusers / transformers / PyTorch layout.

pub mod clip_text;
mod config;
pub mod face_parsing;
mod resnet;
pub mod unet;
pub mod vae;
pub mod vit;
