//! Traces of `tessera serve` child processes exported over real OTLP/gRPC to an in-process
//! receiver: a job called with a `traceparent` is one trace from the caller's span through the
//! `job` span to every `step`, the in-process worker's own `step` (and its `forward`) under it,
//! `decode` and `encode`; the `tessera generate --server` client roots the trace itself, also
//! across two in-process workers; the sampling ratio applies to new traces only, a caller's
//! decision is followed.

mod common;

use common::server::{generate, small_request, Server};
use std::time::Duration;
use tessera_proto::v1::generate_event::Event;
use tessera_telemetry::receiver::{ReceivedSpan, TestReceiver, TraceTree};

/// Stops the server with SIGTERM (so it flushes its spans) and returns everything it exported.
async fn stop_and_collect(mut server: Server, receiver: &TestReceiver) -> Vec<ReceivedSpan> {
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", server.log()));
    assert!(status.success(), "{status:?}\n{}", server.log());
    // The exporter's last batch left before the process exited.
    receiver.spans()
}

/// A `traceparent` of the test's own: a fresh trace id and a caller span id.
fn caller_context(salt: u64) -> (String, String) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    (format!("{:016x}{:016x}", t, salt ^ 0x9e37_79b9_7f4a_7c15), format!("{:016x}", salt.wrapping_mul(0x5851_f42d_4c95_7f2d) | 1))
}

/// The coordinator's `step` spans (they carry the step count) and the workers' (they carry the
/// rank): in-process workers export under the coordinator's service name.
fn steps<'a>(tree: &TraceTree<'a>) -> (Vec<&'a ReceivedSpan>, Vec<&'a ReceivedSpan>) {
    tree.named("step").into_iter().partition(|s| s.attr("total").is_some())
}

fn job_id(events: &[tessera_proto::v1::GenerateEvent]) -> String {
    match &events[0].event {
        Some(Event::Accepted(a)) => a.job_id.clone(),
        e => panic!("first event {e:?}"),
    }
}

#[tokio::test]
async fn a_job_is_one_trace_from_the_callers_span_to_its_steps_decode_and_encode() {
    let receiver = TestReceiver::start().unwrap();
    let server = Server::start_serving(&["--otlp-endpoint", &receiver.endpoint()]).await;
    let mut client = server.client().await;
    let (trace, caller) = caller_context(1);
    let mut request = tonic::Request::new(small_request(5));
    request.metadata_mut().insert("traceparent", format!("00-{trace}-{caller}-01").parse().unwrap());
    let got = generate(&mut client, request).await;
    assert!(got.status.is_none(), "{:?}\n{}", got.status, server.log());
    let id = job_id(&got.events);
    let log = server.log();
    let spans = stop_and_collect(server, &receiver).await;

    let tree = TraceTree::new(&spans, &trace);
    eprintln!("trace {trace}: {} spans: {:?}", tree.len(), tree.counts());
    let jobs = tree.named("job");
    assert_eq!(jobs.len(), 1, "{spans:#?}\n{log}");
    let job = jobs[0];
    assert_eq!(job.parent_span_id, caller, "the job's parent is the caller's span");
    assert_eq!(job.service_name, "tessera-coordinator");
    assert_eq!((job.attr("job_id"), job.attr("model"), job.attr("tokens"), job.attr("steps")), (Some(id.as_str()), Some("tiny"), Some("72"), Some("4")));
    let (coordinator_steps, worker_steps) = steps(&tree);
    assert_eq!(coordinator_steps.iter().map(|s| s.attr("step").unwrap_or("?")).collect::<Vec<_>>(), ["0", "1", "2", "3"], "one step span per step");
    for s in &coordinator_steps {
        assert_eq!(s.parent_span_id, job.span_id, "step {:?} is not a child of the job", s.attr("step"));
    }
    assert_eq!(worker_steps.len(), 4, "the worker's step spans: {:?}", tree.counts());
    for s in &worker_steps {
        let parent = tree.parent(s).expect("the worker step's parent was exported");
        assert_eq!((parent.name.as_str(), parent.attr("step")), ("step", s.attr("step")), "the worker's step hangs under the coordinator's");
        let forwards: Vec<_> = tree.named("forward").into_iter().filter(|f| tree.descends_from(f, &s.span_id)).collect();
        assert_eq!(forwards.len(), 1, "one forward (a batch of two with guidance) per step");
        assert_eq!(forwards[0].attr("batch"), Some("2"));
    }
    for name in ["queued", "prepare", "encode"] {
        let found = tree.named(name);
        assert_eq!(found.len(), 1, "{name}: {:?}", tree.counts());
        assert_eq!(found[0].parent_span_id, job.span_id, "{name} is a child of the job");
    }
    let prepare_job = tree.named("prepare_job");
    assert_eq!(prepare_job.len(), 1, "{:?}", tree.counts());
    assert!(tree.descends_from(prepare_job[0], &tree.named("prepare")[0].span_id), "the worker prepares under the coordinator's prepare");
    // The coordinator's decode phase, and the worker's (rank 0) decode under it.
    let (decode, worker_decode): (Vec<_>, Vec<_>) = tree.named("decode").into_iter().partition(|d| d.parent_span_id == job.span_id);
    assert_eq!((decode.len(), worker_decode.len()), (1, 1), "{:?}", tree.counts());
    assert!(tree.descends_from(worker_decode[0], &decode[0].span_id), "the worker decodes under the coordinator's decode");
    assert!(decode[0].end_unix_nano <= tree.named("encode")[0].start_unix_nano + 1_000_000, "encode completes after decode");
    assert!(spans.iter().all(|s| s.service_name == "tessera-coordinator"));
    let stray: Vec<_> = spans.iter().filter(|s| s.trace_id != trace).map(|s| &s.name).collect();
    assert!(stray.is_empty(), "the server exported spans outside the job's trace: {stray:?}");
    println!("spans per job at the default level (1 worker, 4 steps): {} {:?}", tree.len(), tree.counts());
}

#[tokio::test]
async fn the_cli_client_roots_the_trace_and_every_worker_joins_it() {
    let receiver = TestReceiver::start().unwrap();
    let server = Server::start_serving(&["--otlp-endpoint", &receiver.endpoint(), "--workers", "2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "generate",
            "--server",
            &server.addr,
            "--prompt",
            "a red ball",
            "--width",
            "96",
            "--height",
            "64",
            "--frames",
            "9",
            "--steps",
            "3",
            "--seed",
            "2",
            "--quiet",
        ])
        .arg("-o")
        .arg(dir.path().join("v.mp4"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let trace = stderr.lines().find_map(|l| l.strip_prefix("trace ")).unwrap_or_else(|| panic!("no trace id printed:\n{stderr}")).to_string();
    let spans = stop_and_collect(server, &receiver).await;

    let tree = TraceTree::new(&spans, &trace);
    eprintln!("trace {trace}: {} spans: {:?}", tree.len(), tree.counts());
    let root = tree.named("generate");
    assert_eq!(root.len(), 1, "the client exported its span: {:?}", tree.counts());
    assert_eq!((root[0].service_name.as_str(), root[0].parent_span_id.as_str()), ("tessera-client", ""), "the client's span is the root");
    let job = tree.named("job")[0];
    assert_eq!(job.parent_span_id, root[0].span_id);
    // Two in-process workers: each runs every step under the coordinator's step span.
    let forwards = tree.named("forward");
    assert_eq!(forwards.len(), 2 * 3, "a forward per worker per step");
    for rank in ["0", "1"] {
        let mine: Vec<_> = forwards.iter().filter(|f| f.attr("rank") == Some(rank)).collect();
        assert_eq!(mine.len(), 3, "rank {rank}");
        for f in mine {
            let step = tree.parent(f).expect("the forward's parent was exported");
            assert_eq!((step.name.as_str(), step.attr("rank")), ("step", Some(rank)), "the worker's step span");
            let coordinator_step = tree.parent(step).expect("the worker step's parent was exported");
            assert_eq!((coordinator_step.name.as_str(), coordinator_step.attr("step")), ("step", step.attr("step")));
            assert!(tree.descends_from(step, &job.span_id));
            assert_eq!((f.attr("ranks"), f.attr("tokens")), (Some("2"), Some("36")));
            assert!(f.attr("bytes_sent").and_then(|b| b.parse::<u64>().ok()).is_some_and(|b| b > 0), "the forward's collectives moved bytes: {f:?}");
            let gathers: Vec<_> = tree.named("all_gather").into_iter().filter(|g| g.parent_span_id == f.span_id).collect();
            assert!(gathers.is_empty(), "each rank keeps its share of the velocity: nothing is gathered in a step");
        }
    }
    assert!(tree.named("ring_attention").is_empty(), "per-layer collectives are DEBUG spans");
    println!("spans per job at the default level (2 workers, 3 steps, client span included): {} {:?}", tree.len(), tree.counts());
}

#[tokio::test]
async fn the_sample_ratio_applies_to_new_traces_and_a_callers_decision_is_kept() {
    let receiver = TestReceiver::start().unwrap();
    let server = Server::start_serving(&["--otlp-endpoint", &receiver.endpoint(), "--trace-sample-ratio", "0"]).await;
    let mut client = server.client().await;
    let run = |flags: Option<&'static str>, salt: u64| {
        let mut client = client.clone();
        async move {
            let (trace, caller) = caller_context(salt);
            let mut request = tonic::Request::new(small_request(salt));
            if let Some(f) = flags {
                request.metadata_mut().insert("traceparent", format!("00-{trace}-{caller}-{f}").parse().unwrap());
            }
            let got = generate(&mut client, request).await;
            assert!(got.status.is_none(), "{:?}", got.status);
            trace
        }
    };
    let _unparented = run(None, 11).await;
    let unsampled = run(Some("00"), 12).await;
    let sampled = run(Some("01"), 13).await;
    // A sampled job that fails (its deadline passes): its span says so.
    let (failed, caller) = caller_context(14);
    let mut request = tonic::Request::new(small_request(14));
    request.metadata_mut().insert("traceparent", format!("00-{failed}-{caller}-01").parse().unwrap());
    request.metadata_mut().insert("grpc-timeout", "1m".parse().unwrap());
    let got = generate(&mut client, request).await;
    assert!(got.status.is_some(), "the 1 ms deadline passed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans = stop_and_collect(server, &receiver).await;
    let traces: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces, [sampled.as_str(), failed.as_str()].into(), "only the caller-sampled jobs were recorded (not {unsampled})");
    let ok = TraceTree::new(&spans, &sampled);
    assert_eq!(steps(&ok).0.len(), 4);
    assert!(spans.iter().filter(|s| s.trace_id == sampled).all(|s| s.error.is_none()));
    let job = TraceTree::new(&spans, &failed).named("job")[0].clone();
    assert!(job.error.as_deref().is_some_and(|e| e.to_lowercase().contains("deadline")), "the failed job's span has status ERROR: {job:?}");
}
