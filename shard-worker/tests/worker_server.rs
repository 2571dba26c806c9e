//! The shard worker's internal gRPC service with real sockets: 2 and 3 worker services on
//! loopback, driven like the coordinator drives them (PrepareJob on every rank at once, each Step on
//! every rank at once, Decode streamed from rank 0), must give the frames of the one-process
//! pipeline; misuse gets the right status codes. Workers running the bf16 model (its host
//! emulation: the GPU model's data flow and device-side strategies) give the one-process frames of
//! that model; a group mixing devices is refused.

mod common;

use common::client::{connect, connect_as, connect_with, Client, SECRET};
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::reason::Reason;
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::shard_worker_server::ShardWorkerServer;
use tessera_worker::model::DitModel;
use tessera_worker::pipeline::{FrameCollector, PipelinePreset, WanPipeline};
use tessera_worker::server::{params_from_spec, WorkerIdentity, WorkerService};
use tessera_worker::transformer_config::TransformerPreset;

/// Starts `n` workers (each with the same built-in pipeline); returns clients and collective addresses.
async fn start_workers(n: usize) -> (Vec<Client>, Vec<String>) {
    let pipe = Arc::new(PipelinePreset::Tiny.build(0).unwrap());
    start_workers_with(vec![pipe; n]).await
}

/// The built-in pipeline with the host emulation of the CUDA model as its transformer.
fn emulated_pipeline() -> WanPipeline {
    PipelinePreset::Tiny.build_with(0, DitModel::emulated_preset(TransformerPreset::Tiny, 0).unwrap()).unwrap()
}

/// Starts a worker per pipeline; returns clients and collective addresses.
async fn start_workers_with(pipes: Vec<Arc<WanPipeline>>) -> (Vec<Client>, Vec<String>) {
    let (addrs, collectives) = start_workers_at(pipes).await;
    let mut clients = Vec::new();
    for addr in &addrs {
        clients.push(connect(addr).await.unwrap());
    }
    (clients, collectives)
}

/// Starts a worker per pipeline; returns their gRPC and collective addresses.
async fn start_workers_at(pipes: Vec<Arc<WanPipeline>>) -> (Vec<String>, Vec<String>) {
    let (mut addrs, mut collectives) = (Vec::new(), Vec::new());
    for (i, pipe) in pipes.into_iter().enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collective_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let collective = collective_listener.local_addr().unwrap();
        let me = WorkerIdentity {
            worker_id: format!("w{i}"),
            model: "tiny".into(),
            address: addr.to_string(),
            collective,
            devices: vec!["cpu".into()],
            memory_bytes: 1 << 30,
            connect_timeout: Duration::from_secs(20),
            job_idle_timeout: Duration::from_secs(600),
            limits: tessera_worker::pipeline::limits::Limits::default(),
        };
        let svc = WorkerService::new(pipe.clone(), me, collective_listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ShardWorkerServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addrs.push(addr.to_string());
        collectives.push(collective.to_string());
    }
    (addrs, collectives)
}

/// Clients of every worker at `addrs` as the coordinator of `epoch`.
async fn clients_as(addrs: &[String], epoch: u64) -> Vec<Client> {
    let mut clients = Vec::new();
    for addr in addrs {
        clients.push(connect_as(addr, &SECRET, epoch).await.unwrap());
    }
    clients
}

/// The job every test runs, as the coordinator sends it (seed 5, Wan's factors).
fn request() -> pb::JobSpec {
    pb::JobSpec {
        prompt: "a red ball".into(),
        width: 48,
        height: 32,
        num_frames: 9,
        steps: 3,
        guidance_scale: 5.0,
        seed: 5,
        spatial_factor: 8,
        temporal_factor: 4,
        ..Default::default()
    }
}

async fn run_job(clients: &mut [Client], peers: &[String], ulysses: u32, job: &str) -> Vec<u8> {
    run_job_with(clients, peers, ulysses, false, job).await
}

/// [`run_job`], the ranks split into CFG halves when `cfg_parallel`.
async fn run_job_with(clients: &mut [Client], peers: &[String], ulysses: u32, cfg_parallel: bool, job: &str) -> Vec<u8> {
    prepare_all(clients, peers, ulysses, cfg_parallel, job).await;
    for step in 0..3 {
        for r in step_all(clients, job, step).await {
            assert_eq!(r.step, step);
            if clients.len() > 1 {
                assert!(r.bytes_sent > 0, "a sharded step moves bytes");
            }
        }
    }
    let rgb = decode_all(clients, job).await;
    for c in clients.iter_mut() {
        c.release_job(pb::ReleaseJobRequest { job_id: job.into() }).await.unwrap();
    }
    rgb
}

/// PrepareJob of [`request`] on every rank at once.
async fn prepare_all(clients: &mut [Client], peers: &[String], ulysses: u32, cfg_parallel: bool, job: &str) {
    let world = clients.len() as u32;
    let prepares = clients.iter_mut().enumerate().map(|(rank, c)| {
        let req = pb::PrepareJobRequest {
            job_id: job.into(),
            rank: rank as u32,
            peers: peers.to_vec(),
            session: 77,
            spec: Some(pb::JobSpec { ranks: world, ulysses, cfg_parallel, ..request() }),
            job_secret: SECRET.to_vec(),
            ..Default::default()
        };
        let mut c = c.clone();
        async move { c.prepare_job(req).await }
    });
    let ranges: Vec<_> = futures_util::future::join_all(prepares).await.into_iter().map(|r| r.unwrap().into_inner()).collect();
    assert_eq!(ranges.first().unwrap().token_start, 0);
    assert_eq!(ranges.last().unwrap().token_end, 3 * 2 * 3, "ranks cover every token (3 latent frames of 2x3 patches)");
}

/// Step `step` on every rank at once; their answers.
async fn step_all(clients: &[Client], job: &str, step: u32) -> Vec<pb::StepResponse> {
    let steps = clients.iter().map(|c| {
        let mut c = c.clone();
        async move { c.step(pb::StepRequest { job_id: job.into(), step, ..Default::default() }).await }
    });
    futures_util::future::join_all(steps).await.into_iter().map(|r| r.unwrap().into_inner()).collect()
}

/// Decode on every rank at once; rank 0's frames as interleaved RGB8.
async fn decode_all(clients: &[Client], job: &str) -> Vec<u8> {
    // Every rank is sent Decode: the latent gathers to rank 0, every rank decodes a band of rows,
    // and rank 0 joins the bands and alone sends frames.
    let decodes = clients.iter().map(|c| {
        let mut c = c.clone();
        async move {
            let mut stream = c.decode(pb::DecodeRequest { job_id: job.into(), ..Default::default() }).await.unwrap().into_inner();
            let (mut rgb, mut next) = (Vec::new(), 0);
            while let Some(m) = stream.message().await.unwrap() {
                assert_eq!(m.first_frame, next);
                assert_eq!((m.width, m.height), (48, 32));
                next += m.count;
                rgb.extend(m.rgb);
            }
            (next, rgb)
        }
    });
    let mut decoded = futures_util::future::join_all(decodes).await;
    assert!(decoded[1..].iter().all(|(n, _)| *n == 0), "only rank 0 sends frames");
    let (next, rgb) = decoded.swap_remove(0);
    assert_eq!(next, 9, "every frame decoded");
    rgb
}

/// A coordinator died having sent step 0 to rank 0 only, which waits in it for rank 1. A new
/// one learns at once where each rank stands (AdoptJob does not wait for the step), sends step 0
/// to both (rank 0 answers with the report of the step it ran), and goes on: the frames of an
/// undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_a_step_in_flight_is_adopted_where_it_stands() {
    let (mut clients, peers) = start_workers(2).await;
    let undisturbed = run_job(&mut clients, &peers, 1, "undisturbed").await;
    prepare_all(&mut clients, &peers, 1, false, "left").await;
    let mut rank0 = clients[0].clone();
    let orphan = tokio::spawn(async move { rank0.step(pb::StepRequest { job_id: "left".into(), step: 0, ..Default::default() }).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!orphan.is_finished(), "rank 0 waits for rank 1 in step 0");
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    for c in clients.iter_mut() {
        let a = c.adopt_job(pb::AdoptJobRequest { job_id: "left".into() }).await.unwrap().into_inner();
        answers.push((a.rank, a.steps_done, a.busy));
    }
    assert!(started.elapsed() < Duration::from_secs(2), "AdoptJob answered without waiting for the step: {:?}", started.elapsed());
    assert_eq!(answers, [(0, 0, 1), (1, 0, 0)], "rank 0 runs step 0, rank 1 is idle before it");
    let first = step_all(&clients, "left", 0).await;
    let orphan = orphan.await.unwrap().unwrap().into_inner();
    assert_eq!((first[0].seconds, first[0].bytes_sent), (orphan.seconds, orphan.bytes_sent), "rank 0 answers with the step it ran");
    for step in 1..3 {
        step_all(&clients, "left", step).await;
    }
    assert_eq!(decode_all(&clients, "left").await, undisturbed, "the adopted run's frames are the undisturbed run's");
}

/// A coordinator cut off from etcd lost the state store to a later one (a higher epoch), which
/// adopted its run. From then on every worker the later one has called refuses the earlier one
/// (SUPERSEDED), whatever it asks, before anything else is looked at; the run goes on
/// undisturbed under its new coordinator. A coordinator without a store (epoch 0) is not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_earlier_owner_of_the_store_is_fenced_out_by_a_later_one() {
    let pipe = Arc::new(PipelinePreset::Tiny.build(0).unwrap());
    let (addrs, peers) = start_workers_at(vec![pipe.clone(), pipe]).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (mut earlier, mut later) = (clients_as(&addrs, now - 60_000).await, clients_as(&addrs, now).await);
    let undisturbed = run_job(&mut earlier, &peers, 1, "undisturbed").await;
    prepare_all(&mut earlier, &peers, 1, false, "taken").await;
    step_all(&earlier, "taken", 0).await;
    for c in later.iter_mut() {
        assert_eq!(c.adopt_job(pb::AdoptJobRequest { job_id: "taken".into() }).await.unwrap().into_inner().steps_done, 1);
    }
    for c in earlier.iter_mut() {
        let refused = [
            c.step(pb::StepRequest { job_id: "taken".into(), step: 1, ..Default::default() }).await.unwrap_err(),
            c.checkpoint(pb::CheckpointRequest { job_id: "taken".into() }).await.unwrap_err(),
            c.release_job(pb::ReleaseJobRequest { job_id: "taken".into() }).await.unwrap_err(),
            c.adopt_job(pb::AdoptJobRequest { job_id: "taken".into() }).await.unwrap_err(),
            c.step(pb::StepRequest { job_id: "gone long ago".into(), step: 0, ..Default::default() }).await.unwrap_err(),
            c.prepare_job(pb::PrepareJobRequest { job_id: "another".into(), ..Default::default() }).await.unwrap_err(),
        ];
        for status in refused {
            assert!(tessera_proto::reason::has_reason(&status, Reason::Superseded), "{status:?}");
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        }
    }
    for step in 1..3 {
        step_all(&later, "taken", step).await;
    }
    assert_eq!(decode_all(&later, "taken").await, undisturbed, "the run goes on undisturbed under the later coordinator");
    for c in later.iter_mut() {
        c.release_job(pb::ReleaseJobRequest { job_id: "taken".into() }).await.unwrap();
    }
    let mut storeless = clients_as(&addrs, 0).await;
    assert_eq!(run_job(&mut storeless, &peers, 1, "no store").await, undisturbed, "epoch 0 is never fenced");
}

/// The one-process pipeline's frames as interleaved RGB8.
fn reference_rgb() -> Vec<u8> {
    rgb_of(&PipelinePreset::Tiny.build(0).unwrap())
}

/// `pipe`'s frames for [`request`] in one process, as interleaved RGB8.
fn rgb_of(pipe: &WanPipeline) -> Vec<u8> {
    let mut frames = FrameCollector::default();
    let spec = tessera_cluster::JobSpec::from_message(&request(), &tessera_cluster::limits::Limits::default()).unwrap();
    pipe.generate(&params_from_spec(&spec), &mut frames).unwrap();
    let t = frames.frames().unwrap();
    let (n, plane) = (t.dim(2), t.dim(3) * t.dim(4));
    (0..n)
        .flat_map(|f| (0..plane).flat_map(move |p| (0..3).map(move |c| (f, p, c))))
        .map(|(f, p, c)| (t.data()[(c * n + f) * plane + p].clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_over_grpc_and_tcp_compute_the_one_process_video() {
    let want = reference_rgb();
    // (workers, ulysses, CFG-parallel): ring, ring of 3, Ulysses, one guidance pass per worker,
    // and two halves of two Ulysses ranks
    for (n, ulysses, cfg) in [(2usize, 1u32, false), (3, 1, false), (2, 2, false), (2, 1, true), (4, 2, true)] {
        let (mut clients, peers) = start_workers(n).await;
        let got = run_job_with(&mut clients, &peers, ulysses, cfg, &format!("job-{n}-{ulysses}-{cfg}")).await;
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{n} workers (ulysses {ulysses}, cfg-parallel {cfg}): frames differ by up to {worst} levels from one process");
        // The workers are free again: a second job runs on the same group.
        let again = run_job_with(&mut clients, &peers, ulysses, cfg, "second").await;
        assert_eq!(again, got, "same request, same workers, same frames");
    }
}

/// The bf16 model's device-side strategies (host collectives in place of NCCL) through the worker
/// service, as a GPU group runs them: Ulysses alone gives the one-process frames exactly, a ring
/// within one level (its partial softmaxes are merged in f32 before the bf16 rounding).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_running_the_bf16_model_compute_its_one_process_video() {
    let pipe = Arc::new(emulated_pipeline());
    let want = rgb_of(&pipe);
    let (mut clients, peers) = start_workers_with(vec![pipe.clone(), pipe]).await;
    for (ulysses, levels) in [(2u32, 0u8), (1, 1)] {
        let got = run_job(&mut clients, &peers, ulysses, &format!("bf16-{ulysses}")).await;
        let worst = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= levels, "ulysses {ulysses}: frames differ by up to {worst} levels from one process");
    }
}

/// Ranks whose models run on different kinds of device are refused by name on every rank, and
/// the workers are free afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_mixing_devices_is_refused_on_every_rank() {
    let (mut clients, peers) = start_workers_with(vec![Arc::new(PipelinePreset::Tiny.build(0).unwrap()), Arc::new(emulated_pipeline())]).await;
    let prepares = clients.iter_mut().enumerate().map(|(rank, c)| {
        let req = pb::PrepareJobRequest {
            job_id: "mixed".into(),
            rank: rank as u32,
            peers: peers.clone(),
            session: 78,
            spec: Some(pb::JobSpec { ranks: 2, ulysses: 1, ..request() }),
            job_secret: SECRET.to_vec(),
            ..Default::default()
        };
        let mut c = c.clone();
        async move { c.prepare_job(req).await }
    });
    for r in futures_util::future::join_all(prepares).await {
        let err = r.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("rank 0 on the CPU (f32), rank 1 on the host emulation of the CUDA model"), "{err}");
    }
    for c in clients.iter_mut() {
        let d = c.describe(pb::DescribeRequest {}).await.unwrap().into_inner();
        assert_eq!(d.worker.unwrap().job_id, "", "the worker is free again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misuse_gets_clear_status_codes() {
    let (mut clients, peers) = start_workers(1).await;
    let c = &mut clients[0];
    let err = c.step(pb::StepRequest { job_id: "nope".into(), step: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let prepare = |job: &str, spec: pb::JobSpec| pb::PrepareJobRequest {
        job_id: job.into(),
        rank: 0,
        peers: peers.clone(),
        spec: Some(pb::JobSpec { ranks: 1, ulysses: 1, ..spec }),
        job_secret: SECRET.to_vec(),
        ..Default::default()
    };
    // Hostile sizes over the internal API are refused before anything is allocated, and the
    // worker goes on serving: a 1,048,576 x 1,048,576 latent, a token count past the budget,
    // sizes whose product overflows 64 bits, factors that would divide by zero.
    for (hostile, field) in [
        (pb::JobSpec { width: 8 << 20, height: 8 << 20, ..request() }, "spec.width"),
        (pb::JobSpec { width: 4096, height: 4096, num_frames: 1441, ..request() }, "spec.num_frames"),
        (pb::JobSpec { steps: u32::MAX, ..request() }, "spec.steps"),
        (pb::JobSpec { spatial_factor: 0, ..request() }, "spec.model_factors"),
        (pb::JobSpec { spatial_factor: 4, ..request() }, "spec.model_factors"),
    ] {
        let err = c.prepare_job(prepare("hostile", hostile)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert_eq!(tessera_proto::reason::failure(&err).and_then(|f| f.field).as_deref(), Some(field), "{err}");
    }
    let err = c.prepare_job(prepare("bad", pb::JobSpec { num_frames: 8, ..request() })).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("num_frames"), "{err}");
    // The reason and the field travel in the status details, for programs to act on.
    let why = tessera_proto::reason::failure(&err).expect("an ErrorInfo");
    assert_eq!((why.reason, why.field.as_deref()), (Reason::InvalidField, Some("spec.num_frames")));
    let err = c.prepare_job(pb::PrepareJobRequest { job_secret: Vec::new(), ..prepare("no-secret", request()) }).await.unwrap_err();
    assert_eq!(tessera_proto::reason::failure(&err).and_then(|f| f.field).as_deref(), Some("job_secret"), "{err}");
    c.prepare_job(prepare("a", request())).await.unwrap();
    // Whoever reaches the port without the job's secret can neither drive nor release the job.
    let addr = c.describe(pb::DescribeRequest {}).await.unwrap().into_inner().worker.unwrap().address;
    let mut impostor = connect_with(&addr, &[0xa5; 32]).await.unwrap();
    let mut anonymous = tessera_proto::worker::v1::shard_worker_client::ShardWorkerClient::connect(format!("http://{addr}")).await.unwrap();
    for err in [
        impostor.step(pb::StepRequest { job_id: "a".into(), step: 0, ..Default::default() }).await.unwrap_err(),
        impostor.release_job(pb::ReleaseJobRequest { job_id: "a".into() }).await.unwrap_err(),
        impostor.checkpoint(pb::CheckpointRequest { job_id: "a".into() }).await.unwrap_err(),
        impostor.fetch_latents(pb::FetchLatentsRequest { job_id: "a".into() }).await.unwrap_err(),
        anonymous.release_job(pb::ReleaseJobRequest { job_id: "a".into() }).await.unwrap_err(),
        anonymous.decode(pb::DecodeRequest { job_id: "a".into(), ..Default::default() }).await.unwrap_err(),
        impostor.adopt_job(pb::AdoptJobRequest { job_id: "a".into() }).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(tessera_proto::reason::has_reason(&err, Reason::PermissionDenied), "{err:?}");
    }
    let err = c.prepare_job(prepare("b", request())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "a busy worker refuses a second job: {err}");
    assert!(tessera_proto::reason::has_reason(&err, Reason::WorkerBusy), "{err:?}");
    let err = c.step(pb::StepRequest { job_id: "a".into(), step: 2, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("step 0 is next"), "{err}");
    // The secret's holder (a coordinator taking the job over) learns where the run stands.
    let ran = c.step(pb::StepRequest { job_id: "a".into(), step: 0, ..Default::default() }).await.unwrap().into_inner();
    let adopted = c.adopt_job(pb::AdoptJobRequest { job_id: "a".into() }).await.unwrap().into_inner();
    assert_eq!((adopted.rank, adopted.ranks, adopted.steps_done, adopted.total_steps, adopted.chunks_done, adopted.busy), (0, 1, 1, 3, 0, 0));
    // The step just run, asked again (a retry, or a new coordinator's first step after one its
    // predecessor sent), is answered with its report; an older one is refused.
    let again = c.step(pb::StepRequest { job_id: "a".into(), step: 0, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((again.seconds, again.bytes_sent), (ran.seconds, ran.bytes_sent), "the same step's report");
    let err = c.step(pb::StepRequest { job_id: "a".into(), step: 2, ..Default::default() }).await.unwrap_err();
    assert!(err.message().contains("step 1 is next"), "{err}");
    let err = c.decode(pb::DecodeRequest { job_id: "a".into(), ..Default::default() }).await.unwrap().into_inner().message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "decode before the last step: {err}");
    let d = c.describe(pb::DescribeRequest {}).await.unwrap().into_inner();
    assert_eq!(d.worker.unwrap().job_id, "a");
}

/// A job released while its rank still waits for the other ranks is abandoned at once (not after
/// the connect timeout), and the worker takes the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releasing_a_job_that_is_still_joining_frees_the_worker_at_once() {
    let (mut clients, peers) = start_workers(2).await;
    let waiting = {
        let mut c = clients[0].clone();
        let req = pb::PrepareJobRequest {
            job_id: "lonely".into(),
            rank: 0,
            peers: peers.clone(),
            session: 9,
            spec: Some(pb::JobSpec { ranks: 2, ulysses: 1, ..request() }),
            job_secret: SECRET.to_vec(),
            ..Default::default()
        };
        tokio::spawn(async move { c.prepare_job(req).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While it joins, the worker is taken.
    let second = pb::PrepareJobRequest {
        job_id: "other".into(),
        rank: 0,
        peers: vec![peers[0].clone()],
        session: 10,
        spec: Some(pb::JobSpec { ranks: 1, ulysses: 1, ..request() }),
        job_secret: SECRET.to_vec(),
        ..Default::default()
    };
    let err = clients[0].prepare_job(second).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let released = std::time::Instant::now();
    clients[0].release_job(pb::ReleaseJobRequest { job_id: "lonely".into() }).await.unwrap();
    let status = waiting.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status}");
    assert!(released.elapsed() < Duration::from_secs(5), "the joining ended {:?} after the release (connect timeout 20 s)", released.elapsed());
    // The worker (and its collective port) is free for the next job.
    let video = run_job(&mut clients, &peers, 1, "next").await;
    assert!(!video.is_empty());
}

/// A caller that hangs up while its rank still waits for the others (here: its deadline passes)
/// frees the worker: the joining is abandoned and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_hanging_up_during_prepare_frees_the_worker() {
    let (mut clients, peers) = start_workers(2).await;
    let req = pb::PrepareJobRequest {
        job_id: "abandoned".into(),
        rank: 0,
        peers: peers.clone(),
        session: 11,
        spec: Some(pb::JobSpec { ranks: 2, ulysses: 1, ..request() }),
        job_secret: SECRET.to_vec(),
        ..Default::default()
    };
    let mut call = tonic::Request::new(req);
    call.set_timeout(Duration::from_millis(300));
    let err = clients[0].prepare_job(call).await.unwrap_err();
    assert!(matches!(err.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{err}");
    // The worker soon takes a new job (no ReleaseJob was sent).
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = clients[0].describe(pb::DescribeRequest {}).await.unwrap().into_inner();
        if d.worker.unwrap().job_id.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < until, "the abandoned job still holds the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let video = run_job(&mut clients, &peers, 1, "after").await;
    assert!(!video.is_empty());
}

/// Rank 0's worker makes a GPU group's NCCL unique id: 128 fresh bytes per call where libnccl.so
/// is on the library path (CI must have it), FAILED_PRECONDITION naming the library where not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_nccl_id_makes_a_fresh_id_or_names_the_missing_library() {
    let (mut clients, _) = start_workers(1).await;
    let ask = |job: &str| pb::CreateNcclIdRequest { job_id: job.into() };
    if !tessera_kernels::cuda::nccl::nccl_available() {
        assert!(std::env::var_os("CI").is_none(), "CI must provide libnccl.so (see .ci/run)");
        eprintln!("libnccl.so is not on the library path: checking the refusal only");
        let err = clients[0].create_nccl_id(ask("g")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("libnccl.so"), "{err}");
        return;
    }
    let a = clients[0].create_nccl_id(ask("g1")).await.unwrap().into_inner().nccl_unique_id;
    let b = clients[0].create_nccl_id(ask("g2")).await.unwrap().into_inner().nccl_unique_id;
    assert_eq!((a.len(), b.len()), (128, 128));
    assert_ne!(a, b, "every group gets its own id");
    assert!(tessera_kernels::cuda::nccl::NcclId::from_bytes(&a).is_ok());
}

/// A PrepareJob whose NCCL id is not an id's 128 bytes is refused naming the field, before the
/// worker is claimed: the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_nccl_id_is_refused_and_leaves_the_worker_free() {
    let (mut clients, peers) = start_workers(1).await;
    let bad = pb::PrepareJobRequest {
        job_id: "bad-id".into(),
        rank: 0,
        peers: peers.clone(),
        session: 12,
        nccl_unique_id: vec![1, 2, 3, 4, 5],
        spec: Some(pb::JobSpec { ranks: 1, ulysses: 1, ..request() }),
        job_secret: SECRET.to_vec(),
        ..Default::default()
    };
    let err = clients[0].prepare_job(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("nccl_unique_id"), "{err}");
    assert!(err.message().contains("5 bytes"), "{err}");
    let d = clients[0].describe(pb::DescribeRequest {}).await.unwrap().into_inner();
    assert!(d.worker.unwrap().job_id.is_empty(), "the refused job does not hold the worker");
    let video = run_job(&mut clients, &peers, 1, "after-bad-id").await;
    assert_eq!(video.len(), 48 * 32 * 3 * 9);
}
