//! The artifact layout (`<run>/models/clip-text`, `<run>/models/clip-vision`, ...): selecting a
//! submodel to load. Each submodel folder is a Hugging Face partial checkpoint, so loading one
//! tower never reads the other tower's weights.

use std::path::Path;

use crate::model::load::WeightFiles;
use crate::model::{ModelError, ModelFiles, Towers};

/// Folder names of the two submodels, as Finetuner named them.
pub const TEXT_SUBMODEL: &str = "clip-text";
pub const VISION_SUBMODEL: &str = "clip-vision";
/// A submodel's tower as an ONNX graph, in artifacts of runs with `to_onnx` (Finetuner's name).
pub const ONNX_FILE: &str = "model.onnx";

/// The model files for `towers` inside an artifact folder or zip. With both towers, the weights of
/// both submodels are combined and the config, tokenizer and preprocessor are taken from the
/// submodel that owns them.
///
/// Finetuner's own artifacts (a Hugging Face CLIP backbone saved as `models/<tower>/model.pt`
/// state dicts, no config) load too: configuration, tokenizer and preprocessor then come from
/// `backbone` (the user's `--model`), or else from the `descriptor` in the submodel's
/// metadata.yml, through the Hugging Face cache.
pub fn submodel_files(artifact: &Path, towers: Towers) -> Result<ModelFiles, ModelError> {
    submodel_files_with_backbone(artifact, towers, None)
}

/// What a command that takes `--model M` and `--artifact A` loads: `towers` of the artifact
/// when there is one (`model` then names a Finetuner artifact's backbone), else the model.
pub fn model_or_artifact(
    model: &str,
    artifact: Option<&Path>,
    towers: Towers,
) -> Result<ModelFiles, ModelError> {
    match artifact {
        Some(a) => submodel_files_with_backbone(a, towers, Some(model)),
        None => ModelFiles::resolve(model),
    }
}

/// [`submodel_files`] with an explicit backbone for Finetuner artifacts.
pub fn submodel_files_with_backbone(
    artifact: &Path,
    towers: Towers,
    backbone: Option<&str>,
) -> Result<ModelFiles, ModelError> {
    if !artifact.exists() {
        return Err(ModelError::NotFound {
            what: artifact.display().to_string(),
            msg: "does not exist".into(),
        });
    }
    let unzipped;
    let (artifact, unpacked) = if artifact.is_file() {
        unzipped = unzip_artifact(artifact).map_err(|e| ModelError::NotFound {
            what: artifact.display().to_string(),
            msg: format!("is not a readable artifact zip: {e}"),
        })?;
        (unzipped.top.as_path(), Some(unzipped.dir.clone()))
    } else {
        (artifact, None)
    };
    let mut files = submodel_files_in(artifact, towers, backbone)?;
    files.unpacked = unpacked;
    Ok(files)
}

fn submodel_files_in(
    artifact: &Path,
    towers: Towers,
    backbone: Option<&str>,
) -> Result<ModelFiles, ModelError> {
    let models = artifact.join("models");
    if !models.is_dir() {
        return Err(ModelError::NotFound {
            what: artifact.display().to_string(),
            msg: "is not an artifact folder (it has no models/ folder)".into(),
        });
    }
    if let Some(files) = finetuner_files(&models, towers, backbone)? {
        return Ok(ModelFiles {
            source: artifact.display().to_string(),
            ..files
        });
    }
    let text = towers
        .text
        .then(|| submodel_dir(&models.join(TEXT_SUBMODEL)))
        .transpose()?;
    let vision = towers
        .vision
        .then(|| submodel_dir(&models.join(VISION_SUBMODEL)))
        .transpose()?;
    let mut files = match (text, vision) {
        (Some(t), None) => t,
        (None, Some(v)) => v,
        (Some(mut t), Some(v)) => {
            t.weights = merge_weights(t.weights, v.weights)?;
            t.preprocessor = v.preprocessor;
            t
        }
        (None, None) => {
            return Err(ModelError::InvalidInput {
                msg: "no tower selected".into(),
            })
        }
    };
    files.source = artifact.display().to_string();
    Ok(files)
}

/// One submodel folder of clipft's layout. A folder with no weights clipft reads is named as
/// such: a Finetuner run with `to_onnx=True` left only `model.onnx` (which unpacking a zip for
/// loading also leaves out), and "has no config.json" would not say what is missing.
fn submodel_dir(dir: &Path) -> Result<ModelFiles, ModelError> {
    if dir.is_dir() && !ModelFiles::has_weights(dir) {
        return Err(ModelError::NotFound {
            what: dir.display().to_string(),
            msg: "holds no weights clipft reads (model.safetensors, or Finetuner's model.pt); \
                  a Finetuner run with to_onnx=True kept only model.onnx, which clipft does not \
                  load: serve that artifact with an ONNX runtime, or fit it again without \
                  to_onnx"
                .into(),
        });
    }
    ModelFiles::from_dir(dir)
}

/// Recognises Finetuner's layout (`model.pt` in the submodel folders, no `model.safetensors`).
fn finetuner_files(
    models: &Path,
    towers: Towers,
    backbone: Option<&str>,
) -> Result<Option<ModelFiles>, ModelError> {
    let mut parts = Vec::new();
    let mut descriptor = None;
    for (sub, t, wanted) in [
        (TEXT_SUBMODEL, Towers::TEXT, towers.text),
        (VISION_SUBMODEL, Towers::VISION, towers.vision),
    ] {
        let dir = models.join(sub);
        let pt = dir.join("model.pt");
        if !wanted {
            continue;
        }
        if dir.join("model.safetensors").exists() || !pt.is_file() {
            return Ok(None);
        }
        if descriptor.is_none() {
            descriptor = std::fs::read_to_string(dir.join("metadata.yml"))
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("descriptor:"))
                        .map(|d| d.trim().trim_matches(['"', '\'']).to_string())
                });
        }
        parts.push((pt, t));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let spec = backbone
        .map(String::from)
        .or(descriptor)
        .ok_or_else(|| ModelError::NotFound {
            what: models.display().to_string(),
            msg: "is a Finetuner artifact without a descriptor; pass the backbone with --model"
                .into(),
        })?;
    let base = ModelFiles::resolve(&spec)?;
    Ok(Some(ModelFiles {
        weights: WeightFiles::FinetunerPt(parts),
        ..base
    }))
}

fn merge_weights(a: WeightFiles, b: WeightFiles) -> Result<WeightFiles, ModelError> {
    match (a, b) {
        (
            WeightFiles::Safetensors {
                files: mut fa,
                index: None,
            },
            WeightFiles::Safetensors {
                files: fb,
                index: None,
            },
        ) => {
            fa.extend(fb);
            Ok(WeightFiles::Safetensors {
                files: fa,
                index: None,
            })
        }
        _ => Err(ModelError::InvalidInput {
            msg: "artifact submodels must each be a single model.safetensors".into(),
        }),
    }
}

/// Errors writing an artifact.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("run name {0:?} is not allowed: use letters, digits, '-', '_' and '.', not starting with '.'")]
    BadName(String),
    #[error("{0} already exists; choose another --run-name or remove it")]
    Exists(std::path::PathBuf),
    #[error("writing weights: {0}")]
    Weights(#[from] candle_core::Error),
    #[error("writing the ONNX graph: {0}")]
    Onnx(#[from] ModelError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Names that become folder names (runs, datasets): no separators, no traversal, no hidden
/// files, at most 128 characters.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Run names become folder names.
pub fn validate_run_name(name: &str) -> Result<(), ArtifactError> {
    if is_safe_name(name) {
        Ok(())
    } else {
        Err(ArtifactError::BadName(name.to_string()))
    }
}

/// Checks that `run_name` may become the artifact folder `output/run_name`: a safe name, not
/// taken.
pub fn ensure_free(output: &Path, run_name: &str) -> Result<(), ArtifactError> {
    validate_run_name(run_name)?;
    let dest = output.join(run_name);
    match dest.exists() {
        true => Err(ArtifactError::Exists(dest)),
        false => Ok(()),
    }
}

/// Finetuner's example results (EvaluationCallback `gather_examples`) in an artifact:
/// `before` and `after`, each a list of `{query, matches}`.
pub const EXAMPLES_FILE: &str = "example-results.yml";

/// What a run hands over to be written as an artifact.
pub struct RunOutput<'a> {
    pub output: &'a Path,
    pub run_name: &'a str,
    pub experiment: &'a str,
    /// The backbone's files (config, tokenizer, preprocessor are copied from them).
    pub files: &'a ModelFiles,
    /// The artifact the run started from instead of the backbone's weights
    /// (`model_artifact`): the backbone is then the run's `model`, and this is kept by name.
    pub continued_from: Option<(&'a str, &'a Path)>,
    /// Every weight under its Hugging Face CLIPModel name.
    pub weights: Vec<(String, candle_core::Tensor)>,
    pub config: serde_json::Value,
    pub device: String,
    /// When the run started (seconds since the Unix epoch).
    pub started_unix: u64,
    /// Finetuner's `to_onnx`: each submodel folder also holds its tower as `model.onnx`
    /// ([`crate::model::onnx`]), for ONNX Runtime and clip-as-service's ONNX executor.
    pub to_onnx: bool,
}

/// `YYYY-MM-DDTHH:MM:SSZ` (ISO 8601, UTC) for logs and artifact metadata, with no time-zone
/// database needed.
pub fn iso_utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The process's umask, read without changing it (`umask(2)` can only be read by setting it,
/// which would race with other threads creating files).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Gives every file and folder under `root` the permissions a plain `create` would under the
/// umask (0666 / 0777 masked). Files written through a temporary file (safetensors does) are
/// 0600 otherwise, so an artifact or checkpoint made by one user, or by root in a container,
/// could not be read by another user or by the non-root image.
pub fn apply_umask(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mask = umask();
    let meta = std::fs::symlink_metadata(root)?;
    let want = if meta.is_dir() { 0o777 } else { 0o666 } & !mask;
    if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o777 != want {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(want))?;
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(root)? {
            apply_umask(&e?.path())?;
        }
    }
    Ok(())
}

/// Replaces the file `path` with `bytes` so that a crash or power loss at any moment leaves the
/// old contents or the new, never an empty or partial file: written beside it, flushed to the
/// disk, renamed over it, and the rename flushed. Without the flushes some filesystems (XFS,
/// ext4 without auto_da_alloc) can leave the renamed file empty after a power loss, and a run
/// record lost that way hid a finished run.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Seconds since the Unix epoch, as run records and artifacts store times.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_unix() -> u64 {
    unix_now().max(0) as u64
}

/// Losses and metrics of a finished run, for metrics.yml and report.md.
pub struct RunSummary<'a> {
    pub seconds: f64,
    pub losses: &'a [f32],
    pub epoch_losses: &'a [f64],
    pub eval_losses: &'a [f64],
    pub before: Option<&'a crate::eval::Metrics>,
    pub after: Option<&'a crate::eval::Metrics>,
    /// Retrieval metrics measured at the end of these epochs (0-based).
    pub epoch_metrics: &'a [(usize, crate::eval::Metrics)],
    /// Written as example-results.yml when not empty.
    pub examples: &'a crate::eval::ExampleResults,
}

/// An artifact being written in a temporary folder next to its destination; [`Staged::finish`]
/// renames it into place, so a reader never sees half an artifact.
pub struct Staged {
    tmp: std::path::PathBuf,
    dest: std::path::PathBuf,
    metadata: serde_json::Value,
    config: serde_json::Value,
}

impl Staged {
    /// Writes the models and configuration into a temporary folder.
    pub fn write(run: &RunOutput) -> Result<Self, ArtifactError> {
        ensure_free(run.output, run.run_name)?;
        std::fs::create_dir_all(run.output).map_err(io_err(run.output))?;
        let dest = run.output.join(run.run_name);
        let tmp = run
            .output
            .join(format!(".{}.tmp-{}", run.run_name, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        // A continued run's files are the earlier artifact, wherever it lay (a trainer's data
        // folder, an unpacked zip since removed): recorded are the backbone and that run's name.
        let (backbone, continued) = match run.continued_from {
            Some((model, artifact)) => {
                let name = artifact.file_name().map(|n| {
                    let n = n.to_string_lossy();
                    n.strip_suffix(".zip").unwrap_or(&n).to_string()
                });
                (model.to_string(), name)
            }
            None => (run.files.source.clone(), None),
        };
        let mut metadata = serde_json::json!({
            "name": run.run_name,
            "experiment": run.experiment,
            "backbone": backbone,
            "device": run.device,
            "started": iso_utc(run.started_unix as i64),
            "started_unix": run.started_unix,
            "clipft_version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(c) = continued {
            metadata["model_artifact"] = c.into();
        }
        for (sub, tower, prefixes, extra) in [
            (
                TEXT_SUBMODEL,
                crate::model::onnx::Tower::Text,
                ["text_model.", "text_projection."],
                run.files.tokenizer.as_ref().map(|p| (p, "tokenizer.json")),
            ),
            (
                VISION_SUBMODEL,
                crate::model::onnx::Tower::Vision,
                ["vision_model.", "visual_projection."],
                run.files
                    .preprocessor
                    .as_ref()
                    .map(|p| (p, "preprocessor_config.json")),
            ),
        ] {
            let dir = tmp.join("models").join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let tensors: std::collections::HashMap<String, candle_core::Tensor> = run
                .weights
                .iter()
                .filter(|(n, _)| n == "logit_scale" || prefixes.iter().any(|p| n.starts_with(p)))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
            std::fs::copy(&run.files.config, dir.join("config.json"))
                .map_err(io_err(&run.files.config))?;
            if let Some((src, name)) = extra {
                std::fs::copy(src, dir.join(name)).map_err(io_err(src))?;
            }
            if run.to_onnx {
                // Read back from the folder just written: the graph holds what a user loading
                // the submodel gets.
                let mut files = ModelFiles::from_dir(&dir)?;
                files.source = format!("{}/models/{sub}", run.run_name);
                let bytes = crate::model::onnx::tower_onnx(&files, tower)?;
                let path = dir.join(ONNX_FILE);
                replace_file(&path, &bytes).map_err(io_err(&path))?;
            }
            let mut meta = metadata.clone();
            meta["submodel"] = sub.into();
            write_text(&dir.join("metadata.yml"), &to_yaml(&meta))?;
        }
        write_text(&tmp.join("config.yml"), &to_yaml(&run.config))?;
        Ok(Self {
            tmp,
            dest,
            metadata,
            config: run.config.clone(),
        })
    }

    /// The folder as written so far (loadable with [`submodel_files`]).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes metadata, metrics and report, then moves the artifact into place.
    pub fn finish(mut self, s: &RunSummary) -> Result<std::path::PathBuf, ArtifactError> {
        let finished = now_unix();
        self.metadata["finished"] = iso_utc(finished as i64).into();
        self.metadata["finished_unix"] = finished.into();
        self.metadata["duration_seconds"] = serde_json::json!((s.seconds * 10.0).round() / 10.0);
        write_text(&self.tmp.join("metadata.yml"), &to_yaml(&self.metadata))?;
        let per_epoch: Vec<_> = s
            .epoch_metrics
            .iter()
            .map(|(e, m)| serde_json::json!({"epoch": e + 1, "metrics": m}))
            .collect();
        let metrics = serde_json::json!({
            "before": s.before,
            "after": s.after,
            "per_epoch": per_epoch,
            "train_loss_per_epoch": s.epoch_losses,
            "eval_loss_per_epoch": s.eval_losses,
            "train_loss_per_step": s.losses,
        });
        write_text(&self.tmp.join("metrics.yml"), &to_yaml(&metrics))?;
        if !s.examples.is_empty() {
            let examples = serde_json::json!(s.examples);
            write_text(&self.tmp.join(EXAMPLES_FILE), &to_yaml(&examples))?;
        }
        let per_epoch = s.losses.len() / s.epoch_losses.len().max(1);
        let loss_svg = self.tmp.join("loss.svg");
        crate::eval::report::loss_plot(&loss_svg, s.losses, s.eval_losses, per_epoch)
            .map_err(io_err(&loss_svg))?;
        if let (Some(b), Some(a)) = (s.before, s.after) {
            let m = self.tmp.join("metrics.svg");
            crate::eval::report::metrics_plot(&m, b, a).map_err(io_err(&m))?;
        }
        write_text(
            &self.tmp.join("report.md"),
            &report(&self.metadata, &self.config, s),
        )?;
        apply_umask(&self.tmp).map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        Ok(self.dest.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // A run that failed after staging leaves nothing behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_text(path: &Path, text: &str) -> Result<(), ArtifactError> {
    std::fs::write(path, text).map_err(io_err(path))
}

/// report.md: a short model card (what was trained on what, how, with what result), the
/// before/after table in the layout of Finetuner's CLIP results, and the loss.
fn report(meta: &serde_json::Value, config: &serde_json::Value, s: &RunSummary) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "# {}\n\nCLIP fine-tuned for text-to-image search with clipft {}.\n\n## Model\n\n\
         - backbone: `{}`\n- submodels: `models/clip-text`, `models/clip-vision` (Hugging Face \
         layout)\n- trained on {} from {} to {} ({:.1} s)\n- experiment: {}\n",
        text(&meta["name"]),
        text(&meta["clipft_version"]),
        text(&meta["backbone"]),
        text(&meta["device"]),
        text(&meta["started"]),
        text(&meta["finished"]),
        s.seconds,
        text(&meta["experiment"]),
    );
    if let Some(a) = meta["model_artifact"].as_str() {
        out.push_str(&format!("- continued from the artifact of run {a}\n"));
    }
    if let Some(d) = config["description"].as_str().filter(|d| !d.is_empty()) {
        out.push_str(&format!("- description: {}\n", d.replace('\n', " ")));
    }
    out.push_str("\n## Data\n\n");
    for (what, key) in [
        ("training pairs", "train_data"),
        ("validation pairs", "eval_data"),
        ("queries", "query_data"),
        ("index", "index_data"),
    ] {
        if !config[key].is_null() {
            out.push_str(&format!("- {what}: `{}`\n", text(&config[key])));
        }
    }
    out.push_str("\n## Training\n\n| setting | value |\n|---|---|\n");
    for key in [
        "loss",
        "epochs",
        "batch_size",
        "learning_rate",
        "optimizer",
        "weight_decay",
        "scheduler",
        "warmup_steps",
        "max_steps",
        "seed",
        "shuffle",
        "dtype",
        "freeze",
        "max_grad_norm",
        "best_model",
        "early_stopping",
        "wise_ft_alpha",
    ] {
        let v = &config[key];
        let empty = v.is_null() || v.as_array().is_some_and(|a| a.is_empty());
        if !empty {
            out.push_str(&format!("| {key} | {} |\n", text(v)));
        }
    }
    out.push_str("\n## Results\n\n");
    if let (Some(b), Some(a)) = (s.before, s.after) {
        out.push_str("| metric | before | after |\n|---|---|---|\n");
        for ((name, before), (_, after)) in b.named().into_iter().zip(a.named()) {
            out.push_str(&format!("| {name} | {before:.3} | {after:.3} |\n"));
        }
        out.push_str("\n![metrics before and after](metrics.svg)\n\n");
    } else {
        out.push_str("No retrieval metrics: the run had no query and index data.\n\n");
    }
    out.push_str("![loss](loss.svg)\n\n| epoch | train loss | eval loss |\n|---|---|---|\n");
    for (i, l) in s.epoch_losses.iter().enumerate() {
        let e = s
            .eval_losses
            .get(i)
            .map_or("-".to_string(), |v| format!("{v:.4}"));
        out.push_str(&format!("| {} | {l:.4} | {e} |\n", i + 1));
    }
    out.push_str(&format!(
        "\n{} optimiser steps; loss first {:.4}, last {:.4}.\n",
        s.losses.len(),
        s.losses.first().copied().unwrap_or(f32::NAN),
        s.losses.last().copied().unwrap_or(f32::NAN)
    ));
    out.push_str(&example_tables(s.examples));
    out
}

/// Matches per query report.md shows (Finetuner's `display_examples(k=5)`).
const REPORT_EXAMPLE_MATCHES: usize = 5;

/// report.md's example results: per query, its best matches before and after side by side.
fn example_tables(x: &crate::eval::ExampleResults) -> String {
    if x.is_empty() {
        return String::new();
    }
    // Queries and image names are the user's text: a `|` would end a table cell.
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::from("\n## Example results\n");
    let n = x.before.len().max(x.after.len());
    for i in 0..n {
        let (b, a) = (x.before.get(i), x.after.get(i));
        let Some(query) = b.or(a).map(|e| e.query.as_str()) else {
            continue;
        };
        out.push_str(&format!(
            "\nquery: {}\n\n| match | before | after |\n|---|---|---|\n",
            cell(query)
        ));
        let at = |e: Option<&crate::eval::Example>, k: usize| {
            e.and_then(|e| e.matches.get(k))
                .map_or_else(|| "-".to_string(), |m| cell(m))
        };
        for k in 0..REPORT_EXAMPLE_MATCHES {
            if at(b, k) == "-" && at(a, k) == "-" {
                break;
            }
            out.push_str(&format!("| {} | {} | {} |\n", k + 1, at(b, k), at(a, k)));
        }
    }
    out
}

/// YAML for the artifact's small documents (maps, lists, scalars), block style.
pub fn to_yaml(v: &serde_json::Value) -> String {
    fn scalar(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Null => "null".into(),
            serde_json::Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
            other => other.to_string(),
        }
    }
    fn emit(v: &serde_json::Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match x {
                        serde_json::Value::Object(o) if !o.is_empty() => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            emit(x, indent + 2, out);
                        }
                        serde_json::Value::Array(a) if !a.is_empty() => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            emit(x, indent + 2, out);
                        }
                        serde_json::Value::Object(_) => out.push_str(&format!("{pad}{k}: {{}}\n")),
                        serde_json::Value::Array(_) => out.push_str(&format!("{pad}{k}: []\n")),
                        _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(x))),
                    }
                }
            }
            serde_json::Value::Array(a) => {
                for x in a {
                    match x {
                        serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                            out.push_str(&format!("{pad}-\n"));
                            emit(x, indent + 2, out);
                        }
                        _ => out.push_str(&format!("{pad}- {}\n", scalar(x))),
                    }
                }
            }
            other => out.push_str(&format!("{pad}{}\n", scalar(other))),
        }
    }
    let mut out = String::new();
    emit(v, 0, &mut out);
    out
}

/// Largest total size an artifact zip may unpack to (a guard against zip bombs).
pub const MAX_UNZIPPED_BYTES: u64 = 64 << 30;

/// An artifact zip unpacked for loading: removed when dropped (the loaded model keeps it
/// alive through [`ModelFiles::unpacked`]).
pub struct Unpacked {
    pub dir: std::sync::Arc<tempfile::TempDir>,
    /// The artifact folder inside (the one holding `models/`).
    pub top: std::path::PathBuf,
}

/// Unpacks an artifact zip (one top folder, Finetuner's layout; `model.onnx` files left out)
/// into a fresh folder of its own under this user's private folder ([`private_temp_dir`]),
/// named after this process so that folders left by a killed process are found and removed by
/// the next unpack.
pub fn unzip_artifact(zip_path: &Path) -> Result<Unpacked, String> {
    let base = private_temp_dir().map_err(|e| e.to_string())?;
    remove_orphans(&base);
    let dir = tempfile::Builder::new()
        .prefix(&format!("artifact-{}-", std::process::id()))
        .tempdir_in(&base)
        .map_err(|e| format!("{}: {e}", base.display()))?;
    // The ONNX graphs (`to_onnx`) are for other runtimes: loading never reads them, and they
    // are as large as the weights.
    let skip_onnx = |p: &Path| (p.file_name() != Some(ONNX_FILE.as_ref())).then_some(u64::MAX);
    extract_zip_entries(zip_path, dir.path(), MAX_UNZIPPED_BYTES, skip_onnx)
        .map_err(|e| e.to_string())?;
    let root = dir.path();
    let top = if root.join("models").is_dir() {
        root.to_path_buf()
    } else {
        let tops: Vec<_> = std::fs::read_dir(root)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("models").is_dir())
            .collect();
        match tops.as_slice() {
            [one] => one.clone(),
            _ => return Err("expected one top folder holding models/".into()),
        }
    };
    Ok(Unpacked {
        dir: std::sync::Arc::new(dir),
        top,
    })
}

/// `$TMPDIR/clipft-<uid>`, made readable by this user only. A folder of that name that another
/// user owns or others can write is refused rather than used: what is unpacked there is loaded
/// as a model.
pub fn private_temp_dir() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("clipft-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a private folder of this user (uid {uid}); remove it",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Removes unpacked artifacts whose process has ended (killed before it could clean up).
fn remove_orphans(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("artifact-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Why a zip did not unpack: over the total it may unpack to (which a caller maps to the limit
/// that set it), or anything else, told in words.
#[derive(Debug, thiserror::Error)]
pub enum UnzipError {
    #[error("unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Bad(String),
}

/// Unpacks `zip_path` into `dest`. Entry names that would leave `dest` (absolute, `..`) are
/// refused, not sanitised, and the total unpacked size is capped at `max_bytes` (zip bombs).
pub fn extract_zip(zip_path: &Path, dest: &Path, max_bytes: u64) -> Result<(), String> {
    extract_zip_entries(zip_path, dest, max_bytes, |_| Some(u64::MAX))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// [`extract_zip`] for the entries `pick` selects, each capped at the size `pick` gives it;
/// returns the bytes written. Unsafe names are refused whether picked or not.
pub fn extract_zip_entries(
    zip_path: &Path,
    dest: &Path,
    max_bytes: u64,
    mut pick: impl FnMut(&Path) -> Option<u64>,
) -> Result<u64, UnzipError> {
    use std::io::Read;
    let bad = |e: &dyn std::fmt::Display| UnzipError::Bad(e.to_string());
    let file = std::fs::File::open(zip_path).map_err(|e| bad(&e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    std::fs::create_dir_all(dest).map_err(|e| bad(&e))?;
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(&e))?;
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| UnzipError::Bad(format!("unsafe entry name {:?}", entry.name())))?;
        let Some(cap) = pick(&rel) else {
            continue;
        };
        let out = dest.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| bad(&e))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| bad(&e))?;
        }
        let mut w = std::fs::File::create(&out).map_err(|e| bad(&e))?;
        let cap = cap.min(max_bytes.saturating_sub(total));
        let n = std::io::copy(&mut (&mut entry).take(cap.saturating_add(1)), &mut w)
            .map_err(|e| bad(&e))?;
        total += n;
        if total > max_bytes {
            return Err(UnzipError::TooLarge(max_bytes));
        }
        if n > cap {
            return Err(UnzipError::Bad(format!(
                "{} unpacks to more than {cap} bytes",
                rel.display()
            )));
        }
    }
    Ok(total)
}

/// Where [`zip_artifact`] writes the zip of the artifact folder `dir`: `<folder>.zip` beside
/// it, the whole folder name kept (`with_extension` made run `clip.v2`'s zip `clip.zip`,
/// replacing run `clip`'s).
pub fn zip_path(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".zip");
    dir.with_file_name(name)
}

/// Packs an artifact folder as `<folder>.zip` beside it, every entry under `<run name>/`
/// (Finetuner's layout); written to a temporary name and renamed.
pub fn zip_artifact(dir: &Path) -> Result<std::path::PathBuf, ArtifactError> {
    use std::io::Write;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("artifact")
        .to_string();
    let dest = zip_path(dir);
    let parent = dir.parent().unwrap_or(Path::new("."));
    let io = |e: std::io::Error| ArtifactError::Io {
        path: dest.clone(),
        source: e,
    };
    // A name of its own, so no other writer (another thread, another process) truncates it.
    // Made as any file is (0666 less the umask), not 0600 as temporary files are.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.zip."))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(parent)
        .map_err(io)?;
    let zerr = |e: zip::result::ZipError| ArtifactError::Io {
        path: dest.clone(),
        source: std::io::Error::other(e),
    };
    let mut zw = zip::ZipWriter::new(tmp.as_file().try_clone().map_err(io)?);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io)? {
            let p = e.map_err(io)?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let rel = f
            .strip_prefix(dir)
            .map_err(|e| io(std::io::Error::other(e)))?;
        let entry = format!("{name}/{}", rel.to_string_lossy().replace('\\', "/"));
        zw.start_file(entry, opts).map_err(zerr)?;
        zw.write_all(&std::fs::read(&f).map_err(io)?).map_err(io)?;
    }
    zw.finish().map_err(zerr)?;
    tmp.persist(&dest).map_err(|e| io(e.error))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Finetuner artifact of a `to_onnx` run (only `model.onnx` beside the metadata) is
    /// refused by what it lacks, as a folder and as a zip (whose unpacking leaves the graph out).
    #[test]
    fn an_artifact_with_only_onnx_graphs_is_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let art = root.path().join("onnx-only");
        for sub in [TEXT_SUBMODEL, VISION_SUBMODEL] {
            let dir = art.join("models").join(sub);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("metadata.yml"), "name: x\n").unwrap();
            std::fs::write(dir.join(ONNX_FILE), b"not read").unwrap();
        }
        std::fs::write(art.join("config.yml"), "model: x\n").unwrap();
        let zip = zip_artifact(&art).unwrap();
        for path in [&art, &zip] {
            for towers in [Towers::TEXT, Towers::VISION, Towers::ALL] {
                let e = submodel_files(path, towers).unwrap_err().to_string();
                assert!(
                    e.contains("holds no weights") && e.contains("to_onnx=True"),
                    "{e}"
                );
            }
        }
    }

    /// Concurrent zips of one artifact all succeed, each complete (they wrote one shared
    /// temporary name, truncating each other's file, and all but one failed), and the zip is
    /// made as any file is, not private as temporary files are.
    #[test]
    fn concurrent_zips_of_one_artifact_all_succeed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        std::fs::create_dir_all(dir.join("models")).unwrap();
        std::fs::write(dir.join("config.yml"), "a: 1\n").unwrap();
        std::fs::write(dir.join("models/w.bin"), vec![7u8; 3 << 20]).unwrap();
        let zips: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6).map(|_| s.spawn(|| zip_artifact(&dir))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for z in zips {
            assert_eq!(z.unwrap(), zip_path(&dir));
        }
        let mut archive =
            zip::ZipArchive::new(std::fs::File::open(zip_path(&dir)).unwrap()).unwrap();
        let mut names: Vec<String> = archive.file_names().map(String::from).collect();
        names.sort();
        assert_eq!(names, ["run/config.yml", "run/models/w.bin"]);
        assert_eq!(archive.by_name("run/models/w.bin").unwrap().size(), 3 << 20);
        let leftovers = std::fs::read_dir(root.path()).unwrap().count();
        assert_eq!(leftovers, 2, "only the folder and its zip");
        use std::os::unix::fs::PermissionsExt;
        let plain = root.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&zip_path(&dir)), mode(&plain));
    }

    /// A dot in a run name is part of it: `clip.v2`'s zip is `clip.v2.zip`, and it leaves run
    /// `clip`'s zip alone.
    #[test]
    fn zips_keep_the_whole_run_name() {
        let root = tempfile::tempdir().unwrap();
        for name in ["clip", "clip.v2"] {
            let dir = root.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.yml"), format!("name: {name}\n")).unwrap();
            assert_eq!(
                zip_artifact(&dir).unwrap(),
                root.path().join(format!("{name}.zip"))
            );
        }
        let archive =
            zip::ZipArchive::new(std::fs::File::open(root.path().join("clip.zip")).unwrap())
                .unwrap();
        assert_eq!(
            archive.file_names().collect::<Vec<_>>(),
            ["clip/config.yml"]
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_795_737_600), "2026-11-27T00:00:00Z");
        assert_eq!(iso_utc(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    /// Files written through a temporary file (0600) get what the umask gives a plain create.
    #[test]
    fn apply_umask_opens_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("models");
        std::fs::create_dir(&sub).unwrap();
        let f = sub.join("model.safetensors");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        apply_umask(dir.path()).unwrap();
        let mask = umask();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f), 0o666 & !mask);
        assert_eq!(mode(&sub), 0o777 & !mask);
    }
}
