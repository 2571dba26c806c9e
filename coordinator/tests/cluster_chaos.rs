//! Chaos on a local cluster: a real etcd, a `tessera serve --etcd --state DIR --max-ranks 2`
//! coordinator and four `tessera-worker` processes on loopback (jobs of two ranks, two workers
//! spare). One undisturbed job gives the reference frames; then
//! 1. a job whose coordinator is SIGKILLed mid-run: a new coordinator on the same etcd and folder
//!    adopts the run the dead one left on the workers, with its plan, going on from the step they
//!    stand at, and WatchJob returns its frames;
//! 2. a job during which etcd is killed and restarted;
//! 3. a job one of whose workers drains (SIGTERM, as a rolling update does): the job moves from
//!    a checkpoint of the next step to a group without it, with its plan, and the draining worker
//!    exits at once instead of at the job's end;
//! 4. a job one of whose workers is SIGKILLed: it goes on from its checkpoint with its plan, on
//!    a group without it (a spare in it);
//! 5. a job whose coordinator and one worker are SIGKILLed together, no worker spare: the run
//!    cannot be adopted, the survivor is released and the job resumes from its checkpoint on it.
//!
//! No job is lost; every video made on its plan equals the undisturbed one byte for byte, and the
//! one made on the smaller group is within one 8-bit level of it.
//! Needs `etcd`; without it the test skips, except under CI=true, where it fails.

mod common;
#[path = "../../shard-worker/tests/common/etcd.rs"]
mod etcd;
#[path = "common/workers.rs"]
mod workers;

use common::server::{generate, watch, Collected, Server};
use etcd::Etcd;
use std::time::{Duration, Instant};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{GenerateRequest, GetJobRequest, JobState, ListJobsRequest, OutputFormat};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use workers::{wait_idle, Worker, HEARTBEAT};

/// PNG frames, long enough (a few seconds on two tiny workers) to be disturbed mid-run.
fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a red ball bouncing on a wooden floor".into(),
        width: 128,
        height: 128,
        num_frames: 9,
        steps: 120,
        seed: Some(11),
        output_format: OutputFormat::PngFrames as i32,
        ..Default::default()
    }
}

/// Each PNG frame's bytes, from a stream that must have ended with Done.
fn frames(c: &Collected, what: &str) -> Vec<Vec<u8>> {
    assert!(c.status.is_none(), "{what}: the stream failed: {:?}", c.status);
    assert!(matches!(c.events.last().and_then(|e| e.event.as_ref()), Some(Event::Done(_))), "{what}: no Done at the end");
    (0..9).map(|i| c.file(i)).collect()
}

/// Waits until the running job has done `step` steps; returns its id and the step seen.
async fn running_past(client: &mut TesseraClient<Channel>, step: u32) -> (String, u32) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = client.list_jobs(ListJobsRequest { states: vec![JobState::Running as i32], limit: 1 }).await.unwrap().into_inner().jobs;
        if let Some(j) = jobs.first().filter(|j| j.progress.as_ref().is_some_and(|p| p.step >= step)) {
            return (j.job_id.clone(), j.progress.as_ref().unwrap().step);
        }
        assert!(Instant::now() < until, "no job reached step {step}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn coordinator(flags: &[&str]) -> Server {
    let server = Server::start_with(flags);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;
    server
}

/// The largest difference, in 8-bit levels, between two videos' PNG frames.
fn levels_apart(a: &[Vec<u8>], b: &[Vec<u8>]) -> u8 {
    let rgb = |png: &[u8]| {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        buf
    };
    a.iter().zip(b).flat_map(|(x, y)| rgb(x).into_iter().zip(rgb(y)).map(|(p, q)| p.abs_diff(q))).max().unwrap_or(0)
}

/// The workers the running job `id` runs on, rank 0 first.
async fn workers_of(client: &mut TesseraClient<Channel>, id: &str) -> Vec<String> {
    client.get_job(GetJobRequest { job_id: id.to_string() }).await.unwrap().into_inner().plan.map(|p| p.worker_ids).unwrap_or_default()
}

/// The index of worker `id` in `workers`.
fn index(workers: &[Worker], id: &str) -> usize {
    workers.iter().position(|w| w.id == id).unwrap_or_else(|| panic!("no worker {id}"))
}

/// The workers' ids and references, for `wait_idle`.
fn alive<'a>(workers: &'a [Worker], ids: &[&str]) -> Vec<&'a Worker> {
    workers.iter().filter(|w| ids.contains(&w.id.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processes_and_a_restarted_etcd_lose_no_job() {
    let Some(mut etcd) = Etcd::start().await else { return };
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint();
    let flags = ["--etcd", &endpoint, "--cluster", "chaos", "--heartbeat", HEARTBEAT, "--step-timeout", "60s", "--state", state.path().to_str().unwrap()];
    // Jobs of 2 ranks on 3 workers: one is spare.
    let flags = [&flags[..], &["--checkpoint-every", "4", "--max-ranks", "2"]].concat();
    let mut server = coordinator(&flags).await;
    let mut client = server.client().await;
    let grace = ["--grace-period", "60s"];
    let mut workers: Vec<Worker> = ["c0", "c1", "c2", "c3"].iter().map(|id| Worker::start_with(&etcd, "chaos", id, &grace)).collect();
    let mut ids = vec!["c0", "c1", "c2", "c3"];
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;
    let (mut started, mut completed, mut equal) = (0, 0, 0);

    let undisturbed = generate(&mut client, request()).await;
    started += 1;
    let expected = frames(&undisturbed, "undisturbed");
    completed += 1;
    let plan = client.get_job(GetJobRequest { job_id: undisturbed.job_id() }).await.unwrap().into_inner().plan.unwrap();
    assert_eq!((plan.ranks, plan.worker_ids.clone()), (2, vec!["c0".to_string(), "c1".to_string()]), "the job runs on two workers");
    let same_plan = |p: Option<&tessera_proto::v1::Plan>| {
        p.map(|p| (p.ranks, p.ulysses, p.ring, p.cfg_parallel)) == Some((plan.ranks, plan.ulysses, plan.ring, plan.cfg_parallel))
    };
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 1. The coordinator is SIGKILLed mid-job; another starts on the same etcd and folder and
    // adopts the run its workers still hold.
    let mut call = client.clone();
    let lost = tokio::spawn(async move { generate(&mut call, request()).await });
    started += 1;
    let (id, killed_at) = running_past(&mut client, 8).await;
    server.kill();
    assert!(lost.await.unwrap().status.is_some(), "the dead coordinator's stream ends in an error");
    let mut server = coordinator(&flags).await;
    let mut client = server.client().await;
    let resumed = watch(&mut client, &id).await;
    let logs = |server: &Server, workers: &[Worker]| {
        format!("{}\n{}", server.log(), workers.iter().map(|w| format!("--- {}:\n{}", w.id, w.log())).collect::<Vec<_>>().join("\n"))
    };
    assert!(resumed.status.is_none(), "{:?}\n{}", resumed.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&resumed, "resumed after the coordinator's death") == expected) as u32;
    let log = server.log();
    assert!(log.contains("adopting the job from the workers that still run it"), "the workers' run was not adopted:\n{log}");
    let line = log.lines().find(|l| l.contains("resuming a stored job")).expect("a resumed job");
    let from: u32 = line.split("from_step=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("from_step");
    let record = client.get_job(GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(record.state, JobState::Succeeded as i32);
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("coordinator killed at step {killed_at}; the new one adopted the run at step {from}");
    // (Steps may have run between the last one seen and the SIGKILL; none is lost.)
    assert!(from >= killed_at && from <= killed_at + 10, "the run went on where the workers stood, no step lost: {line}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 2. etcd is killed and restarted mid-job.
    let mut call = client.clone();
    let job = tokio::spawn(async move { generate(&mut call, request()).await });
    started += 1;
    let (_, restarted_at) = running_past(&mut client, 8).await;
    etcd.restart().await;
    let survived = job.await.unwrap();
    assert!(survived.status.is_none(), "{:?}\n{}", survived.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&survived, "through the etcd restart") == expected) as u32;
    eprintln!("etcd restarted at step {restarted_at}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 3. A worker of the job drains (SIGTERM, a grace period of 60 s): the job moves from a
    // checkpoint of the next step to a group without it, with its plan, and the draining worker,
    // its job gone, exits at once.
    let mut call = client.clone();
    let job = tokio::spawn(async move { generate(&mut call, request()).await });
    started += 1;
    let (id, drained_at) = running_past(&mut client, 8).await;
    let victim = workers_of(&mut client, &id).await[1].clone();
    let v = index(&workers, &victim);
    workers[v].sigterm();
    let exited = workers[v].wait_exit(Duration::from_secs(30)).await.unwrap_or_else(|| panic!("{victim} did not exit:\n{}", workers[v].log()));
    ids.retain(|w| *w != victim);
    let moved = job.await.unwrap();
    assert!(moved.status.is_none(), "{:?}\n{}", moved.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&moved, "moved off a draining worker") == expected) as u32;
    let log = server.log();
    let line = log.lines().find(|l| l.contains("moving it to another group")).unwrap_or_else(|| panic!("the job did not move:\n{log}"));
    let from: u32 = line.split("from_step=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("from_step");
    let record = client.get_job(GetJobRequest { job_id: id }).await.unwrap().into_inner();
    let now = record.plan.as_ref().map(|p| p.worker_ids.clone()).unwrap_or_default();
    assert!(!now.contains(&victim), "the job moved off the draining worker: {now:?}");
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("worker {victim} drained at step {drained_at}; the job moved to {now:?} from step {from}; {victim} exited {exited:?} after SIGTERM");
    assert!(from >= drained_at, "moved from a checkpoint after the SIGTERM, no step lost: {line}");
    assert!(exited < Duration::from_secs(20), "{victim} waited for the job's end, not for its move: {exited:?}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 4. A worker of the job is SIGKILLed: the job goes on from its last checkpoint with its plan,
    // on the worker left and the last spare.
    let mut call = client.clone();
    let job = tokio::spawn(async move { generate(&mut call, request()).await });
    started += 1;
    let (id, worker_at) = running_past(&mut client, 8).await;
    let victim = workers_of(&mut client, &id).await[1].clone();
    let v = index(&workers, &victim);
    workers[v].kill();
    ids.retain(|w| *w != victim);
    let recovered = job.await.unwrap();
    assert!(recovered.status.is_none(), "{:?}\n{}", recovered.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&recovered, "recovered from a lost worker") == expected) as u32;
    let record = client.get_job(GetJobRequest { job_id: id }).await.unwrap().into_inner();
    let now = record.plan.as_ref().map(|p| p.worker_ids.clone()).unwrap_or_default();
    assert!(!now.contains(&victim), "the job went on without the dead worker: {now:?}");
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("worker {victim} killed at step {worker_at}; the job went on with its plan on {now:?}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 5. The coordinator and a worker are SIGKILLed together, and no worker is spare: a rank of
    // the run is gone, so it cannot be adopted. The new coordinator releases the survivor and
    // resumes the job from its last checkpoint on it: a group of 1, another plan, so its frames
    // are within one 8-bit level of the undisturbed ones (the issue's ±1/255), not byte for byte.
    let mut call = client.clone();
    let job = tokio::spawn(async move { generate(&mut call, request()).await });
    started += 1;
    let (id, both_at) = running_past(&mut client, 8).await;
    let group = workers_of(&mut client, &id).await;
    assert_eq!(group.len(), 2, "the two workers left run it");
    let v = index(&workers, &group[1]);
    server.kill();
    workers[v].kill();
    assert!(job.await.unwrap().status.is_some(), "the dead coordinator's stream ends in an error");
    let server = coordinator(&flags).await;
    let mut client = server.client().await;
    let resumed = watch(&mut client, &id).await;
    assert!(resumed.status.is_none(), "{:?}\n{}", resumed.status, logs(&server, &workers));
    completed += 1;
    let log = server.log();
    assert!(log.contains("releasing the job on the workers that still hold it"), "the survivor was not released:\n{log}");
    let worst = levels_apart(&frames(&resumed, "resumed on the worker left"), &expected);
    eprintln!(
        "coordinator and worker {} killed at step {both_at}; resumed from the checkpoint on {} alone, largest difference {worst} levels",
        group[1], group[0]
    );
    assert!(worst <= 1, "the resumed job's frames differ by {worst} levels");

    eprintln!(
        "chaos: {started} jobs started; killed: the coordinator, etcd (and restarted), a worker, the coordinator with a worker (SIGKILL each); drained: a worker (SIGTERM); \
         {completed} jobs completed; {equal} of 4 disturbed videos on their plan equal to the undisturbed one byte for byte, the one on a smaller group within {worst} level"
    );
    assert_eq!((completed, equal), (6, 4));
}
