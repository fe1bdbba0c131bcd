//! `clipft trainer`: the fine-tuning service (`proto/trainer.proto`) on port 8081, keeping its
//! datasets, runs, logs and artifacts under `--data-dir`.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::docarray::ImageHosts;
use crate::trainer::runs::{Registry, RunnerOptions};
use crate::trainer::service::{serve, TrainerServerConfig};

/// Where the trainer keeps its state unless told otherwise (and where `clipft fit` looks up
/// datasets given by name).
pub const DEFAULT_DATA_DIR: &str = "clipft-data";

#[derive(Args, Debug)]
pub struct TrainerArgs {
    /// Address to listen on (0.0.0.0: every interface; 127.0.0.1: this machine only).
    #[arg(long, env = "CLIPFT_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// The gRPC port; 0 picks a free one (printed on stderr).
    #[arg(long, env = "CLIPFT_PORT", default_value_t = 8081)]
    pub port: u16,
    /// Datasets, runs, logs, checkpoints and artifacts; a restarted trainer continues from here.
    #[arg(long, env = "CLIPFT_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: std::path::PathBuf,
    /// Device for runs that do not name one: auto, cpu, cuda:N.
    #[arg(long, env = "CLIPFT_DEVICE", default_value = "auto")]
    pub device: String,
    /// `--matmul-precision` for training (`highest` keeps every product plain f32), for every run of this trainer.
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
    /// Runs trained at the same time; each takes the whole device, so more than one only pays
    /// on a machine with cores or memory to spare.
    #[arg(long, env = "CLIPFT_MAX_CONCURRENT_RUNS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_concurrent_runs: u64,
    /// Runs that may wait in the queue (CREATED, not started yet); a CreateRun past it is
    /// refused (RESOURCE_EXHAUSTED) until some start or are canceled. Every run is a folder and
    /// a line of every ListRuns: clients cannot queue without end.
    #[arg(long, env = "CLIPFT_MAX_QUEUED_RUNS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_runs: u64,
    /// Experiments the trainer keeps, "default" included; creating one past it (explicitly or
    /// by a run's first use) is refused (RESOURCE_EXHAUSTED) until some are deleted.
    #[arg(long, env = "CLIPFT_MAX_EXPERIMENTS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_experiments: u64,
    /// The largest batch_size a run may ask for; a CreateRun over it is refused. A batch's
    /// images are held decoded at once, with the model's activations: a run that needs more
    /// memory than the trainer has kills the process.
    #[arg(long, env = "CLIPFT_MAX_BATCH_SIZE", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..))]
    pub max_batch_size: u64,
    /// Restarts in a row a run may be interrupted by, with no checkpoint written between them,
    /// before it fails instead of resuming: a run that kills the trainer (out of memory) would
    /// otherwise kill it again at every restart.
    #[arg(long, env = "CLIPFT_MAX_INTERRUPTIONS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_interruptions: u32,
    /// The models runs may start from, comma-separated: hub repo ids, Finetuner names
    /// (`clip-base-en`) or folders on the trainer; a CreateRun naming another is refused
    /// (PERMISSION_DENIED). Unset: any, so a client can have any CLIP repo on the hub downloaded
    /// and any model folder on this machine read.
    #[arg(long, env = "CLIPFT_ALLOWED_MODELS", value_delimiter = ',')]
    pub allowed_models: Vec<String>,
    /// TrainingCheckpoint interval for runs that do not set one (and one at every epoch end):
    /// at most this much training is lost when the trainer is killed.
    #[arg(long, env = "CLIPFT_CHECKPOINT_SECONDS", default_value_t = 300)]
    pub checkpoint_seconds: u64,
    /// Largest dataset a client may push.
    #[arg(long, env = "CLIPFT_MAX_DATASET_BYTES", default_value_t = 16 << 30)]
    pub max_dataset_bytes: u64,
    /// Free space pushes must leave on the disk of `--data-dir`: each push is bounded by
    /// `--max-dataset-bytes`, but many pushes are not, and a full disk fails every run's
    /// checkpoints and artifacts (0: no floor).
    #[arg(long, env = "CLIPFT_MIN_FREE_BYTES", default_value_t = 2 << 30)]
    pub min_free_bytes: u64,
    /// Which addresses the hosts of http(s) image URIs in pushed data may resolve to,
    /// redirects included: `public` (internet only), `local` (also loopback and private
    /// networks, never link-local or cloud metadata services), `any`.
    #[arg(long, env = "CLIPFT_IMAGE_HOSTS", default_value_t = ImageHosts::default(), value_parser = ImageHosts::from_str)]
    pub image_hosts: ImageHosts,
    /// Largest gRPC message (dataset chunks are 1 MiB).
    #[arg(long, env = "CLIPFT_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: u64,
    /// Every call must carry `authorization: Bearer <token>` (health checks excepted).
    #[arg(long, env = "CLIPFT_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Prometheus `/metrics`; 0 turns it off.
    #[arg(long, env = "CLIPFT_PORT_MONITORING", default_value_t = 9091)]
    pub port_monitoring: u16,
    /// How long running runs get to write a checkpoint when the trainer is stopped.
    #[arg(long, env = "CLIPFT_SHUTDOWN_TIMEOUT", default_value_t = 60.0)]
    pub shutdown_timeout: f64,
    #[command(flatten)]
    pub tracing: super::TracingArgs,
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

pub fn run(args: TrainerArgs) -> anyhow::Result<()> {
    args.matmul.apply();
    let reg = Registry::open(RunnerOptions {
        data_dir: args.data_dir.clone(),
        max_concurrent: args.max_concurrent_runs as usize,
        max_queued: args.max_queued_runs as usize,
        max_experiments: args.max_experiments as usize,
        device: args.device.clone(),
        checkpoint_seconds: args.checkpoint_seconds,
        max_dataset_bytes: args.max_dataset_bytes,
        min_free_bytes: args.min_free_bytes,
        image_hosts: args.image_hosts,
        max_batch_size: args.max_batch_size as usize,
        max_interruptions: args.max_interruptions,
        allowed_models: args.allowed_models.clone(),
    })
    .with_context(|| format!("--data-dir {}", args.data_dir.display()))?;
    let config = TrainerServerConfig {
        auth_token: args.auth_token.clone(),
        max_message_bytes: args.max_message_bytes as usize,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        tls: args.tls.server_config()?,
    };
    args.tracing.warn_unused();
    let runtime = super::runtime()?;
    let tracing_guard = args
        .tracing
        .start(&runtime, "clipft-trainer".into(), "trainer")?;
    let result = runtime.block_on(async move {
        let addr = super::socket_addr(&args.host, args.port)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        if args.port_monitoring != 0 {
            let maddr = std::net::SocketAddr::new(bound.ip(), args.port_monitoring);
            let exporter = crate::telemetry::metrics::install(maddr)
                .map_err(|e| anyhow::anyhow!("--port-monitoring {}: {e}", args.port_monitoring))?;
            tokio::spawn(exporter);
            errln!("clipft trainer metrics on http://{maddr}/metrics");
        }
        let runs = reg.list(None)?;
        let auth = args.auth_token.as_deref().is_some_and(|t| !t.is_empty());
        let tls = args.tls.tls_cert.is_some();
        errln!(
            "clipft trainer serving on {bound} (data in {}, {} runs, auth {}, {})",
            args.data_dir.display(),
            runs.len(),
            if auth { "on" } else { "off" },
            if tls { "TLS: grpcs://" } else { "plaintext: grpc://" }
        );
        if auth && !tls && !bound.ip().is_loopback() {
            tracing::warn!(
                "the bearer token travels in clear text: give --tls-cert and --tls-key so clients connect with grpcs://"
            );
        }
        serve(reg, config, listener, super::executor::shutdown_signal()).await?;
        errln!("clipft trainer stopped");
        Ok(())
    });
    // The exporter runs on the runtime: flush before it goes.
    drop(tracing_guard);
    result
}
