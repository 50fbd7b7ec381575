//! Face parsing networks: per-pixel classes (skin, hair, eyes, ...) of a face photo.

pub mod bisenet;
pub mod segformer;
