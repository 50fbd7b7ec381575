//! Text-to-3D checkpoints: the Gaussians with Adam's moments, the densification statistics, the
//! cameras left in the current batch and the iteration, with a fingerprint of the run's settings.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::cameras::TrainingView;
use crate::io::{read_safetensors, write_atomically, TensorFile};
use crate::splats::{Densifier, SplatAdam, SplatAdamState};
use crate::{Error, Result};

const FORMAT: &str = "stableid-3d-checkpoint";
const VERSION: &str = "1";
/// Larger files are refused: about 20 million Gaussians of degree 0 with their moments.
const MAX_CHECKPOINT_BYTES: u64 = 8 << 30;
const GROUPS: [&str; 6] = ["means", "log_scales", "rotations", "opacity_logits", "sh_dc", "sh_rest"];
const STATISTICS: [&str; 3] = ["grad_sum", "views", "max_radius"];

/// A saved text-to-3D state.
pub struct Text3dCheckpoint {
    /// Iterations completed.
    pub iteration: usize,
    pub fingerprint: Value,
    pub adam: SplatAdamState,
    pub densify_statistics: [Vec<f64>; 3],
    pub stack: Vec<TrainingView>,
}

impl Text3dCheckpoint {
    pub fn capture(
        adam: &SplatAdam,
        densifier: &Densifier,
        stack: &[TrainingView],
        iteration: usize,
        fingerprint: &Value,
    ) -> Result<Self> {
        let state = adam.state();
        let cpu = |ts: &[Tensor]| ts.iter().map(|t| t.to_device(&Device::Cpu)).collect::<candle_core::Result<Vec<_>>>();
        Ok(Self {
            iteration,
            fingerprint: fingerprint.clone(),
            adam: SplatAdamState {
                values: cpu(&state.values)?,
                first: cpu(&state.first)?,
                second: cpu(&state.second)?,
                step: state.step,
            },
            densify_statistics: densifier.statistics().map(<[f64]>::to_vec),
            stack: stack.to_vec(),
        })
    }

    /// Writes the checkpoint atomically: the previous one stays intact until this one is complete.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (group, name) in GROUPS.iter().enumerate().take(self.adam.values.len()) {
            tensors.push((format!("value.{name}"), self.adam.values[group].clone()));
            tensors.push((format!("first.{name}"), self.adam.first[group].clone()));
            tensors.push((format!("second.{name}"), self.adam.second[group].clone()));
        }
        for (name, values) in STATISTICS.iter().zip(&self.densify_statistics) {
            tensors.push((format!("densify.{name}"), Tensor::new(values.as_slice(), &Device::Cpu)?));
        }
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("iteration", self.iteration.to_string()),
            ("adam_step", self.adam.step.to_string()),
            ("fingerprint", self.fingerprint.to_string()),
            ("stack", serde_json::to_string(&self.stack).map_err(|e| Error::Internal(e.to_string()))?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)).collect::<Vec<_>>(), Some(metadata))
                .map_err(|e| Error::Output { path: path.to_path_buf(), msg: e.to_string() })?;
        write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Input(format!("checkpoint {}: {msg}", path.display()));
        let TensorFile { mut tensors, metadata } =
            read_safetensors(path, MAX_CHECKPOINT_BYTES).map_err(|e| bad(e.to_string()))?;
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad("not a stableid 3d checkpoint".into()));
        }
        if metadata.get("version").map(String::as_str) != Some(VERSION) {
            return Err(bad(format!("checkpoint version {:?} is not supported", metadata.get("version"))));
        }
        let number = |key: &str| -> Result<usize> {
            metadata.get(key).and_then(|s| s.parse().ok()).ok_or_else(|| bad(format!("no {key}")))
        };
        let (iteration, step) = (number("iteration")?, number("adam_step")?);
        let fingerprint = metadata
            .get("fingerprint")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no fingerprint".into()))?;
        let stack = metadata
            .get("stack")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no camera batch".into()))?;
        let groups = if tensors.contains_key("value.sh_rest") { GROUPS.len() } else { GROUPS.len() - 1 };
        let mut take = |key: String| tensors.remove(&key).ok_or_else(|| bad(format!("lacks tensor {key}")));
        let mut state = SplatAdamState { values: Vec::new(), first: Vec::new(), second: Vec::new(), step };
        for name in &GROUPS[..groups] {
            state.values.push(take(format!("value.{name}"))?);
            state.first.push(take(format!("first.{name}"))?);
            state.second.push(take(format!("second.{name}"))?);
        }
        let mut statistic = |name: &str| -> Result<Vec<f64>> { Ok(take(format!("densify.{name}"))?.to_vec1::<f64>()?) };
        let densify_statistics = [statistic(STATISTICS[0])?, statistic(STATISTICS[1])?, statistic(STATISTICS[2])?];
        Ok(Self { iteration, fingerprint, adam: state, densify_statistics, stack })
    }

    /// Refuses to resume a run whose settings differ, naming the first difference.
    pub fn check_compatible(&self, fingerprint: &Value) -> Result<()> {
        match crate::identity::checkpoint::first_difference(&self.fingerprint, fingerprint) {
            Some(difference) => Err(Error::Input(format!(
                "the checkpoint was made with {difference}: resume it with the same settings, or start a new run"
            ))),
            None => Ok(()),
        }
    }
}
