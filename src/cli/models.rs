//! `clipft models`: the supported backbones, like Finetuner's `describe_models(task='text-to-image')`.

use clap::Args;

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long, env = "CLIPFT_JSON")]
    pub json: bool,
}

use crate::model::backbones::BACKBONES;

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
