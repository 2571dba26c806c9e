//! The coordinator's public gRPC server (`tessera serve`): the `tessera.v1.Tessera` service with
//! standard health and reflection beside it. Requests are validated, queued by priority and run
//! by a [`JobExecutor`] ([`ClusterExecutor`]: shard workers found through a membership, either
//! `tessera-worker` processes in etcd or the in-process [`EmbeddedWorkers`]); progress and the
//! encoded video stream back. Shutdown drains: health NOT_SERVING, no new jobs, the running job gets a grace
//! period and is then stopped at a step boundary (a stored job's run is left to the next
//! coordinator there: see `cluster::drive`).

mod auth;
mod cluster;
mod durable;
#[cfg(feature = "embedded")]
mod embedded;
mod executor;
mod feed;
mod input;
mod jobs;
mod launch;
mod metrics;
mod output;
mod ownership;
mod persist;
mod queue;
mod resume;
mod runner;
mod scheduler;
mod service;

pub use auth::{principal, Auth, Principal, TokenFile, ADMIN_GROUP};
pub use cluster::{ulysses_degree, ClusterExecutor, ClusterExecutorConfig, DriveLimits, Group, Startup, WorkerTable};
pub use durable::{Blob, JobStore};
#[cfg(feature = "embedded")]
pub use embedded::{check_workers, default_workers, EmbeddedWorkers, ModelSource};
pub use executor::{ExecEvent, ExecFuture, ExecJob, ExecReport, JobExecutor, OutputFile};
pub use input::{prepare_request_video, prepare_request_video_blocking, HeldInput, HeldShare, MAX_CONCURRENT_DECODES};
pub use jobs::{JobTable, RecordLimits, StopReason, StopSignal, Timings};
pub use metrics::{cause, CoordinatorMetrics};
pub use output::{content_type, latents_file, FrameEncoder, LATENTS_CONTENT_TYPE};
pub use ownership::{holder_name, Fence, Owned, StoreOwnership};
pub use queue::{Admit, JobQueue, QueueLimits, Taken};
pub use scheduler::{Scheduler, SlotGuard};
pub use service::{grpc_timeout, TesseraService};

use crate::request::MAX_INPUT_VIDEO_BYTES;
use crate::CoordinatorError;
use runner::Estimator;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_server::TesseraServer;
use tokio_stream::StreamExt;

/// The service's name in the health service.
pub const SERVICE_NAME: &str = "tessera.v1.Tessera";

/// Settings of the server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// How many new jobs may wait, in all and per tenant.
    pub queue: QueueLimits,
    /// How long finished jobs' records are kept.
    pub job_retention: Duration,
    /// How many finished records are kept at most, in how many bytes (the oldest go first).
    pub job_records: RecordLimits,
    /// How long a running job may go on once shutdown begins before it is stopped.
    pub grace_period: Duration,
    /// Bytes per Chunk message.
    pub chunk_size: usize,
    /// How callers of the public API are authenticated.
    pub auth: Auth,
    /// Longest a Generate stream's next message may wait for its client to read before the job
    /// is stopped (its record says so).
    pub client_send_timeout: Duration,
    /// Most bytes of decoded input frames that accepted jobs hold at once.
    pub max_input_bytes_held: u64,
    /// Where jobs are stored so that they outlive the server (`None`: in memory only).
    pub store: Option<Arc<JobStore>>,
    /// Whether the server serves: what its gRPC health service reports, and the metrics port's
    /// `/readyz` with it (hand a clone to `tessera_telemetry::serve_metrics`).
    pub serving: tessera_telemetry::Serving,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            queue: QueueLimits::default(),
            job_retention: Duration::from_secs(3600),
            job_records: RecordLimits::default(),
            grace_period: Duration::from_secs(30),
            chunk_size: 1 << 20,
            auth: Auth::Open,
            client_send_timeout: Duration::from_secs(60),
            max_input_bytes_held: 1 << 30,
            store: None,
            serving: tessera_telemetry::Serving::new(SERVICE_NAME),
        }
    }
}

/// What the service's handlers and job drivers share.
pub struct ServiceState {
    jobs: JobTable,
    scheduler: Arc<Scheduler>,
    executor: Arc<dyn JobExecutor>,
    estimator: Estimator,
    chunk_size: usize,
    send_timeout: Duration,
    /// Permits for decoding input media at admission.
    media_decodes: tokio::sync::Semaphore,
    /// The decoded input frames accepted jobs hold.
    held_input: Arc<HeldInput>,
    draining: AtomicBool,
    metrics: CoordinatorMetrics,
    /// The state store, if any.
    store: Option<Arc<JobStore>>,
    /// What WatchJob follows of the jobs running here.
    feeds: feed::Feeds,
    /// How long a finished job's record and output are kept.
    output_retention: Duration,
    /// The epoch of this coordinator's ownership of the store, which its job calls carry.
    fence: Fence,
}

impl ServiceState {
    /// State for a service running jobs on `executor`.
    pub fn new(executor: Arc<dyn JobExecutor>, config: &ServerConfig) -> Arc<Self> {
        let metrics = CoordinatorMetrics::global();
        let gauge = metrics.clone();
        Arc::new(Self {
            jobs: JobTable::new(config.job_retention, config.job_records),
            scheduler: Scheduler::new(config.queue, Box::new(move |depth, held| gauge.set_queue_depth(depth, held))),
            executor,
            estimator: Estimator::default(),
            chunk_size: config.chunk_size.max(1),
            send_timeout: config.client_send_timeout.max(Duration::from_millis(1)),
            media_decodes: tokio::sync::Semaphore::new(MAX_CONCURRENT_DECODES),
            held_input: HeldInput::new(config.max_input_bytes_held),
            draining: AtomicBool::new(false),
            metrics,
            store: config.store.clone(),
            feeds: feed::Feeds::default(),
            output_retention: config.job_retention,
            fence: Fence::default(),
        })
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// How long a stopped job may take to reach its step boundary at shutdown, and the server to
/// close its connections, before the process goes on without them.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Serves on `listener` until `shutdown` resolves (or the executor fails to load: then the error),
/// then drains as the module docs say.
pub async fn serve(
    listener: tokio::net::TcpListener,
    executor: Arc<dyn JobExecutor>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    let health = config.serving.clone();
    health.set(false).await;
    let state = ServiceState::new(executor.clone(), &config);
    let dispatcher = tokio::spawn(state.scheduler.clone().dispatch(executor.slots()));
    let sweeper = tokio::spawn(sweep(state.clone(), config.job_retention));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Internal(format!("reflection: {e}")))?;
    // Room for the largest input video the API accepts, so validation can name it. Every call
    // passes authentication first (health and reflection stay open, for probes).
    let tessera = TesseraServer::new(TesseraService::new(state.clone())).max_decoding_message_size(MAX_INPUT_VIDEO_BYTES + (1 << 20));
    let tessera = tonic::service::interceptor::InterceptedService::new(tessera, config.auth.clone());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tessera_cluster::http2::limited(tonic::transport::Server::builder())
            .add_service(health.grpc_service())
            .add_service(reflection)
            .add_service(tessera)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = close_rx.await;
            }),
    );

    tokio::pin!(shutdown);
    let mut owned = None;
    let outcome = tokio::select! {
        ready = executor.wait_ready() => match ready {
            Ok(()) => serve_jobs(&state, &health, &mut owned, shutdown.as_mut()).await,
            Err(e) => Err(e),
        },
        _ = &mut shutdown => Ok(()),
    };
    tracing::info!("shutting down: draining");
    // A coordinator that lost its store stops its jobs at once: another may own them now.
    let grace = if outcome.is_err() && owned.is_some() { Duration::ZERO } else { config.grace_period };
    drain(&state, &health, grace).await;
    // Only now may the next coordinator take the store over: the runs are left to it.
    if let Some(owned) = owned {
        owned.release().await;
        state.metrics.set_store_owner(false);
    }
    let _ = close_tx.send(());
    match tokio::time::timeout(STOP_WAIT, server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Err(_) => tracing::warn!("connections still open after {STOP_WAIT:?}; exiting anyway"),
        _ => {}
    }
    dispatcher.abort();
    sweeper.abort();
    outcome
}

/// Owns the state store (standing by while another coordinator does), resumes the jobs it holds,
/// then serves until `shutdown`; fails when the store is lost (an etcd claim that lapsed).
async fn serve_jobs(
    state: &Arc<ServiceState>,
    health: &tessera_telemetry::Serving,
    owned: &mut Option<Owned>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), CoordinatorError> {
    if let Some(store) = &state.store {
        tokio::select! {
            o = store.ownership().acquire() => *owned = Some(o?),
            _ = shutdown.as_mut() => return Ok(()),
        }
        let epoch = state.fence.owned_now();
        tracing::info!(epoch, "own the state store");
        state.metrics.set_store_owner(true);
    }
    // Jobs a previous run left unfinished go first.
    match resume::resume_stored(state).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "resumed the stored jobs"),
        Err(e) => tracing::error!(error = %e, "cannot read the state store: no stored job is resumed"),
    }
    health.set(true).await;
    tracing::info!("model loaded; serving");
    let lost = async {
        match owned {
            Some(o) => tokio::select! {
                why = o.lost() => why,
                why = state.fence.superseded() => format!("a worker says so: {why}"),
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown => Ok(()),
        why = lost => {
            state.metrics.set_store_owner(false);
            tracing::error!(why, "lost the state store: stopping, so that one coordinator alone runs its jobs");
            Err(CoordinatorError::Store(format!("lost the state store ({why})")))
        }
    }
}

/// Shutdown's first part: NOT_SERVING, no new jobs, queued jobs ended (UNAVAILABLE), the running
/// ones given `grace` and then stopped.
async fn drain(state: &ServiceState, health: &tessera_telemetry::Serving, grace: Duration) {
    health.set(false).await;
    state.draining.store(true, Ordering::SeqCst);
    state.executor.drain();
    for id in state.scheduler.close() {
        if let Some(stop) = state.jobs.stop_signal(&id) {
            stop.stop(StopReason::Shutdown);
        }
    }
    let until = Instant::now() + grace;
    while state.scheduler.running() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if state.scheduler.running() > 0 {
        tracing::warn!(grace_s = grace.as_secs_f64(), "grace period over: stopping the running jobs");
    }
    for id in state.jobs.unfinished() {
        if let Some(stop) = state.jobs.stop_signal(&id) {
            stop.stop(StopReason::Shutdown);
        }
    }
    // Let the stopped jobs reach a step boundary and their drivers end the streams.
    let until = Instant::now() + STOP_WAIT;
    while !state.jobs.unfinished().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drops expired job records now and then.
async fn sweep(state: Arc<ServiceState>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let gone = state.jobs.sweep(Instant::now());
        if gone > 0 {
            tracing::debug!(gone, "expired job records dropped");
        }
    }
}
