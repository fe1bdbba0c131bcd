//! The CLIP backbones clipft knows by name, with the display names Finetuner 0.7+ gave them
//! (`clip-base-en`, `clip-large-en`), so a notebook's `fit(model='clip-base-en', ...)` and
//! `clipft fit --model clip-base-en` find the same weights. Any other CLIP checkpoint in Hugging
//! Face layout loads too; these are the ones `clipft models` and `describe_models()` list.

/// A backbone as Finetuner's `describe_models` table shows it.
#[derive(Debug, serde::Serialize)]
pub struct Backbone {
    pub name: &'static str,
    pub task: &'static str,
    pub output_dim: usize,
    pub architecture: &'static str,
    pub description: &'static str,
    /// Finetuner's display name for the same model, where it had one.
    pub display_name: Option<&'static str>,
}

pub const BACKBONES: &[Backbone] = &[
    Backbone {
        name: "openai/clip-vit-base-patch32",
        task: "text-to-image",
        output_dim: 512,
        architecture: "transformer",
        description: "CLIP ViT-B/32: the default; fast, 151M parameters",
        display_name: Some("clip-base-en"),
    },
    Backbone {
        name: "openai/clip-vit-base-patch16",
        task: "text-to-image",
        output_dim: 512,
        architecture: "transformer",
        description: "CLIP ViT-B/16: finer patches, about 4x the image compute of B/32",
        display_name: None,
    },
    Backbone {
        name: "openai/clip-vit-large-patch14",
        task: "text-to-image",
        output_dim: 768,
        architecture: "transformer",
        description: "CLIP ViT-L/14: large, 428M parameters",
        display_name: Some("clip-large-en"),
    },
    Backbone {
        name: "openai/clip-vit-large-patch14-336",
        task: "text-to-image",
        output_dim: 768,
        architecture: "transformer",
        description: "CLIP ViT-L/14 at 336 pixels",
        display_name: None,
    },
];

/// clip_server's and open-clip's names of OpenAI's CLIP weights, and the Hugging Face
/// checkpoints that hold the same weights (clip-as-service configurations and Finetuner's
/// open-clip era name models this way).
pub const OPEN_CLIP_NAMES: [(&str, &str); 4] = [
    ("ViT-B-32::openai", "openai/clip-vit-base-patch32"),
    ("ViT-B-16::openai", "openai/clip-vit-base-patch16"),
    ("ViT-L-14::openai", "openai/clip-vit-large-patch14"),
    ("ViT-L-14-336::openai", "openai/clip-vit-large-patch14-336"),
];

/// The Hugging Face repo behind a Finetuner display name (`clip-base-en` ->
/// `openai/clip-vit-base-patch32`) or an open-clip name of OpenAI's weights
/// (`ViT-B-32::openai`); any other name is returned as given.
pub fn canonical(name: &str) -> &str {
    if let Some((_, repo)) = OPEN_CLIP_NAMES.iter().find(|(n, _)| *n == name) {
        return repo;
    }
    BACKBONES
        .iter()
        .find(|b| b.display_name == Some(name))
        .map_or(name, |b| b.name)
}

/// Why a Finetuner backbone clipft cannot train is refused, or None when it can be tried.
/// open-clip descriptors of other weights than OpenAI's (`ViT-B-32::laion2b_s34b_b79k`) and
/// the multilingual model name weights in open_clip's layout, which is not Hugging Face's
/// CLIPModel.
pub fn unsupported(name: &str) -> Option<String> {
    if OPEN_CLIP_NAMES.iter().any(|(n, _)| *n == name) {
        return None;
    }
    if name.contains("::") || name == "clip-base-multi" {
        return Some(format!(
            "{name} is an open-clip model; clipft loads CLIP in Hugging Face layout: use {} (clip-base-en) or another of `clipft models`",
            crate::model::DEFAULT_MODEL
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_map_to_repos() {
        assert_eq!(canonical("clip-base-en"), "openai/clip-vit-base-patch32");
        assert_eq!(canonical("clip-large-en"), "openai/clip-vit-large-patch14");
        assert_eq!(canonical("some/folder"), "some/folder");
        assert_eq!(
            canonical("ViT-B-32::openai"),
            "openai/clip-vit-base-patch32"
        );
        assert_eq!(
            canonical("ViT-L-14-336::openai"),
            "openai/clip-vit-large-patch14-336"
        );
        assert!(unsupported("ViT-B-32::openai").is_none());
        assert!(unsupported("ViT-B-32::laion2b_s34b_b79k").is_some());
        assert!(unsupported("clip-base-multi").is_some());
        assert!(unsupported("clip-base-en").is_none());
    }
}
