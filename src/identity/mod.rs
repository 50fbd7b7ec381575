//! Identities: the two learned word embeddings `v1*`, `v2*` of one person, and how they are learned.

mod file;
pub mod loss;
pub mod mlp;
pub mod optim;
pub mod templates;

pub use file::{ExportFormat, Identity, FORMAT, FORMAT_VERSION, IDENTITY_TENSOR};
