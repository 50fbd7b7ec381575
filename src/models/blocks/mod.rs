//! Layers shared by the networks, as diffusers shares `models/resnet.py`, `attention.py`,
//! `embeddings.py` and `unets/unet_2d_blocks.py`: the UNet is built from them, the VAE from the
//! resnets, and the models built from the UNet's parts (ControlNet, the video UNet with its temporal layers) reuse them.

pub mod attention;
pub mod embeddings;
pub mod resnet;
pub mod temporal;
pub mod unet_2d;
pub mod unet_3d;
