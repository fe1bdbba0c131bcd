//! The command line: one module per subcommand. Each parses its flags (every flag also reads a
//! `CLIPFT_*` environment variable), calls the library and prints; no logic a test needs lives here.

#[macro_use]
pub mod output;
pub mod bench;
pub mod data;
pub mod demo;
pub mod encode;
pub mod eval;
pub mod executor;
pub mod experiments;
pub mod export;
pub mod fit;
pub mod jina;
pub mod models;
pub mod ping;
pub mod runs;
pub mod trainer;

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::model::{device, LoadOptions, ModelError, ModelFiles, Towers};

pub use crate::model::DEFAULT_MODEL;

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
    Fit(Box<fit::FitArgs>),
    /// A trainer's runs: list, status, logs, metrics, artifact, cancel, delete.
    Runs(runs::RunsArgs),
    /// A trainer's datasets: push, list, delete.
    Data(data::DataArgs),
    /// A trainer's experiments (groups of runs): list, create, delete.
    Experiments(experiments::ExperimentsArgs),
    /// Text-to-image retrieval metrics on labelled query and index data.
    Eval(eval::EvalArgs),
    /// Measure model throughput on pre-tokenized / pre-processed inputs.
    Bench(bench::BenchArgs),
    /// List the supported CLIP backbones.
    Models(models::ModelsArgs),
    /// Write the towers as ONNX graphs (`textual.onnx`, `visual.onnx`) for ONNX Runtime and
    /// clip-as-service's ONNX executor.
    Export(export::ExportArgs),
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
    /// Compute dtype for serving and encoding: `auto` is f16 on a GPU and f32 on the CPU (for
    /// training, `fit --dtype auto` is bf16 on a GPU); or `f32`, `f16`, `bf16`.
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
        value_parser = choice(&crate::model::cpu::MatmulPrecision::CHOICES),
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
        let files =
            crate::artifact::model_or_artifact(&self.model, self.artifact.as_deref(), towers)?;
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

/// A flag taking one of a library type's named values (`T::CHOICES`): the library stays free of
/// clap, and `--help` still lists the values with what each means.
pub fn choice<T: Copy + Send + Sync + 'static>(
    choices: &'static [(&'static str, &'static str, T)],
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(
        choices
            .iter()
            .map(|(name, help, _)| PossibleValue::new(*name).help(*help)),
    )
    .try_map(move |s: String| {
        choices
            .iter()
            .find(|(name, _, _)| *name == s)
            .map(|(_, _, v)| *v)
            .ok_or_else(|| format!("unknown value {s:?}"))
    })
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
        errln!("clipft {what} traces to {} (OTLP/gRPC)", guard.endpoint());
        Ok(Some(guard))
    }
}

/// `--tls-cert` / `--tls-key`, for the executor and the trainer.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM), and refuse plaintext; needs --tls-key.
    /// Clients then use grpcs://host:port.
    #[arg(long, env = "CLIPFT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "CLIPFT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The server's TLS settings, read now (a bad file stops start-up, not every handshake).
    pub fn server_config(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(
                crate::protocol::transport::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }
                .server_config()?,
            )),
            _ => Ok(None),
        }
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

/// Makes the `CLIPFT_*` variables mean what a user expects before clap reads them: an empty
/// variable is unset (`CLIPFT_TRAINER=` no longer names a trainer called ""), and a boolean
/// flag's variable accepts 1/0, true/false, yes/no and on/off (clap's flags take only
/// true/false). Runs before any thread starts, as changing the environment requires.
fn normalise_env(cmd: &clap::Command) {
    let mut flags = Vec::new();
    env_flags(cmd, &mut flags);
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().filter(|k| k.starts_with("CLIPFT_")) else {
            continue;
        };
        if value.is_empty() {
            std::env::remove_var(key);
        } else if flags.iter().any(|f| f == key) {
            let v = value.to_string_lossy().trim().to_ascii_lowercase();
            match v.as_str() {
                "1" | "true" | "yes" | "on" => std::env::set_var(key, "true"),
                "0" | "false" | "no" | "off" => std::env::set_var(key, "false"),
                // Anything else reaches clap, which names the variable and the values it takes.
                _ => {}
            }
        }
    }
}

/// The variables of every boolean flag of `cmd` and its subcommands.
fn env_flags(cmd: &clap::Command, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                out.push(env.to_string());
            }
        }
    }
    for sub in cmd.get_subcommands() {
        env_flags(sub, out);
    }
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
                errln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    }
    normalise_env(&Cli::command());
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
        Command::Fit(args) => fit::run(*args),
        Command::Trainer(args) => trainer::run(args),
        Command::Runs(args) => runs::run(args),
        Command::Data(args) => data::run(args),
        Command::Experiments(args) => experiments::run(args),
        Command::Models(args) => models::run(args),
        Command::Export(args) => export::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<output::Interrupted>() => ExitCode::from(130),
        // The reader of our output left (`| head`): end quietly, as other tools do.
        Err(e) if output::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {}", output::describe(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Variables read by flags of several commands. Each was checked to mean the same thing in
    /// all of them; a new sharing must be checked too, or the variable named after its command
    /// (`CLIPFT_ENCODE_OUTPUT`), so that setting one for one command never changes another's
    /// meaning (`CLIPFT_OUTPUT` for `fit` once made `encode` write into a folder).
    const SHARED: &[&str] = &[
        "CLIPFT_MODEL",
        "CLIPFT_ARTIFACT",
        "CLIPFT_DEVICE",
        "CLIPFT_DTYPE",
        "CLIPFT_MAX_IMAGE_PIXELS",
        "CLIPFT_MATMUL_PRECISION",
        "CLIPFT_MAX_TEXT_BYTES",
        "CLIPFT_SELECT_MODEL",
        "CLIPFT_HOST",
        "CLIPFT_PORT",
        "CLIPFT_PORT_MONITORING",
        "CLIPFT_IMAGE_HOSTS",
        "CLIPFT_MAX_MESSAGE_BYTES",
        "CLIPFT_SHUTDOWN_TIMEOUT",
        "CLIPFT_TRACING",
        "CLIPFT_TRACES_EXPORTER_HOST",
        "CLIPFT_TRACES_EXPORTER_PORT",
        "CLIPFT_TRAINER",
        // fit files the run under it, runs list shows its runs: the experiment one works in.
        "CLIPFT_EXPERIMENT",
        "CLIPFT_AUTH_TOKEN",
        "CLIPFT_OUTPUT",
        "CLIPFT_JSON",
        // The retrieval metrics' distance, for `eval` and for `fit`'s evaluation alike.
        "CLIPFT_DISTANCE",
        "CLIPFT_FOLLOW",
        "CLIPFT_EPOCHS",
        "CLIPFT_QUERY_DATA",
        // fit and eval: keep the first N queries' top matches.
        "CLIPFT_EXAMPLE_QUERIES",
        "CLIPFT_INDEX_DATA",
        "CLIPFT_LIMIT",
        "CLIPFT_DATA_DIR",
        "CLIPFT_CHECKPOINT_SECONDS",
        "CLIPFT_SEED",
        "CLIPFT_NAME",
        "CLIPFT_TLS_CERT",
        "CLIPFT_TLS_KEY",
        "CLIPFT_TLS_CA",
        "CLIPFT_LEARNING_RATE",
        "CLIPFT_BATCH_SIZE",
        "CLIPFT_RUN_NAME",
        "CLIPFT_ZIP",
    ];

    fn env_users(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String)>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                out.push((env.to_string(), path.to_string()));
            }
        }
        for sub in cmd.get_subcommands() {
            env_users(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn variables_shared_between_commands_mean_one_thing() {
        let mut users = Vec::new();
        env_users(&Cli::command(), "clipft", &mut users);
        let mut by_env: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (env, path) in &users {
            by_env.entry(env).or_default().push(path);
        }
        for (env, paths) in by_env {
            let mut commands = paths.clone();
            commands.sort();
            commands.dedup();
            assert!(
                commands.len() == 1 || SHARED.contains(&env),
                "{env} is read by {commands:?}: check it means the same in each and list it in SHARED, or name it after its command"
            );
        }
    }

    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "clipft", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
