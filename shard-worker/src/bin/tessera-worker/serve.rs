//! `tessera-worker serve`: loads the model, registers in etcd under a lease (when `--etcd` is
//! given) and serves the internal gRPC API (with grpc.health.v1 beside it) until SIGTERM or Ctrl-C.
//! The record's state follows the worker: starting while the model loads, idle, busy with a job,
//! draining at shutdown. Shutdown: health NOT_SERVING and no new job, the running job gets
//! `--grace-period` to end, the lease is revoked (the coordinator sees the worker leave at once),
//! then the process exits.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::worker::v1::shard_worker_server::ShardWorkerServer;
use tessera_worker::duration::parse_duration;
use tessera_worker::membership::{ComputeFigures, EtcdMembership, Heartbeat, Membership, ModelInfo, Presence, WorkerRecord, WorkerState};
use tessera_worker::pipeline::limits::{Limits, DEFAULT_WORKER_MAX_TOKENS};
use tessera_worker::pipeline::{PipelinePreset, WanPipeline};
use tessera_worker::server::{WorkerIdentity, WorkerService};

/// The health service name of the internal API.
const SERVICE_NAME: &str = "tessera.worker.v1.ShardWorker";

/// Arguments of `tessera-worker serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address of the internal gRPC API (must not be reachable from outside the cluster).
    #[arg(long, env = "TESSERA_WORKER_LISTEN", default_value = "0.0.0.0:50061")]
    listen: SocketAddr,
    /// Address the other ranks of a job connect to for collectives (TCP).
    #[arg(long, env = "TESSERA_WORKER_COLLECTIVE", default_value = "0.0.0.0:50062")]
    collective: SocketAddr,
    /// Host name or IP the coordinator and the other workers reach this worker at (default: the
    /// listen IP, or this machine's host name when listening on all interfaces).
    #[arg(long, env = "TESSERA_WORKER_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// etcd endpoints (comma-separated URLs) to register in; without them the worker only serves.
    #[arg(long, env = "TESSERA_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The cluster's name: records live under /tessera/<cluster>/workers/.
    #[arg(long, env = "TESSERA_CLUSTER", default_value = "tessera")]
    cluster: String,
    /// Membership heartbeat: the lease is renewed this often and lapses after 3 missed beats.
    #[arg(long, env = "TESSERA_HEARTBEAT", default_value = "2s")]
    heartbeat: String,
    /// A diffusers snapshot folder; without it the built-in model of --preset is served.
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// Built-in model, used when --model is not given: demo (a small trained model) or one with
    /// random weights (tiny, tiny-df, tiny-i2v).
    #[arg(long, env = "TESSERA_PRESET", default_value = "demo")]
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
    /// A job that receives no command for this long is dropped (its coordinator went away).
    #[arg(long, env = "TESSERA_JOB_IDLE_TIMEOUT", default_value = "10m")]
    job_idle_timeout: String,
    /// Most video tokens per forward this worker accepts (larger requests are refused before
    /// anything is allocated; the other limits are the documented ones).
    #[arg(long, env = "TESSERA_WORKER_MAX_TOKENS", default_value_t = DEFAULT_WORKER_MAX_TOKENS)]
    max_tokens: u64,
    /// At shutdown, how long the running job may go on before the worker exits anyway.
    #[arg(long, env = "TESSERA_GRACE_PERIOD", default_value = "30s")]
    grace_period: String,
    /// Compute device of the transformer: auto (a usable GPU, else the CPU), cpu, cuda or cuda:N.
    /// Sequence-parallel jobs (more than one worker) use the CPU model in this version.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: String,
    /// Span export (OTLP) and sampling.
    #[command(flatten)]
    telemetry: tessera_telemetry::TelemetryArgs,
    /// Mutual TLS on the internal API: the coordinator must present a certificate of the CA.
    #[command(flatten)]
    tls: tessera_cluster::tls::TlsArgs,
    /// TLS to etcd.
    #[command(flatten)]
    etcd_tls: tessera_cluster::tls::EtcdTlsArgs,
    /// The Prometheus endpoint.
    #[command(flatten)]
    metrics: tessera_telemetry::MetricsArgs,
}

/// Largest internal message (decoded frames, latents, video-to-video inputs).
const MAX_MESSAGE: usize = 256 << 20;

/// Settings checked at start-up.
struct Settings {
    identity: WorkerIdentity,
    device: tessera_kernels::Device,
    collective_address: String,
    heartbeat: Heartbeat,
    grace_period: Duration,
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}

/// `host:port` as others dial it.
fn advertised(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => SocketAddr::from((ip, port)).to_string(),
        _ => format!("{host}:{port}"),
    }
}

fn settings(a: &ServeArgs, model_name: String) -> Result<Settings> {
    let device = tessera_worker::pipeline::resolve_pipeline_device(&a.device).map_err(|e| anyhow!("--device {}: {e}", a.device))?;
    if a.max_tokens == 0 {
        bail!("--max-tokens: must be positive");
    }
    if a.connect_timeout_s == 0 {
        bail!("--connect-timeout-s 0: must be at least 1");
    }
    let heartbeat = Heartbeat::parse(&a.heartbeat).map_err(|e| anyhow!("--heartbeat: {e}"))?;
    let job_idle_timeout = parse_duration(&a.job_idle_timeout).map_err(|e| anyhow!("--job-idle-timeout: {e}"))?;
    if job_idle_timeout < Duration::from_secs(1) {
        bail!("--job-idle-timeout {}: must be at least 1s", a.job_idle_timeout);
    }
    let grace_period = parse_duration(&a.grace_period).map_err(|e| anyhow!("--grace-period: {e}"))?;
    let host = match &a.advertise_host {
        Some(h) if h.trim().is_empty() => bail!("--advertise-host: must not be empty"),
        Some(h) => h.trim().to_string(),
        None if a.listen.ip().is_unspecified() => hostname(),
        None => a.listen.ip().to_string(),
    };
    tessera_worker::membership::validate_id("cluster", &a.cluster).map_err(|e| anyhow!("--cluster {:?}: {e}", a.cluster))?;
    let worker_id = a.worker_id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    tessera_worker::membership::validate_id("worker_id", &worker_id).map_err(|e| anyhow!("--worker-id: {e}"))?;
    if model_name.trim().is_empty() {
        bail!("--model-name: must not be empty");
    }
    let identity = WorkerIdentity {
        worker_id,
        model: model_name,
        address: advertised(&host, a.listen.port()),
        collective: a.collective,
        devices: vec![tessera_worker::server::device_name(device)],
        memory_bytes: tessera_worker::server::memory_available().unwrap_or(0),
        connect_timeout: Duration::from_secs(a.connect_timeout_s),
        job_idle_timeout,
        limits: Limits { max_tokens: a.max_tokens, ..Limits::default() },
    };
    let collective_address = advertised(&host, a.collective.port());
    Ok(Settings { identity, device, collective_address, heartbeat, grace_period })
}

/// The pipeline of `model` (a snapshot folder) or else of `preset`, and the facts planning needs.
fn load(model: Option<PathBuf>, preset: &str, device: tessera_kernels::Device) -> Result<(WanPipeline, ModelInfo, Option<ComputeFigures>)> {
    let (pipe, defaults) = match &model {
        Some(dir) => {
            let p = WanPipeline::load_on(dir, device).with_context(|| format!("--model {}", dir.display()))?;
            let d = p.snapshot_defaults();
            (p, d)
        }
        None => {
            let p = PipelinePreset::from_name(preset).map_err(|e| anyhow!("--preset {preset}: {e}"))?;
            (p.build_on(0, device)?, p.defaults())
        }
    };
    let info = pipe.model_info(defaults);
    let compute = tessera_worker::server::compute_figures(pipe.transformer().device(), 1);
    Ok((pipe, info, compute))
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler; only Ctrl-C stops the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
    }
}

/// Runs the server until a shutdown signal.
pub fn serve(a: ServeArgs) -> Result<()> {
    let mut a = a;
    let worker_id = a.worker_id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    a.worker_id = Some(worker_id.clone());
    // Dropped last (after the runtime): flushes the spans to the collector.
    let _telemetry = tessera_telemetry::init(
        "tessera-worker",
        &a.telemetry,
        &[("tessera.worker_id", worker_id), ("service.version", env!("CARGO_PKG_VERSION").to_string())],
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tessera-worker-io").enable_all().build()?;
    let result = runtime.block_on(run(a));
    // A job thread stuck in a collective must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(a: ServeArgs) -> Result<()> {
    // Checked now (the key goes with the certificate); renewed files are picked up as they change.
    let tls = a.tls.load().map_err(|e| anyhow!(e))?;
    // Bind first: a port in use is reported before minutes of model loading.
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("--listen {}", a.listen))?;
    let metrics = a.metrics.bind().await?;
    if let Some(m) = &metrics {
        println!("tessera-worker: metrics on http://{}/metrics", m.local_addr().context("--metrics-listen")?);
    }
    // Held for the worker's life: no other process can take the port between jobs.
    let collective = std::net::TcpListener::bind(a.collective).with_context(|| format!("--collective {}", a.collective))?;
    let default_name = match &a.model {
        Some(dir) => tessera_worker::pipeline::Snapshot::default_model_name(dir),
        None => PipelinePreset::from_name(&a.preset).map_err(|e| anyhow!("--preset {}: {e}", a.preset))?.name().to_string(),
    };
    let s = settings(&a, a.model_name.clone().unwrap_or(default_name))?;
    let me = s.identity.clone();

    let record = WorkerRecord::starting(&me.worker_id, &me.address, &s.collective_address, &me.model, me.devices.clone(), me.memory_bytes);
    let membership: Option<Arc<dyn Membership>> = if a.etcd.is_empty() {
        tracing::warn!("no --etcd: this worker is not registered anywhere (coordinators will not find it)");
        None
    } else {
        let etcd_tls = a.etcd_tls.load().map_err(|e| anyhow!(e))?;
        let m = EtcdMembership::connect_tls(&a.etcd, &a.cluster, s.heartbeat, etcd_tls).await.map_err(|e| anyhow!("--etcd {}: {e}", a.etcd.join(",")))?;
        Some(Arc::new(m))
    };
    let mut presence = Presence::register(membership, record).await.map_err(|e| anyhow!("registering in etcd: {e}"))?;

    // gRPC health and the HTTP probes of the metrics port answer from the start: alive, not
    // ready until the model has loaded.
    let serving = tessera_telemetry::Serving::new(SERVICE_NAME);
    serving.set(false).await;
    let exporter = metrics.map(|m| tessera_telemetry::serve_metrics(m, Arc::new(|| {}), serving.clone()));
    tracing::info!(worker_id = %me.worker_id, model = %me.model, "loading the model");
    let (model, preset) = (a.model.clone(), a.preset.clone());
    let device = s.device;
    let (pipe, info, compute) =
        tokio::task::spawn_blocking(move || load(model, &preset, device)).await.map_err(|e| anyhow!("the loading thread failed: {e}"))??;
    let service = WorkerService::new(Arc::new(pipe), me.clone(), collective);
    let mut running = service.running();
    presence
        .set(|r| {
            r.model_info = info;
            r.compute = compute;
            r.state = WorkerState::Idle;
        })
        .await;
    serving.set(true).await;
    eprintln!("tessera-worker {} serving model {:?} on {} (collectives on {})", me.worker_id, me.model, me.address, s.collective_address);

    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tessera_cluster::http2::limited(tonic::transport::Server::builder())
        .add_service(serving.grpc_service())
        .add_service(ShardWorkerServer::new(service.clone()).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE));
    let closed = async {
        let _ = close_rx.await;
    };
    let server = match &tls {
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), closed)),
        None => tokio::spawn(router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), closed)),
    };

    presence.follow(&mut running, shutdown_signal()).await;

    // Drain: not ready, no new job, the running one gets the grace period, then leave etcd.
    tracing::info!(grace_s = s.grace_period.as_secs_f64(), "shutting down: draining");
    serving.set(false).await;
    service.drain();
    let job = running.borrow().clone();
    presence.set_state(WorkerState::Draining, job).await;
    let finished = tokio::time::timeout(s.grace_period, running.wait_for(Option::is_none)).await.is_ok();
    if !finished {
        tracing::warn!(job = ?running.borrow().clone(), "grace period over with a job still running: leaving anyway");
    }
    presence.leave().await;
    let _ = close_tx.send(());
    if tokio::time::timeout(Duration::from_secs(2), server).await.is_err() {
        tracing::warn!("connections still open; exiting anyway");
    }
    if let Some(e) = exporter {
        e.abort();
    }
    tracing::info!("stopped");
    Ok(())
}
