//! The artifact layout (`<run>/models/clip-text`, `<run>/models/clip-vision`, ...): selecting a
//! submodel to load. Each submodel folder is a Hugging Face partial checkpoint, so loading one
//! tower never reads the other tower's weights.

use std::path::Path;

use crate::model::load::WeightFiles;
use crate::model::{ModelError, ModelFiles, Towers};

/// Folder names of the two submodels, as Finetuner named them.
pub const TEXT_SUBMODEL: &str = "clip-text";
pub const VISION_SUBMODEL: &str = "clip-vision";

/// The model files for `towers` inside an artifact folder. With both towers, the weights of both
/// submodels are combined and the config, tokenizer and preprocessor are taken from the submodel
/// that owns them.
pub fn submodel_files(artifact: &Path, towers: Towers) -> Result<ModelFiles, ModelError> {
    if artifact.is_file() {
        return Err(ModelError::NotFound {
            what: artifact.display().to_string(),
            msg: "is a file: unzip the artifact and pass its folder".into(),
        });
    }
    let models = artifact.join("models");
    if !models.is_dir() {
        return Err(ModelError::NotFound {
            what: artifact.display().to_string(),
            msg: "is not an artifact folder (it has no models/ folder)".into(),
        });
    }
    let text = towers
        .text
        .then(|| ModelFiles::from_dir(&models.join(TEXT_SUBMODEL)))
        .transpose()?;
    let vision = towers
        .vision
        .then(|| ModelFiles::from_dir(&models.join(VISION_SUBMODEL)))
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
