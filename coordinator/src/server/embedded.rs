//! In-process workers behind the cluster's code path: N worker services (sharing one loaded
//! pipeline) each serving the internal gRPC API on a loopback port, meeting on loopback collective
//! ports, and registered in an in-memory membership instead of etcd. A [`super::ClusterExecutor`]
//! over that membership drives them exactly as it drives `tessera-worker` processes: this is how
//! `tessera generate` and `tessera serve` without `--etcd` run every job, so a generation on a
//! laptop takes the same path as one on a cluster.

use super::{ClusterExecutor, ClusterExecutorConfig, DriveLimits, Startup};
use crate::CoordinatorError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tessera_kernels::Device;
use tessera_proto::worker::v1::shard_worker_server::ShardWorkerServer;
use tessera_worker::membership::{Heartbeat, Membership, MemoryMembership, ModelInfo, Presence, WorkerRecord, WorkerState};
use tessera_worker::pipeline::limits::{Limits, DEFAULT_WORKER_MAX_TOKENS};
use tessera_worker::pipeline::{PipelineDefaults, PipelinePreset, WanPipeline};
use tessera_worker::server::{device_name, WorkerIdentity, WorkerService};
use tokio::sync::watch;

/// Where the in-process workers' pipeline comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A diffusers snapshot folder.
    Snapshot(PathBuf),
    /// A built-in pipeline: the trained `demo`, or one with random weights (seed 0).
    Preset(PipelinePreset),
}

impl ModelSource {
    /// The model name requests use when none is configured: a snapshot's folder name (as a
    /// worker serving it says), the preset's own name otherwise.
    pub fn default_name(&self) -> String {
        match self {
            ModelSource::Snapshot(dir) => tessera_worker::pipeline::Snapshot::default_model_name(dir),
            ModelSource::Preset(p) => p.name().into(),
        }
    }

    /// Loads (or builds) the pipeline on `device`, with its request defaults; the error says what
    /// failed.
    pub fn load(&self, device: Device) -> Result<(WanPipeline, PipelineDefaults), String> {
        match self {
            ModelSource::Snapshot(dir) => WanPipeline::load_on(dir, device)
                .map(|p| {
                    let d = p.snapshot_defaults();
                    (p, d)
                })
                .map_err(|e| format!("loading {} on {device}: {e}", dir.display())),
            ModelSource::Preset(p) => {
                p.build_on(0, device).map(|pipe| (pipe, p.defaults())).map_err(|e| format!("building the `{}` preset on {device}: {e}", p.name()))
            }
        }
    }
}

/// Whether `workers` in-process workers can share the device: on a GPU only one can (they would
/// share one model on one GPU, and NCCL needs a GPU per rank). Checked on the device asked for
/// before anything loads, and again on the device `auto` resolved to.
pub fn check_workers(gpu: bool, workers: usize) -> Result<(), String> {
    if workers == 0 {
        return Err("at least one worker is needed".into());
    }
    if gpu && workers > 1 {
        return Err(format!(
            "{workers} in-process workers would share one model on one GPU, and NCCL needs a GPU per rank; run a `tessera-worker serve --device cuda:N` per GPU (`tessera serve --etcd`; `TESSERA_DEVICE=cuda bash deploy/local-cluster.sh {workers}` starts them on this machine), or use one worker"
        ));
    }
    Ok(())
}

/// How many in-process workers a job gets when the caller does not say: one per device. The
/// workers of one process share one loaded model and one device (this machine's cores, or one
/// GPU), so a second worker splits the same compute and only adds collectives; more workers are
/// for checking the sharded path (`--workers N`), and more devices mean more worker processes.
pub fn default_workers(_device: Device) -> usize {
    1
}

/// The running in-process workers; dropping this stops them (their servers close and they
/// leave membership).
pub struct EmbeddedWorkers {
    membership: Arc<MemoryMembership>,
    shutdown: watch::Sender<bool>,
}

/// A listener on a free loopback port, and its address (a worker's collective port, held for its life).
fn loopback_listener() -> Result<(std::net::TcpListener, std::net::SocketAddr), CoordinatorError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CoordinatorError::Internal(format!("no free loopback port: {e}")))?;
    let addr = l.local_addr().map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    Ok((l, addr))
}

/// Starts `n` workers serving `pipe` as `model` (with `info` for planning), registered idle in
/// `membership`; they stop when `shutdown` turns true.
async fn spawn_workers(
    membership: &Arc<MemoryMembership>,
    shutdown: &watch::Sender<bool>,
    pipe: Arc<WanPipeline>,
    model: &str,
    info: ModelInfo,
    n: usize,
) -> Result<(), CoordinatorError> {
    // the workers share this machine: each has its share of the CPU's rates
    let compute = tessera_worker::server::compute_figures(pipe.transformer().device(), n);
    let memory = tessera_worker::server::memory_available().unwrap_or(0);
    // Advertised as the transformer runs: GPU groups get an NCCL id from the coordinator.
    let device = device_name(pipe.transformer().device());
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| CoordinatorError::Internal(format!("worker {i}: {e}")))?;
        let address = listener.local_addr().map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        // the worker holds its collective port for its life
        let (collective_listener, collective) = loopback_listener()?;
        let me = WorkerIdentity {
            worker_id: format!("local-{i}"),
            model: model.to_string(),
            address: address.to_string(),
            collective,
            devices: vec![device.clone()],
            memory_bytes: memory,
            connect_timeout: Duration::from_secs(30),
            job_idle_timeout: Duration::from_secs(600),
            limits: Limits { max_tokens: DEFAULT_WORKER_MAX_TOKENS, ..Limits::default() },
        };
        let service = WorkerService::new(pipe.clone(), me.clone(), collective_listener);
        let mut stop = shutdown.subscribe();
        tokio::spawn({
            let service = service.clone();
            async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let server = ShardWorkerServer::new(service)
                    .max_decoding_message_size(super::cluster::MAX_MESSAGE)
                    .max_encoding_message_size(super::cluster::MAX_MESSAGE);
                let ended = tonic::transport::Server::builder().add_service(server).serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
                if let Err(e) = ended.await {
                    tracing::warn!(error = %e, "an in-process worker's server failed");
                }
            }
        });
        let mut record = WorkerRecord::starting(&me.worker_id, &me.address, collective.to_string(), model, me.devices.clone(), memory);
        record.state = WorkerState::Idle;
        record.model_info = info.clone();
        record.compute = compute;
        let m: Arc<dyn Membership> = membership.clone();
        let mut presence = Presence::register(Some(m), record).await?;
        let mut running = service.running();
        let mut stop = shutdown.subscribe();
        tokio::spawn(async move {
            presence
                .follow(&mut running, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            presence.leave().await;
        });
    }
    Ok(())
}

impl EmbeddedWorkers {
    /// Where the workers are registered.
    pub fn membership(&self) -> Arc<dyn Membership> {
        self.membership.clone()
    }

    /// Starts a [`ClusterExecutor`] over an in-memory membership at once (jobs of at most
    /// `max_ranks` workers, 0 = all, and `max_tokens` tokens), and in the background loads
    /// `source` on `device` and registers `workers` in-process workers serving it as
    /// `model_name`. The executor is ready (`wait_ready`) once they are registered, and fails
    /// with the reason if the model does not load. Jobs are checkpointed every `checkpoint_every`
    /// steps (0: never; with a state store, a restarted server resumes from there). Keep the
    /// returned workers alive as long as the executor.
    pub async fn with_executor(
        source: ModelSource,
        device: Device,
        model_name: &str,
        workers: usize,
        max_ranks: usize,
        max_tokens: usize,
        checkpoint_every: u32,
    ) -> Result<(Self, ClusterExecutor), CoordinatorError> {
        check_workers(device != Device::Cpu, workers).map_err(|detail| CoordinatorError::invalid_argument("workers", detail))?;
        let membership = Arc::new(MemoryMembership::new(Heartbeat::default()));
        let (shutdown, _) = watch::channel(false);
        let (startup, startup_rx) = watch::channel(Startup::Loading);
        let executor = ClusterExecutor::start(ClusterExecutorConfig {
            tls: None,
            membership: membership.clone(),
            max_ranks,
            max_tokens,
            default_model: Some(model_name.to_string()),
            limits: DriveLimits::default(),
            recover_attempts: 0,
            // (In-process workers are never replaced: a job waits for none.)
            recover_wait: Duration::ZERO,
            checkpoint_every,
            startup: Some(startup_rx),
        })?;
        let embedded = Self { membership: membership.clone(), shutdown: shutdown.clone() };
        let model = model_name.to_string();
        tokio::spawn(async move {
            let outcome = match tokio::task::spawn_blocking(move || source.load(device)).await {
                Ok(Ok((pipe, defaults))) => {
                    let info = pipe.model_info(defaults);
                    spawn_workers(&membership, &shutdown, Arc::new(pipe), &model, info, workers).await.map_err(|e| e.to_string())
                }
                Ok(Err(why)) => Err(why),
                Err(e) => Err(format!("the loading thread failed: {e}")),
            };
            if let Err(why) = &outcome {
                tracing::error!(error = %why, "the in-process workers did not start");
            }
            startup.send_replace(outcome.map_or_else(Startup::Failed, |()| Startup::Ready(workers)));
        });
        Ok((embedded, executor))
    }
}

impl Drop for EmbeddedWorkers {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}
