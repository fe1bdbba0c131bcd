//! `clipft experiments`: a trainer's experiments, Finetuner's groups of runs. Runs join one
//! with `clipft fit --experiment`; `clipft runs list --experiment` shows one's runs.

use clap::{Args, Subcommand};

use super::runs::TrainerAddr;
use crate::protocol::trainer as pb;

#[derive(Args, Debug)]
pub struct ExperimentsArgs {
    #[command(subcommand)]
    pub command: ExperimentsCommand,
    #[command(flatten)]
    pub addr: TrainerAddr,
}

#[derive(Subcommand, Debug)]
pub enum ExperimentsCommand {
    /// Every experiment: name, runs (and how many have not ended), age.
    List,
    /// An empty experiment (`fit --experiment` also creates one on its first run).
    Create {
        /// The experiment's name.
        #[arg(value_parser = super::fit::safe_name)]
        name: String,
    },
    /// Remove an experiment with all its runs, their logs, artifacts and pushed datasets;
    /// refused while one of them trains. "default" stays, emptied.
    Delete {
        /// The experiment's name.
        name: String,
    },
}

pub fn run(args: ExperimentsArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let mut c = args.addr.connect().await?;
        match args.command {
            ExperimentsCommand::List => {
                let list = c
                    .list_experiments(pb::ListExperimentsRequest {})
                    .await?
                    .into_inner()
                    .experiments;
                outln!(
                    "{:<32} {:>6} {:>10} {:>10}",
                    "name",
                    "runs",
                    "unfinished",
                    "created"
                );
                for x in list {
                    outln!(
                        "{:<32} {:>6} {:>10} {:>10}",
                        x.name,
                        x.runs,
                        x.unfinished_runs,
                        super::runs::age(x.created_unix)
                    );
                }
            }
            ExperimentsCommand::Create { name } => {
                let x = c
                    .create_experiment(pb::CreateExperimentRequest { name })
                    .await?
                    .into_inner();
                outln!("created {}", x.name);
            }
            ExperimentsCommand::Delete { name } => {
                let x = c
                    .delete_experiment(pb::DeleteExperimentRequest { name })
                    .await?
                    .into_inner();
                outln!("deleted {} ({} runs)", x.name, x.runs);
            }
        }
        Ok(())
    })
}
