//! `tessera generate` without `--server`: the whole service in this process. An embedded
//! coordinator (the public gRPC server on a loopback port) with in-process workers registered in
//! an in-memory membership, driven over the internal API exactly as a cluster is; the command is
//! then its own client, as with `--server`.

use anyhow::{anyhow, Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tessera_coordinator::server::{serve, EmbeddedWorkers, JobExecutor, ModelSource, ServerConfig};
use tessera_kernels::Device;
use tokio::sync::oneshot;

/// The embedded coordinator's thread; dropping this shuts it down.
pub struct EmbeddedServer {
    /// Where its public API listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedServer {
    /// Loads `source` on `device`, starts `workers` workers and the coordinator; returns once it
    /// serves.
    pub fn start(source: ModelSource, device: Device, model_name: String, workers: usize, max_tokens: usize) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tessera-embedded".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("tessera-embedded-io").enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("starting the embedded coordinator's runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = async {
                        let (embedded, executor) =
                            EmbeddedWorkers::with_executor(source, device, &model_name, workers, 0, max_tokens, 0).await.map_err(|e| anyhow!("{e}"))?;
                        // The client connects once the model is loaded and the workers listed.
                        executor.wait_ready().await.map_err(|e| anyhow!("{e}"))?;
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the embedded coordinator to loopback")?;
                        let addr = listener.local_addr()?;
                        Ok::<_, anyhow::Error>((embedded, executor, listener, addr))
                    };
                    let (embedded, executor, listener, addr) = match started.await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(addr));
                    let config = ServerConfig { grace_period: std::time::Duration::ZERO, ..ServerConfig::default() };
                    if let Err(e) = serve(listener, Arc::new(executor), config, async {
                        let _ = stop_rx.await;
                    })
                    .await
                    {
                        tracing::warn!(error = %e, "the embedded coordinator ended with an error");
                    }
                    drop(embedded);
                });
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .context("starting the embedded coordinator's thread")?;
        let addr = ready_rx.recv().map_err(|_| anyhow!("the embedded coordinator's thread ended while starting"))??;
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
