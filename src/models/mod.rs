//! The frozen networks of Stable Diffusion, each loaded from its diffusers / transformers layout.

pub mod clip_text;
pub mod unet;
pub mod vae;
