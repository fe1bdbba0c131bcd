//! TrainingCheckpoint: everything a run needs to continue exactly where it stopped (weights,
//! optimiser moments and step, the position in the epoch, losses, callback scores), written to
//! the run's work folder so that a crash or a killed trainer loses at most the steps since the
//! last checkpoint. Resuming replays nothing: the shuffled order of each epoch is derived from the
//! seed and the epoch number, so the continued run takes the same batches the uninterrupted one
//! would have.
//!
//! Layout of a work folder:
//! ```text
//! checkpoint/  weights.safetensors  optimizer.safetensors  state.json
//! best.safetensors   (BestModelCheckpoint's weights)
//! ```
//! A checkpoint is written as `checkpoint.tmp/`, then swapped in by rename, so a crash while
//! writing leaves the previous one (as `checkpoint/` or `checkpoint.old/`) readable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::callbacks::{BestModel, EarlyStopper};
use super::optim::Optimizer;
use crate::eval::Metrics;

/// How often a run checkpoints when nothing says otherwise: at most this much training is lost
/// to a crash or a kill (a graceful stop checkpoints where it is).
pub const DEFAULT_CHECKPOINT_SECONDS: u64 = 300;

/// Where the loop stands, in plain numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Epoch to continue in, and the first batch of it not yet trained.
    pub epoch: usize,
    pub batch: usize,
    /// Optimiser steps taken.
    pub step: u64,
    /// `step` when `epoch` began (its losses are `losses[epoch_start_step..]`).
    pub epoch_start_step: u64,
    pub losses: Vec<f32>,
    pub epoch_losses: Vec<f64>,
    pub eval_losses: Vec<f64>,
    /// Retrieval metrics measured at the end of these epochs (0-based).
    pub epoch_metrics: Vec<(usize, Metrics)>,
    pub before: Option<Metrics>,
    /// Example results of the backbone, measured with `before`.
    #[serde(default)]
    pub before_examples: Vec<crate::eval::Example>,
    pub best: Option<BestModel>,
    pub early: Option<EarlyStopper>,
    pub started_unix: u64,
    /// The run's configuration as it started (FitConfig as JSON), so a resumption with other
    /// settings is caught instead of silently mixing two runs.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// Settings a resumed run may change: where and how often it saves, where it computes, how
/// many matches the evaluation keeps, and its labels (experiment, description). Everything
/// else changes what is trained.
const RESUMABLE_CHANGES: &[&str] = &[
    "checkpoint_seconds",
    "zip",
    "device",
    "limit",
    "experiment_name",
    "description",
];

/// The settings of `now` that differ from those the checkpoint was made with, as
/// `name: then -> now`; empty when the run may continue. A setting the checkpoint lacks was
/// added by a later version: the run had its default (a run checkpointed before the upgrade
/// resumes after it).
pub fn config_changes(then: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let (Some(then), Some(now)) = (then.as_object(), now.as_object()) else {
        return Vec::new();
    };
    let defaults = serde_json::to_value(super::fit::FitConfig::default()).unwrap_or_default();
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = then.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !RESUMABLE_CHANGES.contains(&k.as_str()))
        .filter_map(|k| {
            let a = then.get(k).or_else(|| defaults.get(k)).unwrap_or(&null);
            let b = now.get(k).unwrap_or(&null);
            (a != b).then(|| format!("{k}: {a} -> {b}"))
        })
        .collect()
}

/// Whether `work` holds a checkpoint to resume from.
pub fn exists(work: &Path) -> bool {
    [work.join("checkpoint"), work.join("checkpoint.old")]
        .iter()
        .any(|d| d.join(STATE).is_file())
}

/// A checkpoint read back.
pub struct Loaded {
    pub weights: HashMap<String, Tensor>,
    pub moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
    pub optimizer_step: u64,
    pub state: RunState,
}

const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const BEST: &str = "best.safetensors";

#[derive(Debug, thiserror::Error)]
#[error("checkpoint {path}: {msg}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub msg: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn tensors(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn sync(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(path, e))
}

/// Writes a checkpoint of `vars`, `opt` and `state` into `work`.
pub fn save(
    work: &Path,
    vars: &[(String, Var)],
    opt: &Optimizer,
    state: &RunState,
) -> Result<(), CheckpointError> {
    let tmp = work.join("checkpoint.tmp");
    let cur = work.join("checkpoint");
    let old = work.join("checkpoint.old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    let weights = tmp.join(WEIGHTS);
    candle_core::safetensors::save(&tensors(vars), &weights).map_err(|e| err(&weights, e))?;
    let mut moments = HashMap::new();
    for p in &opt.params {
        if let Some((m, v)) = opt.moments(&p.name) {
            let n = m.len();
            let t = |x: Vec<f32>| Tensor::from_vec(x, n, &Device::Cpu);
            moments.insert(format!("m.{}", p.name), t(m).map_err(|e| err(&tmp, e))?);
            moments.insert(format!("v.{}", p.name), t(v).map_err(|e| err(&tmp, e))?);
        }
    }
    let optimizer = tmp.join(OPTIMIZER);
    candle_core::safetensors::save(&moments, &optimizer).map_err(|e| err(&optimizer, e))?;
    let state_path = tmp.join(STATE);
    let json = serde_json::json!({ "optimizer_step": opt.step_count(), "run": state });
    std::fs::write(
        &state_path,
        serde_json::to_vec(&json).map_err(|e| err(&tmp, e))?,
    )
    .map_err(|e| err(&state_path, e))?;
    for f in [&weights, &optimizer, &state_path] {
        sync(f)?;
    }
    crate::artifact::apply_umask(&tmp).map_err(|e| err(&tmp, e))?;
    if cur.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| err(&old, e))?;
        }
        std::fs::rename(&cur, &old).map_err(|e| err(&cur, e))?;
    }
    std::fs::rename(&tmp, &cur).map_err(|e| err(&tmp, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| err(&old, e))?;
    }
    Ok(())
}

/// Reads the newest complete checkpoint in `work`, if there is one.
pub fn load(work: &Path, device: &Device) -> Result<Option<Loaded>, CheckpointError> {
    let dir = [work.join("checkpoint"), work.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join(STATE).is_file());
    let Some(dir) = dir else {
        return Ok(None);
    };
    let state_path = dir.join(STATE);
    let raw = std::fs::read(&state_path).map_err(|e| err(&state_path, e))?;
    #[derive(Deserialize)]
    struct File {
        optimizer_step: u64,
        run: RunState,
    }
    let f: File = serde_json::from_slice(&raw).map_err(|e| err(&state_path, e))?;
    let weights_path = dir.join(WEIGHTS);
    let weights =
        candle_core::safetensors::load(&weights_path, device).map_err(|e| err(&weights_path, e))?;
    let opt_path = dir.join(OPTIMIZER);
    let raw =
        candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(|e| err(&opt_path, e))?;
    let mut moments: HashMap<String, (Vec<f32>, Vec<f32>)> = HashMap::new();
    for (k, t) in raw {
        let v = t.to_vec1::<f32>().map_err(|e| err(&opt_path, e))?;
        if let Some(name) = k.strip_prefix("m.") {
            moments.entry(name.to_string()).or_default().0 = v;
        } else if let Some(name) = k.strip_prefix("v.") {
            moments.entry(name.to_string()).or_default().1 = v;
        }
    }
    Ok(Some(Loaded {
        weights,
        moments,
        optimizer_step: f.optimizer_step,
        state: f.run,
    }))
}

/// Saves the weights BestModelCheckpoint keeps (atomically).
pub fn save_best(work: &Path, vars: &[(String, Var)]) -> Result<(), CheckpointError> {
    let tmp = work.join("best.safetensors.tmp");
    candle_core::safetensors::save(&tensors(vars), &tmp).map_err(|e| err(&tmp, e))?;
    sync(&tmp)?;
    crate::artifact::apply_umask(&tmp).map_err(|e| err(&tmp, e))?;
    let path = work.join(BEST);
    std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))
}

/// The weights BestModelCheckpoint kept.
pub fn load_best(work: &Path, device: &Device) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let path = work.join(BEST);
    candle_core::safetensors::load(&path, device).map_err(|e| err(&path, e))
}

/// Sets every variable from `weights` (all must be present with the same shape).
pub fn restore_vars(
    vars: &[(String, Var)],
    weights: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<(), CheckpointError> {
    for (name, var) in vars {
        let t = weights
            .get(name)
            .ok_or_else(|| err(source, format!("no tensor {name}")))?;
        if t.shape() != var.shape() {
            return Err(err(
                source,
                format!(
                    "{name} has shape {:?}, the model {:?}",
                    t.shape(),
                    var.shape()
                ),
            ));
        }
        var.set(t).map_err(|e| err(source, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::fit::FitConfig;

    /// A checkpoint written before a setting existed resumes under the version that added it
    /// (the run had its default); a setting that changes training is still refused.
    #[test]
    fn settings_added_since_the_checkpoint_take_their_defaults() {
        let now = serde_json::to_value(FitConfig::default()).expect("json");
        let mut then = now.clone();
        for added in ["example_queries", "experiment_name"] {
            then.as_object_mut().expect("object").remove(added);
        }
        assert!(config_changes(&then, &now).is_empty());
        then["epochs"] = 9.into();
        assert_eq!(config_changes(&then, &now), ["epochs: 9 -> 5"]);
        let mut asked = now.clone();
        asked["example_queries"] = 3.into();
        then["epochs"] = 5.into();
        assert_eq!(config_changes(&then, &asked), ["example_queries: 0 -> 3"]);
    }
}
