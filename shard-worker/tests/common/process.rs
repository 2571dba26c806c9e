//! A `tessera-worker serve --preset tiny` child process on free loopback ports, without etcd
//! (killed when dropped if still running), and a client that waits for it to answer.

use super::client::{connect, Client};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback address (bound by the worker a moment later).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The worker process.
pub struct WorkerProcess {
    /// The process.
    pub child: Child,
    /// Its internal gRPC address.
    pub addr: SocketAddr,
    /// Its collective address.
    pub collective: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl WorkerProcess {
    /// Starts `tessera-worker serve --preset tiny` with one thread, metrics off and `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_metrics("off", extra)
    }

    /// [`Self::start`] with the metrics port (and its HTTP probes) on `metrics` (`HOST:PORT`).
    pub fn start_with_metrics(metrics: &str, extra: &[&str]) -> Self {
        let (addr, collective) = (free_addr(), free_addr());
        let log = tempfile::Builder::new().prefix("tessera-worker-").suffix(".log").tempfile().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
            .args(["serve", "--preset", "tiny", "--metrics-listen", metrics, "--listen", &addr.to_string(), "--collective", &collective.to_string()])
            .args(extra)
            .env("TESSERA_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Self { child, addr, collective, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A client of its internal API, once it answers (60 s at most).
    pub async fn client(&self) -> Client {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = connect(&self.addr.to_string()).await {
                return c;
            }
            assert!(Instant::now() < until, "worker on {} never answered:\n{}", self.addr, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
