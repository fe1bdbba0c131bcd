//! `clipft executor`: the Jina-compatible gRPC executor. Flags first, then `--uses` YAML for
//! whatever the command line and environment left at its default, then the defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use super::{parse_towers, ModelArgs};
use crate::docarray::{HttpFetch, ImageHosts};
use crate::executor::config::UsesConfig;
use crate::executor::{Core, ExecutorOptions, ImagePolicy, ServerConfig};
use crate::model::{Encoder, Towers};
use crate::protocol::paths::AccessPaths;

#[derive(Args, Debug)]
pub struct ExecutorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `clip-text`, `clip-vision` or `all`: an executor with one tower passes the other
    /// modality's documents through untouched, so a Flow can chain a text and a vision executor.
    #[arg(long, env = "CLIPFT_SELECT_MODEL", default_value = "all", value_parser = parse_towers)]
    pub select_model: Towers,
    /// Address to listen on (0.0.0.0: every interface; 127.0.0.1: this machine only).
    #[arg(long, env = "CLIPFT_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// The gRPC port; 0 picks a free port (printed on stderr).
    #[arg(long, env = "CLIPFT_PORT", default_value_t = 8080)]
    pub port: u16,
    /// The route name, and the key of per-executor parameters (`<name>__key`).
    #[arg(long, env = "CLIPFT_NAME", default_value = "clipft")]
    pub name: String,
    /// Jina executor YAML (`jtype`/`with:`/`metas:`) or clip_server's one-executor Flow YAML.
    #[arg(long, env = "CLIPFT_USES")]
    pub uses: Option<PathBuf>,
    /// Jina's `--uses-with`: a JSON object of `with:` keys, applied over the YAML.
    #[arg(long, env = "CLIPFT_USES_WITH")]
    pub uses_with: Option<String>,
    /// Jina's `--uses-metas`: a JSON object of `metas:` keys (`name`), applied over the YAML.
    #[arg(long, env = "CLIPFT_USES_METAS")]
    pub uses_metas: Option<String>,
    /// The largest model batch; requests from all clients are batched up to it.
    #[arg(long, env = "CLIPFT_MINIBATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub minibatch_size: u64,
    /// Documents queued or in compute per tower; beyond it streams wait and unary calls get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLIPFT_QUEUE_DEPTH", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub queue_depth: u64,
    /// Documents one request may ask to embed.
    #[arg(long, env = "CLIPFT_MAX_REQUEST_DOCS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_docs: u64,
    /// Largest gRPC message received or sent.
    #[arg(long, env = "CLIPFT_MAX_MESSAGE_BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1024..=4_294_967_295))]
    pub max_message_bytes: u64,
    /// The memory one request may take once decoded, estimated from its wire form before
    /// decoding: an empty document is two bytes on the wire but hundreds once decoded, so the
    /// message size alone would let a small request take gigabytes. Over it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLIPFT_MAX_DECODED_BYTES", default_value_t = crate::protocol::budget::DEFAULT_LIMIT, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_decoded_bytes: u64,
    /// The memory all requests being worked on may hold together: each one's decoded size and
    /// its reply's embeddings, from when it starts to when its reply is built. Each request is
    /// bounded on its own by the limits above; this bounds their sum while many clients send at
    /// once (requests decoded and waiting to start, up to --stream-concurrency per stream, are
    /// not counted). Over it, unary calls get RESOURCE_EXHAUSTED and streams wait. A request
    /// bigger than it runs alone.
    #[arg(long, env = "CLIPFT_MAX_INFLIGHT_BYTES", default_value_t = crate::executor::inflight::DEFAULT_LIMIT, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_inflight_bytes: u64,
    /// Requests of one stream processed at once: enough to fill a minibatch from one client,
    /// few enough that a long stream does not queue ahead of everyone else (at 8, a clip_client
    /// stream at its defaults keeps 64 documents in flight).
    #[arg(long, env = "CLIPFT_STREAM_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub stream_concurrency: u64,
    /// Threads decoding images and tokenizing (0: one per CPU).
    #[arg(long, env = "CLIPFT_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,
    /// Access paths used when a request names none.
    #[arg(long, env = "CLIPFT_ACCESS_PATHS", default_value = "@r")]
    pub access_paths: String,
    /// Image URIs naming local files are read only below this folder (off by default).
    #[arg(long, env = "CLIPFT_IMAGE_ROOT")]
    pub image_root: Option<PathBuf>,
    /// Fetch http(s) image URIs (off by default: clients send image bytes).
    #[arg(long, env = "CLIPFT_ALLOW_HTTP_IMAGES")]
    pub allow_http_images: bool,
    /// Largest image body fetched over http(s).
    #[arg(long, env = "CLIPFT_HTTP_IMAGE_MAX_BYTES", default_value_t = 20 << 20)]
    pub http_image_max_bytes: u64,
    /// Time limit of one http(s) image fetch, in seconds.
    #[arg(long, env = "CLIPFT_HTTP_IMAGE_TIMEOUT", default_value_t = 10.0)]
    pub http_image_timeout: f64,
    /// Which addresses an http(s) image's host may resolve to, redirects included, since any
    /// client can name any URI: `public` (internet only), `local` (also loopback and private
    /// networks, never link-local or cloud metadata services), `any`.
    #[arg(long, env = "CLIPFT_IMAGE_HOSTS", default_value_t = ImageHosts::default(), value_parser = ImageHosts::from_str)]
    pub image_hosts: ImageHosts,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "CLIPFT_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Prometheus `/metrics` port (0: off), on the same host as the gRPC port.
    #[arg(long, env = "CLIPFT_PORT_MONITORING", default_value_t = 9090)]
    pub port_monitoring: u16,
    #[command(flatten)]
    pub tracing: super::TracingArgs,
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

/// True where the user did not set the flag (so `--uses` may).
fn defaulted(matches: Option<&ArgMatches>, id: &str) -> bool {
    matches.is_none_or(|m| matches!(m.value_source(id), None | Some(ValueSource::DefaultValue)))
}

impl ExecutorArgs {
    /// Fills flags left at their defaults from the `--uses` YAML.
    fn apply_uses(&mut self, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
        let mut uses = match &self.uses {
            Some(path) => UsesConfig::from_file(path).map_err(anyhow::Error::msg)?,
            None => UsesConfig::default(),
        };
        if self.uses_with.is_some() || self.uses_metas.is_some() {
            // JSON is YAML: the overrides read as an executor YAML of their own.
            let doc = format!(
                "with: {}\nmetas: {}\n",
                self.uses_with.as_deref().unwrap_or("{}"),
                self.uses_metas.as_deref().unwrap_or("{}")
            );
            let over = UsesConfig::parse(&doc)
                .map_err(|e| anyhow::anyhow!("--uses-with / --uses-metas: {e}"))?;
            uses.values.extend(over.values);
            uses.ignored.extend(over.ignored);
        }
        let path = self.uses.clone().unwrap_or_else(|| "--uses-with".into());
        for key in &uses.ignored {
            tracing::warn!("{}: {key} has no effect in clipft", path.display());
        }
        for (key, value) in &uses.values {
            if !defaulted(matches, key) {
                continue;
            }
            let bad = |e: String| anyhow::anyhow!("{}: {key}: {e}", path.display());
            let num = |v: &str| v.parse::<u64>().map_err(|e| bad(e.to_string()));
            match key.as_str() {
                "model" => self.model.model = value.clone(),
                "artifact" => self.model.artifact = Some(value.into()),
                "select_model" => self.select_model = parse_towers(value).map_err(bad)?,
                "device" => self.model.device = value.clone(),
                "dtype" => self.model.dtype = value.clone(),
                "minibatch_size" => self.minibatch_size = num(value)?.max(1),
                "access_paths" => self.access_paths = value.clone(),
                "preprocess_threads" => self.preprocess_threads = num(value)? as usize,
                "queue_depth" => self.queue_depth = num(value)?.max(1),
                "max_request_docs" => self.max_request_docs = num(value)?.max(1),
                "max_decoded_bytes" => self.max_decoded_bytes = num(value)?.max(1024),
                "max_inflight_bytes" => self.max_inflight_bytes = num(value)?.max(1024),
                "max_image_pixels" => self.model.max_image_pixels = num(value)?,
                "max_text_bytes" => self.model.max_text_bytes = num(value)? as usize,
                "image_root" => self.image_root = Some(value.into()),
                "allow_http_images" => self.allow_http_images = value == "true",
                "image_hosts" => self.image_hosts = value.parse().map_err(bad)?,
                "name" => self.name = value.clone(),
                other => return Err(bad(format!("{other} cannot be set from YAML"))),
            }
        }
        Ok(())
    }
}

pub fn run(mut args: ExecutorArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    args.apply_uses(matches)?;
    let monitoring_port_defaulted = defaulted(matches, "port_monitoring");
    // Jina names the service after the runtime; ours is `--name` unless left at its default.
    let service_name = if defaulted(matches, "name") && args.name == "clipft" {
        "clipft-executor".to_string()
    } else {
        args.name.clone()
    };
    args.tracing.warn_unused();
    let access_paths = AccessPaths::parse(&args.access_paths).map_err(anyhow::Error::msg)?;
    let image_root = match &args.image_root {
        Some(r) => Some(
            r.canonicalize()
                .with_context(|| format!("--image-root {}", r.display()))?,
        ),
        None => None,
    };
    let (files, opts) = args.model.resolve(args.select_model)?;
    let encoder = Encoder::load(&files, &opts)?;
    let options = ExecutorOptions {
        name: args.name.clone(),
        minibatch_size: args.minibatch_size as usize,
        queue_depth: args.queue_depth as usize,
        max_request_docs: args.max_request_docs as usize,
        max_inflight_bytes: args.max_inflight_bytes,
        release_packed_weights: true,
        preprocess_threads: args.preprocess_threads,
        access_paths,
        images: ImagePolicy {
            root: image_root,
            allow_http: args.allow_http_images,
            http: HttpFetch {
                max_bytes: args.http_image_max_bytes,
                timeout: Duration::from_secs_f64(args.http_image_timeout.max(0.001)),
                hosts: args.image_hosts,
            },
        },
    };
    let server = ServerConfig {
        max_message_bytes: args.max_message_bytes as usize,
        max_decoded_bytes: args.max_decoded_bytes,
        stream_concurrency: args.stream_concurrency as usize,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        tls: args.tls.server_config()?,
    };
    if args.max_inflight_bytes < args.max_decoded_bytes {
        tracing::warn!(
            "--max-inflight-bytes {} is below --max-decoded-bytes {}: a request that large is \
             refused (unary) or waits (streamed) whenever any other request is in flight",
            args.max_inflight_bytes,
            args.max_decoded_bytes
        );
    }
    let tls = server.tls.is_some();
    let towers = match (encoder.clip.text.is_some(), encoder.clip.vision.is_some()) {
        (true, true) => "clip-text + clip-vision",
        (true, false) => "clip-text",
        _ => "clip-vision",
    };
    let source = encoder.source.clone();
    if let Some(k) = &encoder.kernels {
        errln!("clipft executor kernels: {k}");
    }
    let core = Core::start(encoder, &options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clipft-io")
        .build()?;
    // The exporter runs on this runtime, so the guard is dropped (flushing) before it.
    let tracing_guard = args.tracing.start(&runtime, service_name, "executor")?;
    let served = runtime.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port))
                    .map_err(anyhow::Error::from)
                    .and_then(|mut a| {
                        a.next()
                            .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", args.host))
                    })
            })
            .with_context(|| format!("--host {} --port {}", args.host, args.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        if args.port_monitoring != 0 {
            let maddr = SocketAddr::new(bound.ip(), args.port_monitoring);
            match crate::telemetry::metrics::install(maddr) {
                Ok(exporter) => {
                    tokio::spawn(exporter);
                    errln!("clipft executor metrics on http://{maddr}/metrics");
                }
                // The default port taken (a second executor on the same host): serve without
                // metrics rather than not at all. A port the user asked for must work.
                Err(e) if monitoring_port_defaulted => {
                    tracing::warn!("no metrics: {e} (set --port-monitoring to a free port, or 0)");
                    errln!("clipft executor: no metrics, {e}");
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "--port-monitoring {}: {e}",
                        args.port_monitoring
                    ))
                }
            }
        }
        errln!(
            "clipft executor {:?} ({towers} of {source}) serving on {bound} ({})",
            options.name,
            if tls {
                "TLS: grpcs://"
            } else {
                "plaintext: grpc://"
            }
        );
        crate::executor::serve(core, server, listener, shutdown_signal()).await?;
        errln!("clipft executor stopped");
        Ok(())
    });
    // After SIGTERM too: the spans of the drain go out before the process ends.
    drop(tracing_guard);
    served
}

/// SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExecutorArgs,
    }

    /// The executor YAML's keys and the flags they set are listed in two places
    /// (`executor::config` reads the YAML, `apply_uses` sets the flags); a key only one of them
    /// knows is refused or ignored.
    #[test]
    fn every_yaml_key_sets_its_flag() {
        let mut a = Cli::try_parse_from(["clipft"])
            .expect("defaults parse")
            .args;
        a.uses_with = Some(
            r#"{"minibatch_size": 3, "queue_depth": 5, "max_request_docs": 7,
                "max_decoded_bytes": 4096, "max_inflight_bytes": 8192, "max_image_pixels": 1000, "max_text_bytes": 99,
                "image_root": "/srv/images", "allow_http_images": true, "image_hosts": "public",
                "traversal_paths": "@c", "num_worker_preprocess": 2, "device": "cpu",
                "dtype": "fp16", "select_model": "clip-text"}"#
                .into(),
        );
        a.uses_metas = Some(r#"{"name": "enc"}"#.into());
        a.apply_uses(None).expect("every key applies");
        assert_eq!(
            (a.minibatch_size, a.queue_depth, a.max_request_docs),
            (3, 5, 7)
        );
        assert_eq!((a.max_decoded_bytes, a.max_inflight_bytes), (4096, 8192));
        assert_eq!(
            (a.model.max_image_pixels, a.model.max_text_bytes),
            (1000, 99)
        );
        assert_eq!(a.image_root, Some(PathBuf::from("/srv/images")));
        assert!(a.allow_http_images);
        assert_eq!(a.image_hosts, ImageHosts::Public);
        assert_eq!((a.access_paths.as_str(), a.preprocess_threads), ("@c", 2));
        assert_eq!(
            (a.model.device.as_str(), a.model.dtype.as_str()),
            ("cpu", "f16")
        );
        assert_eq!(a.select_model, Towers::TEXT);
        assert_eq!(a.name, "enc");

        a.uses_with = Some(r#"{"image_hosts": "intranet"}"#.into());
        a.image_hosts = ImageHosts::default();
        let e = a.apply_uses(None).expect_err("a bad value").to_string();
        assert!(
            e.contains("image_hosts") && e.contains("public, local, any"),
            "{e}"
        );
    }
}
