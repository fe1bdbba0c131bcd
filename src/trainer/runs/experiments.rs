//! Experiments: named groups of runs, as Finetuner's (one per task, a run per configuration
//! tried). Which runs an experiment holds is each run's own `config.experiment_name`; what is
//! kept here is the list of experiments, so one outlives its last run and is listed empty.
//!
//! `<data-dir>/experiments.json` holds `[{"name", "created_unix"}]`, rewritten atomically.
//! At open it is completed from the runs found (older registries had no such file, and a
//! lost file must not hide runs), and "default" always exists.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io, unix_now, Inner, Registry, RunError, RunRecord, State, DEFAULT_EXPERIMENT};
use crate::artifact::is_safe_name;

/// Experiment name to creation time.
pub(super) type Experiments = BTreeMap<String, i64>;

const FILE: &str = "experiments.json";

/// One line of `experiments.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    name: String,
    created_unix: i64,
}

/// An experiment as listed: its name, when it was made, and how many runs it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    pub name: String,
    pub created_unix: i64,
    pub runs: u32,
    /// Runs not yet ended (CREATED or STARTED).
    pub unfinished_runs: u32,
}

impl Experiment {
    /// Finetuner's experiments carried a status; theirs only ever said this.
    pub const STATUS: &'static str = "ACTIVE";
}

/// Experiment names follow the run names' rule: they are folder-safe and show in listings.
pub(super) fn check_name(name: &str) -> Result<(), RunError> {
    match is_safe_name(name) {
        true => Ok(()),
        false => Err(RunError::BadExperimentName(name.to_string())),
    }
}

/// The experiments of `data_dir`: the file's, those the runs name, and "default".
pub(super) fn load<'a>(data_dir: &Path, runs: impl Iterator<Item = &'a RunRecord>) -> Experiments {
    let path = data_dir.join(FILE);
    let mut ex = Experiments::new();
    match std::fs::read(&path) {
        Ok(raw) => match serde_json::from_slice::<Vec<Stored>>(&raw) {
            Ok(list) => ex.extend(list.into_iter().map(|s| (s.name, s.created_unix))),
            Err(e) => tracing::warn!(
                "{}: unreadable ({e}); experiments are listed from their runs",
                path.display()
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            "{}: {e}; experiments are listed from their runs",
            path.display()
        ),
    }
    for r in runs {
        let t = ex
            .entry(r.experiment().to_string())
            .or_insert(r.created_unix);
        *t = (*t).min(r.created_unix);
    }
    ex.entry(DEFAULT_EXPERIMENT.to_string())
        .or_insert_with(unix_now);
    ex
}

/// Runs and unfinished runs per experiment.
fn run_counts(inner: &Inner) -> std::collections::HashMap<&str, (u32, u32)> {
    let mut counts = std::collections::HashMap::new();
    for e in inner.runs.values() {
        let c: &mut (u32, u32) = counts.entry(e.rec.experiment()).or_default();
        c.0 += 1;
        c.1 += u32::from(!e.rec.state.is_terminal());
    }
    counts
}

impl Registry {
    fn save_experiments(&self, ex: &Experiments) -> Result<(), RunError> {
        let path = self.opts.data_dir.join(FILE);
        let list: Vec<Stored> = ex
            .iter()
            .map(|(name, &created_unix)| Stored {
                name: name.clone(),
                created_unix,
            })
            .collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|e| RunError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        crate::artifact::replace_file(&path, &json).map_err(io(&path))
    }

    /// Adds `name` (already checked) unless it exists; for runs created in a new experiment.
    pub(super) fn ensure_experiment(&self, inner: &mut Inner, name: &str) -> Result<(), RunError> {
        if inner.experiments.contains_key(name) {
            return Ok(());
        }
        // Every creation rewrites the list under the lock all calls take: it stays bounded.
        if inner.experiments.len() >= self.opts.max_experiments.max(1) {
            return Err(RunError::TooManyExperiments(
                inner.experiments.len(),
                name.to_string(),
            ));
        }
        let mut ex = inner.experiments.clone();
        ex.insert(name.to_string(), unix_now());
        self.save_experiments(&ex)?;
        inner.experiments = ex;
        Ok(())
    }

    fn experiment_of(&self, inner: &Inner, name: &str) -> Result<Experiment, RunError> {
        let &created_unix = inner
            .experiments
            .get(name)
            .ok_or_else(|| RunError::ExperimentNotFound(name.to_string()))?;
        let (runs, unfinished_runs) = run_counts(inner).remove(name).unwrap_or_default();
        Ok(Experiment {
            name: name.to_string(),
            created_unix,
            runs,
            unfinished_runs,
        })
    }

    /// A new, empty experiment; ALREADY_EXISTS when the name is taken.
    pub fn create_experiment(&self, name: &str) -> Result<Experiment, RunError> {
        check_name(name)?;
        let mut inner = self.lock();
        if inner.experiments.contains_key(name) {
            return Err(RunError::ExperimentExists(name.to_string()));
        }
        self.ensure_experiment(&mut inner, name)?;
        self.experiment_of(&inner, name)
    }

    pub fn get_experiment(&self, name: &str) -> Result<Experiment, RunError> {
        self.experiment_of(&self.lock(), name)
    }

    /// Every experiment, oldest first.
    pub fn list_experiments(&self) -> Vec<Experiment> {
        let inner = self.lock();
        // One pass over the runs for all experiments, under the lock every call takes.
        let mut counts = run_counts(&inner);
        let mut v: Vec<Experiment> = inner
            .experiments
            .iter()
            .map(|(name, &created_unix)| {
                let (runs, unfinished_runs) = counts.remove(name.as_str()).unwrap_or_default();
                Experiment {
                    name: name.clone(),
                    created_unix,
                    runs,
                    unfinished_runs,
                }
            })
            .collect();
        v.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        v
    }

    /// Deletes the experiment with every run in it, as Finetuner did; refused while one of
    /// them trains (cancel it first). Queued runs are deleted unstarted. "default" stays,
    /// empty. Returns the experiment as it was.
    pub fn delete_experiment(&self, name: &str) -> Result<Experiment, RunError> {
        let mut inner = self.lock();
        let before = self.experiment_of(&inner, name)?;
        let mut runs: Vec<(u64, String, State)> = inner
            .runs
            .values()
            .filter(|e| e.rec.experiment() == name)
            .map(|e| (e.rec.seq, e.rec.name.clone(), e.rec.state))
            .collect();
        runs.sort_by_key(|r| r.0);
        let training: Vec<String> = runs
            .iter()
            .filter(|(_, _, s)| *s == State::Started)
            .map(|(_, n, _)| n.clone())
            .collect();
        if !training.is_empty() {
            return Err(RunError::ExperimentBusy {
                name: name.to_string(),
                runs: training,
            });
        }
        // A run another experiment's unended run starts from (model_artifact) stays, and so
        // does its experiment: checked for all first, not found part way through.
        for (_, run, _) in &runs {
            let outside: Vec<String> = Self::artifact_users(&inner, run)
                .into_iter()
                .filter(|u| !runs.iter().any(|(_, r, _)| r == u))
                .collect();
            if !outside.is_empty() {
                return Err(RunError::ArtifactInUse {
                    run: run.clone(),
                    users: outside,
                });
            }
        }
        // Every run leaves under this one lock, so none starts meanwhile; what fails part way
        // (a folder that cannot be moved) stops the deletion with the experiment still there.
        // Newest first: a run that starts from another's artifact is newer than it, and leaves
        // before it.
        let mut gone = Vec::with_capacity(runs.len());
        let mut failed = None;
        for (_, run, _) in runs.iter().rev() {
            match self.unlink(&mut inner, run) {
                Ok(g) => gone.push(g),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() && name != DEFAULT_EXPERIMENT {
            let mut ex = inner.experiments.clone();
            ex.remove(name);
            match self.save_experiments(&ex) {
                Ok(()) => inner.experiments = ex,
                Err(e) => failed = Some(e),
            }
        }
        self.publish_counts(&inner);
        drop(inner);
        for g in gone {
            if let Err(e) = self.clear(g) {
                tracing::warn!("experiment {name}: a deleted run's files remain: {e}");
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(before),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Progress, RunResult, RunnerOptions};
    use super::*;
    use crate::trainer::fit::FitConfig;

    fn options(dir: &Path) -> RunnerOptions {
        RunnerOptions {
            device: "cpu".into(),
            max_dataset_bytes: 1 << 20,
            min_free_bytes: 0,
            ..RunnerOptions::new(dir.to_path_buf())
        }
    }

    /// A finished run's run.json as written before experiments existed (no experiment_name
    /// in its configuration) or in `experiment`.
    fn write_run(dir: &Path, name: &str, experiment: Option<&str>, created_unix: i64) {
        let rec = RunRecord {
            name: name.into(),
            state: State::Finished,
            details: String::new(),
            config: FitConfig {
                run_name: name.into(),
                experiment_name: experiment.unwrap_or("").into(),
                ..Default::default()
            },
            created_unix,
            started_unix: None,
            finished_unix: None,
            progress: Progress::default(),
            result: RunResult::default(),
            seq: created_unix as u64,
            interruptions: 0,
        };
        let mut json = serde_json::to_value(&rec).expect("json");
        if experiment.is_none() {
            json["config"]
                .as_object_mut()
                .expect("config")
                .remove("experiment_name");
        }
        let run_dir = dir.join("runs").join(name);
        std::fs::create_dir_all(&run_dir).expect("run dir");
        std::fs::write(run_dir.join("run.json"), json.to_string()).expect("run.json");
    }

    /// A registry from before experiments (no experiments.json, runs without an experiment)
    /// lists them all under "default"; a lost or broken experiments.json hides no run's
    /// experiment; what is created is kept.
    #[test]
    fn experiments_are_completed_from_the_runs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        write_run(dir, "old", None, 100);
        write_run(dir, "tagged", Some("exp-x"), 50);
        {
            let reg = Registry::open(options(dir)).expect("open");
            assert_eq!(reg.get("old").expect("old").experiment(), "default");
            let list = reg.list_experiments();
            let got: Vec<(&str, i64, u32)> = list
                .iter()
                .map(|x| (x.name.as_str(), x.created_unix, x.runs))
                .collect();
            assert_eq!(got[0], ("exp-x", 50, 1), "{list:?}");
            assert_eq!((got[1].0, got[1].2), ("default", 1), "{list:?}");
            reg.create_experiment("kept").expect("create");
            assert!(matches!(
                reg.create_experiment("kept"),
                Err(RunError::ExperimentExists(_))
            ));
            assert!(matches!(
                reg.create_experiment(".hidden"),
                Err(RunError::BadExperimentName(_))
            ));
        }
        let stored = std::fs::read_to_string(dir.join(FILE)).expect("experiments.json");
        assert!(stored.contains("\"kept\""), "{stored}");
        {
            let reg = Registry::open(options(dir)).expect("reopen");
            assert!(reg.get_experiment("kept").is_ok());
        }
        std::fs::write(dir.join(FILE), "{not json").expect("break it");
        let reg = Registry::open(options(dir)).expect("open with a broken file");
        let names: Vec<String> = reg.list_experiments().into_iter().map(|x| x.name).collect();
        assert!(names.contains(&"exp-x".to_string()), "{names:?}");
        assert!(names.contains(&"default".to_string()), "{names:?}");
    }
}
