//! A `tessera serve` child process on a free loopback port, and gRPC clients for it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{generate_event::Event, GenerateEvent, GenerateRequest, Job, JobState};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A running `tessera serve` (killed when dropped, if still running).
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The metrics URL (`http://127.0.0.1:PORT/metrics`), unless metrics are off.
    pub metrics: Option<String>,
    log: tempfile::NamedTempFile,
}

impl Server {
    /// Starts `tessera serve --preset tiny --listen 127.0.0.1:0` with `extra` flags and waits
    /// until it prints its address.
    pub fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--preset", "tiny"];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// Starts `tessera serve --listen 127.0.0.1:0` (unless `extra` names the address) with
    /// `extra` flags (no model flag added) and waits until it prints its address.
    pub fn start_with(extra: &[&str]) -> Self {
        let log = tempfile::Builder::new().prefix("tessera-serve-").suffix(".log").tempfile().expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("serve")
            .args(if extra.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .args(if extra.contains(&"--metrics-listen") { &[][..] } else { &["--metrics-listen", "127.0.0.1:0"][..] })
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("tessera serve starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let mut metrics = None;
        let addr = loop {
            line.clear();
            if stdout.read_line(&mut line).expect("reading the server's stdout") == 0 {
                panic!("tessera serve {extra:?} exited before listening: {}", std::fs::read_to_string(log.path()).unwrap_or_default());
            }
            if let Some(m) = line.trim().strip_prefix("tessera serve: metrics on ") {
                metrics = Some(m.to_string());
            }
            if let Some(a) = line.trim().strip_prefix("tessera serve: listening on ") {
                break a.to_string();
            }
        };
        // Keep draining stdout (the H.264 library prints there) so the server never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        Self { child, addr, metrics, log }
    }

    /// Starts a server and waits until its health is SERVING.
    pub async fn start_serving(extra: &[&str]) -> Self {
        let s = Self::start(extra);
        s.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
        s
    }

    /// Scrapes the metrics endpoint (plain HTTP/1.1) and returns the exposition text.
    pub async fn scrape(&self) -> String {
        let answer = self.metrics_port_get("/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
    }

    /// The HTTP status code of `GET path` on the metrics port (the probes `/healthz`, `/readyz`).
    pub async fn probe(&self, path: &str) -> u16 {
        let answer = self.metrics_port_get(path).await;
        answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status line: {answer}"))
    }

    /// The whole answer to `GET path` on the metrics port.
    async fn metrics_port_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = self.metrics.as_deref().expect("metrics are on");
        let hostport = url.trim_start_matches("http://").trim_end_matches("/metrics");
        let mut s = tokio::net::TcpStream::connect(hostport).await.expect("metrics endpoint");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// The server's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", self.addr, self.log()))
    }

    /// A client of the public API.
    pub async fn client(&self) -> TesseraClient<Channel> {
        TesseraClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// The overall health status.
    pub async fn health(&self) -> ServingStatus {
        let r = HealthClient::new(self.channel().await).check(HealthCheckRequest { service: String::new() }).await.expect("health check").into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    /// Waits until the overall health is `want`.
    pub async fn wait_health(&self, want: ServingStatus, within: Duration) {
        let until = Instant::now() + within;
        loop {
            if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await {
                if let Ok(r) = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await {
                    if r.into_inner().status == want as i32 {
                        return;
                    }
                }
            }
            assert!(Instant::now() < until, "health never became {want:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM to the server.
    pub fn sigterm(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill runs").success();
        assert!(ok, "kill -TERM {}", self.pid());
    }

    /// Waits for the process to exit, at most `within` (asynchronously, so that this test's
    /// client connections keep answering the server's graceful-shutdown pings).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A small, fast request for the tiny model.
pub fn small_request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red ball bouncing on a wooden floor".into(),
        width: 96,
        height: 64,
        num_frames: 9,
        steps: 4,
        seed: Some(seed),
        ..Default::default()
    }
}

/// A request that runs for long (1000 steps, about 45 ms each): to cancel, time out or drain.
pub fn long_request() -> GenerateRequest {
    GenerateRequest { prompt: "a long walk".into(), width: 128, height: 128, num_frames: 17, steps: 1000, seed: Some(1), ..Default::default() }
}

/// Every event of a Generate call and how it ended.
pub struct Collected {
    /// The events, in order.
    pub events: Vec<GenerateEvent>,
    /// The final status (None when it ended OK).
    pub status: Option<tonic::Status>,
}

impl Collected {
    /// The job's id, from its Accepted message (panics if there was none).
    pub fn job_id(&self) -> String {
        self.events
            .iter()
            .find_map(|e| match &e.event {
                Some(Event::Accepted(a)) => Some(a.job_id.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Accepted message (status {:?})", self.status))
    }

    /// The files of frames `0..count` (each PNG frame's bytes) of a stream that must have ended
    /// with Done; `what` names the job in a failure.
    pub fn finished_frames(&self, count: u32, what: &str) -> Vec<Vec<u8>> {
        assert!(self.status.is_none(), "{what}: the stream failed: {:?}", self.status);
        assert!(matches!(self.events.last().and_then(|e| e.event.as_ref()), Some(Event::Done(_))), "{what}: no Done at the end");
        (0..count).map(|i| self.file(i)).collect()
    }

    /// Frames `0..count` of a PNG-frames job, each written under `dir` as `{tag}-{i}.png` and
    /// decoded to RGB24 by ffmpeg, concatenated.
    pub fn png_frames_rgb(&self, count: u32, dir: &std::path::Path, tag: &str) -> Vec<u8> {
        (0..count)
            .flat_map(|i| {
                let path = dir.join(format!("{tag}-{i}.png"));
                std::fs::write(&path, self.file(i)).unwrap();
                super::decode_rgb24(&path)
            })
            .collect()
    }

    /// The concatenated bytes of the chunks of frame `frame_index` (the whole file for MP4/GIF).
    pub fn file(&self, frame_index: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.events {
            if let Some(Event::Chunk(c)) = &e.event {
                if c.frame_index == frame_index {
                    assert_eq!(c.offset, out.len() as u64, "chunks arrive in order without gaps");
                    out.extend_from_slice(&c.data);
                }
            }
        }
        out
    }
}

/// Runs a Generate call to its end.
pub async fn generate(client: &mut TesseraClient<Channel>, req: impl tonic::IntoRequest<GenerateRequest>) -> Collected {
    collect(client.generate(req).await).await
}

/// Runs a WatchJob call to its end.
pub async fn watch(client: &mut TesseraClient<Channel>, job_id: &str) -> Collected {
    collect(client.watch_job(tessera_proto::v1::WatchJobRequest { job_id: job_id.into() }).await).await
}

/// Longest a test waits for the next event of a call: a job that hangs fails its test, naming
/// where it stopped, instead of holding CI up to its time limit. The tests' jobs send progress
/// every step, and none of their steps takes a minute.
const SILENCE_LIMIT: Duration = Duration::from_secs(300);

async fn collect(call: Result<tonic::Response<tonic::Streaming<GenerateEvent>>, tonic::Status>) -> Collected {
    let mut stream = match call {
        Ok(r) => r.into_inner(),
        Err(status) => return Collected { events: Vec::new(), status: Some(status) },
    };
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(SILENCE_LIMIT, stream.message()).await;
        let next = next.unwrap_or_else(|_| panic!("no event for {SILENCE_LIMIT:?} (a hung job?); the last of {}: {:?}", events.len(), events.last()));
        match next {
            Ok(Some(e)) => events.push(e),
            Ok(None) => return Collected { events, status: None },
            Err(s) => return Collected { events, status: Some(s) },
        }
    }
}

/// Polls GetJob until the job is in `state` (panics after `within`).
pub async fn wait_job_state(client: &mut TesseraClient<Channel>, id: &str, state: JobState, within: Duration) -> Job {
    let until = Instant::now() + within;
    loop {
        let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: id.into() }).await.expect("GetJob").into_inner();
        if job.state == state as i32 {
            return job;
        }
        assert!(Instant::now() < until, "job {id} never became {state:?}: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the running job has done `step` steps; returns its id and the step seen.
pub async fn running_past(client: &mut TesseraClient<Channel>, step: u32) -> (String, u32) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let running = tessera_proto::v1::ListJobsRequest { states: vec![JobState::Running as i32], limit: 1 };
        let jobs = client.list_jobs(running).await.unwrap().into_inner().jobs;
        if let Some(j) = jobs.first().filter(|j| j.progress.as_ref().is_some_and(|p| p.step >= step)) {
            return (j.job_id.clone(), j.progress.as_ref().unwrap().step);
        }
        assert!(Instant::now() < until, "no job reached step {step}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
