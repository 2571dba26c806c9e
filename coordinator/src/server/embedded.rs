//! In-process workers behind the cluster's code path: N worker services (sharing one loaded
//! pipeline) each serving the internal gRPC API on a loopback port, meeting on loopback collective
//! ports, and registered in an in-memory membership instead of etcd. A [`super::ClusterExecutor`]
//! over that membership drives them exactly as it drives `tessera-worker` processes.

use super::{ClusterExecutor, ClusterExecutorConfig, DriveLimits, ModelSource};
use crate::CoordinatorError;
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::worker::v1::shard_worker_server::ShardWorkerServer;
use tessera_worker::membership::{Heartbeat, Membership, MemoryMembership, ModelInfo, Presence, WorkerRecord, WorkerState};
use tessera_worker::pipeline::limits::{Limits, DEFAULT_WORKER_MAX_TOKENS};
use tessera_worker::pipeline::WanPipeline;
use tessera_worker::server::{device_name, WorkerIdentity, WorkerService};
use tokio::sync::watch;

/// The running in-process workers; dropping this stops them (their servers close and they
/// leave membership).
pub struct EmbeddedWorkers {
    membership: Arc<MemoryMembership>,
    shutdown: watch::Sender<bool>,
}

/// A free loopback port (bound and released: the worker binds it again per job).
fn free_loopback() -> Result<std::net::SocketAddr, CoordinatorError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CoordinatorError::Internal(format!("no free loopback port: {e}")))?;
    l.local_addr().map_err(|e| CoordinatorError::Internal(e.to_string()))
}

impl EmbeddedWorkers {
    /// Starts `n` workers serving `pipe` as `model` (with `info` for planning), registered idle.
    pub async fn start(pipe: Arc<WanPipeline>, model: &str, info: ModelInfo, n: usize) -> Result<Self, CoordinatorError> {
        if n == 0 {
            return Err(CoordinatorError::invalid_argument("workers", "at least one worker is needed"));
        }
        let membership = Arc::new(MemoryMembership::new(Heartbeat::default()));
        // Advertised as the transformer runs: GPU groups get an NCCL id from the coordinator.
        let device = device_name(pipe.transformer().device());
        let (shutdown, _) = watch::channel(false);
        for i in 0..n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| CoordinatorError::Internal(format!("worker {i}: {e}")))?;
            let address = listener.local_addr().map_err(|e| CoordinatorError::Internal(e.to_string()))?;
            let collective = free_loopback()?;
            let me = WorkerIdentity {
                worker_id: format!("local-{i}"),
                model: model.to_string(),
                address: address.to_string(),
                collective,
                devices: vec![device.clone()],
                memory_bytes: 0,
                connect_timeout: Duration::from_secs(30),
                job_idle_timeout: Duration::from_secs(600),
                limits: Limits { max_tokens: DEFAULT_WORKER_MAX_TOKENS, ..Limits::default() },
            };
            let service = WorkerService::new(pipe.clone(), me.clone());
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
            let mut record = WorkerRecord::starting(&me.worker_id, &me.address, collective.to_string(), model, me.devices.clone(), 0);
            record.state = WorkerState::Idle;
            record.model_info = info;
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
        Ok(Self { membership, shutdown })
    }

    /// Where the workers are registered.
    pub fn membership(&self) -> Arc<dyn Membership> {
        self.membership.clone()
    }

    /// Loads `source` (on a blocking thread), starts `workers` in-process workers serving it as
    /// `model_name`, and a [`ClusterExecutor`] over them (jobs of at most `max_ranks` workers, 0 =
    /// all, and `max_tokens` tokens). Keep the returned workers alive as long as the executor.
    pub async fn with_executor(
        source: ModelSource,
        model_name: &str,
        workers: usize,
        max_ranks: usize,
        max_tokens: usize,
    ) -> Result<(Self, ClusterExecutor), CoordinatorError> {
        let (pipe, defaults) = tokio::task::spawn_blocking(move || source.load())
            .await
            .map_err(|e| CoordinatorError::Internal(format!("the loading thread failed: {e}")))?
            .map_err(CoordinatorError::Unavailable)?;
        let info = ModelInfo::of(&pipe, defaults);
        let embedded = Self::start(Arc::new(pipe), model_name, info, workers).await?;
        let executor = ClusterExecutor::start(ClusterExecutorConfig {
            membership: embedded.membership(),
            max_ranks,
            max_tokens,
            default_model: Some(model_name.to_string()),
            limits: DriveLimits::default(),
            recover_attempts: 0,
            checkpoint_every: 0,
        })?;
        Ok((embedded, executor))
    }
}

impl Drop for EmbeddedWorkers {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}
