//! `clipft export`: a model's or an artifact's towers as ONNX graphs, in the folder layout
//! clip-as-service's ONNX executor reads as its `model_path` (`textual.onnx`, `visual.onnx`).

use std::path::PathBuf;

use clap::Args;

use super::{parse_towers, DEFAULT_MODEL};
use crate::model::onnx::{self, Tower};
use crate::model::Towers;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Hugging Face repo id or local folder in Hugging Face layout.
    #[arg(long, env = "CLIPFT_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// A fine-tuned artifact (folder or zip); takes precedence over --model, which then only
    /// names the backbone of a Finetuner artifact that holds `model.pt` files.
    #[arg(long, env = "CLIPFT_ARTIFACT")]
    pub artifact: Option<PathBuf>,
    /// `clip-text`, `clip-vision` or `all`: the towers to write.
    #[arg(long, env = "CLIPFT_SELECT_MODEL", value_parser = parse_towers, default_value = "all")]
    pub select_model: Towers,
    /// The folder to write `textual.onnx` and `visual.onnx` into (created if missing); hand it
    /// to clip_server's ONNX executor as `model_path`. Its variable names the command:
    /// `CLIPFT_OUTPUT` is the artifacts folder of `fit`.
    #[arg(long, env = "CLIPFT_EXPORT_OUTPUT")]
    pub output: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let files = crate::artifact::model_or_artifact(
        &args.model,
        args.artifact.as_deref(),
        args.select_model,
    )?;
    std::fs::create_dir_all(&args.output)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.display()))?;
    let towers = [
        (args.select_model.text, Tower::Text),
        (args.select_model.vision, Tower::Vision),
    ];
    for tower in towers.into_iter().filter(|t| t.0).map(|t| t.1) {
        let path = args.output.join(tower.clip_server_file());
        let bytes = onnx::tower_onnx(&files, tower)?;
        crate::artifact::replace_file(&path, &bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        outln!("{} ({:.1} MB)", path.display(), bytes.len() as f64 / 1e6);
    }
    Ok(())
}
