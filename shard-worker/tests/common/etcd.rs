//! A private etcd server for tests (Debian's `etcd-server`): started on free loopback ports with
//! a data folder on tmpfs, killed when dropped. Shared by the worker's membership tests and the
//! coordinator's cluster tests (included there by path).
//!
//! Without `etcd` on PATH, [`Etcd::start`] says why and returns `None` (the test skips), except
//! under `CI=true`, where it fails with an install hint.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_worker::membership::{EtcdMembership, Heartbeat};

/// A short heartbeat keeps the suite fast: lease TTL 750 ms, which etcd rounds up to 1 s.
pub fn heartbeat() -> Heartbeat {
    Heartbeat::new(Duration::from_millis(250)).unwrap()
}

/// Generous bound for anything that should happen "promptly" on a loaded machine.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A private etcd process.
pub struct Etcd {
    binary: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// With TLS: the folder holding `ca.crt`, `etcd.crt` and `etcd.key`, and how the start-up
    /// probe connects (a client certificate of that CA).
    tls: Option<(PathBuf, std::sync::Arc<tessera_cluster::tls::EtcdTls>)>,
}

/// A loopback port free now, for a program to bind: [`free_ports_in_a_row`] of one.
pub fn free_port() -> u16 {
    free_ports_in_a_row(1)
}

/// The first of `n` consecutive loopback ports that are all free now (for programs that take a
/// base port and count up from it). They lie below the range the kernel hands out for port 0
/// and for the source ports of outgoing connections (`ip_local_port_range`): the other tests
/// running meanwhile cannot take one of them between this check and the program's bind (a
/// worker of the local cluster script once found its port taken so). This process never hands
/// out a port twice.
pub fn free_ports_in_a_row(n: u16) -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let automatic = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    let (low, high) = (10_000u16, automatic.unwrap_or(32_768).saturating_sub(n));
    let mut state = u64::from(std::process::id()) ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    loop {
        let first = if high > low {
            // A multiplicative congruential step: where to look next, not a secret.
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            low + ((state >> 33) % u64::from(high - low)) as u16
        } else {
            TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
        };
        let Some(end) = first.checked_add(n) else { continue };
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.range(first..end).next().is_some() {
            continue;
        }
        let held: Vec<_> = (first..end).map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok()).collect();
        if held.len() == n as usize {
            given.extend(first..end);
            return first;
        }
    }
}

/// The `etcd` binary, or `None` (after saying why) when it is missing outside CI.
fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("etcd is not installed but CI=true requires the etcd membership tests: apt-get install -y etcd-server");
    }
    eprintln!("skipping the etcd membership test: no `etcd` on PATH (apt-get install etcd-server)");
    None
}

impl Etcd {
    /// Starts etcd and waits until it answers; `None` when etcd is not installed (outside CI).
    pub async fn start() -> Option<Self> {
        let binary = etcd_binary()?;
        // Data on tmpfs where there is one: etcd fsyncs every write.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let mut etcd = Self { binary, child: None, dir, client_port: free_port(), peer_port: free_port(), tls: None };
        etcd.spawn().await;
        Some(etcd)
    }

    /// Starts etcd serving clients over TLS with its certificate from `certs` (`etcd.crt`,
    /// `etcd.key`, for 127.0.0.1) and requiring client certificates of `certs/ca.crt`; `probe` is
    /// how the start-up check connects. `None` when etcd is not installed (outside CI).
    pub async fn start_tls(certs: &std::path::Path, probe: std::sync::Arc<tessera_cluster::tls::EtcdTls>) -> Option<Self> {
        let binary = etcd_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Self { binary, child: None, dir, client_port: free_port(), peer_port: free_port(), tls: Some((certs.to_path_buf(), probe)) };
        etcd.spawn().await;
        Some(etcd)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::options().create(true).append(true).open(self.dir.path().join("etcd.log")).unwrap();
        let tls: Vec<String> = match &self.tls {
            Some((certs, _)) => {
                let file = |name: &str| certs.join(name).display().to_string();
                vec![
                    "--cert-file".into(),
                    file("etcd.crt"),
                    "--key-file".into(),
                    file("etcd.key"),
                    "--trusted-ca-file".into(),
                    file("ca.crt"),
                    "--client-cert-auth".into(),
                ]
            }
            None => Vec::new(),
        };
        let child = Command::new(&self.binary)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            // Short raft timings lower etcd's minimum lease TTL to 1 s.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(&tls)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(20) {
            let probe = self.tls.as_ref().map(|(_, c)| c.clone());
            match EtcdMembership::connect_tls(&self.endpoints(), "probe", heartbeat(), probe).await {
                Ok(_) => return,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd at {} not ready after 20 s (last: {last}); its log:\n{log}", self.endpoint());
    }

    /// Kills etcd (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) etcd: its connections stay open but nothing answers.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("etcd running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
