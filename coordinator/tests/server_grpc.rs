//! `tessera serve` as a child process on a loopback port, driven through the generated gRPC
//! client: the Generate stream (Accepted, Progress per step, Chunks, Done) and its MP4 checked by
//! ffprobe; sharded and single-rank servers agree; bad requests are INVALID_ARGUMENT naming the
//! field; a full queue, CancelJob, deadlines, client disconnects; health and reflection; the
//! `tessera generate --server` and `tessera status` clients; SIGTERM drains and exits in time.

mod common;

use common::server::{generate, long_request, small_request, wait_job_state, Server};
use common::{decode_rgb24, probe};
use std::time::{Duration, Instant};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::{CancelJobRequest, GenerateRequest, GetJobRequest, JobState, ListJobsRequest, ListWorkersRequest, OutputFormat, Phase, WorkerState};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test]
async fn generate_streams_accepted_progress_chunks_done_and_a_playable_mp4() {
    let server = Server::start_serving(&["--chunk-size", "4096"]).await;
    let mut client = server.client().await;
    let got = generate(&mut client, small_request(3)).await;
    assert!(got.status.is_none(), "{:?}\n{}", got.status, server.log());

    let Some(Event::Accepted(acc)) = &got.events[0].event else { panic!("first event: {:?}", got.events[0]) };
    assert!(acc.job_id.starts_with("j-"), "{acc:?}");
    assert_eq!((acc.seed, acc.queue_position), (3, 0));
    let plan = acc.plan.as_ref().unwrap();
    // 9 frames → 3 latent frames; 64x96 → 8x12 latents → 4x6 patches.
    assert_eq!((plan.ranks, plan.ulysses, plan.ring, plan.tokens, plan.forwards_per_step), (1, 1, 1, 72, 2));
    // Workers are chosen when the job is scheduled: the job's record names them.
    assert!(plan.worker_ids.is_empty(), "{plan:?}");
    let job = client.get_job(tessera_proto::v1::GetJobRequest { job_id: acc.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(job.plan.unwrap().worker_ids, ["local-0"]);
    let eff = acc.effective_request.as_ref().unwrap();
    assert_eq!((eff.width, eff.height, eff.num_frames, eff.steps, eff.fps), (96, 64, 9, 4, 16));
    assert_eq!((eff.model.as_str(), eff.output_format, eff.guidance_scale), ("tiny", OutputFormat::Mp4 as i32, Some(5.0)));

    let progress: Vec<_> = got.events.iter().filter_map(|e| if let Some(Event::Progress(p)) = &e.event { Some(*p) } else { None }).collect();
    let steps: Vec<u32> = progress.iter().filter(|p| p.phase == Phase::Denoising as i32 && p.step > 0).map(|p| p.step).collect();
    assert_eq!(steps, [1, 2, 3, 4], "a Progress for every step");
    assert!(progress.iter().all(|p| p.total_steps == 4 && p.elapsed.is_some()));
    assert!(
        progress.iter().filter(|p| p.step > 0 && p.phase == Phase::Denoising as i32).all(|p| p.estimated_remaining.is_some()),
        "an estimate once a step is done"
    );
    let mut phases: Vec<i32> = progress.iter().map(|p| p.phase).collect();
    phases.dedup();
    assert_eq!(phases, [Phase::Preparing as i32, Phase::Denoising as i32, Phase::Decoding as i32, Phase::Encoding as i32]);

    let chunks: Vec<_> = got.events.iter().filter_map(|e| if let Some(Event::Chunk(c)) = &e.event { Some(c.clone()) } else { None }).collect();
    assert!(chunks.len() > 1, "4 KiB chunks split the file");
    assert!(chunks.iter().all(|c| c.content_type == "video/mp4" && c.data.len() <= 4096 && c.frame_index == 0));
    assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
    assert!(chunks.last().unwrap().last);
    let file = got.file(0);

    let Some(Event::Done(done)) = &got.events.last().unwrap().event else { panic!("last event: {:?}", got.events.last()) };
    assert_eq!((done.job_id.as_str(), done.num_frames, done.width, done.height), (acc.job_id.as_str(), 9, 96, 64));
    assert_eq!(done.total_bytes, file.len() as u64);
    let t = done.timings.as_ref().unwrap();
    assert!(t.total.is_some() && t.denoising.is_some() && t.queued.is_some());

    let dir = tempfile::tempdir().unwrap();
    let s = probe(&write_temp(&dir, "v.mp4", &file), &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some("9"), "{s}");
    assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(96), Some(64)), "{s}");

    let job = client.get_job(GetJobRequest { job_id: acc.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(job.state, JobState::Succeeded as i32);
    assert_eq!(job.seed, 3);
    assert!(job.created.is_some() && job.finished.is_some() && job.timings.is_some() && job.error.is_empty());
    assert_eq!(job.progress.as_ref().unwrap().phase, Phase::Done as i32);
    assert_eq!(job.request.as_ref().unwrap().prompt, small_request(3).prompt);
    let workers = client.list_workers(ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1);
    assert_eq!((workers[0].worker_id.as_str(), workers[0].state, workers[0].model.as_str()), ("local-0", WorkerState::Idle as i32, "tiny"));
    assert!(client.list_workers(ListWorkersRequest { model: "other".into() }).await.unwrap().into_inner().workers.is_empty());
    let jobs = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [acc.job_id.as_str()]);
    let err = client.get_job(GetJobRequest { job_id: "j-nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn png_frames_gif_and_raw_latents_come_back_as_asked() {
    let server = Server::start_serving(&[]).await;
    let mut client = server.client().await;
    let req = |format: OutputFormat| GenerateRequest { width: 32, height: 32, num_frames: 5, steps: 2, output_format: format as i32, ..small_request(9) };

    let png = generate(&mut client, req(OutputFormat::PngFrames)).await;
    assert!(png.status.is_none(), "{:?}", png.status);
    for i in 0..5 {
        let f = png.file(i);
        assert!(f.starts_with(b"\x89PNG"), "frame {i} is a PNG");
    }
    assert!(png.events.iter().all(|e| !matches!(&e.event, Some(Event::Chunk(c)) if c.content_type != "image/png")));

    let gif = generate(&mut client, req(OutputFormat::Gif)).await;
    assert!(gif.status.is_none(), "{:?}", gif.status);
    let dir = tempfile::tempdir().unwrap();
    let s = probe(&write_temp(&dir, "v.gif", &gif.file(0)), &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some("5"), "{s}");

    let raw = generate(&mut client, req(OutputFormat::RawLatents)).await;
    assert!(raw.status.is_none(), "{:?}", raw.status);
    let bytes = raw.file(0);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let latents = st.tensor("latents").unwrap();
    assert_eq!(latents.shape(), &[1, 16, 2, 4, 4]);
    assert_eq!(latents.dtype(), safetensors::Dtype::F32);
}

/// Same request on a server with one in-process worker, and on servers with 2 and 3 (internal
/// gRPC, TCP collectives, in-memory membership; the tiny model's 2 heads make 2 workers Ulysses
/// and 3 workers ring): the frames agree to float rounding. PNG frames (lossless) decode to within
/// one 8-bit level; the MP4s, where H.264's mode decisions can turn a one-level rounding flip into
/// a different block, agree to a high PSNR.
#[tokio::test]
async fn two_and_three_workers_give_the_frames_of_one() {
    let (one, two, three) =
        tokio::join!(Server::start_serving(&["--workers", "1"]), Server::start_serving(&["--workers", "2"]), Server::start_serving(&["--workers", "3"]));
    let mut c1 = one.client().await;
    for (other, ids, tag) in [(&two, &["local-0", "local-1"][..], "2 workers"), (&three, &["local-0", "local-1", "local-2"][..], "3 workers")] {
        let mut c2 = other.client().await;
        let dir = tempfile::tempdir().unwrap();
        let mut decoded = Vec::new();
        for (name, format) in [("png", OutputFormat::PngFrames), ("mp4", OutputFormat::Mp4)] {
            let req = GenerateRequest { steps: 3, output_format: format as i32, ..small_request(11) };
            let (a, b) = tokio::join!(generate(&mut c1, req.clone()), generate(&mut c2, req));
            assert!(a.status.is_none() && b.status.is_none(), "{:?} {:?}", a.status, b.status);
            let Some(Event::Accepted(acc)) = &b.events[0].event else { panic!() };
            let plan = acc.plan.as_ref().unwrap();
            assert_eq!(plan.ranks as usize, ids.len(), "{tag}");
            let job = c2.get_job(tessera_proto::v1::GetJobRequest { job_id: acc.job_id.clone() }).await.unwrap().into_inner();
            assert_eq!(job.plan.unwrap().worker_ids, ids, "{tag}");
            let files = if format == OutputFormat::PngFrames { 9 } else { 1 };
            let rgb = |c: &common::server::Collected, which: &str| -> Vec<u8> {
                (0..files).flat_map(|i| decode_rgb24(&write_temp(&dir, &format!("{which}-{i}.{name}"), &c.file(i)))).collect()
            };
            decoded.push((name, rgb(&a, "one"), rgb(&b, "two")));
        }
        for (name, fa, fb) in decoded {
            assert_eq!(fa.len(), 9 * 96 * 64 * 3, "{name}");
            assert_eq!(fa.len(), fb.len(), "{name}");
            let max = fa.iter().zip(&fb).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            let mse = fa.iter().zip(&fb).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / fa.len() as f64;
            let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
            eprintln!("{name}: 1 worker vs {tag}: max difference {max} levels, PSNR {psnr:.1} dB");
            match name {
                "png" => assert!(max <= 1, "{tag}: PNG frames differ by up to {max} levels"),
                _ => assert!(psnr >= 40.0, "{tag}: MP4 frames differ: PSNR {psnr:.1} dB, max {max} levels"),
            }
        }
    }
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let server = Server::start_serving(&["--max-tokens", "500"]).await;
    let mut client = server.client().await;
    let ok = || small_request(1);
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest { width: 8192, ..ok() }, "width"),
        (GenerateRequest { height: 4097, ..ok() }, "height"),
        (GenerateRequest { height: 100_000, ..ok() }, "height"),
        (GenerateRequest { num_frames: 8, ..ok() }, "num_frames"),
        (GenerateRequest { num_frames: 1445, ..ok() }, "num_frames"),
        (GenerateRequest { steps: 1001, ..ok() }, "steps"),
        (GenerateRequest { guidance_scale: Some(-1.0), ..ok() }, "guidance_scale"),
        (GenerateRequest { flow_shift: Some(0.0), ..ok() }, "flow_shift"),
        (GenerateRequest { fps: 500, ..ok() }, "fps"),
        (GenerateRequest { model: "wan-huge".into(), ..ok() }, "model"),
        (GenerateRequest { prompt: "x".repeat(2001), ..ok() }, "prompt"),
        (GenerateRequest { prompt: "  ".into(), ..ok() }, "prompt"),
        (GenerateRequest { priority: 500, ..ok() }, "priority"),
        (GenerateRequest { output_format: 42, ..ok() }, "output_format"),
        (GenerateRequest { input_video: b"\xde\xad\xbe\xef not a video".to_vec(), ..ok() }, "input_video"),
        // 256x256 with 17 frames is 1280 tokens, past --max-tokens 500.
        (GenerateRequest { width: 256, height: 256, num_frames: 17, ..ok() }, "num_frames"),
    ];
    for (req, field) in cases {
        let err = client.generate(req.clone()).await.err().unwrap_or_else(|| panic!("accepted a bad {field}"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field} not named in {:?}", err.message());
    }
    assert!(client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty(), "nothing was queued");
    // Zero sizes mean the model's defaults (128x128, 17 frames, 20 steps for the tiny model).
    let mut stream = client.generate(GenerateRequest { width: 0, height: 0, num_frames: 0, steps: 0, ..ok() }).await.unwrap().into_inner();
    let Some(Event::Accepted(acc)) = stream.message().await.unwrap().unwrap().event else { panic!() };
    let eff = acc.effective_request.unwrap();
    assert_eq!((eff.width, eff.height, eff.num_frames, eff.steps), (128, 128, 17, 20));
    let err = client.get_job(GetJobRequest::default()).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("job_id"), "{err:?}");
}

/// Under load the plan a job is accepted with is the plan it runs with: 3 in-process workers,
/// groups of at most 2; while A holds two, B (accepted with 2 ranks) waits for two free workers
/// instead of starting on the one left over.
#[tokio::test]
async fn a_job_runs_on_the_group_its_plan_said() {
    let server = Server::start_serving(&["--workers", "3", "--max-ranks", "2"]).await;
    let mut client = server.client().await;
    let mut a = client.generate(GenerateRequest { steps: 60, ..long_request() }).await.unwrap().into_inner();
    let Some(Event::Accepted(acc_a)) = a.message().await.unwrap().unwrap().event else { panic!() };
    assert_eq!(acc_a.plan.as_ref().map(|p| p.ranks), Some(2));
    loop {
        if let Some(Event::Progress(p)) = a.message().await.unwrap().unwrap().event {
            if p.step >= 1 {
                break;
            }
        }
    }
    let b = generate(&mut client, GenerateRequest { steps: 2, ..small_request(3) }).await;
    assert!(b.status.is_none(), "{:?}", b.status);
    let Some(Event::Accepted(acc_b)) = &b.events[0].event else { panic!() };
    let planned = acc_b.plan.clone().unwrap();
    assert_eq!(planned.ranks, 2, "{planned:?}");
    assert!(planned.predicted_duration.is_some() && planned.predicted_peak_bytes_per_rank > 0, "the planner predicted it: {planned:?}");
    let ran = client.get_job(GetJobRequest { job_id: acc_b.job_id.clone() }).await.unwrap().into_inner().plan.unwrap();
    // the layout the planner chose (Ulysses x ring) is the one reserved
    assert_eq!((ran.ranks, ran.ulysses, ran.ring, ran.worker_ids.len()), (2, planned.ulysses, planned.ring, 2), "B ran as planned: {ran:?}");
    while a.message().await.unwrap().is_some() {}
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted_and_cancel_job_stops_queued_and_running_jobs() {
    let server = Server::start_serving(&["--max-queue", "1"]).await;
    let mut client = server.client().await;
    // A runs; wait for its first step.
    let mut a = client.generate(long_request()).await.unwrap().into_inner();
    let Some(Event::Accepted(acc_a)) = a.message().await.unwrap().unwrap().event else { panic!() };
    loop {
        if let Some(Event::Progress(p)) = a.message().await.unwrap().unwrap().event {
            if p.step >= 1 {
                break;
            }
        }
    }
    // B waits in the queue, C finds it full.
    let mut b = client.generate(GenerateRequest { priority: 5, ..long_request() }).await.unwrap().into_inner();
    let Some(Event::Accepted(acc_b)) = b.message().await.unwrap().unwrap().event else { panic!() };
    assert_eq!(acc_b.queue_position, 0);
    assert_eq!(client.get_job(GetJobRequest { job_id: acc_b.job_id.clone() }).await.unwrap().into_inner().state, JobState::Queued as i32);
    let err = client.generate(small_request(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full") && err.message().contains('1'), "{}", err.message());

    // Cancelling the queued job ends it at once.
    let r = client.cancel_job(CancelJobRequest { job_id: acc_b.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(r.state, JobState::Cancelled as i32);
    let end_b = loop {
        match b.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("B ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(end_b.code(), Code::Cancelled, "{end_b:?}");
    assert_eq!(client.get_job(GetJobRequest { job_id: acc_b.job_id.clone() }).await.unwrap().into_inner().state, JobState::Cancelled as i32);

    // Cancelling the running job stops it at a step boundary.
    let r = client.cancel_job(CancelJobRequest { job_id: acc_a.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(r.state, JobState::Running as i32);
    let end_a = loop {
        match tokio::time::timeout(Duration::from_secs(10), a.message()).await.expect("A stops within seconds") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("A ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(end_a.code(), Code::Cancelled, "{end_a:?}");
    let job = client.get_job(GetJobRequest { job_id: acc_a.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(job.state, JobState::Cancelled as i32, "{job:?}");
    assert!(job.progress.unwrap().step < 1000);
    assert!(job.finished.is_some() && job.error.contains("cancel"), "{}", job.error);
    // Cancelling again is a no-op; an unknown job is NOT_FOUND.
    let r = client.cancel_job(CancelJobRequest { job_id: acc_a.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(r.state, JobState::Cancelled as i32);
    assert_eq!(client.cancel_job(CancelJobRequest { job_id: "j-0".into() }).await.unwrap_err().code(), Code::NotFound);
    // The workers are free again.
    let got = generate(&mut client, small_request(2)).await;
    assert!(got.status.is_none(), "{:?}", got.status);
}

#[tokio::test]
async fn higher_priorities_leave_the_queue_first_and_a_queued_job_meets_its_deadline() {
    let server = Server::start_serving(&["--max-queue", "4"]).await;
    let mut client = server.client().await;
    let accept = |c: &mut tessera_proto::v1::tessera_client::TesseraClient<tonic::transport::Channel>, priority: i32| {
        let mut c = c.clone();
        async move {
            let mut s = c.generate(GenerateRequest { priority, ..long_request() }).await.unwrap().into_inner();
            let Some(Event::Accepted(acc)) = s.message().await.unwrap().unwrap().event else { panic!() };
            (acc, s)
        }
    };
    let (running, _s0) = accept(&mut client, 0).await;
    wait_job_state(&mut client, &running.job_id, JobState::Running, Duration::from_secs(10)).await;
    let (low, _s1) = accept(&mut client, -5).await;
    let (high, _s2) = accept(&mut client, 50).await;
    let (mid, _s3) = accept(&mut client, 0).await;
    assert_eq!((low.queue_position, high.queue_position, mid.queue_position), (0, 0, 1));
    // A queued job whose deadline passes ends with DEADLINE_EXCEEDED and leaves the queue.
    let mut late = tonic::Request::new(long_request());
    late.set_timeout(Duration::from_millis(300));
    let got = generate(&mut client, late).await;
    assert_eq!(got.status.as_ref().map(|s| s.code()), Some(Code::DeadlineExceeded), "{:?}", got.status);
    let Some(Event::Accepted(late)) = &got.events[0].event else { panic!() };
    assert_eq!(client.get_job(GetJobRequest { job_id: late.job_id.clone() }).await.unwrap().into_inner().state, JobState::Failed as i32);
    // The running job goes; the highest priority runs next, the others wait in order.
    client.cancel_job(CancelJobRequest { job_id: running.job_id.clone() }).await.unwrap();
    wait_job_state(&mut client, &high.job_id, JobState::Running, Duration::from_secs(10)).await;
    for j in [&low, &mid] {
        assert_eq!(client.get_job(GetJobRequest { job_id: j.job_id.clone() }).await.unwrap().into_inner().state, JobState::Queued as i32);
    }
    client.cancel_job(CancelJobRequest { job_id: high.job_id.clone() }).await.unwrap();
    wait_job_state(&mut client, &mid.job_id, JobState::Running, Duration::from_secs(10)).await;
    let queued = client.list_jobs(ListJobsRequest { states: vec![JobState::Queued as i32], limit: 0 }).await.unwrap().into_inner().jobs;
    assert_eq!(queued.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [low.job_id.as_str()]);
    for j in [&mid, &low] {
        client.cancel_job(CancelJobRequest { job_id: j.job_id.clone() }).await.unwrap();
    }
}

#[tokio::test]
async fn a_deadline_ends_the_job_with_deadline_exceeded() {
    let server = Server::start_serving(&[]).await;
    let mut client = server.client().await;
    let mut req = tonic::Request::new(long_request());
    req.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let got = generate(&mut client, req).await;
    let status = got.status.expect("the stream ends with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let Some(Event::Accepted(acc)) = &got.events[0].event else { panic!() };
    let job = wait_job_state(&mut client, &acc.job_id, JobState::Failed, Duration::from_secs(5)).await;
    assert!(job.error.contains("deadline"), "{}", job.error);
}

#[tokio::test]
async fn a_client_that_drops_its_stream_cancels_its_job() {
    let server = Server::start_serving(&[]).await;
    let mut client = server.client().await;
    let mut stream = client.generate(long_request()).await.unwrap().into_inner();
    let Some(Event::Accepted(acc)) = stream.message().await.unwrap().unwrap().event else { panic!() };
    while !matches!(stream.message().await.unwrap().unwrap().event, Some(Event::Progress(p)) if p.step >= 1) {}
    drop(stream);
    let job = wait_job_state(&mut client, &acc.job_id, JobState::Cancelled, Duration::from_secs(10)).await;
    assert!(job.error.contains("client"), "{}", job.error);
    let got = generate(&mut client, small_request(4)).await;
    assert!(got.status.is_none(), "the slot is free again: {:?}", got.status);
}

#[tokio::test]
async fn a_client_that_stops_reading_has_its_job_stopped_after_the_send_timeout() {
    let server = Server::start_serving(&["--client-send-timeout", "1s", "--chunk-size", "1024"]).await;
    // A client whose HTTP/2 windows are the protocol's smallest (64 KiB), and that reads nothing
    // after Accepted: 9 PNG frames of 192x192 (about 1 MB of noise) cannot all be sent.
    let small_window = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled = tessera_proto::v1::tessera_client::TesseraClient::new(small_window);
    let request = GenerateRequest { width: 192, height: 192, steps: 2, output_format: OutputFormat::PngFrames as i32, ..small_request(5) };
    let mut stream = stalled.generate(request).await.unwrap().into_inner();
    let Some(Event::Accepted(acc)) = stream.message().await.unwrap().unwrap().event else { panic!() };
    let mut client = server.client().await;
    let job = wait_job_state(&mut client, &acc.job_id, JobState::Cancelled, Duration::from_secs(60)).await;
    assert!(job.error.contains("stopped reading") && job.error.contains("send timeout"), "{}", job.error);
    // Its workers are free: the next job runs.
    let got = generate(&mut client, small_request(6)).await;
    assert!(got.status.is_none(), "the slot is free again: {:?}", got.status);
    drop(stream);
}

/// A small MP4 (`frames` frames of a gradient, 48x32) as bytes.
fn small_mp4(frames: usize) -> Vec<u8> {
    use tessera_coordinator::video::{FrameSink, Mp4Options, Mp4Writer, VideoSpec};
    let file = tempfile::NamedTempFile::new().unwrap();
    let spec = VideoSpec::new(48, 32, 16.0).unwrap();
    let mut writer = Mp4Writer::new(std::fs::File::create(file.path()).unwrap(), spec, Mp4Options::default()).unwrap();
    for t in 0..frames {
        let frame: Vec<f32> = (0..3 * 48 * 32).map(|i| ((i + 7 * t) % 97) as f32 / 97.0).collect();
        writer.push_frame(&frame).unwrap();
    }
    writer.finish().unwrap();
    std::fs::read(file.path()).unwrap()
}

#[tokio::test]
async fn decoded_input_frames_held_by_accepted_jobs_are_bounded() {
    // Each job below holds 5 decoded frames of 32x32 RGB: 15,360 bytes; the server 20,000.
    let server = Server::start_serving(&["--max-input-bytes-held", "20000"]).await;
    let mut client = server.client().await;
    let video = small_mp4(6);
    let v2v = |steps: u32| GenerateRequest { input_video: video.clone(), strength: Some(0.6), width: 32, height: 32, num_frames: 5, steps, ..small_request(1) };
    let mut first = client.generate(v2v(1000)).await.unwrap().into_inner();
    let Some(Event::Accepted(acc)) = first.message().await.unwrap().unwrap().event else { panic!() };
    let full = client.generate(v2v(2)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("decoded input frames") && full.message().contains("retry later"), "{}", full.message());
    // A text-to-video job holds no frames and is accepted meanwhile.
    let mut t2v = client.generate(small_request(2)).await.unwrap().into_inner();
    assert!(matches!(t2v.message().await.unwrap().unwrap().event, Some(Event::Accepted(_))));
    drop(t2v);
    // Once the first job ends its frames are given back.
    client.cancel_job(CancelJobRequest { job_id: acc.job_id.clone() }).await.unwrap();
    wait_job_state(&mut client, &acc.job_id, JobState::Cancelled, Duration::from_secs(10)).await;
    drop(first);
    let until = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let got = generate(&mut client, v2v(2)).await;
        match &got.status {
            Some(s) if s.code() == Code::ResourceExhausted && Instant::now() < until => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break got,
        }
    };
    assert!(done.status.is_none(), "{:?}", done.status);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest, ServerReflectionResponse,
    };
    let server = Server::start_serving(&[]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: "tessera.v1.Tessera".into() }).await.unwrap().into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    // the same state over plain HTTP on the metrics port, for probes that cannot speak TLS
    assert_eq!((server.probe("/healthz").await, server.probe("/readyz").await), (200, 200));

    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
    let ask = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let codec = tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
    let mut answers = grpc.streaming(tonic::Request::new(tokio_stream::iter([ask])), path, codec).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response else { panic!("not a service list") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "tessera.v1.Tessera") && names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn the_cli_client_writes_what_the_local_mode_writes_and_status_lists_the_job() {
    let server = Server::start_serving(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let tessera = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let path = |name: &str| dir.path().join(name).display().to_string();
    let flags = ["generate", "--prompt", "a red ball", "--frames", "9", "--height", "64", "--width", "96", "--steps", "3", "--seed", "2", "--quiet"];
    let (code, stdout, stderr) = tessera(&[&flags[..], &["--server", &server.addr, "-o", &path("remote.mp4")]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("job j-") && stderr.contains("plan: 1 ranks") && stdout.contains("time: queued") && stdout.contains("9 frames"),
        "{stdout}\n{stderr}"
    );
    let s = probe(&dir.path().join("remote.mp4"), &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some("9"), "{s}");
    // The local run names the server's model (the harness serves tiny; demo is the local default).
    let (code, _, stderr) = tessera(&[&flags[..], &["--preset", "tiny", "-o", &path("local.mp4")]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("remote.mp4")).unwrap(),
        std::fs::read(dir.path().join("local.mp4")).unwrap(),
        "the server's file is the local one"
    );

    let (code, _, stderr) = tessera(&["generate", "--server", &server.addr, "--prompt", "x", "--width", "5000", "-o", &path("bad.mp4")]);
    assert_ne!(code, 0);
    // The flag comes from the status's ErrorInfo field, not from its message.
    assert!(stderr.contains("--width: INVALID_ARGUMENT") && stderr.contains("width"), "{stderr}");
    // The server refuses with the words a local run uses (generate_cli.rs,
    // local_runs_get_the_servers_limits_and_messages): one check, one message.
    for (flags, want) in [
        (["--frames", "2001"], "--frames: INVALID_ARGUMENT: invalid num_frames: 2001 must be 4k+1 (1, 5, 9, ... 1441)"),
        (["--steps", "5000"], "--steps: INVALID_ARGUMENT: invalid steps: 5000 must be between 1 and 1000"),
        (["--guidance", "80"], "--guidance: INVALID_ARGUMENT: invalid guidance_scale: 80 must be between 0 and 50"),
    ] {
        let bad = path("bad.mp4");
        let args: Vec<&str> = ["generate", "--server", &server.addr, "--prompt", "x", "-o", &bad].into_iter().chain(flags).collect();
        let (code, _, stderr) = tessera(&args);
        assert_ne!(code, 0, "{flags:?}");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    assert!(!dir.path().join("bad.mp4").exists());

    let (code, stdout, stderr) = tessera(&["status", "--server", &server.addr]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("SERVING") && stdout.contains("local-0") && stdout.contains("SUCCEEDED"), "{stdout}");
    let (code, _, stderr) = tessera(&["status", "--server", "127.0.0.1:1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--server"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_within_the_grace_period() {
    let mut server = Server::start_serving(&["--grace-period", "2s"]).await;
    let mut client = server.client().await;
    let mut stream = client.generate(long_request()).await.unwrap().into_inner();
    while !matches!(stream.message().await.unwrap().unwrap().event, Some(Event::Progress(p)) if p.step >= 1) {}
    let signalled = Instant::now();
    server.sigterm();
    server.wait_health(ServingStatus::NotServing, Duration::from_secs(1)).await;
    assert_eq!((server.probe("/readyz").await, server.probe("/healthz").await), (503, 200), "draining: alive, not ready");
    let refused = client.generate(small_request(1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the running job ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(signalled.elapsed() >= Duration::from_millis(1800), "the job had its grace period: {:?}", signalled.elapsed());
    let status = server.wait_exit(Duration::from_secs(5)).await.unwrap_or_else(|| panic!("still running 5 s after the grace period:\n{}", server.log()));
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(signalled.elapsed() < Duration::from_secs(6), "{:?}", signalled.elapsed());
}

#[test]
fn serve_flags_are_checked_at_start_up() {
    let empty = tempfile::tempdir().unwrap();
    let empty = empty.path().to_str().unwrap().to_string();
    for (flags, named) in [
        (vec!["--preset", "tiny", "--max-queue", "0"], "--max-queue"),
        (vec!["--preset", "tiny", "--max-tenant-priority", "101"], "--max-tenant-priority"),
        (vec!["--preset", "tiny", "--max-tenant-priority", "-101"], "--max-tenant-priority"),
        (vec!["--preset", "tiny", "--job-retention", "5 parsecs"], "--job-retention"),
        (vec!["--preset", "tiny", "--grace-period", "soon"], "--grace-period"),
        (vec!["--preset", "tiny", "--chunk-size", "10"], "--chunk-size"),
        (vec!["--preset", "tiny", "--client-send-timeout", "1ms"], "--client-send-timeout"),
        (vec!["--preset", "tiny", "--device", "tpu"], "--device"),
        (vec!["--preset", "tiny", "--listen", "nowhere"], "--listen"),
        // Off loopback, authentication is needed (or waived by name).
        (vec!["--preset", "tiny", "--listen", "0.0.0.0:0"], "--auth-token-file"),
        (vec!["--preset", "tiny", "--auth-token-file", "/nonexistent/tokens.csv"], "--auth-token-file"),
        // Mutual TLS is for the workers of --etcd; its files are checked before anything starts.
        (vec!["--preset", "tiny", "--tls-cert", "/nonexistent/c.pem"], "--tls-cert"),
        (vec!["--etcd", "http://127.0.0.1:1", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/k", "--tls-ca", "/ca"], "--tls-cert"),
        (vec!["--etcd", "http://127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem"], "--tls-cert, --tls-key and --tls-ca"),
        (vec!["--preset", "huge"], "--preset"),
        (vec!["--model", "/nonexistent/snapshot"], "--model"),
        // A folder that is not a snapshot fails while loading, after the port is bound.
        (vec!["--model", &empty], "--model"),
        (vec!["--preset", "tiny", "--workers", "2", "--etcd", "http://127.0.0.1:1"], "--workers"),
        (vec!["--preset", "tiny", "--etcd", "http://127.0.0.1:1"], "--etcd"),
        (vec!["--etcd", "http://127.0.0.1:1", "--heartbeat", "1ms"], "--heartbeat"),
        (vec!["--etcd", "http://127.0.0.1:1", "--step-timeout", "0s"], "--step-timeout"),
        (vec!["--etcd", "http://127.0.0.1:1", "--cluster", "a/b"], "--cluster"),
    ] {
        let listen: &[&str] = if flags.contains(&"--listen") { &[] } else { &["--listen", "127.0.0.1:0"] };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera")).arg("serve").args(listen).args(&flags).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(named), "{flags:?}: {named} not named in {stderr}");
    }
}

/// The value of one sample in a Prometheus text exposition (`name` or `name{labels}` exactly).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} is not in the metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// `/metrics` scraped before and after a job: the job, step and phase histograms, the token
/// counters and the worker gauges moved; a refused request is counted by cause; the in-process
/// workers of `--workers` report their steps and collective bytes.
#[tokio::test]
async fn metrics_move_with_a_job() {
    let server = Server::start_serving(&["--workers", "2"]).await;
    let mut client = server.client().await;
    let before = server.scrape().await;
    for (series, value) in [
        ("tessera_jobs_total{outcome=\"succeeded\"}", 0.0),
        ("tessera_queue_depth", 0.0),
        ("tessera_jobs_running", 0.0),
        ("tessera_step_duration_seconds_count", 0.0),
        ("tessera_workers{state=\"idle\"}", 2.0),
        ("tessera_collective_bytes_total{worker=\"local-1\"}", 0.0),
    ] {
        assert_eq!(sample(&before, series), value, "{series} before the job");
    }
    let req = GenerateRequest { steps: 3, ..small_request(2) };
    let got = generate(&mut client, req).await;
    assert!(got.status.is_none(), "{:?}", got.status);
    let bad = client.generate(GenerateRequest { width: 5000, ..small_request(2) }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let after = server.scrape().await;
    assert_eq!(sample(&after, "tessera_jobs_total{outcome=\"succeeded\"}"), 1.0);
    assert_eq!(sample(&after, "tessera_job_duration_seconds_count{outcome=\"succeeded\"}"), 1.0);
    assert!(sample(&after, "tessera_job_duration_seconds_sum{outcome=\"succeeded\"}") > 0.0);
    assert_eq!(sample(&after, "tessera_step_duration_seconds_count"), 3.0);
    assert_eq!(sample(&after, "tessera_phase_duration_seconds_count{phase=\"denoising\"}"), 1.0);
    // 72 tokens, guidance on (2 forwards), 3 steps.
    assert_eq!(sample(&after, "tessera_tokens_total"), (72 * 2 * 3) as f64);
    assert!(sample(&after, "tessera_tokens_per_second") > 0.0);
    assert_eq!(sample(&after, "tessera_requests_rejected_total{cause=\"invalid_argument\"}"), 1.0);
    assert_eq!(sample(&after, "tessera_workers{state=\"idle\"}"), 2.0);
    for w in ["local-0", "local-1"] {
        assert_eq!(sample(&after, &format!("tessera_worker_step_duration_seconds_count{{worker=\"{w}\"}}")), 3.0, "{w}");
        assert!(sample(&after, &format!("tessera_collective_bytes_total{{worker=\"{w}\"}}")) > 0.0, "{w} sent nothing");
        assert_eq!(sample(&after, &format!("tessera_worker_jobs_total{{outcome=\"prepared\",worker=\"{w}\"}}")), 1.0, "{w}");
    }
    // Each metric is described once, with its unit.
    let helps: Vec<&str> = after.lines().filter(|l| l.starts_with("# HELP tessera_")).collect();
    let mut names: Vec<&str> = helps.iter().map(|h| h.split_whitespace().nth(2).unwrap()).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "a metric is described twice: {helps:#?}");
    for name in [
        "tessera_queue_depth",
        "tessera_job_duration_seconds",
        "tessera_step_duration_seconds",
        "tessera_tokens_per_second",
        "tessera_workers",
        "tessera_requests_rejected_total",
        "tessera_collective_bytes_total",
        "tessera_worker_step_duration_seconds",
    ] {
        assert!(names.contains(&name), "{name} is not described: {helps:#?}");
    }
    assert!(helps.iter().all(|h| h.ends_with(").")), "a description without its unit: {helps:#?}");
}
