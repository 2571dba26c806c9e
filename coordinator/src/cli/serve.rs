//! `tessera serve`: the coordinator's public gRPC server. With `--etcd`, jobs run on the
//! `tessera-worker` processes registered there; without it, on in-process workers (a diffusers
//! snapshot or a built-in model) driven through the same cluster code. Prints `listening on ADDR`
//! once bound; health turns SERVING once the workers are listed (in process: once the model is
//! loaded). SIGTERM or Ctrl-C drain it: NOT_SERVING, no new jobs, the
//! running job gets `--grace-period` to finish and is then stopped between steps (with `--state`,
//! checkpointed there and its run left on its workers for the next coordinator to adopt).

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tessera_cluster::duration::parse_duration;
use tessera_cluster::membership::{EtcdMembership, Heartbeat};
#[cfg(feature = "embedded")]
use tessera_coordinator::server::{default_workers, EmbeddedWorkers, ModelSource};
use tessera_coordinator::server::{
    holder_name, serve, Auth, ClusterExecutor, ClusterExecutorConfig, DriveLimits, JobExecutor, JobStore, QueueLimits, RecordLimits, ServerConfig,
    StoreOwnership, TokenFile,
};

/// Arguments of `tessera serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address of the public gRPC API (port 0 picks a free port; the address is printed). An
    /// address other than loopback needs --auth-token-file (or --allow-unauthenticated).
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Clients' bearer tokens: Kubernetes' static token file, CSV `token,user,uid[,"groups"]`.
    /// The user is the tenant: it sees and cancels only its own jobs, the group `admin` all.
    /// Calls without a listed token get UNAUTHENTICATED. The file is read again when it changes.
    #[arg(long, env = "TESSERA_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve a non-loopback --listen address without authentication: anyone who reaches it may
    /// submit, see and cancel every job.
    #[arg(long, env = "TESSERA_ALLOW_UNAUTHENTICATED", conflicts_with = "auth_token_file")]
    allow_unauthenticated: bool,
    /// etcd endpoints (comma-separated URLs): run jobs on the workers registered there.
    #[arg(long, env = "TESSERA_ETCD_ENDPOINTS", value_delimiter = ',', conflicts_with_all = ["model", "preset"])]
    etcd: Vec<String>,
    /// The cluster's name in etcd (records under /tessera/<cluster>/workers/).
    #[arg(long, env = "TESSERA_CLUSTER", default_value = "tessera")]
    cluster: String,
    /// Membership heartbeat (must match the workers'): how fast a lapsed worker is noticed.
    #[arg(long, env = "TESSERA_HEARTBEAT", default_value = "2s")]
    heartbeat: String,
    /// Most workers one job uses (0 = every free worker serving its model).
    #[arg(long, env = "TESSERA_MAX_RANKS", default_value_t = 0)]
    max_ranks: usize,
    /// How often a job whose group loses a worker goes on, on a new group of free workers, from
    /// its last checkpoint (0: a lost worker ends the job with UNAVAILABLE).
    #[arg(long, env = "TESSERA_RECOVER_ATTEMPTS", default_value_t = 2)]
    recover_attempts: u32,
    /// How long a job going on from a checkpoint (after a lost or draining worker, or resumed by
    /// this coordinator) waits for a group of its plan's size, such as a replacement worker,
    /// before it goes on with another plan on fewer workers (with its plan, its video is the
    /// undisturbed run's byte for byte).
    #[arg(long, env = "TESSERA_RECOVER_WAIT", default_value = "2m")]
    recover_wait: String,
    /// With recovery on, copy the run out of rank 0 every this many steps (at least 1; a
    /// diffusion-forcing run is copied at each chunk's end instead). With --state the copy is
    /// stored too, so a restarted coordinator resumes from it.
    #[arg(long, env = "TESSERA_CHECKPOINT_EVERY", default_value_t = 5)]
    checkpoint_every: u32,
    /// Where jobs are kept so that they outlive this process: a folder (a volume) or
    /// s3://BUCKET[/PREFIX] (an S3-compatible store, set up by the standard AWS_* variables). With
    /// --etcd the job records go to etcd (under /tessera/<cluster>/jobs/) and the checkpoints,
    /// input media and outputs here. At start, unfinished jobs found there are resumed from their
    /// last checkpoint; finished jobs' output is kept for --job-retention, for WatchJob. One
    /// coordinator owns a store at a time (with --etcd an etcd claim, else a lock on the folder's
    /// owner.lock); another stands by, NOT_SERVING, until the owner lets go or dies.
    #[arg(long, env = "TESSERA_STATE")]
    state: Option<String>,
    /// Longest a denoising step may take on the workers before the job is failed.
    #[arg(long, env = "TESSERA_STEP_TIMEOUT", default_value = "10m")]
    step_timeout: String,
    /// A diffusers snapshot folder to serve.
    #[arg(long, env = "TESSERA_MODEL", conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A built-in model to serve instead: demo (a small trained model, the default when neither
    /// flag is given) or one with random weights (tiny, tiny-df, tiny-i2v).
    #[arg(long, env = "TESSERA_PRESET")]
    preset: Option<String>,
    /// The model name requests use (default: the snapshot folder's name, or the preset's).
    #[arg(long, env = "TESSERA_MODEL_NAME")]
    model_name: Option<String>,
    /// In-process workers (internal gRPC and TCP collectives on loopback, in-memory membership:
    /// the cluster's code path); 0 = as many as the plan gives the device (one).
    #[arg(long, env = "TESSERA_WORKERS", default_value_t = 0, conflicts_with = "etcd")]
    workers: usize,
    /// Compute device of the in-process workers' model: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto", conflicts_with = "etcd")]
    device: String,
    /// Most jobs waiting in the queue; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TESSERA_MAX_QUEUE", default_value_t = QueueLimits::default().max_queued)]
    max_queue: usize,
    /// Most jobs of one tenant waiting in the queue (0: only --max-queue bounds them); more are
    /// refused with RESOURCE_EXHAUSTED naming the tenant. Among equal priorities tenants take
    /// turns whatever this is.
    #[arg(long, env = "TESSERA_MAX_QUEUED_PER_TENANT", default_value_t = QueueLimits::default().max_queued_per_tenant)]
    max_queued_per_tenant: usize,
    /// Most jobs of one tenant running at once (0: no cap). A tenant at its cap waits, even
    /// with workers free, while other tenants' jobs start: so that one tenant's hours-long jobs
    /// cannot hold every group.
    #[arg(long, env = "TESSERA_MAX_RUNNING_PER_TENANT", default_value_t = QueueLimits::default().max_running_per_tenant)]
    max_running_per_tenant: usize,
    /// Highest queue priority a caller may ask for (-100 to 100) unless the token file puts it in
    /// the group `priority` or `admin`; higher is refused with PERMISSION_DENIED naming
    /// `priority`. Without authentication every caller may ask for any.
    #[arg(long, env = "TESSERA_MAX_TENANT_PRIORITY", default_value_t = QueueLimits::default().max_priority, allow_negative_numbers = true)]
    max_tenant_priority: i32,
    /// Largest job in video tokens (latent frames x patch rows x patch columns); 0 = no budget:
    /// every job is planned by memory and refused when it fits no group of the workers (workers
    /// that do not describe their model and device keep 75,600, 1280x720 with 81 frames).
    #[arg(long, env = "TESSERA_MAX_TOKENS", default_value_t = 0)]
    max_tokens: usize,
    /// How long finished jobs stay visible to GetJob (e.g. 90s, 10m, 1h).
    #[arg(long, env = "TESSERA_JOB_RETENTION", default_value = "1h")]
    job_retention: String,
    /// Most finished job records kept (the oldest go first, whatever --job-retention says).
    #[arg(long, env = "TESSERA_MAX_JOB_RECORDS", default_value_t = RecordLimits::default().max_records)]
    max_job_records: usize,
    /// Most bytes of finished job records kept (their encoded size; the oldest go first).
    #[arg(long, env = "TESSERA_MAX_JOB_RECORD_BYTES", default_value_t = RecordLimits::default().max_bytes)]
    max_job_record_bytes: usize,
    /// At shutdown, how long the running job may go on before it is stopped.
    #[arg(long, env = "TESSERA_GRACE_PERIOD", default_value = "30s")]
    grace_period: String,
    /// A Generate client that takes none of its stream's messages for this long (its HTTP/2
    /// window stays shut) has its job stopped, so that it cannot pin the workers.
    #[arg(long, env = "TESSERA_CLIENT_SEND_TIMEOUT", default_value = "60s")]
    client_send_timeout: String,
    /// Most bytes of decoded input video frames (8-bit, at the generated size) that accepted
    /// jobs may hold at once; past it video jobs get RESOURCE_EXHAUSTED until some finish.
    #[arg(long, env = "TESSERA_MAX_INPUT_BYTES_HELD", default_value_t = 1 << 30)]
    max_input_bytes_held: u64,
    /// Bytes of output per Chunk message (1 KiB to 4 MiB).
    #[arg(long, env = "TESSERA_CHUNK_SIZE", default_value_t = 1 << 20)]
    chunk_size: usize,
    /// Span export (OTLP) and sampling.
    #[command(flatten)]
    telemetry: tessera_telemetry::TelemetryArgs,
    /// Mutual TLS to the workers of --etcd: their certificates must chain to --tls-ca.
    #[command(flatten)]
    tls: tessera_cluster::tls::TlsArgs,
    /// TLS to etcd (--etcd https://...).
    #[command(flatten)]
    etcd_tls: tessera_cluster::tls::EtcdTlsArgs,
    /// The Prometheus endpoint.
    #[command(flatten)]
    metrics: tessera_telemetry::MetricsArgs,
}

/// What `--model`/`--preset` asked for, and the flag that named it.
#[cfg(feature = "embedded")]
fn model_source(args: &ServeArgs) -> Result<(ModelSource, String)> {
    match (&args.model, &args.preset) {
        (Some(dir), None) => {
            if !dir.is_dir() {
                bail!("--model {}: not a folder (expected a diffusers snapshot)", dir.display());
            }
            Ok((ModelSource::Snapshot(dir.clone()), format!("--model {}", dir.display())))
        }
        (None, Some(name)) => {
            let preset = tessera_worker::pipeline::PipelinePreset::from_name(name).map_err(|e| anyhow!("--preset {name}: {e}"))?;
            Ok((ModelSource::Preset(preset), format!("--preset {name}")))
        }
        (None, None) => {
            let preset = tessera_worker::pipeline::PipelinePreset::DEFAULT;
            Ok((ModelSource::Preset(preset), format!("--preset {} (the default)", preset.name())))
        }
        (Some(_), Some(_)) => bail!("--model and --preset: give one of them"),
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives (handlers installed before this returns).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        #[cfg(unix)]
        let term = term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
            _ = term => tracing::info!("SIGTERM received"),
        }
    })
}

/// How jobs run: on in-process workers, or on the workers registered in etcd.
enum Mode {
    #[cfg(feature = "embedded")]
    Embedded {
        source: ModelSource,
        device: tessera_kernels::Device,
        model_name: String,
        source_flag: String,
        workers: usize,
    },
    Cluster {
        heartbeat: Heartbeat,
        limits: DriveLimits,
        recover_wait: Duration,
        tls: Option<std::sync::Arc<tessera_cluster::tls::InternalTls>>,
    },
}

fn mode(args: &ServeArgs) -> Result<Mode> {
    if !args.etcd.is_empty() {
        tessera_cluster::membership::validate_id("cluster", &args.cluster).map_err(|e| anyhow!("--cluster {:?}: {e}", args.cluster))?;
        let heartbeat = Heartbeat::parse(&args.heartbeat).map_err(|e| anyhow!("--heartbeat: {e}"))?;
        let step = parse_duration(&args.step_timeout).map_err(|e| anyhow!("--step-timeout: {e}"))?;
        if step < Duration::from_secs(1) {
            bail!("--step-timeout {}: must be at least 1s", args.step_timeout);
        }
        if args.recover_attempts > 0 && args.checkpoint_every == 0 {
            bail!(
                "--checkpoint-every 0: recovery (--recover-attempts {}, default 2) needs a checkpoint every N >= 1 steps; --recover-attempts 0 turns recovery off",
                args.recover_attempts
            );
        }
        let recover_wait = parse_duration(&args.recover_wait).map_err(|e| anyhow!("--recover-wait: {e}"))?;
        let tls = args.tls.load().map_err(|e| anyhow!(e))?;
        return Ok(Mode::Cluster { heartbeat, limits: DriveLimits { step, ..DriveLimits::default() }, recover_wait, tls });
    }
    #[cfg(not(feature = "embedded"))]
    bail!("--etcd: this build of tessera has no in-process workers (built without the `embedded` feature); give the etcd the workers register in");
    #[cfg(feature = "embedded")]
    {
        if args.etcd_tls.etcd_ca.is_some() || args.etcd_tls.etcd_cert.is_some() || args.etcd_tls.etcd_key.is_some() {
            bail!("--etcd-ca/--etcd-cert/--etcd-key: TLS to etcd is for --etcd (in-process workers use no etcd)");
        }
        if args.tls.given() {
            bail!("--tls-cert/--tls-key/--tls-ca: mutual TLS is for the workers of --etcd (in-process workers talk over loopback)");
        }
        let (source, source_flag) = model_source(args)?;
        let model_name = args.model_name.clone().unwrap_or_else(|| source.default_name());
        if model_name.trim().is_empty() {
            bail!("--model-name: must not be empty");
        }
        let device = tessera_worker::pipeline::resolve_pipeline_device(&args.device).map_err(|e| anyhow!("--device {}: {e}", args.device))?;
        let workers = if args.workers == 0 { default_workers(device) } else { args.workers };
        Ok(Mode::Embedded { source, device, model_name, source_flag, workers })
    }
}

/// How often jobs are checkpointed: for recovery on the workers of --etcd, and for --state
/// (in-process workers cannot be lost on their own: only --state needs their checkpoints).
fn checkpoint_every(args: &ServeArgs, cluster: bool) -> u32 {
    let wanted = args.state.is_some() || (cluster && args.recover_attempts > 0);
    if wanted {
        args.checkpoint_every
    } else {
        0
    }
}

/// How the public API authenticates: the token file, or nobody, which only loopback (or
/// `--allow-unauthenticated`) allows.
fn authentication(args: &ServeArgs, listen: SocketAddr) -> Result<Auth> {
    match &args.auth_token_file {
        Some(path) => Ok(Auth::Tokens(Arc::new(TokenFile::load(path).map_err(|e| anyhow!("--auth-token-file: {e}"))?))),
        None if listen.ip().is_loopback() || args.allow_unauthenticated => Ok(Auth::Open),
        None => bail!(
            "--listen {listen}: a non-loopback address needs --auth-token-file FILE (clients' bearer tokens); \
             --allow-unauthenticated serves it open to anyone who reaches it"
        ),
    }
}

/// Runs the server until it is told to stop.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let listen: SocketAddr = args.listen.parse().map_err(|e| anyhow!("--listen {}: {e} (expected HOST:PORT, e.g. 0.0.0.0:50051)", args.listen))?;
    let mode = mode(&args)?;
    if args.max_queue == 0 {
        bail!("--max-queue 0: the queue must hold at least one job");
    }
    if !(-100..=100).contains(&args.max_tenant_priority) {
        bail!("--max-tenant-priority {}: priorities run from -100 to 100", args.max_tenant_priority);
    }
    let job_retention = parse_duration(&args.job_retention).map_err(|e| anyhow!("--job-retention: {e}"))?;
    let grace_period = parse_duration(&args.grace_period).map_err(|e| anyhow!("--grace-period: {e}"))?;
    if !(1024..=4 << 20).contains(&args.chunk_size) {
        bail!("--chunk-size {}: must be from 1024 to 4194304 bytes", args.chunk_size);
    }
    if args.max_job_records == 0 || args.max_job_record_bytes == 0 {
        bail!("--max-job-records and --max-job-record-bytes must be positive");
    }
    let job_records = RecordLimits { max_records: args.max_job_records, max_bytes: args.max_job_record_bytes };
    let auth = authentication(&args, listen)?;
    let client_send_timeout = parse_duration(&args.client_send_timeout).map_err(|e| anyhow!("--client-send-timeout: {e}"))?;
    if client_send_timeout < Duration::from_millis(100) {
        bail!("--client-send-timeout {}: must be at least 100ms", args.client_send_timeout);
    }
    let mut config = ServerConfig {
        queue: QueueLimits {
            max_queued: args.max_queue,
            max_queued_per_tenant: args.max_queued_per_tenant,
            max_running_per_tenant: args.max_running_per_tenant,
            max_priority: args.max_tenant_priority,
        },
        job_retention,
        job_records,
        grace_period,
        chunk_size: args.chunk_size,
        auth,
        client_send_timeout,
        max_input_bytes_held: args.max_input_bytes_held,
        store: None,
        serving: tessera_telemetry::Serving::new(tessera_coordinator::server::SERVICE_NAME),
    };

    // Dropped last (after the runtime): flushes the spans of the jobs to the collector.
    let _telemetry = tessera_telemetry::init("tessera-coordinator", &args.telemetry, &[("service.version", env!("CARGO_PKG_VERSION").to_string())])?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tessera-io").enable_all().build().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}"))?;
        let bound = listener.local_addr().with_context(|| format!("--listen {listen}"))?;
        let metrics = args.metrics.bind().await?;
        if let Some(m) = &metrics {
            println!("tessera serve: metrics on http://{}/metrics", m.local_addr().context("--metrics-listen")?);
        }
        println!("tessera serve: listening on {bound}");
        std::io::stdout().flush().ok();
        #[cfg(feature = "embedded")]
        let mut embedded_workers = None;
        let (executor, what): (Arc<dyn JobExecutor>, String) = match mode {
            #[cfg(feature = "embedded")]
            Mode::Embedded { source, device, model_name, source_flag, workers } => {
                tracing::info!(%bound, model = %model_name, %device, workers, "loading the model for the in-process workers");
                if let Some(location) = &args.state {
                    config.store = Some(Arc::new(JobStore::open(location, None).map_err(|e| anyhow!("--state {location}: {e}"))?));
                }
                let (embedded, executor) =
                    EmbeddedWorkers::with_executor(source, device, &model_name, workers, args.max_ranks, args.max_tokens, checkpoint_every(&args, false))
                        .await
                        .map_err(|e| anyhow!("{source_flag}: {e}"))?;
                embedded_workers = Some(embedded);
                (Arc::new(executor), source_flag)
            }
            Mode::Cluster { heartbeat, limits, recover_wait, tls } => {
                let endpoints = args.etcd.join(",");
                let etcd_tls = args.etcd_tls.load().map_err(|e| anyhow!(e))?;
                let membership =
                    EtcdMembership::connect_tls(&args.etcd, &args.cluster, heartbeat, etcd_tls).await.map_err(|e| anyhow!("--etcd {endpoints}: {e}"))?;
                if let Some(location) = &args.state {
                    let records = membership.job_records().map_err(|e| anyhow!("--etcd {endpoints}: {e}"))?;
                    // One coordinator of the cluster owns its store at a time: an etcd claim.
                    let owner = StoreOwnership::Etcd { membership: Box::new(membership.clone()), holder: holder_name() };
                    let store = JobStore::open(location, Some(Arc::new(records))).map_err(|e| anyhow!("--state {location}: {e}"))?.owned_by(owner);
                    tracing::info!(store = %store.describe(), "jobs are stored");
                    config.store = Some(Arc::new(store));
                }
                let default_model = args.model_name.clone();
                let executor = ClusterExecutor::start(ClusterExecutorConfig {
                    membership: Arc::new(membership),
                    max_ranks: args.max_ranks,
                    max_tokens: args.max_tokens,
                    default_model,
                    limits,
                    recover_attempts: args.recover_attempts,
                    recover_wait,
                    checkpoint_every: checkpoint_every(&args, true),
                    startup: None,
                    tls,
                })
                .map_err(|e| anyhow!("{e}"))?;
                tracing::info!(%bound, etcd = %endpoints, cluster = %args.cluster, "following the workers in etcd");
                (Arc::new(executor), format!("--etcd {endpoints}"))
            }
        };
        let exporter = metrics.map(|m| {
            let (executor, metrics) = (executor.clone(), tessera_coordinator::server::CoordinatorMetrics::global());
            tessera_telemetry::serve_metrics(m, Arc::new(move || metrics.refresh_workers(&executor.workers())), config.serving.clone())
        });
        let served = serve(listener, executor, config, shutdown).await.map_err(|e| anyhow!("{what}: {e}"));
        if let Some(e) = exporter {
            e.abort();
        }
        #[cfg(feature = "embedded")]
        drop(embedded_workers);
        served
    });
    // A job thread that ignored its stop must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
