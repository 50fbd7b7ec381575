//! Finding and reading model weights, or making them up ([`RandomWeights`]).
//!
//! A model is a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
//! each with its config) given as a local path, or a Hugging Face hub id found in the standard
//! hub cache and fetched into it on first use ([`hub`]: only the files the loaders read, which
//! each loader declares as [`ModelFiles`] beside itself).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

pub mod hub;
mod pytorch;
mod random;
mod safetensors_file;

pub use hub::{DownloadEvent, DownloadProgress, Hub, ModelFiles};
pub use pytorch::open_checkpoint;
pub use random::RandomWeights;
pub use safetensors_file::SafetensorsFile;

/// The base model StableIdentity is defined on.
pub const DEFAULT_MODEL: &str = "stabilityai/stable-diffusion-2-1-base";

/// The weights files of a transformers model folder, in the order they are looked for.
pub const TRANSFORMERS_WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// A resolved diffusers model folder.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    name: String,
}

impl ModelDir {
    /// Resolves `spec`: an existing local folder, or a hub id (`owner/name`) found in the hub
    /// cache or fetched into it (the files [`ModelDir::files`] lists for `dtype`).
    pub fn resolve(spec: &str, hub: &Hub, dtype: DType) -> Result<Self> {
        let root = hub.resolve(spec, &Self::files(dtype))?;
        Ok(Self { root, name: spec.to_string() })
    }

    /// A local diffusers folder, named by its path.
    pub fn local(root: &Path) -> Self {
        Self { root: root.to_path_buf(), name: root.display().to_string() }
    }

    /// What the text-to-image and text-to-video pipelines read of a diffusers folder: its
    /// configs, the tokenizer, and the text encoder's, UNet's and VAE's weights, in the form
    /// [`ModelDir::weights`] prefers for `dtype`.
    pub fn files(dtype: DType) -> ModelFiles {
        let weights = |component: &str, stem: &str| -> Vec<String> {
            weights_file_names(stem, dtype).map(|f| format!("{component}/{f}")).collect()
        };
        ModelFiles::new("diffusers model", DEFAULT_MODEL)
            .file("model_index.json")
            .file("scheduler/scheduler_config.json")
            .file("text_encoder/config.json")
            .file("tokenizer/vocab.json")
            .file("tokenizer/merges.txt")
            .optional("tokenizer/tokenizer_config.json")
            .optional("tokenizer/special_tokens_map.json")
            .file("unet/config.json")
            .file("vae/config.json")
            .weights(weights("text_encoder", "model"))
            .weights(weights("unet", "diffusion_pytorch_model"))
            .weights(weights("vae", "diffusion_pytorch_model"))
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

    /// The weights of `component` ([`folder_weights`]), read as `dtype`.
    pub fn weights(&self, component: &str, stem: &str, dtype: DType, device: &Device) -> Result<Weights> {
        folder_weights(&self.component(component)?, stem, dtype, device, &format!("{component} weights"))
    }
}

/// The weights files of `stem` in a diffusers folder, in the order they are looked for:
/// `stem.safetensors`, `stem.fp16.safetensors` (first when `dtype` is f16: the same numbers,
/// half the bytes), then a PyTorch checkpoint (`stem.bin`; transformers' `pytorch_model.bin` for
/// the stem `model`).
pub fn weights_file_names(stem: &str, dtype: DType) -> impl Iterator<Item = String> {
    let (full, half) = (format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors"));
    let safetensors = if dtype == DType::F16 { [half, full] } else { [full, half] };
    let pytorch = if stem == "model" { "pytorch_model.bin".to_string() } else { format!("{stem}.bin") };
    safetensors.into_iter().chain(std::iter::once(pytorch))
}

/// The weights of `stem` in `dir`: the first of [`weights_file_names`] there, read as `dtype`;
/// `what` names them in errors.
pub fn folder_weights(dir: &Path, stem: &str, dtype: DType, device: &Device, what: &str) -> Result<Weights> {
    let names: Vec<String> = weights_file_names(stem, dtype).collect();
    let Some(path) = names.iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
        return Err(Error::MissingFile {
            what: what.to_string(),
            path: dir.join(&names[0]),
            hint: format!("expected {}", names.join(", ")),
        });
    };
    if path.extension().is_some_and(|e| e == "safetensors") {
        let vb = safetensors_var_builder(&path, dtype, device)?;
        Ok(Weights { path, vb })
    } else {
        Ok(open_checkpoint(&path, dtype, device)?.0)
    }
}

/// The weights of a transformers model folder: `model.safetensors`, else
/// `pytorch_model.bin`, read as `dtype`, with their tensor names; `what` names the model in errors.
pub fn transformers_weights(dir: &Path, dtype: DType, device: &Device, what: &str) -> Result<(Weights, Vec<String>)> {
    let [safetensors, pytorch] = TRANSFORMERS_WEIGHTS.map(|f| dir.join(f));
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
