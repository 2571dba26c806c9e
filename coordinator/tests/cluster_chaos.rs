//! Chaos on a local cluster: a real etcd, a `tessera serve --etcd --state DIR --max-ranks 2`
//! coordinator and four `tessera-worker` processes on loopback (jobs of two ranks, two workers
//! spare). One undisturbed job gives the reference frames; then
//! 1. a job whose coordinator is SIGKILLed mid-run: a new coordinator on the same etcd and folder
//!    adopts the run the dead one left on the workers, with its plan, going on from the step they
//!    stand at, and WatchJob returns its frames;
//! 2. a job whose coordinator is stopped (SIGTERM, as a rolling update does) with no grace period
//!    left: it checkpoints the job at the step boundary and leaves the run on its workers, and
//!    the next coordinator, on the same address, adopts it at that step; the client,
//!    `tessera generate --server`, reattaches by itself and writes the whole video;
//! 3. a job during which etcd is killed and restarted;
//! 4. a job one of whose workers drains (SIGTERM, as a rolling update does): the job moves from
//!    a checkpoint of the next step to a group without it, with its plan, and the draining worker
//!    exits at once instead of at the job's end;
//! 5. a job one of whose workers is SIGKILLed: it goes on from its checkpoint with its plan, on
//!    a group without it (a spare in it);
//! 6. a job whose coordinator and one worker are SIGKILLed together, no worker spare: the run
//!    cannot be adopted, and the job waits (`--recover-wait`) for a
//!    group of its plan's size: a replacement worker starts, and the job resumes from its
//!    checkpoint on the survivor and the replacement.
//!
//! No job is lost, and every disturbed video equals the undisturbed one byte for byte.
//! Needs `etcd`; without it the test skips, except under CI=true, where it fails.

mod common;
#[path = "../../shard-worker/tests/common/etcd.rs"]
mod etcd;
#[path = "common/workers.rs"]
mod workers;

use common::server::{generate, running_past, watch, Collected, Server};
use etcd::Etcd;
use std::time::{Duration, Instant};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{GenerateRequest, GetJobRequest, JobState, OutputFormat};
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
    c.finished_frames(request().num_frames, what)
}

async fn coordinator(flags: &[&str]) -> Server {
    let server = Server::start_with(flags);
    server.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;
    server
}

/// The number logged after `key=` in `line`.
fn logged(line: &str, key: &str) -> u32 {
    line.split(&format!("{key}=")).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Starts the chaos job on `client`'s coordinator; its whole stream comes back.
fn start_job(client: &TesseraClient<Channel>) -> tokio::task::JoinHandle<Collected> {
    let mut call = client.clone();
    tokio::spawn(async move { generate(&mut call, request()).await })
}

/// The workers a job's record says it runs on, rank 0 first.
fn planned_workers(record: &tessera_proto::v1::Job) -> Vec<String> {
    record.plan.as_ref().map(|p| p.worker_ids.clone()).unwrap_or_default()
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
    // (The grace period matters only to case 2: a job it cannot wait for.)
    let flags = [&flags[..], &["--checkpoint-every", "4", "--max-ranks", "2", "--grace-period", "0s"]].concat();
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
    let lost = start_job(&client);
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
    let from = logged(line, "from_step");
    let record = client.get_job(GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(record.state, JobState::Succeeded as i32);
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("coordinator killed at step {killed_at}; the new one adopted the run at step {from}");
    // (Steps may have run between the last one seen and the SIGKILL; none is lost.)
    assert!(from >= killed_at && from <= killed_at + 10, "the run went on where the workers stood, no step lost: {line}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 2. The coordinator is stopped (SIGTERM) mid-job, its grace period over at once: the job is
    // checkpointed at the step boundary and its run left on its workers; the next coordinator, on
    // the same address, adopts it exactly there. The client is the CLI, which reattaches.
    let addr = server.addr.clone();
    let out = tempfile::tempdir().unwrap();
    let cli_log = tempfile::NamedTempFile::new().unwrap();
    let r = request();
    let (size, frames_n, steps, seed) = (r.width.to_string(), r.num_frames.to_string(), r.steps.to_string(), r.seed.unwrap().to_string());
    #[rustfmt::skip]
    let args = ["generate", "--server", &addr, "--prompt", &r.prompt, "--width", &size, "--height", &size, "--frames", &frames_n,
        "--steps", &steps, "--seed", &seed, "--format", "png", "-o", out.path().to_str().unwrap(), "--quiet"];
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(cli_log.reopen().unwrap())
        .spawn()
        .unwrap();
    started += 1;
    let (id, stopped_at) = running_past(&mut client, 8).await;
    server.sigterm();
    let exit = server.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.is_some_and(|s| s.success()), "the coordinator exits cleanly: {exit:?}\n{}", server.log());
    let old_log = server.log();
    let left =
        old_log.lines().find(|l| l.contains("left on its workers for the next coordinator")).unwrap_or_else(|| panic!("the run was not left:\n{old_log}"));
    let left_at = logged(left, "steps_done");
    let mut server = coordinator(&[&flags[..], &["--listen", &addr]].concat()).await;
    let mut client = server.client().await;
    let until = Instant::now() + Duration::from_secs(60);
    let cli_exit = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "the CLI did not finish:\n{}\n{}", std::fs::read_to_string(cli_log.path()).unwrap(), logs(&server, &workers));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cli_said = std::fs::read_to_string(cli_log.path()).unwrap();
    assert!(cli_exit.success(), "the CLI failed: {cli_exit:?}\n{cli_said}\n{}", logs(&server, &workers));
    assert!(cli_said.contains("reattached to job"), "the CLI did not reattach:\n{cli_said}");
    completed += 1;
    let written: Vec<Vec<u8>> = (0..9).map(|i| std::fs::read(out.path().join(format!("frame_{i:05}.png"))).unwrap()).collect();
    equal += (written == expected) as u32;
    let log = server.log();
    assert!(log.contains("adopting the job from the workers that still run it"), "the run left was not adopted:\n{log}");
    let line = log.lines().find(|l| l.contains("resuming a stored job")).expect("a resumed job");
    let from = logged(line, "from_step");
    let record = client.get_job(GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("coordinator stopped (SIGTERM) at step {stopped_at}; it left the run at step {left_at}; the next one adopted it at step {from}");
    assert!(left_at >= stopped_at && from == left_at, "adopted where it was left, no step lost or run twice: {left}\n{line}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 3. etcd is killed and restarted mid-job.
    let job = start_job(&client);
    started += 1;
    let (_, restarted_at) = running_past(&mut client, 8).await;
    etcd.restart().await;
    let survived = job.await.unwrap();
    assert!(survived.status.is_none(), "{:?}\n{}", survived.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&survived, "through the etcd restart") == expected) as u32;
    eprintln!("etcd restarted at step {restarted_at}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 4. A worker of the job drains (SIGTERM, a grace period of 60 s): the job moves from a
    // checkpoint of the next step to a group without it, with its plan, and the draining worker,
    // its job gone, exits at once.
    let job = start_job(&client);
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
    let from = logged(line, "from_step");
    let record = client.get_job(GetJobRequest { job_id: id }).await.unwrap().into_inner();
    let now = planned_workers(&record);
    assert!(!now.contains(&victim), "the job moved off the draining worker: {now:?}");
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("worker {victim} drained at step {drained_at}; the job moved to {now:?} from step {from}; {victim} exited {exited:?} after SIGTERM");
    assert!(from >= drained_at, "moved from a checkpoint after the SIGTERM, no step lost: {line}");
    assert!(exited < Duration::from_secs(20), "{victim} waited for the job's end, not for its move: {exited:?}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 5. A worker of the job is SIGKILLed: the job goes on from its last checkpoint with its plan,
    // on the worker left and the last spare.
    let job = start_job(&client);
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
    let now = planned_workers(&record);
    assert!(!now.contains(&victim), "the job went on without the dead worker: {now:?}");
    assert!(same_plan(record.plan.as_ref()), "the job kept its plan: {:?}", record.plan);
    eprintln!("worker {victim} killed at step {worker_at}; the job went on with its plan on {now:?}");
    wait_idle(&mut client, &ids, &alive(&workers, &ids)).await;

    // 6. The coordinator and a worker are SIGKILLed together, and no worker is spare: a rank of
    // the run is gone, so it cannot be adopted (the survivor is released, if it still holds it).
    // The job waits for a group of its plan's size rather than go on alone with another plan, and a
    // replacement worker (as a Deployment would start) gives it one.
    let job = start_job(&client);
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
    // (Started once the job was released and waits: the wait is what is checked.)
    let survivor = group[0].clone();
    wait_idle(&mut client, &[survivor.as_str()], &alive(&workers, &[survivor.as_str()])).await;
    workers.push(Worker::start_with(&etcd, "chaos", "c4", &grace));
    let resumed = watch(&mut client, &id).await;
    assert!(resumed.status.is_none(), "{:?}\n{}", resumed.status, logs(&server, &workers));
    completed += 1;
    equal += (frames(&resumed, "resumed on the survivor and a replacement") == expected) as u32;
    let log = server.log();
    // (The survivor either still held the run, and was released, or had dropped it already, its
    // peer gone: either way the job resumed from its checkpoint.)
    let line = log.lines().find(|l| l.contains("resuming a stored job")).expect("a resumed job");
    assert!(line.contains("adopted=false"), "a run without one of its ranks cannot be adopted: {line}");
    let record = client.get_job(GetJobRequest { job_id: id }).await.unwrap().into_inner();
    let now = planned_workers(&record);
    assert!(same_plan(record.plan.as_ref()) && now.contains(&"c4".to_string()), "the job kept its plan, on the replacement: {:?}", record.plan);
    eprintln!("coordinator and worker {} killed at step {both_at}; resumed from the checkpoint with its plan on {now:?}", group[1]);

    eprintln!(
        "chaos: {started} jobs started; killed: the coordinator, etcd (and restarted), a worker, the coordinator with a worker (SIGKILL each); stopped: the coordinator, a worker (SIGTERM); \
         {completed} jobs completed; {equal} of 6 disturbed videos equal to the undisturbed one byte for byte"
    );
    assert_eq!((completed, equal), (7, 6));
}
