//! # stableid
//!
//! StableIdentity (arXiv 2401.15975) in Rust on candle: learn a face identity from one photo as two
//! word embeddings `v1*` `v2*` of Stable Diffusion 2.1's text encoder, then generate that person
//! anywhere with the frozen diffusion models.
//!
//! The folders follow the data flow; each module uses only those listed before it, which
//! `tests/layers.rs` checks:
//! - [`io`], [`random`]: bounded reads of input files, atomic outputs with PNG metadata; seeded noise.
//! - [`weights`]: find a diffusers model folder (local or Hugging Face cache), read configs and tensors.
//! - [`tokenizer`]: CLIP BPE with placeholder tokens for identities.
//! - [`nn`]: differentiable building blocks shared by every model.
//! - [`schedulers`]: DDPM, DDIM, Euler and DPM-Solver++ behind one trait.
//! - [`models`]: the frozen networks (CLIP text encoder, UNet, VAE, face ViT, face parsers), the
//!   blocks they share, and the Stable Diffusion components every pipeline and the learner use.
//! - [`priors`]: photo loading, face detection and FFHQ alignment, face-recognition feature,
//!   face/hair masks, celebrity basis.
//! - [`identity`]: the learner (MLP, AdaIN, augmentation, masked two-phase loss, AdamW, loop,
//!   checkpoints) and the identity file (`v1*`, `v2*`).
//! - [`pipelines`]: text-to-image generation, identities in the prompt.
//! - [`bench`](mod@bench): timings of the real SD 2.1-base architecture against the PyTorch reference.
//! - `server` (feature `server`, on by default): the web app of `stableid serve`, its HTTP API
//!   and job queue.
//!
//! ## Aligning photos
//!
//! The learner expects an FFHQ-aligned 512x512 head crop; from any photo (`stableid align PHOTO
//! --out DIR` on the command line):
//!
//! ```no_run
//! # fn main() -> stableid::Result<()> {
//! use std::path::Path;
//! use stableid::priors::align::{align, choose_face, FaceDetector, ALIGNED_SIZE};
//! use stableid::priors::photo::load_upright;
//!
//! let path = Path::new("me.jpg");
//! let photo = load_upright(path)?; // full resolution, EXIF orientation applied
//! let faces = FaceDetector::shipped(&candle_core::Device::Cpu)?.detect(&photo)?; // largest first
//! let face = choose_face(&faces, None, path)?; // the largest; an input error if there is none
//! let aligned = align(&photo, face, ALIGNED_SIZE)?; // aligned.image: 512x512; aligned.quad
//! # Ok(())
//! # }
//! ```
//!
//! The method as implemented, with the paper's and the published code's settings, is described in
//! `docs/method.md`; what training through frozen models takes on candle, and so why [`nn`] exists,
//! in `docs/candle.md`.

pub mod bench;
pub mod error;
pub mod eval;
pub mod identity;
pub mod io;
pub mod models;
pub mod nn;
pub mod pipelines;
pub mod priors;
pub mod random;
pub mod schedulers;
#[cfg(feature = "server")]
pub mod server;
pub mod splats;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
