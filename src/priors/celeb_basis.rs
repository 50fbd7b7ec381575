//! The celebrity-name basis: StableIdentity's editability prior (arXiv 2401.15975, section 3.1,
//! after Celeb-Basis, arXiv 2306.00926).
//!
//! Names of well-known people, each two words that the CLIP tokenizer splits into exactly two tokens,
//! pick rows of the text encoder's input token-embedding table (before position embeddings). Their
//! per-position, per-dimension mean and unbiased standard deviation over names, `mean` and `std`
//! (2, hidden), are where the learned identity lands: `v* = mean + mlp_out * std`. The default names
//! ship with the crate (`assets/celeb_names.txt`); `--celeb-names FILE` replaces them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::io::{read_safetensors, read_text_bounded, TensorFile, SMALL_FILE_LIMIT};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The shipped list: one "first last" name per line.
const SHIPPED_NAMES: &str = include_str!("../../assets/celeb_names.txt");

/// Bumped whenever the cached content or its key changes meaning, so old caches are not reused.
const CACHE_VERSION: &str = "stableid celeb basis v1";

/// A list of celebrity names, each of two words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CelebNames {
    names: Vec<String>,
    /// Where the names come from, for error messages.
    origin: String,
}

impl Default for CelebNames {
    fn default() -> Self {
        Self::shipped()
    }
}

impl CelebNames {
    /// The list shipped with the crate.
    pub fn shipped() -> Self {
        Self::parse(SHIPPED_NAMES, "the shipped list assets/celeb_names.txt")
    }

    /// One name per line; blank lines and lines starting with `#` are ignored. `origin` names the
    /// source in error messages.
    pub fn parse(text: &str, origin: &str) -> Self {
        let names = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_string)
            .collect();
        Self { names, origin: origin.to_string() }
    }

    /// Reads a names file (at most 16 MiB): one two-word name per line.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text_bounded(path, SMALL_FILE_LIMIT).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                what: "celebrity names file".into(),
                path: path.to_path_buf(),
                hint: "give a text file with one two-word name per line, or none to use the shipped list".into(),
            },
            _ => Error::Input(format!("celebrity names file {}: {e}", path.display())),
        })?;
        Ok(Self::parse(&text, &path.display().to_string()))
    }

    /// The names of `path`, else the shipped list.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        path.map_or_else(|| Ok(Self::shipped()), Self::from_file)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The two token ids of every name, in order. Fails, listing every offending name with its tokens,
/// if any name does not split into exactly two tokens, and if there are fewer than two names (an
/// unbiased standard deviation needs two).
pub fn validate(names: &CelebNames, tokenizer: &ClipTokenizer) -> Result<Vec<[u32; 2]>> {
    let mut ids = Vec::with_capacity(names.len());
    let mut bad = Vec::new();
    for name in names.names() {
        let tokens = tokenizer.tokenize(name);
        match tokens.as_slice() {
            [first, last] => ids.push([token_id(tokenizer, first)?, token_id(tokenizer, last)?]),
            _ => bad.push(format!("\"{name}\" -> {tokens:?}")),
        }
    }
    if !bad.is_empty() {
        return Err(Error::Input(format!(
            "{} celebrity name(s) in {} do not split into exactly two CLIP tokens (one per word); fix or remove \
             them:\n  {}",
            bad.len(),
            names.origin,
            bad.join("\n  ")
        )));
    }
    if ids.len() < 2 {
        return Err(Error::Input(format!(
            "{} holds {} celebrity name(s); the basis needs at least two",
            names.origin,
            ids.len()
        )));
    }
    Ok(ids)
}

fn token_id(tokenizer: &ClipTokenizer, token: &str) -> Result<u32> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| Error::Input(format!("token {token:?} is not in the tokenizer's vocabulary")))
}

/// Per-position statistics of the celebrity names' token embeddings.
#[derive(Debug, Clone)]
pub struct CelebBasis {
    /// Mean over names, (2, hidden) f32: row 0 for first names, row 1 for last names.
    pub mean: Tensor,
    /// Unbiased standard deviation over names, (2, hidden) f32.
    pub std: Tensor,
}

impl CelebBasis {
    /// Statistics of the rows `ids` of `token_embedding` (vocab, hidden), computed in f64 on the CPU
    /// and returned as f32 on the table's device.
    pub fn compute(token_embedding: &Tensor, ids: &[[u32; 2]]) -> Result<Self> {
        let (vocab, hidden) = token_embedding.dims2()?;
        if ids.len() < 2 {
            return Err(Error::Input(format!("the celeb basis needs at least two names, got {}", ids.len())));
        }
        if let Some(id) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {id} is past the text encoder's vocabulary ({vocab})")));
        }
        let n = ids.len();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let index = Tensor::from_vec(flat, 2 * n, token_embedding.device())?;
        let rows = token_embedding
            .index_select(&index, 0)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .reshape((n, 2, hidden))?;
        let mean = rows.mean_keepdim(0)?;
        let var = (rows.broadcast_sub(&mean)?.sqr()?.sum(0)? / (n - 1) as f64)?;
        let device = token_embedding.device();
        Ok(Self {
            mean: mean.squeeze(0)?.to_dtype(DType::F32)?.to_device(device)?,
            std: var.sqrt()?.to_dtype(DType::F32)?.to_device(device)?,
        })
    }

    /// The basis of `names`, from `cache_dir` when a cache for these weights and names exists,
    /// else computed and cached there.
    ///
    /// The cache key is a SHA-256 of what the basis depends on: the names and their token ids (so a
    /// changed list or tokenizer misses), and the weights as stored in `weights_file` (the text
    /// encoder's safetensors): its size, its header (every tensor's name, dtype, shape and offset) and
    /// the bytes of the token-embedding table, plus the dtype the table was loaded in. Hashing the
    /// table alone (200 MB for SD 2.1 in f32, well under a second) rather than the whole 1.3 GB file
    /// keeps the check cheap while any edit of the rows the basis reads still changes the key.
    /// A cache file that cannot be read, or whose key, shapes or checksum are wrong, is recomputed
    /// and overwritten; files are written atomically.
    pub fn load_or_compute(
        cache_dir: &Path,
        weights_file: &Path,
        names: &CelebNames,
        tokenizer: &ClipTokenizer,
        token_embedding: &Tensor,
    ) -> Result<Self> {
        let ids = validate(names, tokenizer)?;
        let key = cache_key(weights_file, names, &ids, token_embedding.dtype())?;
        let path = cache_path(cache_dir, &key);
        let hidden = token_embedding.dim(1)?;
        if let Some(basis) = read_cache(&path, &key, hidden, token_embedding.device()) {
            return Ok(basis);
        }
        let basis = Self::compute(token_embedding, &ids)?;
        write_cache(&path, &key, &basis)?;
        Ok(basis)
    }
}

/// Where the cache for `key` lives in `cache_dir`.
fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("celeb_basis-{}.safetensors", &key[..16]))
}

/// The hex SHA-256 cache key (see [`CelebBasis::load_or_compute`]).
fn cache_key(weights_file: &Path, names: &CelebNames, ids: &[[u32; 2]], dtype: DType) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(CACHE_VERSION.as_bytes());
    hash_token_embedding(weights_file, &mut hasher)?;
    hasher.update(format!("\nloaded as {dtype:?}\n").as_bytes());
    for name in names.names() {
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
    }
    for id in ids.iter().flatten() {
        hasher.update(id.to_le_bytes());
    }
    Ok(hex(&hasher.finalize()))
}

/// A fingerprint of a text encoder's weights (hex SHA-256 of the file size, the safetensors
/// header and the token-embedding table; of the whole file for a PyTorch checkpoint): identifies
/// the model an identity was learned for without reading a whole safetensors file.
pub fn text_encoder_fingerprint(weights_file: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    hash_token_embedding(weights_file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Feeds the file size, the safetensors header and the token-embedding table's bytes to `hasher`;
/// a PyTorch checkpoint (`.bin`), whose tensors have no index to seek by, is hashed whole.
fn hash_token_embedding(weights_file: &Path, hasher: &mut Sha256) -> Result<()> {
    let bad = |msg: String| Error::Weights { file: weights_file.to_path_buf(), msg };
    let mut file = File::open(weights_file).map_err(|e| bad(e.to_string()))?;
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if weights_file.extension().is_some_and(|e| e == "bin") {
        hasher.update(size.to_le_bytes());
        std::io::copy(&mut file, hasher).map_err(|e| bad(e.to_string()))?;
        return Ok(());
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > size.saturating_sub(8) {
        return Err(bad(format!("not a safetensors file (header of {header_len} bytes in a {size}-byte file)")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable safetensors header ({e})")))?;
    // Same preference as the text encoder: transformers 4 layout first, then transformers 5's.
    let entry = ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"]
        .iter()
        .find_map(|name| entries.get(*name))
        .ok_or_else(|| bad("no embeddings.token_embedding.weight tensor".into()))?;
    let offsets: Option<Vec<u64>> =
        entry["data_offsets"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
    let (start, end) = match offsets.as_deref() {
        Some(&[start, end]) if start <= end && 8 + header_len + end <= size => (start, end),
        _ => return Err(bad("bad data_offsets for the token-embedding table".into())),
    };
    hasher.update(size.to_le_bytes());
    hasher.update(&header);
    file.seek(SeekFrom::Start(8 + header_len + start)).map_err(|e| bad(e.to_string()))?;
    let copied = std::io::copy(&mut file.take(end - start), hasher).map_err(|e| bad(e.to_string()))?;
    if copied != end - start {
        return Err(bad("the file ends inside the token-embedding table".into()));
    }
    Ok(())
}

/// The cached basis, if `path` holds a sound one for `key`; `None` means "recompute".
fn read_cache(path: &Path, key: &str, hidden: usize, device: &Device) -> Option<CelebBasis> {
    let TensorFile { tensors, metadata } = read_safetensors(path, SMALL_FILE_LIMIT).ok()?;
    if metadata.get("key").map(String::as_str) != Some(key) {
        return None;
    }
    let get = |name: &str| tensors.get(name).filter(|t| t.dtype() == DType::F32 && t.dims() == [2, hidden]);
    let basis = CelebBasis { mean: get("mean")?.clone(), std: get("std")?.clone() };
    // The checksum catches bit rot and hand edits that leave a well-formed file.
    if metadata.get("checksum") != Some(&checksum(&basis).ok()?) {
        return None;
    }
    Some(CelebBasis { mean: basis.mean.to_device(device).ok()?, std: basis.std.to_device(device).ok()? })
}

/// Hex SHA-256 of the basis values (f32, little-endian, mean then std).
fn checksum(basis: &CelebBasis) -> Result<String> {
    let mut hasher = Sha256::new();
    for t in [&basis.mean, &basis.std] {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(v.to_le_bytes());
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_cache(path: &Path, key: &str, basis: &CelebBasis) -> Result<()> {
    let out_err = |msg: String| Error::Output { path: path.to_path_buf(), msg };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| out_err(e.to_string()))?;
    }
    let mean = basis.mean.to_device(&Device::Cpu)?.contiguous()?;
    let std = basis.std.to_device(&Device::Cpu)?.contiguous()?;
    let metadata = [("key".to_string(), key.to_string()), ("checksum".to_string(), checksum(basis)?)];
    let bytes = safetensors::serialize([("mean", &mean), ("std", &std)], Some(metadata.into_iter().collect()))
        .map_err(|e| out_err(e.to_string()))?;
    crate::io::write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
}
