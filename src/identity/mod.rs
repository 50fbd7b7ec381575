//! Identities: the two learned word embeddings `v1*`, `v2*` of one person, and how they are learned.
//!
//! - [`mlp`]: the trainable MLP and the AdaIN landing in the celebrity basis.
//! - [`augment`]: the per-step augmentation of the single photo and its masks.
//! - [`templates`]: the captions.
//! - [`loss`]: the masked two-phase diffusion loss.
//! - [`optim`]: AdamW and gradient clipping.
//! - [`step`]: one learning step through the frozen models.
//! - [`train_loop`], [`checkpoint`]: the loop, checkpoints and resuming.
//! - [`run`]: a whole run, from a prepared photo to the identity.

pub mod augment;
pub mod checkpoint;
mod file;
pub mod loss;
pub mod mlp;
pub mod optim;
pub mod run;
pub mod step;
pub mod templates;
pub mod train_loop;

pub use file::{token_table_digest, ExportFormat, Identity, FORMAT, FORMAT_VERSION, IDENTITY_TENSOR, TOKEN_TABLE_KEY};
