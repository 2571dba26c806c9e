//! `tessera-worker serve`: loads the model and serves the internal gRPC API until SIGTERM or
//! Ctrl-C; the job's ranks meet on the collective address.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::worker::v1::shard_worker_server::ShardWorkerServer;
use tessera_worker::pipeline::{PipelinePreset, WanPipeline};
use tessera_worker::server::{WorkerIdentity, WorkerService};

/// Arguments of `tessera-worker serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address of the internal gRPC API (must not be reachable from outside the cluster).
    #[arg(long, env = "TESSERA_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// Address the other ranks of a job connect to for collectives (TCP).
    #[arg(long, env = "TESSERA_WORKER_COLLECTIVE", default_value = "127.0.0.1:50062")]
    collective: SocketAddr,
    /// A diffusers snapshot folder; without it the built-in model of --preset is served.
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// Built-in model with random weights, used when --model is not given.
    #[arg(long, env = "TESSERA_PRESET", default_value = "tiny")]
    preset: String,
    /// The model name requests use (default: the preset's name, or the snapshot folder's name).
    #[arg(long, env = "TESSERA_MODEL_NAME")]
    model_name: Option<String>,
    /// This worker's id (default: host name and process id).
    #[arg(long, env = "TESSERA_WORKER_ID")]
    worker_id: Option<String>,
    /// Seconds PrepareJob waits for the other ranks of a job.
    #[arg(long, env = "TESSERA_CONNECT_TIMEOUT_S", default_value_t = 30)]
    connect_timeout_s: u64,
    /// Span export (OTLP) and sampling.
    #[command(flatten)]
    telemetry: tessera_telemetry::TelemetryArgs,
}

/// Runs the server until a shutdown signal.
pub fn serve(a: ServeArgs) -> Result<()> {
    if a.connect_timeout_s == 0 {
        return Err(anyhow!("--connect-timeout-s 0: must be at least 1"));
    }
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    let worker_id = a.worker_id.clone().unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    // Dropped last (after the runtime): flushes the spans to the collector.
    let _telemetry = tessera_telemetry::init("tessera-worker", &a.telemetry, &[("tessera.worker_id", worker_id.clone()), ("service.version", env!("CARGO_PKG_VERSION").to_string())])?;
    let (pipe, default_name) = match &a.model {
        Some(dir) => {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
            (WanPipeline::load(dir).with_context(|| format!("--model {}", dir.display()))?, name)
        }
        None => {
            let p = PipelinePreset::from_name(&a.preset).map_err(|e| anyhow!("--preset {}: {e}", a.preset))?;
            (p.build(0)?, p.name().to_string())
        }
    };
    let me = WorkerIdentity {
        worker_id,
        model: a.model_name.clone().unwrap_or(default_name),
        address: a.listen.to_string(),
        collective: a.collective,
        devices: vec!["cpu".into()],
        memory_bytes: 0,
        connect_timeout: Duration::from_secs(a.connect_timeout_s),
    };
    let service = WorkerService::new(Arc::new(pipe), me.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("--listen {}", a.listen))?;
        eprintln!("tessera-worker {} serving model {:?} on {} (collectives on {})", me.worker_id, me.model, a.listen, a.collective);
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!("shutting down: no new requests; running calls finish");
        };
        tonic::transport::Server::builder()
            .add_service(ShardWorkerServer::new(service))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await
            .context("serving")
    })
}
