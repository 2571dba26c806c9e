//! A `tessera-worker serve` process checked from outside, as an attacker on the internal network
//! would reach it: absurd sizes, overflowing products, lying input frames, a group that does not
//! hold the rank, calls without the job's secret or with another's. Every call is refused with
//! its status (and the field, for bad requests), and after each one the process is still running
//! and its gRPC health still says SERVING; a well-formed job then runs on it. Its metrics port's
//! plain HTTP probes (`/healthz`, `/readyz`) answer as its gRPC health does.

mod common;

use common::client::{connect_with, SECRET};
use common::process::{free_addr, WorkerProcess};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tessera_proto::worker::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The worker's health status (the whole server, "").
async fn health(addr: SocketAddr) -> Result<i32, String> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.map_err(|e| e.to_string())?;
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
    Ok(answer.into_inner().status)
}

/// Alive, and its health SERVING.
async fn assert_serving(w: &mut WorkerProcess, after: &str) {
    assert!(w.child.try_wait().unwrap().is_none(), "the worker exited after {after}:\n{}", w.log());
    let status = health(w.addr).await.unwrap_or_else(|e| panic!("health after {after}: {e}\n{}", w.log()));
    assert_eq!(status, ServingStatus::Serving as i32, "health after {after}");
}

fn spec() -> pb::JobSpec {
    pb::JobSpec {
        prompt: "a red ball".into(),
        width: 48,
        height: 32,
        num_frames: 9,
        steps: 2,
        guidance_scale: 5.0,
        seed: 5,
        spatial_factor: 8,
        temporal_factor: 4,
        ranks: 1,
        ulysses: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_internal_calls_are_refused_and_the_process_stays_serving() {
    let mut w = WorkerProcess::start(&[]);
    let mut c = w.client().await;
    let until = Instant::now() + Duration::from_secs(60);
    // SERVING once the model is loaded.
    while health(w.addr).await != Ok(ServingStatus::Serving as i32) {
        assert!(Instant::now() < until, "never SERVING:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peers = vec![w.collective.to_string()];
    let prepare = |job: &str, spec: pb::JobSpec| pb::PrepareJobRequest {
        job_id: job.into(),
        rank: 0,
        peers: peers.clone(),
        spec: Some(spec),
        job_secret: SECRET.to_vec(),
        ..Default::default()
    };
    let frames = |frames: u32, width: u32, height: u32, bytes: usize| pb::InputFrames { frames, width, height, rgb: vec![0; bytes] };
    let cases: Vec<(&str, pb::PrepareJobRequest, &str)> = vec![
        ("a 1,048,576 × 1,048,576 latent", prepare("h1", pb::JobSpec { width: 8 << 20, height: 8 << 20, ..spec() }), "spec.width"),
        ("frames whose token count passes the budget", prepare("h2", pb::JobSpec { width: 4096, height: 4096, num_frames: 1441, ..spec() }), "spec.num_frames"),
        ("u32::MAX steps", prepare("h3", pb::JobSpec { steps: u32::MAX, ..spec() }), "spec.steps"),
        ("a zero factor (a division by zero)", prepare("h4", pb::JobSpec { spatial_factor: 0, ..spec() }), "spec.model_factors"),
        ("a NaN guidance", prepare("h5", pb::JobSpec { guidance_scale: f32::NAN, ..spec() }), "spec.guidance_scale"),
        (
            "input frames of 4 × 2³¹ × 2³¹ over 12 bytes",
            pb::PrepareJobRequest { input_frames: Some(frames(4, 1 << 31, 1 << 31, 12)), ..prepare("h6", pb::JobSpec { strength: Some(0.5), ..spec() }) },
            "input_frames",
        ),
        ("a rank past the group", pb::PrepareJobRequest { rank: 7, ..prepare("h7", spec()) }, "rank"),
        ("no job secret", pb::PrepareJobRequest { job_secret: Vec::new(), ..prepare("h8", spec()) }, "job_secret"),
        ("an empty job id", prepare("", spec()), "job_id"),
    ];
    for (what, request, field) in cases {
        let err = c.prepare_job(request).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        let named = tessera_proto::reason::failure(&err).and_then(|f| f.field).unwrap_or_default();
        assert!(named.starts_with(field) || named == field, "{what}: the field is {named:?}, not {field}: {err}");
        assert_serving(&mut w, what).await;
    }

    // A real job; strangers cannot touch it.
    c.prepare_job(prepare("job", spec())).await.unwrap();
    let mut impostor = connect_with(&w.addr.to_string(), &[0xa5; 32]).await.unwrap();
    for (what, err) in [
        ("a step with another secret", impostor.step(pb::StepRequest { job_id: "job".into(), step: 0, ..Default::default() }).await.unwrap_err()),
        ("a release with another secret", impostor.release_job(pb::ReleaseJobRequest { job_id: "job".into() }).await.unwrap_err()),
        ("a checkpoint with another secret", impostor.checkpoint(pb::CheckpointRequest { job_id: "job".into() }).await.unwrap_err()),
    ] {
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err}");
        assert_serving(&mut w, what).await;
    }
    let err = c.prepare_job(prepare("second", spec())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "a busy worker refuses a second job: {err}");
    let err = c.step(pb::StepRequest { job_id: "job".into(), step: 5, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "a step out of order: {err}");
    assert_serving(&mut w, "the busy and out-of-order calls").await;

    // The job runs to its end.
    for step in 0..2 {
        c.step(pb::StepRequest { job_id: "job".into(), step, ..Default::default() }).await.unwrap();
    }
    let mut decoded = c.decode(pb::DecodeRequest { job_id: "job".into(), ..Default::default() }).await.unwrap().into_inner();
    let mut frames_in = 0;
    while let Some(chunk) = decoded.message().await.unwrap() {
        frames_in += chunk.count;
    }
    assert_eq!(frames_in, 9);
    c.release_job(pb::ReleaseJobRequest { job_id: "job".into() }).await.unwrap();
    assert_serving(&mut w, "the job").await;
}

/// The status code of `GET path` on `addr` (plain HTTP/1.1), or the connection error.
async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.map_err(|e| e.to_string())?;
    answer.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or(answer)
}

/// The plain HTTP probes of the metrics port say what the gRPC health says: alive, and ready
/// once the model serves.
#[tokio::test]
async fn the_metrics_port_answers_the_http_probes_as_grpc_health_does() {
    let metrics = free_addr();
    let mut w = WorkerProcess::start_with_metrics(&metrics.to_string(), &[]);
    let until = Instant::now() + Duration::from_secs(60);
    while health(w.addr).await != Ok(ServingStatus::Serving as i32) {
        assert!(Instant::now() < until && w.child.try_wait().unwrap().is_none(), "never served:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_status(metrics, "/readyz").await, Ok(200), "{}", w.log());
    assert_eq!(http_status(metrics, "/healthz").await, Ok(200));
    assert_eq!(http_status(metrics, "/nothing").await, Ok(404));
}
