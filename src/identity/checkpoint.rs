//! Learner checkpoints: the MLP, the AdamW moments and the step count, with a fingerprint of
//! every setting that shapes the run. The randomness of step `n` is a function of (seed, n) only,
//! so a resumed run continues exactly as an uninterrupted one would.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::identity::mlp::{IdentityMlp, PARAM_NAMES};
use crate::identity::step::Learner;
use crate::io::{read_safetensors, write_atomically, TensorFile};
use crate::{Error, Result};

const FORMAT: &str = "stableid-checkpoint";
const VERSION: &str = "1";
/// The largest checkpoint read: the MLP and its two AdamW moments, 70 MB for SD 2.1's learner.
const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

/// A saved learner state.
pub struct Checkpoint {
    /// Steps completed.
    pub step: usize,
    /// The run's settings (model, photo, seed, optimiser, loss, ...) as a JSON object.
    pub fingerprint: Value,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Captures the learner after `step` completed steps.
    pub fn capture(learner: &Learner, step: usize, fingerprint: &Value) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (i, (name, var)) in learner.mlp.params().iter().enumerate() {
            tensors.insert(format!("mlp.{name}"), var.as_tensor().to_device(&Device::Cpu)?);
            tensors.insert(format!("adam.exp_avg.{name}"), learner.optimizer.exp_avg[i].to_device(&Device::Cpu)?);
            tensors.insert(format!("adam.exp_avg_sq.{name}"), learner.optimizer.exp_avg_sq[i].to_device(&Device::Cpu)?);
        }
        Ok(Self { step, fingerprint: fingerprint.clone(), tensors })
    }

    /// Writes the checkpoint atomically: the previous one stays intact until the new one is complete.
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata: HashMap<String, String> = [
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("fingerprint".to_string(), self.fingerprint.to_string()),
        ]
        .into();
        let bytes = safetensors::serialize(
            self.tensors.iter().map(|(k, v)| (k.clone(), v)).collect::<Vec<_>>(),
            Some(metadata),
        )
        .map_err(|e| Error::Output { path: path.to_path_buf(), msg: e.to_string() })?;
        write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
    }

    /// Reads a checkpoint (at most 1 GiB).
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Input(format!("checkpoint {}: {msg}", path.display()));
        let TensorFile { tensors, metadata } =
            read_safetensors(path, MAX_CHECKPOINT_BYTES).map_err(|e| bad(e.to_string()))?;
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad("not a stableid learner checkpoint".into()));
        }
        if metadata.get("version").map(String::as_str) != Some(VERSION) {
            return Err(bad(format!("checkpoint version {:?} is not supported", metadata.get("version"))));
        }
        let step = metadata.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no step count".into()))?;
        let fingerprint = metadata
            .get("fingerprint")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no fingerprint".into()))?;
        Ok(Self { step, fingerprint, tensors })
    }

    /// Refuses to resume a run whose settings differ, naming the first difference.
    pub fn check_compatible(&self, fingerprint: &Value, path: &Path) -> Result<()> {
        match first_difference(&self.fingerprint, fingerprint) {
            Some(difference) => Err(Error::Input(format!(
                "checkpoint {} was made with {difference}: resume it with the same settings, or start a new run",
                path.display()
            ))),
            None => Ok(()),
        }
    }

    /// Puts the saved MLP and optimizer state into `learner`.
    pub fn restore(&self, learner: &mut Learner) -> Result<()> {
        let device = learner.mlp.params()[0].1.device().clone();
        let get = |key: String| -> Result<Tensor> {
            let t = self.tensors.get(&key).ok_or_else(|| Error::Input(format!("checkpoint lacks tensor {key}")))?;
            Ok(t.to_device(&device)?)
        };
        let params = PARAM_NAMES.iter().map(|n| get(format!("mlp.{n}"))).collect::<Result<Vec<_>>>()?;
        learner.mlp = IdentityMlp::from_tensors(learner.mlp.shape(), params)
            .map_err(|e| Error::Input(format!("checkpoint does not fit this model: {e}")))?;
        learner.optimizer.exp_avg =
            PARAM_NAMES.iter().map(|n| get(format!("adam.exp_avg.{n}"))).collect::<Result<_>>()?;
        learner.optimizer.exp_avg_sq =
            PARAM_NAMES.iter().map(|n| get(format!("adam.exp_avg_sq.{n}"))).collect::<Result<_>>()?;
        learner.optimizer.step = self.step;
        Ok(())
    }
}

/// The first setting (in key order) on which two run fingerprints (JSON objects) differ, as
/// `KEY = SAVED, this run has KEY = CURRENT`.
pub fn first_difference(saved: &Value, current: &Value) -> Option<String> {
    let (Some(saved), Some(current)) = (saved.as_object(), current.as_object()) else {
        return Some("a malformed fingerprint".into());
    };
    let mut keys: Vec<&String> = saved.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().find_map(|key| {
        let (a, b) = (saved.get(key), current.get(key));
        (a != b).then(|| {
            format!(
                "{key} = {}, this run has {key} = {}",
                a.map_or("(none)".into(), Value::to_string),
                b.map_or("(none)".into(), Value::to_string)
            )
        })
    })
}
