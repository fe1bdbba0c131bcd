//! `clipft runs`: list, inspect, follow, cancel and delete a trainer's runs, and fetch their
//! artifacts.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::protocol::trainer as pb;
use crate::trainer::client;

/// Where the trainer is and how to authenticate; shared by `runs` and `data`.
#[derive(Args, Debug, Clone)]
pub struct TrainerAddr {
    /// The trainer's address (`grpc://host:port`).
    #[arg(
        long,
        env = "CLIPFT_TRAINER",
        default_value = "grpc://127.0.0.1:8081",
        global = true
    )]
    pub trainer: String,
    /// The trainer's bearer token (its --auth-token).
    #[arg(long, env = "CLIPFT_AUTH_TOKEN", hide_env_values = true, global = true)]
    pub auth_token: Option<String>,
    /// A CA certificate (PEM) to trust for a grpcs:// trainer, besides the system's roots.
    #[arg(long, env = "CLIPFT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
}

impl TrainerAddr {
    pub async fn connect(&self) -> anyhow::Result<client::Client> {
        Ok(client::connect(
            &self.trainer,
            self.auth_token.as_deref(),
            self.tls_ca.as_deref(),
        )
        .await?)
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
    /// Every run: name, experiment, state, progress, details.
    List {
        /// Only the runs of this experiment.
        #[arg(long, env = "CLIPFT_EXPERIMENT")]
        experiment: Option<String>,
    },
    /// The run's state word (CREATED, STARTED, FINISHED, FAILED, CANCELED), then its details.
    Status {
        /// The run's name.
        name: String,
    },
    /// The run's log; with --follow, until the run ends.
    Logs {
        /// The run's name.
        name: String,
        /// Keep printing as the run goes on, until it ends (Ctrl-C stops following, not the
        /// run).
        #[arg(long, env = "CLIPFT_FOLLOW")]
        follow: bool,
    },
    /// Retrieval metrics before and after (and per epoch with --json), then the example
    /// results when the run kept them.
    Metrics {
        /// The run's name.
        name: String,
        /// One JSON object (before, after, per epoch) instead of the table.
        #[arg(long, env = "CLIPFT_JSON")]
        json: bool,
    },
    /// Download the artifact as OUTPUT/NAME/ (the run's name).
    Artifact {
        /// The run's name.
        name: String,
        /// The folder the artifact lands in, as OUTPUT/NAME/.
        #[arg(long, env = "CLIPFT_OUTPUT", default_value = "artifacts")]
        output: PathBuf,
        /// Also write it as OUTPUT/NAME.zip.
        #[arg(long, env = "CLIPFT_ZIP")]
        zip: bool,
    },
    /// Cancel a queued or running run.
    Cancel {
        /// The run's name.
        name: String,
    },
    /// Remove a run that is not running, with its logs and artifact.
    Delete {
        /// The run's name.
        name: String,
    },
}

/// Why a run has no retrieval metrics to show: it has no query and index data, or it has not
/// (or never) reached the point where they are measured.
fn no_metrics_reason(run: &pb::Run) -> String {
    let cfg: serde_json::Value = serde_json::from_str(&run.config_json).unwrap_or_default();
    let has_data = !cfg["query_data"].is_null() && !cfg["index_data"].is_null();
    let state = client::state_word(run.state);
    let name = &run.name;
    if !has_data {
        return format!(
            "run {name} has no retrieval metrics: it was created without query and index data"
        );
    }
    match pb::RunState::try_from(run.state) {
        Ok(pb::RunState::Created | pb::RunState::Started) => format!(
            "run {name} has no retrieval metrics yet ({state}): they are measured before the first step, after each epoch and at the end"
        ),
        _ => format!("run {name} ended ({state}) before any retrieval metrics were measured"),
    }
}

pub(super) fn age(unix: i64) -> String {
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
            RunsCommand::List { experiment } => {
                let runs = client::list_runs(&mut c, &experiment.unwrap_or_default()).await?;
                outln!(
                    "{:<32} {:<16} {:<9} {:>13} {:>10}  details",
                    "name",
                    "experiment",
                    "state",
                    "step",
                    "created"
                );
                for r in runs {
                    let p = r.progress.unwrap_or_default();
                    outln!(
                        "{:<32} {:<16} {:<9} {:>13} {:>10}  {}",
                        r.name,
                        r.experiment,
                        client::state_word(r.state),
                        format!("{}/{}", p.step, p.total_steps),
                        age(r.created_unix),
                        r.details
                    );
                }
            }
            RunsCommand::Status { name } => {
                let r = c
                    .get_run(pb::GetRunRequest {
                        name,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                outln!("{}", client::state_word(r.state));
                outln!("{}", r.details);
            }
            RunsCommand::Logs { name, follow } => {
                let logs = async {
                    client::stream_logs(&mut c, &name, follow, &mut |chunk| {
                        super::output::out_raw(&chunk.text);
                        // `| head` has what it wanted: stop reading quietly.
                        match super::output::stdout_closed() {
                            true => std::ops::ControlFlow::Break(()),
                            false => std::ops::ControlFlow::Continue(()),
                        }
                    })
                    .await
                    .map_err(anyhow::Error::from)
                };
                match follow {
                    true => super::output::follow_or_detach(&name, logs).await?,
                    false => logs.await?,
                }
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
                    outln!(
                        "{}",
                        serde_json::json!({
                            "before": b, "after": a, "epochs": epochs,
                            "epoch_losses": m.epoch_losses, "eval_losses": m.eval_losses,
                            "examples": client::examples_from(&m),
                        })
                    );
                } else {
                    let mut columns: Vec<(String, crate::eval::Metrics)> = Vec::new();
                    columns.extend(b.map(|b| ("before".to_string(), b)));
                    for e in &m.epochs {
                        if let Some(x) = client::metrics_from_map(&e.metrics) {
                            columns.push((format!("epoch {}", e.epoch), x));
                        }
                    }
                    columns.extend(a.map(|a| ("after".to_string(), a)));
                    if columns.is_empty() {
                        let run = c
                            .get_run(pb::GetRunRequest {
                                name: name.clone(),
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        anyhow::bail!("{}", no_metrics_reason(&run));
                    }
                    let refs: Vec<(&str, &crate::eval::Metrics)> =
                        columns.iter().map(|(n, m)| (n.as_str(), m)).collect();
                    outln!("{}", super::eval::metrics_table(&refs));
                    super::output::out_raw(&super::eval::examples_text(&client::examples_from(&m)));
                }
            }
            RunsCommand::Artifact { name, output, zip } => {
                let dir = client::download_artifact(&mut c, &name, &output, &mut |_, _| {}).await?;
                outln!("{}", dir.display());
                if zip {
                    outln!("{}", crate::artifact::zip_artifact(&dir)?.display());
                }
            }
            RunsCommand::Cancel { name } => {
                let r = c
                    .cancel_run(pb::CancelRunRequest { name })
                    .await?
                    .into_inner();
                outln!("{}", client::state_word(r.state));
                outln!("{}", r.details);
            }
            RunsCommand::Delete { name } => {
                c.delete_run(pb::DeleteRunRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await?;
                outln!("deleted {name}");
            }
        }
        Ok(())
    })
}
