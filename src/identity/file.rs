//! The identity file: a safetensors file holding one (2, hidden) f32 tensor, `v1*` then `v2*`.
//!
//! Besides the tool's own files (tensor `identity`), textual-inversion embeddings written by
//! AUTOMATIC1111 / ComfyUI (`emb_params`) or diffusers (`<token>` -> tensor) are read too, as long
//! as they hold exactly one two-vector embedding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::io::{read_safetensors, write_atomically, TensorFile, SMALL_FILE_LIMIT};
use crate::{Error, Result};

/// Name of the tensor in the tool's own identity files.
pub const IDENTITY_TENSOR: &str = "identity";

/// The metadata key of the [`token_table_digest`] of the text encoder an identity was learned on.
pub const TOKEN_TABLE_KEY: &str = "token_embedding_f16_sha256";

/// Hex SHA-256 of a text encoder's token-embedding table rounded to f16 (little-endian): the same
/// for copies of one encoder stored in f32 or f16 (ModelScope ships SD 2.1's in fp16), different
/// for another encoder. Identities record it, so that a model sharing the encoder is recognised
/// by content rather than by file.
pub fn token_table_digest(table: &Tensor) -> Result<String> {
    let half: Vec<half::f16> = table.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
    let mut hasher = Sha256::new();
    let mut bytes = Vec::with_capacity(8192);
    for chunk in half.chunks(4096) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|v| v.to_bits().to_le_bytes()));
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A learned identity: two embeddings of the text encoder's width.
#[derive(Debug, Clone)]
pub struct Identity {
    /// (2, hidden) f32: row 0 is `v1*`, row 1 is `v2*`.
    pub embeddings: Tensor,
    /// Where it came from, for messages and image metadata.
    pub source: PathBuf,
    pub metadata: HashMap<String, String>,
}

impl Identity {
    /// Reads an identity file (own, A1111/ComfyUI or diffusers textual-inversion format) of at
    /// most [`SMALL_FILE_LIMIT`] bytes; one holding NaN or infinite values is refused.
    pub fn load(path: &Path) -> Result<Self> {
        let identity = Self::load_unchecked(path)?;
        let non_finite = identity.non_finite_values()?;
        if non_finite > 0 {
            return Err(Error::Input(format!(
                "identity file {}: {non_finite} of its {} values are NaN or infinite (the run that made it \
                 diverged?): learn the identity again",
                path.display(),
                identity.embeddings.elem_count()
            )));
        }
        Ok(identity)
    }

    /// [`Identity::load`] without refusing NaN or infinite values, to inspect a damaged file.
    pub fn load_unchecked(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Input(format!("identity file {}: {msg}", path.display()));
        let TensorFile { tensors, metadata } =
            read_safetensors(path, SMALL_FILE_LIMIT).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::MissingFile {
                    what: "identity file".into(),
                    path: path.to_path_buf(),
                    hint: "identity files are written by learning from a photo of the person".into(),
                },
                _ => bad(e.to_string()),
            })?;
        let embeddings = match tensors.get(IDENTITY_TENSOR).or_else(|| tensors.get("emb_params")) {
            Some(t) => t.clone(),
            None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
            None => {
                let mut names: Vec<_> = tensors.keys().cloned().collect();
                names.sort();
                return Err(bad(format!(
                    "expected one tensor `{IDENTITY_TENSOR}` (or a single textual-inversion embedding), found {names:?}"
                )));
            }
        };
        if !matches!(embeddings.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(bad(format!("the embedding has dtype {:?}; expected floating point", embeddings.dtype())));
        }
        if embeddings.rank() != 2 || embeddings.dim(0)? != 2 {
            return Err(bad(format!(
                "the embedding has shape {:?}; an identity is 2 vectors (v1*, v2*) of the text encoder's width, shape [2, 1024] for SD 2.1",
                embeddings.dims()
            )));
        }
        let embeddings = embeddings.to_dtype(DType::F32)?;
        Ok(Self { embeddings, source: path.to_path_buf(), metadata })
    }

    /// How many of the values are NaN or infinite (0 for any identity [`Identity::load`] returns).
    pub fn non_finite_values(&self) -> Result<usize> {
        let values = self.embeddings.flatten_all()?.to_vec1::<f32>()?;
        Ok(values.iter().filter(|v| !v.is_finite()).count())
    }

    /// Width of each embedding (1024 for SD 2.1).
    pub fn width(&self) -> usize {
        self.embeddings.dims()[1]
    }

    /// Whether this identity was learned on a text encoder with the token-embedding table of
    /// `table_digest` ([`token_table_digest`]); `None` when the file does not record it (files of
    /// other tools, or older ones).
    pub fn learned_on(&self, table_digest: &str) -> Option<bool> {
        self.metadata.get(TOKEN_TABLE_KEY).map(|recorded| recorded == table_digest)
    }

    /// Writes the tool's own identity file (tensor `identity`, f32, with the metadata), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut metadata = self.metadata.clone();
        metadata.insert("format".into(), FORMAT.into());
        metadata.insert("format_version".into(), FORMAT_VERSION.into());
        write_safetensors(path, IDENTITY_TENSOR, &self.embeddings, Some(metadata))
    }

    /// Writes the identity as a textual-inversion embedding other tools load for SD 2.x: one
    /// two-vector embedding, under the key each tool looks for.
    pub fn export(&self, path: &Path, format: ExportFormat) -> Result<()> {
        match format {
            // diffusers' `load_textual_inversion` takes a file with a single tensor; its key is
            // the token when none is given.
            ExportFormat::Diffusers => write_safetensors(path, "<v1*v2*>", &self.embeddings, None),
            // AUTOMATIC1111 and ComfyUI read safetensors embeddings from `emb_params`.
            ExportFormat::A1111 => write_safetensors(path, "emb_params", &self.embeddings, None),
        }
    }
}

/// The `format` metadata value of the tool's identity files.
pub const FORMAT: &str = "stableid-identity";
/// Bumped when the identity file changes incompatibly.
pub const FORMAT_VERSION: &str = "1";

/// Textual-inversion formats `stableid export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Diffusers,
    A1111,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "diffusers" => Ok(Self::Diffusers),
            "a1111" | "comfyui" => Ok(Self::A1111),
            other => Err(format!("unknown export format `{other}`: expected diffusers or a1111")),
        }
    }
}

fn write_safetensors(path: &Path, key: &str, tensor: &Tensor, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    let bytes = safetensors::serialize([(key.to_string(), &tensor)], metadata)
        .map_err(|e| Error::Output { path: path.to_path_buf(), msg: e.to_string() })?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
}
