//! The library's error type: every message names what is wrong and, where it can, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model folder, hub id or one of its files could not be found.
    #[error("{what} not found at {path}: {hint}")]
    MissingFile { what: String, path: PathBuf, hint: String },

    /// A weights file lacks a tensor, or holds it with another shape.
    #[error("{file}: {msg}")]
    Weights { file: PathBuf, msg: String },

    /// A config file could not be read or parsed.
    #[error("cannot read config {file}: {msg}")]
    Config { file: PathBuf, msg: String },

    /// A model of another kind than the one the tool expects (e.g. v-prediction SD 2.1-768).
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// Bad user input (prompt, sizes, files given on the command line).
    #[error("{0}")]
    Input(String),

    /// An output file or folder could not be written.
    #[error("cannot write {path}: {msg}")]
    Output { path: PathBuf, msg: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
