//! `clipft models`: the supported backbones, like Finetuner's `describe_models(task='text-to-image')`.

use clap::Args;

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long, env = "CLIPFT_JSON")]
    pub json: bool,
}

/// A backbone clipft knows by name. Any other CLIP checkpoint in Hugging Face layout loads too.
#[derive(Debug, serde::Serialize)]
pub struct Backbone {
    pub name: &'static str,
    pub task: &'static str,
    pub output_dim: usize,
    pub architecture: &'static str,
    pub description: &'static str,
}

pub const BACKBONES: &[Backbone] = &[
    Backbone {
        name: "openai/clip-vit-base-patch32",
        task: "text-to-image",
        output_dim: 512,
        architecture: "transformer",
        description: "CLIP ViT-B/32: the default; fast, 151M parameters",
    },
    Backbone {
        name: "openai/clip-vit-base-patch16",
        task: "text-to-image",
        output_dim: 512,
        architecture: "transformer",
        description: "CLIP ViT-B/16: finer patches, about 4x the image compute of B/32",
    },
    Backbone {
        name: "openai/clip-vit-large-patch14",
        task: "text-to-image",
        output_dim: 768,
        architecture: "transformer",
        description: "CLIP ViT-L/14: large, 428M parameters",
    },
    Backbone {
        name: "openai/clip-vit-large-patch14-336",
        task: "text-to-image",
        output_dim: 768,
        architecture: "transformer",
        description: "CLIP ViT-L/14 at 336 pixels",
    },
];

pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    if args.json {
        outln!("{}", serde_json::to_string_pretty(BACKBONES)?);
        return Ok(());
    }
    outln!(
        "{:<36} {:<14} {:>10} {:<12} description",
        "name",
        "task",
        "output_dim",
        "architecture"
    );
    for b in BACKBONES {
        outln!(
            "{:<36} {:<14} {:>10} {:<12} {}",
            b.name,
            b.task,
            b.output_dim,
            b.architecture,
            b.description
        );
    }
    Ok(())
}
