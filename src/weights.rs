//! Finding and reading model weights, or making them up ([`RandomWeights`]).
//!
//! A model is a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
//! each with its config) given as a local path, or a Hugging Face hub id resolved through the
//! standard hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), as
//! people already keep them. This tool never downloads: weights are the user's.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

mod pytorch;
mod random;
mod safetensors_file;

pub use pytorch::open_checkpoint;
pub use random::RandomWeights;
pub use safetensors_file::SafetensorsFile;

/// The base model StableIdentity is defined on.
pub const DEFAULT_MODEL: &str = "stabilityai/stable-diffusion-2-1-base";

/// A resolved diffusers model folder.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    name: String,
}

impl ModelDir {
    /// Resolves `spec`: an existing local folder, or a hub id (`owner/name`) found in the hub cache.
    pub fn resolve(spec: &str) -> Result<Self> {
        let root = resolve_folder(spec, "model_index.json", "model folder", DEFAULT_MODEL)?;
        Ok(Self { root, name: spec.to_string() })
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the user called it (hub id or path), for metadata and messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `root/component`, which must exist.
    pub fn component(&self, component: &str) -> Result<PathBuf> {
        let dir = self.root.join(component);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::MissingFile {
                what: format!("{component}/ folder of the model"),
                path: dir,
                hint: "the model folder is incomplete: it needs the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)".into(),
            })
        }
    }

    /// Parses `component/file` (a JSON config) into `T`.
    pub fn config<T: DeserializeOwned>(&self, component: &str, file: &str) -> Result<T> {
        crate::io::read_json(&self.component(component)?.join(file))
    }

    /// The weights of `component`: `stem.safetensors`, else `stem.fp16.safetensors`,
    /// else a PyTorch checkpoint (`stem.bin`; transformers' `pytorch_model.bin` for the stem `model`);
    /// tensors are converted to `dtype` as they are read.
    pub fn weights(&self, component: &str, stem: &str, dtype: DType, device: &Device) -> Result<Weights> {
        folder_weights(&self.component(component)?, stem, dtype, device, &format!("{component} weights"))
    }
}

/// The weights in `dir`: `stem.safetensors`, else `stem.fp16.safetensors`, else a
/// PyTorch checkpoint (`stem.bin`; transformers' `pytorch_model.bin` for the stem `model`), read
/// as `dtype`; `what` names them in errors.
pub fn folder_weights(dir: &Path, stem: &str, dtype: DType, device: &Device, what: &str) -> Result<Weights> {
    let safetensors = [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")];
    if let Some(path) = safetensors.iter().map(|f| dir.join(f)).find(|p| p.is_file()) {
        let vb = safetensors_var_builder(&path, dtype, device)?;
        return Ok(Weights { path, vb });
    }
    let pytorch = if stem == "model" { "pytorch_model.bin".to_string() } else { format!("{stem}.bin") };
    if dir.join(&pytorch).is_file() {
        return Ok(open_checkpoint(&dir.join(&pytorch), dtype, device)?.0);
    }
    Err(Error::MissingFile {
        what: what.to_string(),
        path: dir.join(&safetensors[0]),
        hint: format!("expected {}, {} or {pytorch}", safetensors[0], safetensors[1]),
    })
}

/// The weights of a transformers model folder: `model.safetensors`, else
/// `pytorch_model.bin`, read as `dtype`, with their tensor names; `what` names the model in errors.
pub fn transformers_weights(dir: &Path, dtype: DType, device: &Device, what: &str) -> Result<(Weights, Vec<String>)> {
    let safetensors = dir.join("model.safetensors");
    let pytorch = dir.join("pytorch_model.bin");
    if safetensors.is_file() {
        let file = SafetensorsFile::open(&safetensors)
            .map_err(|msg| Error::Weights { file: safetensors.clone(), msg: format!("cannot read it: {msg}") })?;
        let names = file.names().map(str::to_string).collect();
        let vb = VarBuilder::from_backend(Box::new(file), dtype, device.clone());
        Ok((Weights { path: safetensors, vb }, names))
    } else if pytorch.is_file() {
        open_checkpoint(&pytorch, dtype, device)
    } else {
        Err(Error::MissingFile {
            what: format!("{what} weights"),
            path: safetensors,
            hint: "expected model.safetensors or pytorch_model.bin next to config.json".into(),
        })
    }
}

/// A builder over the safetensors file at `path` whose tensors are read as `dtype` one by one,
/// straight into their own buffers ([`SafetensorsFile`]).
pub fn safetensors_var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let file = SafetensorsFile::open(path).map_err(|msg| Error::Weights { file: path.to_path_buf(), msg })?;
    Ok(VarBuilder::from_backend(Box::new(file), dtype, device.clone()))
}

/// The weights in one file: safetensors (by its extension) or a PyTorch checkpoint of either
/// format, read as `dtype`.
pub fn weights_file(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let vb = safetensors_var_builder(path, dtype, device)?;
        return Ok(Weights { path: path.to_path_buf(), vb });
    }
    Ok(open_checkpoint(path, dtype, device)?.0)
}

/// PyTorch's cache folder, as torch and facenet-pytorch resolve it: `TORCH_HOME`, else
/// `XDG_CACHE_HOME/torch`, else `~/.cache/torch`.
pub fn torch_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("TORCH_HOME") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map_or_else(|| PathBuf::from(".cache"), |home| PathBuf::from(home).join(".cache"))
    });
    cache.join("torch")
}

/// A checkpoint a PyTorch package downloaded: `file` in `torch_home()/hub/checkpoints` (where
/// torch.hub, so torchvision and pytorch-fid, keep theirs) or in `torch_home()/checkpoints`
/// (facenet-pytorch's). `what` and `source` (where to fetch it from) word the error when it is in
/// neither.
pub fn torch_cached_checkpoint(file: &str, what: &str, source: &str) -> Result<PathBuf> {
    let home = torch_home();
    let hub = home.join("hub").join("checkpoints").join(file);
    if let Some(found) = [hub.clone(), home.join("checkpoints").join(file)].into_iter().find(|p| p.is_file()) {
        return Ok(found);
    }
    Err(Error::MissingFile {
        what: what.to_string(),
        path: hub,
        hint: format!(
            "this tool never downloads weights; fetch {file} from {source} into {} (or set TORCH_HOME), \
             or give its path",
            home.join("hub").join("checkpoints").display()
        ),
    })
}

/// A weights file and a builder over it.
pub struct Weights {
    pub path: PathBuf,
    pub vb: VarBuilder<'static>,
}

impl Weights {
    /// Builds a model from these weights; a missing or mis-shaped tensor becomes an error that
    /// names this file.
    pub fn build<M>(self, build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>) -> Result<M> {
        let file = self.path;
        build(self.vb).map_err(|e| Error::Weights { file, msg: format!("{e} (is this the right model?)") })
    }
}

/// Resolves a model given as a local folder or as a hub id (`owner/name`) found in the hub
/// cache, whose snapshot holds `marker` (e.g. `model_index.json`, `config.json`). `what` and
/// `example` word the error.
pub fn resolve_folder(spec: &str, marker: &str, what: &str, example: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_hub_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !path.is_absolute();
    if !looks_like_hub_id {
        return Err(Error::MissingFile {
            what: what.to_string(),
            path: path.to_path_buf(),
            hint: format!("pass a local folder or a Hugging Face hub id such as {example}"),
        });
    }
    let cache = hub_cache_dir();
    match hf_hub::Cache::new(cache.clone()).model(spec.to_string()).get(marker) {
        Some(file) => Ok(file.parent().expect("a file in a snapshot has a parent").to_path_buf()),
        None => Err(Error::MissingFile {
            what: format!("{what} {spec}"),
            path: cache,
            hint: format!(
                "this tool never downloads weights; fetch them once with `huggingface-cli download {spec}` \
                 (or set HF_HOME / HF_HUB_CACHE to where they are), or pass a local folder"
            ),
        }),
    }
}

/// The hub cache folder, as huggingface_hub resolves it.
fn hub_cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    hf_hub::Cache::from_env().path().clone()
}
