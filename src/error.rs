//! The library's error type: every message names what is wrong and, where it can, what to do.
//!
//! Messages speak of the library's own terms (a request's field and its value, a file, a config
//! key), never of one front end's flags: the command line maps [`Error::Setting`] to its flags,
//! a server to its form fields. [`Error::kind`] sorts the variants into what a caller can act on.

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

    /// A model could not be fetched from the Hugging Face hub: the message says why and what to do.
    #[error("cannot download {repo}: {msg}")]
    Download { repo: String, msg: String },

    /// A model of another kind than the one the tool expects (e.g. v-prediction SD 2.1-768).
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// A setting of a request (a generation, a learning run, a benchmark) has a value it cannot
    /// take; `name` is the request's field (`width`, `steps`, `identities`, ...).
    #[error("{name} = {value}: {problem}")]
    Setting { name: &'static str, value: String, problem: String },

    /// Bad input data: a photo, an identity file, a checkpoint, a prompt.
    #[error("{0}")]
    Input(String),

    /// A photo gives no face to align: none found, too small, or no such face number.
    #[error("{0}")]
    Face(String),

    /// The numbers went wrong: a NaN or infinite loss or gradient.
    #[error("{0}")]
    Numeric(String),

    /// A bug in the library (a cut graph, a worker thread that died): not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),

    /// An output file or folder could not be written.
    #[error("cannot write {path}: {msg}")]
    Output { path: PathBuf, msg: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a caller can do about an [`Error`] (a server answers 4xx for the first three, 5xx for the
/// others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or its input files are wrong: fix them.
    Input,
    /// The model is missing, incomplete, of an unsupported kind or does not match: use another.
    Model,
    /// The run diverged (non-finite loss or gradients): change the settings.
    Numeric,
    /// Files could not be read or written (disk full, permissions).
    Storage,
    /// A bug or a failure inside the tensor library.
    Internal,
}

impl Error {
    /// A bad value for a request's field `name`.
    pub fn setting(name: &'static str, value: impl ToString, problem: impl Into<String>) -> Self {
        Self::Setting { name, value: value.to_string(), problem: problem.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Setting { .. } | Self::Input(_) | Self::Face(_) => ErrorKind::Input,
            Self::MissingFile { .. }
            | Self::Download { .. }
            | Self::Weights { .. }
            | Self::Config { .. }
            | Self::UnsupportedModel(_) => ErrorKind::Model,
            Self::Numeric(_) => ErrorKind::Numeric,
            Self::Output { .. } | Self::Io(_) => ErrorKind::Storage,
            Self::Internal(_) | Self::Candle(_) => ErrorKind::Internal,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
