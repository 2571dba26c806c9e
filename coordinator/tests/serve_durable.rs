//! Jobs that outlive their coordinator: `tessera serve --state DIR` keeps each job's record,
//! checkpoints and output in a folder. Checked: WatchJob reattaches to a finished job and gets its
//! output byte for byte from the folder; a server SIGKILLed mid-job and started again on the same
//! folder resumes the job from its last stored checkpoint, and WatchJob returns the frames of an
//! undisturbed run, byte for byte; a restart queues again every unfinished job, more than its
//! queue takes from new requests too; without a state store, a finished job's output is
//! FAILED_PRECONDITION and an unknown job NOT_FOUND.

mod common;

use common::server::{generate, long_request, wait_job_state, watch, Collected, Server};
use std::time::{Duration, Instant};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::{CancelJobRequest, GenerateRequest, GetJobRequest, JobState, OutputFormat};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// PNG frames of a job long enough (a few seconds on the tiny model) to be killed mid-run.
fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red ball bouncing on a wooden floor".into(),
        width: 96,
        height: 64,
        num_frames: 9,
        steps: 150,
        seed: Some(5),
        output_format: OutputFormat::PngFrames as i32,
        ..Default::default()
    }
}

/// The bytes of each PNG frame of a finished stream, by frame index.
fn frames(c: &Collected) -> Vec<Vec<u8>> {
    assert!(c.status.is_none(), "the stream failed: {:?}", c.status);
    assert!(matches!(c.events.last().and_then(|e| e.event.as_ref()), Some(Event::Done(_))), "no Done at the end");
    (0..9).map(|i| c.file(i)).inspect(|f| assert!(f.starts_with(b"\x89PNG"), "a PNG frame")).collect()
}

#[tokio::test]
async fn a_killed_server_resumes_its_job_from_the_state_folder_and_watch_job_returns_the_same_frames() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let flags = ["--preset", "tiny", "--state", dir.as_str(), "--checkpoint-every", "4"];
    let mut server = Server::start_with(&flags);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    let mut client = server.client().await;

    // Undisturbed; then reattached once finished: the same bytes, from the folder.
    let undisturbed = generate(&mut client, request()).await;
    let expected = frames(&undisturbed);
    let rewatched = watch(&mut client, &undisturbed.job_id()).await;
    assert_eq!(frames(&rewatched), expected, "WatchJob of a finished job returns its output");

    // The same job again; the server is killed mid-run.
    let mut call = client.clone();
    let running = tokio::spawn(async move { generate(&mut call, request()).await });
    let (id, step) = loop {
        let jobs = client.list_jobs(tessera_proto::v1::ListJobsRequest { states: vec![JobState::Running as i32], limit: 1 }).await.unwrap().into_inner().jobs;
        if let Some(j) = jobs.first().filter(|j| j.progress.as_ref().is_some_and(|p| p.step >= 20)) {
            break (j.job_id.clone(), j.progress.as_ref().unwrap().step);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    server.kill();
    let lost = running.await.unwrap();
    assert!(lost.status.is_some(), "the Generate call of a killed server ends in an error");
    eprintln!("killed the server at step {step} of 150");

    let server = Server::start_with(&flags);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    let mut client = server.client().await;
    let started = Instant::now();
    let resumed = watch(&mut client, &id).await;
    assert!(resumed.status.is_none(), "{:?}\n{}", resumed.status, server.log());
    eprintln!("the resumed job finished {:.1}s after the restart", started.elapsed().as_secs_f64());
    assert_eq!(frames(&resumed), expected, "the resumed job's frames are the undisturbed run's, byte for byte");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("resuming a stored job")).unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    let from: u32 = line.split("from_step=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("from_step");
    assert!(from >= 20 && from.is_multiple_of(4), "resumed from the last checkpoint before the kill: {line}");
    let record = wait_job_state(&mut client, &id, JobState::Succeeded, Duration::from_secs(5)).await;
    assert_eq!(record.seed, 5);
    // The first job's record and output came back too.
    let first = client.get_job(GetJobRequest { job_id: undisturbed.job_id() }).await.unwrap().into_inner();
    assert_eq!(first.state, JobState::Succeeded as i32);
    assert_eq!(frames(&watch(&mut client, &undisturbed.job_id()).await), expected);
}

/// Jobs accepted before a restart are queued again whatever `--max-queue` says: one running and
/// two waiting in a queue of two come back, to a coordinator started with a queue of one, as
/// three jobs, none failed (before, the full queue refused the last and it failed).
#[tokio::test]
async fn a_restart_queues_every_accepted_job_past_the_queue_limit() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let flags = ["--preset", "tiny", "--state", dir.as_str(), "--max-queue", "2"];
    let mut server = Server::start_with(&flags);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    let mut streams = Vec::new();
    for seed in 1..=3 {
        let mut s = client.generate(GenerateRequest { seed: Some(seed), ..long_request() }).await.unwrap().into_inner();
        let Some(Event::Accepted(acc)) = s.message().await.unwrap().unwrap().event else { panic!("no Accepted") };
        ids.push(acc.job_id);
        streams.push(s);
    }
    let full = client.generate(long_request()).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "one running and two waiting fill a queue of two: {full:?}");
    wait_job_state(&mut client, &ids[0], JobState::Running, Duration::from_secs(30)).await;
    server.kill();
    drop(streams);

    let server = Server::start_with(&["--preset", "tiny", "--state", dir.as_str(), "--max-queue", "1"]);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    let mut client = server.client().await;
    for id in &ids {
        let job = client.get_job(GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
        assert!([JobState::Queued as i32, JobState::Running as i32].contains(&job.state), "job {id} after the restart: {job:?}\n{}", server.log());
    }
    assert!(!server.log().contains("cannot be resumed"), "{}", server.log());
    for id in &ids {
        client.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap();
    }
}

#[tokio::test]
async fn without_a_state_store_a_finished_jobs_output_is_not_kept() {
    let server = Server::start_serving(&[]).await;
    let mut client = server.client().await;
    let done = generate(&mut client, GenerateRequest { steps: 2, ..request() }).await;
    assert!(done.status.is_none(), "{:?}", done.status);
    let gone = watch(&mut client, &done.job_id()).await;
    assert_eq!(gone.status.as_ref().map(|s| s.code()), Some(Code::FailedPrecondition), "{:?}", gone.status);
    assert!(gone.status.unwrap().message().contains("--state"));
    let unknown = watch(&mut client, "j-0000000000000000").await;
    assert_eq!(unknown.status.map(|s| s.code()), Some(Code::NotFound));
    let empty = watch(&mut client, "").await;
    assert_eq!(empty.status.map(|s| s.code()), Some(Code::InvalidArgument));
}
