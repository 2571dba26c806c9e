//! Two real `tessera-worker serve` processes exporting spans over OTLP/gRPC to an in-process
//! receiver, driven over gRPC as the coordinator drives them (PrepareJob, Step, Decode), each
//! request carrying the `trace_context` of this test's job span (the test exports it too): every
//! worker's `prepare_job`, `step` and `decode` spans are children of that span in its trace,
//! tagged with the worker's `service.name` and `tessera.worker_id`, and each rank's `forward`
//! runs under its step on the job thread.

mod common;

use common::client::{Client, SECRET};
use common::process::WorkerProcess;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};
use tessera_proto::worker::v1 as pb;
use tessera_telemetry::receiver::{TestReceiver, TraceTree};
use tessera_telemetry::{current_context_map, TelemetryArgs};
use tracing::Instrument;

/// A worker exporting its spans to `endpoint`.
fn start(id: &str, endpoint: &str) -> WorkerProcess {
    WorkerProcess::start(&["--worker-id", id, "--otlp-endpoint", endpoint])
}

/// SIGTERM, so the worker flushes its spans, then waits for it to exit.
async fn stop(mut w: WorkerProcess) {
    assert!(Command::new("kill").args(["-TERM", &w.child.id().to_string()]).status().unwrap().success());
    let until = Instant::now() + Duration::from_secs(30);
    while w.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "no exit after SIGTERM:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(w.child.wait().unwrap().success(), "{}", w.log());
}

const STEPS: u32 = 3;

/// PrepareJob on both ranks, every step on both, Decode on both, ReleaseJob; every request
/// carries `trace_context` (the current span's, as the coordinator's cluster executor sends it).
async fn drive(clients: &mut [Client], peers: &[String], job: &str) {
    let trace_context: HashMap<String, String> = current_context_map();
    assert!(trace_context.contains_key("traceparent"), "{trace_context:?}");
    let spec = pb::JobSpec {
        prompt: "a red ball".into(),
        width: 48,
        height: 32,
        num_frames: 9,
        steps: STEPS,
        guidance_scale: 5.0,
        seed: 3,
        spatial_factor: 8,
        temporal_factor: 4,
        ..Default::default()
    };
    let world = clients.len() as u32;
    let prepares = clients.iter().enumerate().map(|(rank, c)| {
        let req = pb::PrepareJobRequest {
            job_id: job.into(),
            rank: rank as u32,
            peers: peers.to_vec(),
            session: 9,
            spec: Some(pb::JobSpec { ranks: world, ulysses: 1, ..spec.clone() }),
            trace_context: trace_context.clone(),
            job_secret: SECRET.to_vec(),
            ..Default::default()
        };
        let mut c = c.clone();
        async move { c.prepare_job(req).await }
    });
    for r in futures_util::future::join_all(prepares).await {
        r.unwrap();
    }
    // A step out of order is refused; its span on that worker says why.
    let err = clients[0].clone().step(pb::StepRequest { job_id: job.into(), step: 1, trace_context: trace_context.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    for step in 0..STEPS {
        let steps = clients.iter().map(|c| {
            let mut c = c.clone();
            let trace_context = trace_context.clone();
            async move { c.step(pb::StepRequest { job_id: job.into(), step, trace_context }).await }
        });
        for r in futures_util::future::join_all(steps).await {
            r.unwrap();
        }
    }
    // Every rank is sent Decode (each decodes a band of rows); rank 0 joins them and sends the frames.
    let decodes = clients.iter().map(|c| {
        let mut c = c.clone();
        let trace_context = trace_context.clone();
        async move {
            let mut stream = c.decode(pb::DecodeRequest { job_id: job.into(), trace_context }).await.unwrap().into_inner();
            let mut frames = 0;
            while let Some(m) = stream.message().await.unwrap() {
                frames += m.count;
            }
            frames
        }
    });
    assert_eq!(futures_util::future::join_all(decodes).await, [9, 0]);
    for c in clients.iter_mut() {
        c.release_job(pb::ReleaseJobRequest { job_id: job.into() }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_workers_spans_join_the_coordinators_trace() {
    let receiver = TestReceiver::start().unwrap();
    let workers = [start("w0", &receiver.endpoint()), start("w1", &receiver.endpoint())];
    let mut clients = Vec::new();
    for w in &workers {
        clients.push(w.client().await);
    }
    let peers: Vec<String> = workers.iter().map(|w| w.collective.to_string()).collect();

    // This test stands in for the coordinator: its job span is exported to the same receiver.
    let guard = tessera_telemetry::init(
        "telemetry-test-coordinator",
        &TelemetryArgs { otlp_endpoint: Some(receiver.endpoint()), trace_sample_ratio: 1.0, ..Default::default() },
        &[],
    )
    .unwrap();
    let span = tracing::info_span!("job", job_id = "tj-1");
    let trace = tessera_telemetry::trace_id(&span).unwrap();
    drive(&mut clients, &peers, "tj-1").instrument(span).await;
    drop(guard);
    for w in workers {
        stop(w).await;
    }

    let spans = receiver.spans();
    let tree = TraceTree::new(&spans, &trace);
    eprintln!("trace {trace}: {} spans: {:?}", tree.len(), tree.counts());
    let job = tree.named("job");
    assert_eq!(job.len(), 1, "the test's job span was exported: {:?}", tree.counts());
    let job = job[0];
    assert_eq!(job.service_name, "telemetry-test-coordinator");
    for (rank, id) in ["w0", "w1"].iter().enumerate() {
        let mine =
            |name: &str| -> Vec<_> { tree.named(name).into_iter().filter(|s| s.resource.get("tessera.worker_id").map(String::as_str) == Some(*id)).collect() };
        let (failed, steps): (Vec<_>, Vec<_>) = mine("step").into_iter().partition(|s| s.error.is_some());
        if rank == 0 {
            assert_eq!(failed.len(), 1, "the refused step");
            assert!(failed[0].error.as_deref().is_some_and(|e| e.contains("step 0 is next")) && failed[0].attr("step") == Some("1"), "{:?}", failed[0]);
        } else {
            assert!(failed.is_empty(), "{failed:?}");
        }
        assert_eq!(steps.iter().map(|s| s.attr("step").unwrap()).collect::<Vec<_>>(), ["0", "1", "2"], "worker {id}: one step span per step");
        for s in &steps {
            assert_eq!(s.service_name, "tessera-worker");
            assert_eq!(s.parent_span_id, job.span_id, "worker {id}: the step's parent is the coordinator's span");
            assert_eq!((s.attr("job_id"), s.attr("rank")), (Some("tj-1"), Some(rank.to_string().as_str())));
            assert!(s.attr("bytes_sent").and_then(|b| b.parse::<u64>().ok()).is_some_and(|b| b > 0), "{s:?}");
            let forwards: Vec<_> = mine("forward").into_iter().filter(|f| f.parent_span_id == s.span_id).collect();
            assert_eq!(forwards.len(), 1, "worker {id}: the forward runs under its step (on the job thread)");
            assert_eq!(forwards[0].attr("rank"), Some(rank.to_string().as_str()));
        }
        let prepare = mine("prepare_job");
        assert_eq!(prepare.len(), 1, "worker {id}");
        assert_eq!((prepare[0].parent_span_id.as_str(), prepare[0].attr("rank")), (job.span_id.as_str(), Some(rank.to_string().as_str())));
        assert_eq!(mine("decode").len(), 1, "worker {id}: every rank takes part in the decode");
    }
    assert_eq!(tree.named("decode")[0].parent_span_id, job.span_id);
    let stray: Vec<_> = spans.iter().filter(|s| s.trace_id != trace).map(|s| (&s.service_name, &s.name)).collect();
    assert!(stray.is_empty(), "spans outside the job's trace: {stray:?}");
    println!("spans per job on 2 workers at the default level ({STEPS} steps): {} {:?}", tree.len() - 1, tree.counts());
}
