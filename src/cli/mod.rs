//! The command line: one module per subcommand. Each parses its flags (every flag also reads a
//! `CLIPFT_*` environment variable), calls the library and prints; no logic a test needs lives here.

pub mod bench;
pub mod data;
pub mod demo;
pub mod encode;
pub mod eval;
pub mod executor;
pub mod fit;
pub mod jina;
pub mod models;
pub mod ping;
pub mod runs;
pub mod trainer;

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::model::{device, LoadOptions, ModelError, ModelFiles, Towers};

/// The default backbone, as in Finetuner and clip-as-service.
pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

#[derive(Parser, Debug)]
#[command(
    name = "clipft",
    version,
    about = "Fine-tune and serve CLIP for text-to-image search"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole story offline on what the repository ships.
    Demo(demo::DemoArgs),
    /// Serve CLIP over Jina's gRPC protocol to clip_client and Jina Flows.
    Executor(executor::ExecutorArgs),
    /// Ask a gRPC server for its health (exit 0 when SERVING).
    Ping(ping::PingArgs),
    /// Embed texts and images, one JSON line per input, in input order.
    Encode(encode::EncodeArgs),
    /// The fine-tuning service: datasets, queued runs, logs, metrics, artifacts.
    Trainer(trainer::TrainerArgs),
    /// Fine-tune CLIP on caption-image pairs (in process, or on a trainer) and write the artifact.
    Fit(fit::FitArgs),
    /// A trainer's runs: list, status, logs, metrics, artifact, cancel, delete.
    Runs(runs::RunsArgs),
    /// A trainer's datasets: push, list, delete.
    Data(data::DataArgs),
    /// Text-to-image retrieval metrics on labelled query and index data.
    Eval(eval::EvalArgs),
    /// Measure model throughput on pre-tokenized / pre-processed inputs.
    Bench(bench::BenchArgs),
    /// List the supported CLIP backbones.
    Models(models::ModelsArgs),
}

/// Which model to load and where to run it; shared by the commands that load one.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face repo id or local folder in Hugging Face layout.
    #[arg(long, env = "CLIPFT_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// A fine-tuned artifact folder; takes precedence over --model.
    #[arg(long, env = "CLIPFT_ARTIFACT")]
    pub artifact: Option<std::path::PathBuf>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "CLIPFT_DEVICE", default_value = "auto")]
    pub device: String,
    /// `auto` (f32 on CPU, f16 on GPU), `f32`, `f16` or `bf16`.
    #[arg(long, env = "CLIPFT_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Images with more pixels than this are refused before decoding.
    #[arg(long, env = "CLIPFT_MAX_IMAGE_PIXELS", default_value_t = crate::model::image::DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    #[command(flatten)]
    pub matmul: MatmulArgs,
    /// Texts longer than this many bytes are refused.
    #[arg(long, env = "CLIPFT_MAX_TEXT_BYTES", default_value_t = crate::model::tokenizer::DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
}

/// `--matmul-precision`, for every command that multiplies matrices on the CPU (inference and
/// training alike).
#[derive(Args, Debug, Clone, Copy)]
pub struct MatmulArgs {
    /// CPU matrix products: `high` uses AMX bf16x3 where the CPU has it (f32-grade results,
    /// relative error ~4e-6 per product; PyTorch's "high" float32 matmul precision), `highest`
    /// plain f32, `medium` one bf16 pass.
    #[arg(
        long,
        env = "CLIPFT_MATMUL_PRECISION",
        value_enum,
        default_value = "high"
    )]
    pub matmul_precision: crate::model::cpu::MatmulPrecision,
}

impl MatmulArgs {
    /// Makes the choice the process-wide setting the CPU kernels read.
    pub fn apply(&self) {
        crate::model::cpu::set_matmul_precision(self.matmul_precision);
    }
}

impl ModelArgs {
    /// Resolves files and load options for `towers`.
    pub fn resolve(&self, towers: Towers) -> Result<(ModelFiles, LoadOptions), ModelError> {
        let files = match &self.artifact {
            Some(a) => crate::artifact::submodel_files_with_backbone(a, towers, Some(&self.model))?,
            None => ModelFiles::resolve(&self.model)?,
        };
        self.matmul.apply();
        let device = device::parse_device(&self.device)?;
        let dtype = device::parse_dtype(&self.dtype, &device)?;
        let opts = LoadOptions {
            towers,
            device,
            dtype,
            max_image_pixels: self.max_image_pixels,
            max_text_bytes: self.max_text_bytes,
        };
        Ok((files, opts))
    }
}

/// Parses `--select-model`.
pub fn parse_towers(s: &str) -> Result<Towers, String> {
    Towers::from_select(s)
        .ok_or_else(|| format!("unknown submodel {s:?}: use clip-text, clip-vision or all"))
}

/// Logs go to stderr: human-readable on a terminal, one JSON object per line otherwise (log
/// collectors in Kubernetes parse them); `CLIPFT_LOG_FORMAT=text|json` overrides the choice and
/// `CLIPFT_LOG` sets the filter (default `warn`). The filter is the log layer's own, so the
/// trace layer beside it (empty until a command calls `telemetry::tracing::init`) sees spans
/// the logs leave out.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLIPFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let json = match std::env::var("CLIPFT_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(crate::telemetry::tracing::layer())
        .with(logs.with_filter(filter))
        .try_init();
}

/// Keeps large allocations on the heap and freed memory in the process. Candle allocates a fresh
/// buffer for every op; with glibc's defaults each large one is a new mmap, so the kernel zeroes
/// and maps pages and unmaps them with TLB shootdowns on every step (about 40% of a ViT-B/32
/// training step on two cores). Reusing heap memory costs a memset instead.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// For the executor: every allocation of 1 MiB or more is its own mapping, returned to the
/// system when freed. A fixed threshold also stops glibc from raising it after the first large
/// free, which would put the f32 weights released after packing (see
/// `Clip::release_packed_weights`) in the heap, where freeing them does not shrink the process.
pub fn tune_allocator_for_serving() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// OpenTelemetry export, as Jina's flags spell it; shared by the executor and the trainer.
#[derive(Args, Debug, Clone)]
pub struct TracingArgs {
    /// Export OpenTelemetry traces over OTLP/gRPC (Jina's flag): a span per call, continuing the
    /// caller's W3C `traceparent` (the executor adds decode, admission, preprocess, queue, model
    /// and encode spans; the trainer run and epoch spans). The `OTEL_*` variables configure the
    /// rest.
    #[arg(long, env = "CLIPFT_TRACING")]
    pub tracing: bool,
    /// The OTLP/gRPC collector's host (Jina's flag); overrides `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(long, env = "CLIPFT_TRACES_EXPORTER_HOST")]
    pub traces_exporter_host: Option<String>,
    /// The collector's port (default 4317 when a host is given).
    #[arg(long, env = "CLIPFT_TRACES_EXPORTER_PORT")]
    pub traces_exporter_port: Option<u16>,
}

impl TracingArgs {
    pub fn warn_unused(&self) {
        if !self.tracing
            && (self.traces_exporter_host.is_some() || self.traces_exporter_port.is_some())
        {
            tracing::warn!(
                "--traces-exporter-host/--traces-exporter-port have no effect without --tracing"
            );
        }
    }

    /// Starts the exporter on `runtime` (it runs there, so drop the guard, which flushes,
    /// before the runtime).
    pub fn start(
        &self,
        runtime: &tokio::runtime::Runtime,
        service_name: String,
        what: &str,
    ) -> anyhow::Result<Option<crate::telemetry::tracing::TracingGuard>> {
        use anyhow::Context;
        if !self.tracing {
            return Ok(None);
        }
        let _entered = runtime.enter();
        let guard = crate::telemetry::tracing::init(crate::telemetry::tracing::TracingOptions {
            service_name,
            exporter_host: self.traces_exporter_host.clone(),
            exporter_port: self.traces_exporter_port,
        })
        .context("--tracing")?;
        eprintln!("clipft {what} traces to {} (OTLP/gRPC)", guard.endpoint());
        Ok(Some(guard))
    }
}

/// The async runtime of the client commands and the trainer.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clipft-io")
        .build()
}

/// `host:port` as a socket address (names resolved).
pub fn socket_addr(host: &str, port: u16) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    if let Ok(a) = format!("{host}:{port}").parse() {
        return Ok(a);
    }
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("--host {host} --port {port}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve --host {host}"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    init_logging();
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called_as_jina = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "jina");
    if called_as_jina {
        argv = match jina::translate(&argv) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    }
    let matches = Cli::command().get_matches_from(argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // A long-running server hands large freed buffers back to the system at once; the batch
    // jobs keep them for speed.
    if matches!(cli.command, Command::Executor(_)) {
        tune_allocator_for_serving();
    } else {
        tune_allocator();
    }
    let sub = matches.subcommand().map(|(_, m)| m);
    let result = match cli.command {
        Command::Encode(args) => encode::run(args, sub),
        Command::Executor(args) => executor::run(args, sub),
        Command::Ping(args) => ping::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fit(args) => fit::run(args),
        Command::Trainer(args) => trainer::run(args),
        Command::Runs(args) => runs::run(args),
        Command::Data(args) => data::run(args),
        Command::Models(args) => models::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
