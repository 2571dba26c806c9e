//! The cluster for real: an etcd server, a `tessera serve --etcd` coordinator and
//! `tessera-worker serve --etcd` processes on loopback, driven through the generated gRPC client.
//! The workers register under leases, the coordinator follows membership, plans a group over the
//! free workers and drives them over the internal API; the workers meet on their TCP collective
//! ports. Checked: an MP4 from 3 workers that ffprobe decodes with the requested frames and size;
//! the same frames from 1 and 3 workers; a worker that joins later is used by the next job; a
//! worker killed (SIGKILL) mid-job ends that job promptly with UNAVAILABLE naming it and the next
//! job runs on the workers left; a cancelled job frees its workers; video-to-video through the
//! cluster; garbage input video refused with INVALID_ARGUMENT; the internal API over mutual TLS
//! (a throwaway CA from rcgen), closed to clients without one of its certificates.
//!
//! Needs `etcd` (Debian's `etcd-server`) and ffprobe; without them the tests skip, except under
//! CI=true, where they fail.

mod common;
#[path = "../../shard-worker/tests/common/etcd.rs"]
mod etcd;
#[path = "common/workers.rs"]
mod workers;

use common::server::{generate, wait_job_state, Collected, Server};
use etcd::Etcd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{generate_event::Event, CancelJobRequest, GenerateRequest, JobState, ListWorkersRequest, OutputFormat};
use tonic::transport::Channel;
use workers::{wait_idle, worker_binary, Worker, HEARTBEAT};

/// A Generate stream.
type Events = tonic::Streaming<tessera_proto::v1::GenerateEvent>;

/// Reads the stream until `step` steps are done.
async fn until_step(stream: &mut Events, step: u32) {
    loop {
        match stream.message().await.unwrap().and_then(|e| e.event) {
            Some(Event::Progress(p)) if p.step >= step => return,
            Some(_) => {}
            None => panic!("the job ended before {step} steps"),
        }
    }
}

/// Reads the stream to its end, which must be an error status.
async fn failure(stream: &mut Events) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the job succeeded"),
            Err(s) => return s,
        }
    }
}

/// etcd and a coordinator following it, with `extra` flags; `None` when etcd is missing outside CI.
async fn cluster(name: &str, extra: &[&str]) -> Option<(Etcd, Server)> {
    let etcd = Etcd::start().await?;
    let endpoint = etcd.endpoint();
    let server = Server::start_with(&[&["--etcd", &endpoint, "--cluster", name, "--heartbeat", HEARTBEAT, "--step-timeout", "60s"], extra].concat());
    server.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    Some((etcd, server))
}

fn request(format: OutputFormat) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red ball bouncing on a wooden floor".into(),
        width: 96,
        height: 64,
        num_frames: 9,
        steps: 4,
        seed: Some(11),
        output_format: format as i32,
        ..Default::default()
    }
}

/// The job id from the Accepted event.
fn job_id(c: &Collected) -> String {
    match c.events.first().and_then(|e| e.event.as_ref()) {
        Some(Event::Accepted(a)) => a.job_id.clone(),
        other => panic!("the first event is not Accepted: {other:?} (status {:?})", c.status),
    }
}

/// Every PNG frame of a job, decoded to RGB8.
fn png_frames(c: &Collected, frames: u32) -> Vec<Vec<u8>> {
    (0..frames)
        .map(|i| {
            let bytes = c.file(i);
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a PNG");
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            buf
        })
        .collect()
}

async fn ok(server: &Server, client: &mut TesseraClient<Channel>, req: GenerateRequest, workers: &[&Worker]) -> Collected {
    let c = generate(client, req).await;
    if let Some(s) = &c.status {
        let logs: Vec<String> = workers.iter().map(|w| format!("--- {}:\n{}", w.id, w.log())).collect();
        panic!("the job failed: {s:?}\ncoordinator:\n{}\n{}", server.log(), logs.join("\n"));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_give_the_frames_of_one_and_a_late_joiner_is_used() {
    let Some((etcd, server)) = cluster("same-frames", &[]).await else { return };
    let mut client = server.client().await;
    let w0 = Worker::start(&etcd, "same-frames", "w0");
    wait_idle(&mut client, &["w0"], &[&w0]).await;

    let one = ok(&server, &mut client, request(OutputFormat::PngFrames), &[&w0]).await;
    let id = job_id(&one);
    let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: id }).await.unwrap().into_inner();
    assert_eq!(job.plan.as_ref().unwrap().worker_ids, ["w0"]);

    // Two workers join later: the next job uses all three.
    let w1 = Worker::start(&etcd, "same-frames", "w1");
    let w2 = Worker::start(&etcd, "same-frames", "w2");
    let all = [&w0, &w1, &w2];
    wait_idle(&mut client, &["w0", "w1", "w2"], &all).await;
    let three = ok(&server, &mut client, request(OutputFormat::PngFrames), &all).await;
    let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: job_id(&three) }).await.unwrap().into_inner();
    let plan = job.plan.unwrap();
    assert_eq!(plan.worker_ids, ["w0", "w1", "w2"], "the late joiners take part");
    assert_eq!((plan.ranks, plan.ring * plan.ulysses), (3, 3));

    // Same frames within float32 tolerance: 8-bit frames at most one level apart.
    let (a, b) = (png_frames(&one, 9), png_frames(&three, 9));
    let mut worst = 0u8;
    for (fa, fb) in a.iter().zip(&b) {
        assert_eq!(fa.len(), 96 * 64 * 3);
        worst = worst.max(fa.iter().zip(fb).map(|(x, y)| x.abs_diff(*y)).max().unwrap());
    }
    eprintln!("1 worker vs 3 workers: largest difference {worst} levels of 255");
    assert!(worst <= 1, "1 and 3 workers differ by {worst} levels");

    // An MP4 from the three workers that ffprobe decodes with the requested frames and size.
    let mp4 = ok(&server, &mut client, request(OutputFormat::Mp4), &all).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.mp4");
    std::fs::write(&path, mp4.file(0)).unwrap();
    let stream = common::probe(&path, &[]);
    assert_eq!((stream["width"].as_u64(), stream["height"].as_u64()), (Some(96), Some(64)));
    assert_eq!(stream["nb_read_frames"].as_str(), Some("9"));
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_ends_its_job_promptly_and_the_rest_go_on() {
    let Some((etcd, server)) = cluster("kill", &["--recover-attempts", "0"]).await else { return };
    let mut client = server.client().await;
    let mut workers = [Worker::start(&etcd, "kill", "k0"), Worker::start(&etcd, "kill", "k1"), Worker::start(&etcd, "kill", "k2")];
    wait_idle(&mut client, &["k0", "k1", "k2"], &workers.iter().collect::<Vec<_>>()).await;

    // A long job; once two steps are done, k1 is killed.
    let long = GenerateRequest { steps: 400, width: 128, height: 128, num_frames: 17, ..request(OutputFormat::Mp4) };
    let mut stream = client.generate(long).await.unwrap().into_inner();
    until_step(&mut stream, 2).await;
    let killed = Instant::now();
    workers[1].kill();
    let status = failure(&mut stream).await;
    let took = killed.elapsed();
    eprintln!("the job ended {took:?} after the kill: {status:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("worker k1 "), "the status names the killed worker first: {}", status.message());
    assert!(took < Duration::from_secs(10), "the job took {took:?} to end");

    // The coordinator goes on: once k1's lease lapses, the next job runs on k0 and k2.
    wait_idle(&mut client, &["k0", "k2"], &workers.iter().collect::<Vec<_>>()).await;
    let next = ok(&server, &mut client, request(OutputFormat::PngFrames), &workers.iter().collect::<Vec<_>>()).await;
    let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: job_id(&next) }).await.unwrap().into_inner();
    assert_eq!(job.plan.unwrap().worker_ids, ["k0", "k2"]);
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_frees_the_workers_and_video_to_video_runs_on_the_cluster() {
    let Some((etcd, server)) = cluster("cancel", &[]).await else { return };
    let mut client = server.client().await;
    let workers = [Worker::start(&etcd, "cancel", "c0"), Worker::start(&etcd, "cancel", "c1")];
    let refs: Vec<&Worker> = workers.iter().collect();
    wait_idle(&mut client, &["c0", "c1"], &refs).await;

    let long = GenerateRequest { steps: 400, width: 128, height: 128, num_frames: 17, ..request(OutputFormat::Mp4) };
    let mut stream = client.generate(long).await.unwrap().into_inner();
    let id = match stream.message().await.unwrap().and_then(|e| e.event) {
        Some(Event::Accepted(a)) => a.job_id,
        other => panic!("expected Accepted, got {other:?}"),
    };
    wait_job_state(&mut client, &id, JobState::Running, Duration::from_secs(30)).await;
    client.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap();
    let status = failure(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    // Both workers are idle again and take the next job.
    wait_idle(&mut client, &["c0", "c1"], &refs).await;

    // Video-to-video on the cluster, from a video the cluster made.
    let source = ok(&server, &mut client, request(OutputFormat::Mp4), &refs).await.file(0);
    let v2v = GenerateRequest { input_video: source, strength: Some(0.6), ..request(OutputFormat::PngFrames) };
    let out = ok(&server, &mut client, v2v, &refs).await;
    assert_eq!(png_frames(&out, 9).len(), 9);

    // Garbage as input video is refused before the job is accepted, naming the field.
    let garbage =
        GenerateRequest { input_video: b"\x00\x00\x00\x18ftypmp42 certainly not a video".to_vec(), strength: Some(0.5), ..request(OutputFormat::Mp4) };
    let Err(status) = client.generate(garbage).await else { panic!("garbage input video was accepted") };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("input_video"), "{}", status.message());
    drop(etcd);
}

/// The worker ids registered in etcd now.
async fn registered(etcd: &Etcd, cluster: &str) -> Vec<String> {
    use tessera_worker::membership::{EtcdMembership, Heartbeat, Membership};
    let m = EtcdMembership::connect(&etcd.endpoints(), cluster, Heartbeat::default()).await.unwrap();
    m.list().await.unwrap().workers.into_iter().map(|w| w.worker_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_its_job_finishes_and_its_lease_is_revoked() {
    let Some((etcd, server)) = cluster("drain", &["--recover-attempts", "0"]).await else { return };
    let mut client = server.client().await;
    // A slow heartbeat (lease TTL 6 s): a record gone within a second of the exit was revoked,
    // not left to lapse.
    let mut d0 = Worker::start_with(&etcd, "drain", "d0", &["--heartbeat", "2s", "--grace-period", "30s"]);
    let d1 = Worker::start(&etcd, "drain", "d1");
    wait_idle(&mut client, &["d0", "d1"], &[&d0, &d1]).await;

    let job = GenerateRequest { steps: 40, width: 128, height: 128, num_frames: 17, ..request(OutputFormat::Mp4) };
    let mut stream = client.generate(job).await.unwrap().into_inner();
    until_step(&mut stream, 2).await;
    d0.sigterm();
    // The job goes on to the end on both workers.
    let mut done = false;
    while let Some(e) = stream.message().await.unwrap_or_else(|s| panic!("the job failed while d0 drained: {s:?}\n{}", d0.log())) {
        done |= matches!(e.event, Some(Event::Done(_)));
    }
    assert!(done, "the job finished");
    let exited = d0.wait_exit(Duration::from_secs(30)).await.unwrap_or_else(|| panic!("d0 did not exit within its grace period:\n{}", d0.log()));
    eprintln!("d0 exited {exited:?} after the job's end");
    let log = d0.log();
    assert!(log.contains("membership lease revoked"), "{log}");
    let gone = Instant::now();
    while registered(&etcd, "drain").await.contains(&"d0".to_string()) {
        assert!(gone.elapsed() < Duration::from_secs(1), "d0's record outlived its exit: the lease was not revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_idle(&mut client, &["d1"], &[&d1]).await;

    // A job longer than the grace period: the worker leaves at the end of it, and the job (with
    // recovery off on this coordinator) fails.
    let mut d2 = Worker::start_with(&etcd, "drain", "d2", &["--grace-period", "1s"]);
    wait_idle(&mut client, &["d1", "d2"], &[&d1, &d2]).await;
    let long = GenerateRequest { steps: 400, width: 128, height: 128, num_frames: 17, ..request(OutputFormat::Mp4) };
    let mut stream = client.generate(long).await.unwrap().into_inner();
    until_step(&mut stream, 2).await;
    d2.sigterm();
    let exited = d2.wait_exit(Duration::from_secs(10)).await.unwrap_or_else(|| panic!("d2 did not exit:\n{}", d2.log()));
    eprintln!("d2 (grace 1 s) exited {exited:?} after SIGTERM");
    assert!(exited < Duration::from_secs(4), "{exited:?}");
    let status = failure(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(!registered(&etcd, "drain").await.contains(&"d2".to_string()));
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_the_job_span_and_every_workers_step_spans() {
    use tessera_telemetry::receiver::{TestReceiver, TraceTree};
    let Some(etcd) = Etcd::start().await else { return };
    let receiver = TestReceiver::start().unwrap();
    let otlp = receiver.endpoint();
    let mut server = Server::start_with(&["--etcd", &etcd.endpoint(), "--cluster", "trace", "--heartbeat", HEARTBEAT, "--otlp-endpoint", &otlp]);
    server.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let mut workers =
        [Worker::start_with(&etcd, "trace", "t0", &["--otlp-endpoint", &otlp]), Worker::start_with(&etcd, "trace", "t1", &["--otlp-endpoint", &otlp])];
    wait_idle(&mut client, &["t0", "t1"], &workers.iter().collect::<Vec<_>>()).await;

    // The caller's own trace context.
    let trace = format!("{:032x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() | 1);
    let caller = "00f067aa0ba902b7";
    let mut call = tonic::Request::new(request(OutputFormat::Mp4));
    call.metadata_mut().insert("traceparent", format!("00-{trace}-{caller}-01").parse().unwrap());
    let got = generate(&mut client, call).await;
    assert!(got.status.is_none(), "{:?}\n{}", got.status, server.log());

    // Every process flushes its spans when it stops.
    for w in &workers {
        w.sigterm();
    }
    for w in &mut workers {
        w.wait_exit(Duration::from_secs(30)).await.unwrap_or_else(|| panic!("{} did not exit:\n{}", w.id, w.log()));
    }
    server.sigterm();
    server.wait_exit(Duration::from_secs(30)).await.expect("the coordinator exits");
    let spans = receiver.spans();
    let tree = TraceTree::new(&spans, &trace);
    eprintln!("trace {trace}: {} spans: {:?}", tree.len(), tree.counts());

    let jobs = tree.named("job");
    assert_eq!(jobs.len(), 1, "{:?}", tree.counts());
    let job = jobs[0];
    assert_eq!((job.parent_span_id.as_str(), job.service_name.as_str()), (caller, "tessera-coordinator"));
    // The coordinator's step spans hang under the job; each worker's step spans under them.
    let coordinator_steps: Vec<_> = tree.named("step").into_iter().filter(|s| s.service_name == "tessera-coordinator").collect();
    assert_eq!(coordinator_steps.len(), 4, "{:?}", tree.counts());
    for s in &coordinator_steps {
        assert!(tree.descends_from(s, &job.span_id), "coordinator step {s:?} is outside the job");
    }
    for id in ["t0", "t1"] {
        let steps: Vec<_> = tree.named("step").into_iter().filter(|s| s.resource.get("tessera.worker_id").map(String::as_str) == Some(id)).collect();
        assert_eq!(steps.len(), 4, "worker {id}: {:?}", tree.counts());
        for s in &steps {
            assert_eq!(s.service_name, "tessera-worker");
            let parent = tree.parent(s).unwrap_or_else(|| panic!("worker {id}'s step has no parent in the trace"));
            assert_eq!((parent.name.as_str(), parent.service_name.as_str()), ("step", "tessera-coordinator"), "worker {id}'s step parent");
            assert_eq!(parent.attr("step"), s.attr("step"), "the same step");
            assert!(tree.descends_from(s, &job.span_id));
        }
        assert_eq!(tree.named("prepare_job").iter().filter(|s| s.resource.get("tessera.worker_id").map(String::as_str) == Some(id)).count(), 1, "{id}");
    }
    assert_eq!(
        tree.named("decode").iter().filter(|s| s.service_name == "tessera-worker").count(),
        2,
        "every rank takes part in the decode (the others hand their shares of the latent to rank 0)"
    );
    assert_eq!(tree.named("encode").len(), 1);
    drop(etcd);
}

/// Two coordinators share one worker: each sends a job at the same moment; both see the worker
/// idle, one wins it, the other is refused as busy, waits and runs after: both jobs succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_a_worker_without_losing_a_job() {
    let Some((etcd, first)) = cluster("shared", &[]).await else { return };
    let second = Server::start_with(&["--etcd", &etcd.endpoint(), "--cluster", "shared", "--heartbeat", HEARTBEAT]);
    second.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    let (mut c1, mut c2) = (first.client().await, second.client().await);
    let w = Worker::start(&etcd, "shared", "s0");
    wait_idle(&mut c1, &["s0"], &[&w]).await;
    wait_idle(&mut c2, &["s0"], &[&w]).await;
    for round in 0..3 {
        let req = GenerateRequest { steps: 6, ..request(OutputFormat::Mp4) };
        let (a, b) = tokio::join!(generate(&mut c1, req.clone()), generate(&mut c2, req));
        assert!(a.status.is_none() && b.status.is_none(), "round {round}: {:?} / {:?}\n{}\n{}\n{}", a.status, b.status, first.log(), second.log(), w.log());
        assert_eq!(a.file(0), b.file(0), "round {round}: the same request gives the same video on either coordinator");
    }
    let retries = first.log().matches("choosing again").count() + second.log().matches("choosing again").count();
    eprintln!("jobs that found the worker taken by the other coordinator and chose again: {retries}");
    drop(etcd);
}

/// `deploy/local-cluster.sh 2` (with this build's binaries) starts a working cluster: etcd, 2
/// workers and a coordinator on loopback, each with its own metrics port, talking mutual TLS
/// under a throwaway CA; SIGTERM stops it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_script_starts_a_working_cluster() {
    use std::io::{BufRead, BufReader};
    if Etcd::start().await.is_none() {
        return;
    }
    worker_binary();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_tessera")).parent().unwrap().to_path_buf();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh");
    // Worker i takes base+2i and base+2i+1, metrics on metrics+1+i, etcd its port and the next:
    // one run of 10 free ports holds them all, so that no two of them can be the same port.
    let base = etcd::free_ports_in_a_row(10);
    let (port, etcd_port, metrics) = (base + 4, base + 5, base + 7);
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("2")
        .env("TESSERA_BIN_DIR", &bin_dir)
        .env("TESSERA_PORT", port.to_string())
        .env("TESSERA_WORKER_BASE_PORT", base.to_string())
        .env("TESSERA_ETCD_PORT", etcd_port.to_string())
        .env("TESSERA_METRICS_BASE_PORT", metrics.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bash runs the script");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut mutual_tls = false;
    loop {
        let line = lines.next().expect("the script printed its addresses").unwrap();
        eprintln!("{line}");
        mutual_tls |= line.starts_with("mutual TLS between the coordinator, the workers and etcd");
        if line.starts_with("coordinator on") {
            break;
        }
    }
    assert!(mutual_tls, "the script runs the internal API and etcd over mutual TLS by default");
    std::thread::spawn(move || lines.for_each(|l| eprintln!("{}", l.unwrap_or_default())));
    let addr = format!("http://127.0.0.1:{port}");
    let mut client = loop {
        if let Ok(c) = TesseraClient::connect(addr.clone()).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_idle(&mut client, &["worker-0", "worker-1"], &[]).await;
    let got = generate(&mut client, request(OutputFormat::Mp4)).await;
    assert!(got.status.is_none(), "{:?}", got.status);
    let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: job_id(&got) }).await.unwrap().into_inner();
    assert_eq!(job.plan.unwrap().worker_ids, ["worker-0", "worker-1"]);

    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let stopped = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(stopped.elapsed() < Duration::from_secs(30), "the script did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everything it started is gone: the coordinator's port no longer answers.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "the coordinator outlived the script");
}

/// With `--recover-attempts 1`, a job whose worker is killed mid-run goes on from its last
/// checkpoint on the workers left, once no replacement came within `--recover-wait`, and its
/// frames are those of an undisturbed run (within a level: another plan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_recovers_from_a_killed_worker_on_the_workers_left() {
    let Some(etcd) = Etcd::start().await else { return };
    let server = Server::start_with(&[
        "--etcd",
        &etcd.endpoint(),
        "--cluster",
        "recover",
        "--heartbeat",
        HEARTBEAT,
        "--recover-attempts",
        "1",
        "--checkpoint-every",
        "1",
        "--recover-wait",
        "1s",
    ]);
    server.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let mut workers = [Worker::start(&etcd, "recover", "r0"), Worker::start(&etcd, "recover", "r1"), Worker::start(&etcd, "recover", "r2")];
    wait_idle(&mut client, &["r0", "r1", "r2"], &workers.iter().collect::<Vec<_>>()).await;
    // Long enough (about 2 s alone) that the poll below sees it running past step 3 even when the
    // other tests load both cores.
    let req = GenerateRequest { steps: 120, width: 128, height: 128, num_frames: 9, ..request(OutputFormat::PngFrames) };

    // Undisturbed, on all three.
    let undisturbed = ok(&server, &mut client, req.clone(), &workers.iter().collect::<Vec<_>>()).await;
    wait_idle(&mut client, &["r0", "r1", "r2"], &workers.iter().collect::<Vec<_>>()).await;

    // The same job; r1 is killed after step 3.
    let mut call = client.clone();
    let job = tokio::spawn(async move { generate(&mut call, req).await });
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = client.list_jobs(tessera_proto::v1::ListJobsRequest { states: Vec::new(), limit: 1 }).await.unwrap().into_inner().jobs;
        if jobs.first().and_then(|j| j.progress.as_ref()).is_some_and(|p| p.step >= 3 && j_running(&jobs[0])) {
            break;
        }
        let first_job = job_id(&undisturbed);
        if jobs.first().is_some_and(|j| j.job_id != first_job && (j.state == JobState::Succeeded as i32 || j.state == JobState::Failed as i32)) {
            panic!("the second job ended before it could be disturbed: {:?}", jobs[0].state);
        }
        assert!(Instant::now() < until, "the second job never reached step 3");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers[1].kill();
    let recovered = job.await.unwrap();
    assert!(recovered.status.is_none(), "the job did not recover: {:?}\n{}", recovered.status, server.log());
    let record = client.get_job(tessera_proto::v1::GetJobRequest { job_id: job_id(&recovered) }).await.unwrap().into_inner();
    assert_eq!(record.plan.unwrap().worker_ids, ["r0", "r2"], "the job finished on the workers left");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("recovering on a new group")).unwrap_or_else(|| panic!("no recovery in the log:\n{log}"));
    let from: u32 =
        line.split("from_step=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("from_step in the recovery line");
    eprintln!("resumed from the checkpoint after step {from}");
    assert!(from >= 3, "the job restarted instead of resuming: {line}");
    assert!(log.contains("no group of the job's plan came in time"), "the job did not wait for its plan's group first:\n{log}");
    let (a, b) = (png_frames(&undisturbed, 9), png_frames(&recovered, 9));
    let worst = a.iter().zip(&b).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)).max().unwrap()).max().unwrap();
    eprintln!("recovered run vs undisturbed run: largest difference {worst} levels");
    assert!(worst <= 1, "the recovered job's frames differ by {worst} levels");
    drop(etcd);
}

fn j_running(j: &tessera_proto::v1::Job) -> bool {
    j.state == JobState::Running as i32
}

/// PEM files of a throwaway CA and certificates it signed for 127.0.0.1 (one per name), written
/// under `dir` as `{name}.crt` / `{name}.key`, the CA as `ca.crt`.
fn certificates(dir: &std::path::Path, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// `--tls-cert`, `--tls-key`, `--tls-ca` for `name`'s certificate under `dir`.
fn tls_flags(dir: &std::path::Path, name: &str, ca_dir: &std::path::Path) -> Vec<String> {
    let path = |p: std::path::PathBuf| p.display().to_string();
    vec![
        "--tls-cert".into(),
        path(dir.join(format!("{name}.crt"))),
        "--tls-key".into(),
        path(dir.join(format!("{name}.key"))),
        "--tls-ca".into(),
        path(ca_dir.join("ca.crt")),
    ]
}

/// With `--tls-*` on both sides, the coordinator drives its workers over mutual TLS; a client
/// without a certificate, or with one another CA signed, cannot reach a worker's internal API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_api_runs_over_mutual_tls() {
    let Some(etcd) = Etcd::start().await else { return };
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(ours.path(), &["coordinator", "w0"]);
    certificates(theirs.path(), &["stranger"]);
    let coordinator_tls = tls_flags(ours.path(), "coordinator", ours.path());
    let mut flags = vec!["--etcd", &etcd.endpoint(), "--cluster", "mtls", "--heartbeat", HEARTBEAT, "--step-timeout", "60s"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    flags.extend(coordinator_tls);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start_with(&flags);
    server.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    let worker_tls = tls_flags(ours.path(), "w0", ours.path());
    let w0 = Worker::start_with(&etcd, "mtls", "w0", &worker_tls.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = server.client().await;
    wait_idle(&mut client, &["w0"], &[&w0]).await;
    let done = ok(&server, &mut client, request(OutputFormat::PngFrames), &[&w0]).await;
    assert_eq!(png_frames(&done, 9).len(), 9);

    // The worker's internal port, reached by others.
    let address = client.list_workers(ListWorkersRequest::default()).await.unwrap().into_inner().workers[0].address.clone();
    let describe = |tls: Option<tonic::transport::ClientTlsConfig>| {
        let address = address.clone();
        async move {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}")).unwrap().connect_timeout(Duration::from_secs(5));
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).unwrap();
            }
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut c = tessera_proto::worker::v1::shard_worker_client::ShardWorkerClient::new(channel);
            c.describe(tessera_proto::worker::v1::DescribeRequest {}).await.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    let pem = |dir: &tempfile::TempDir, file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let ca = tonic::transport::Certificate::from_pem(pem(&ours, "ca.crt"));
    let with = |dir: &tempfile::TempDir, name: &str| {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(tonic::transport::Identity::from_pem(pem(dir, &format!("{name}.crt")), pem(dir, &format!("{name}.key"))))
    };
    assert!(describe(Some(with(&ours, "coordinator"))).await.is_ok(), "a certificate of the cluster's CA is let in");
    assert!(describe(None).await.is_err(), "plain HTTP/2 reached a mutual-TLS worker");
    assert!(describe(Some(tonic::transport::ClientTlsConfig::new().ca_certificate(ca.clone()))).await.is_err(), "no client certificate, let in");
    assert!(describe(Some(with(&theirs, "stranger"))).await.is_err(), "another CA's certificate, let in");
}

/// etcd over TLS that requires client certificates: the coordinator and a worker connect with
/// certificates of the cluster's CA (`--etcd-ca --etcd-cert --etcd-key`) and a job runs; over
/// plain HTTP, or without a client certificate, etcd is out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_runs_over_tls_with_client_certificates() {
    use tessera_cluster::membership::{EtcdMembership, Heartbeat};
    use tessera_cluster::tls::EtcdTlsArgs;
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path(), &["etcd", "coordinator", "w0"]);
    let file = |f: &str| Some(certs.path().join(f));
    let probe = EtcdTlsArgs { etcd_ca: file("ca.crt"), etcd_cert: file("coordinator.crt"), etcd_key: file("coordinator.key") }.load().unwrap().unwrap();
    let Some(etcd) = Etcd::start_tls(certs.path(), probe).await else { return };
    let path = |f: String| certs.path().join(f).display().to_string();
    let etcd_flags = |name: &str| {
        vec![
            "--etcd-ca".to_string(),
            path("ca.crt".into()),
            "--etcd-cert".into(),
            path(format!("{name}.crt")),
            "--etcd-key".into(),
            path(format!("{name}.key")),
        ]
    };
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let mut flags: Vec<String> = ["--etcd", &endpoint, "--cluster", "etcdtls", "--heartbeat", HEARTBEAT, "--step-timeout", "60s"].map(String::from).to_vec();
    flags.extend(etcd_flags("coordinator"));
    let server = Server::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    server.wait_health(tonic_health::pb::health_check_response::ServingStatus::Serving, Duration::from_secs(30)).await;
    let w0_flags = etcd_flags("w0");
    let w0 = Worker::start_with(&etcd, "etcdtls", "w0", &w0_flags.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = server.client().await;
    wait_idle(&mut client, &["w0"], &[&w0]).await;
    let done = ok(&server, &mut client, request(OutputFormat::PngFrames), &[&w0]).await;
    assert_eq!(png_frames(&done, 9).len(), 9);

    let hb = Heartbeat::default();
    let plain = [endpoint.replacen("https://", "http://", 1)];
    assert!(EtcdMembership::connect(&plain, "etcdtls", hb).await.is_err(), "plain HTTP reached a TLS etcd");
    let anonymous = EtcdTlsArgs { etcd_ca: file("ca.crt"), ..Default::default() }.load().unwrap();
    assert!(EtcdMembership::connect_tls(&etcd.endpoints(), "etcdtls", hb, anonymous).await.is_err(), "no client certificate, let in");
    assert!(EtcdMembership::connect(&etcd.endpoints(), "etcdtls", hb).await.is_err(), "an https endpoint without --etcd-ca is refused");
}
