//! `clipft ping grpc://host:port`: the standard gRPC health check, as `jina ping executor`
//! does it: exit 0 when the server answers SERVING, 1 otherwise.

use std::time::Duration;

use clap::Args;

#[derive(Args, Debug)]
pub struct PingArgs {
    /// `grpc://host:port` or `host:port`.
    pub target: String,
    /// Give up after this many seconds.
    #[arg(long, env = "CLIPFT_PING_TIMEOUT", default_value_t = 3.0)]
    pub timeout: f64,
    /// The health service name to ask about ("" is the whole server).
    #[arg(long, env = "CLIPFT_PING_SERVICE", default_value = "")]
    pub service: String,
}

/// Asks `target` for its health; Ok(true) when it is SERVING.
pub async fn ping(target: &str, service: &str, timeout: Duration) -> anyhow::Result<bool> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let rest = target.strip_prefix("grpc://").unwrap_or(target);
    if rest.contains("://") {
        anyhow::bail!("{target}: only grpc:// targets are supported (TLS is not)");
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{rest}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect()).await??;
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
    match runtime.block_on(ping(&args.target, &args.service, timeout)) {
        Ok(true) => {
            outln!("{}: SERVING", args.target);
            Ok(())
        }
        Ok(false) => anyhow::bail!("{}: NOT_SERVING", args.target),
        Err(e) => anyhow::bail!("{}: {e:#}", args.target),
    }
}
