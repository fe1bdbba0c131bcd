//! `clipft ping grpc://host:port`: the standard gRPC health check, as `jina ping executor`
//! does it: exit 0 when the server answers SERVING, 1 otherwise.

use std::time::Duration;

use clap::Args;

#[derive(Args, Debug)]
pub struct PingArgs {
    /// `grpc://host:port`, `host:port`, or `grpcs://host:port` for a server with TLS.
    pub target: String,
    /// Give up after this many seconds.
    #[arg(long, env = "CLIPFT_PING_TIMEOUT", default_value_t = 3.0)]
    pub timeout: f64,
    /// The health service name to ask about ("" is the whole server).
    #[arg(long, env = "CLIPFT_PING_SERVICE", default_value = "")]
    pub service: String,
    /// A CA certificate (PEM) to trust for grpcs://, besides the system's roots.
    #[arg(long, env = "CLIPFT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Asks `target` for its health; Ok(true) when it is SERVING.
pub async fn ping(
    target: &str,
    service: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    use crate::protocol::transport::{self, TransportError};
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let endpoint = transport::endpoint(target, ca)
        .map_err(|e| match e {
            TransportError::Address { msg, .. } => anyhow::anyhow!(msg),
            other => other.into(),
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!(transport::error_chain(&e)))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?;
    Ok(reply.into_inner().status == ServingStatus::Serving as i32)
}

pub fn run(args: PingArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    match runtime.block_on(ping(
        &args.target,
        &args.service,
        timeout,
        args.tls_ca.as_deref(),
    )) {
        Ok(true) => {
            outln!("{}: SERVING", args.target);
            Ok(())
        }
        Ok(false) => anyhow::bail!("{}: NOT_SERVING", args.target),
        Err(e) => anyhow::bail!("{}: {}", args.target, super::output::describe(&e)),
    }
}
