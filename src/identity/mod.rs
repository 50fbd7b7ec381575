//! Identities: the two learned word embeddings `v1*`, `v2*` of one person.

mod file;

pub use file::{Identity, IDENTITY_TENSOR};
