//! Layers shared by the networks, as diffusers shares `models/resnet.py`, `attention.py`,
//! `embeddings.py` and `unets/unet_2d_blocks.py`: the UNet is built from them, the VAE from the
//! resnets, and the models built from the UNet's parts (ControlNet, the video UNet with its temporal layers) reuse them.
//! The evaluation's Inception networks (FaceNet, FID's Inception-v3) share [`basic_conv`].

pub mod attention;
pub mod basic_conv;
pub mod embeddings;
pub mod resnet;
pub mod temporal;
pub mod unet_2d;
pub mod unet_3d;
