//! Pipelines: what the frozen models produce for a user (text-to-image; later ControlNet, video, 3D).

pub mod text_to_image;

pub use text_to_image::{placeholder_token, GenerateRequest, StableDiffusion, MAX_IDENTITIES};
