//! `tessera-worker serve --etcd` child processes for the cluster tests (which declare the shared
//! `etcd` helper module beside this one), and waiting for them to be listed idle.
#![allow(dead_code)]

use crate::etcd::{self, Etcd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{ListWorkersRequest, WorkerState};
use tonic::transport::Channel;

/// Membership heartbeat of every process: a killed worker's lease lapses within about a second.
pub const HEARTBEAT: &str = "250ms";

/// The `tessera-worker` binary, built beside `tessera` by `cargo test --workspace`.
pub fn worker_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_tessera")).with_file_name("tessera-worker");
    if !path.is_file() {
        let ok = Command::new(env!("CARGO")).args(["build", "-p", "tessera-worker", "--bin", "tessera-worker"]).status().is_ok_and(|s| s.success());
        assert!(ok && path.is_file(), "{} is missing: run `cargo build -p tessera-worker` (or `cargo test --workspace`)", path.display());
    }
    path
}

/// A `tessera-worker serve` process (SIGKILLed when dropped).
pub struct Worker {
    pub id: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Worker {
    pub fn start(etcd: &Etcd, cluster: &str, id: &str) -> Self {
        Self::start_with(etcd, cluster, id, &[])
    }

    /// A worker with extra `serve` flags (`--heartbeat` among them replaces the default). Ports
    /// are picked free and bound by the worker a moment later; when another test took one in
    /// between, the worker exits saying so and is started again on new ports.
    pub fn start_with(etcd: &Etcd, cluster: &str, id: &str, extra: &[&str]) -> Self {
        for _ in 0..5 {
            let mut w = Self::spawn(etcd, cluster, id, extra);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) && !w.log().contains("serving model") {
                if w.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !(w.child.try_wait().unwrap().is_some() && w.log().contains("Address already in use")) {
                return w;
            }
        }
        panic!("worker {id}: its ports were taken five times in a row");
    }

    fn spawn(etcd: &Etcd, cluster: &str, id: &str, extra: &[&str]) -> Self {
        let log = tempfile::Builder::new().prefix(&format!("tessera-worker-{id}-")).suffix(".log").tempfile().unwrap();
        let (listen, collective) = (etcd::free_port(), etcd::free_port());
        let heartbeat: &[&str] = if extra.contains(&"--heartbeat") { &[] } else { &["--heartbeat", HEARTBEAT] };
        let child = Command::new(worker_binary())
            .args(["--threads", "1", "serve", "--preset", "tiny", "--metrics-listen", "127.0.0.1:0"])
            .args(["--listen", &format!("127.0.0.1:{listen}"), "--collective", &format!("127.0.0.1:{collective}")])
            .args(["--etcd", &etcd.endpoint(), "--cluster", cluster, "--worker-id", id, "--connect-timeout-s", "10"])
            .args(heartbeat)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("tessera-worker starts");
        Self { id: id.into(), child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {}", self.child.id());
    }

    /// Waits for the process to exit, at most `within`; returns how long it took.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.child.try_wait().unwrap().is_some() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until ListWorkers shows exactly `ids` (sorted), all idle.
pub async fn wait_idle(client: &mut TesseraClient<Channel>, ids: &[&str], workers: &[&Worker]) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let list = client.list_workers(ListWorkersRequest::default()).await.unwrap().into_inner().workers;
        let got: Vec<(&str, i32)> = list.iter().map(|w| (w.worker_id.as_str(), w.state)).collect();
        let want: Vec<(&str, i32)> = ids.iter().map(|id| (*id, WorkerState::Idle as i32)).collect();
        if got == want {
            return;
        }
        if Instant::now() > until {
            let logs: Vec<String> = workers.iter().map(|w| format!("--- {}:\n{}", w.id, w.log())).collect();
            panic!("workers never became {want:?}; ListWorkers says {got:?}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
