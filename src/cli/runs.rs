//! `clipft runs`: list, inspect, follow, cancel and delete a trainer's runs, and fetch their
//! artifacts.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::protocol::trainer as pb;
use crate::trainer::client;

/// Where the trainer is and how to authenticate; shared by `runs` and `data`.
#[derive(Args, Debug, Clone)]
pub struct TrainerAddr {
    #[arg(
        long,
        env = "CLIPFT_TRAINER",
        default_value = "grpc://127.0.0.1:8081",
        global = true
    )]
    pub trainer: String,
    #[arg(long, env = "CLIPFT_AUTH_TOKEN", hide_env_values = true, global = true)]
    pub auth_token: Option<String>,
}

impl TrainerAddr {
    pub async fn connect(&self) -> anyhow::Result<client::Client> {
        Ok(client::connect(&self.trainer, self.auth_token.as_deref()).await?)
    }
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: RunsCommand,
    #[command(flatten)]
    pub addr: TrainerAddr,
}

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// Every run: name, state, progress, details.
    List,
    /// The run's state word (CREATED, STARTED, FINISHED, FAILED, CANCELED), then its details.
    Status { name: String },
    /// The run's log; with --follow, until the run ends.
    Logs {
        name: String,
        #[arg(long, env = "CLIPFT_FOLLOW")]
        follow: bool,
    },
    /// Retrieval metrics before and after (and per epoch with --json).
    Metrics {
        name: String,
        #[arg(long, env = "CLIPFT_JSON")]
        json: bool,
    },
    /// Download the artifact as OUTPUT/NAME/ (the run's name).
    Artifact {
        name: String,
        #[arg(long, env = "CLIPFT_OUTPUT", default_value = "artifacts")]
        output: PathBuf,
    },
    /// Cancel a queued or running run.
    Cancel { name: String },
    /// Remove a run that is not running, with its logs and artifact.
    Delete { name: String },
}

fn age(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let s = (crate::trainer::runs::unix_now() - unix).max(0);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub fn run(args: RunsArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let mut c = args.addr.connect().await?;
        match args.command {
            RunsCommand::List => {
                let runs = c.list_runs(pb::ListRunsRequest {}).await?.into_inner().runs;
                println!(
                    "{:<32} {:<9} {:>13} {:>10}  details",
                    "name", "state", "step", "created"
                );
                for r in runs {
                    let p = r.progress.unwrap_or_default();
                    println!(
                        "{:<32} {:<9} {:>13} {:>10}  {}",
                        r.name,
                        client::state_word(r.state),
                        format!("{}/{}", p.step, p.total_steps),
                        age(r.created_unix),
                        r.details
                    );
                }
            }
            RunsCommand::Status { name } => {
                let r = c.get_run(pb::GetRunRequest { name }).await?.into_inner();
                println!("{}", client::state_word(r.state));
                println!("{}", r.details);
            }
            RunsCommand::Logs { name, follow } => {
                client::stream_logs(&mut c, &name, follow, &mut |chunk| {
                    print!("{}", chunk.text);
                })
                .await?;
            }
            RunsCommand::Metrics { name, json } => {
                let m = c
                    .get_metrics(pb::GetMetricsRequest { name: name.clone() })
                    .await?
                    .into_inner();
                let (b, a) = (
                    client::metrics_from_map(&m.before),
                    client::metrics_from_map(&m.after),
                );
                if json {
                    let epochs: Vec<_> = m
                        .epochs
                        .iter()
                        .map(|e| serde_json::json!({"epoch": e.epoch, "metrics": e.metrics}))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "before": b, "after": a, "epochs": epochs,
                            "epoch_losses": m.epoch_losses, "eval_losses": m.eval_losses,
                        })
                    );
                } else {
                    match (b, a) {
                        (Some(b), Some(a)) => println!(
                            "{}",
                            super::eval::metrics_table(&[("before", &b), ("after", &a)])
                        ),
                        (Some(b), None) => {
                            println!("{}", super::eval::metrics_table(&[("before", &b)]))
                        }
                        _ => anyhow::bail!(
                            "run {name} has no metrics yet (it needs query and index data)"
                        ),
                    }
                }
            }
            RunsCommand::Artifact { name, output } => {
                let dir = client::download_artifact(&mut c, &name, &output, &mut |_, _| {}).await?;
                println!("{}", dir.display());
            }
            RunsCommand::Cancel { name } => {
                let r = c
                    .cancel_run(pb::CancelRunRequest { name })
                    .await?
                    .into_inner();
                println!("{}", client::state_word(r.state));
                println!("{}", r.details);
            }
            RunsCommand::Delete { name } => {
                c.delete_run(pb::DeleteRunRequest { name: name.clone() })
                    .await?;
                println!("deleted {name}");
            }
        }
        Ok(())
    })
}
