//! A partition, for real: coordinator A reaches etcd through a relay that the test cuts mid-job,
//! while A still reaches its two `tessera-worker` processes and its `--state` folder. A's claim on
//! the state store lapses (it cannot renew its lease), but A does not learn it: it goes on
//! driving the job. Coordinator B, on the same etcd and folder, takes the store over and adopts
//! the run. From then on the workers refuse A (SUPERSEDED, by the epochs the calls carry), and A
//! stops at once, writing nothing more of the job; B finishes it, and its frames equal an
//! undisturbed run's byte for byte.
//!
//! Needs `etcd`; without it the test skips, except under CI=true, where it fails.

mod common;
#[path = "../../shard-worker/tests/common/etcd.rs"]
mod etcd;
#[path = "common/workers.rs"]
mod workers;

use common::server::{generate, running_past, watch, Collected, Server};
use etcd::Etcd;
use std::time::Duration;
use tessera_proto::v1::{GenerateRequest, GetJobRequest, JobState, OutputFormat};
use tokio::sync::watch as signal;
use tonic_health::pb::health_check_response::ServingStatus;
use workers::{wait_idle, Worker, HEARTBEAT};

/// A TCP relay to a local port that the test can cut: every connection through it is dropped,
/// and none is accepted after.
struct Relay {
    endpoint: String,
    cut: signal::Sender<bool>,
}

impl Relay {
    async fn to(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (cut, _) = signal::channel(false);
        let mut stop = cut.subscribe();
        let conns = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                    _ = stop.wait_for(|c| *c) => return,
                };
                let mut stop = conns.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { endpoint, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// PNG frames, long enough (several seconds on two tiny workers) to outlast the takeover.
fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a paper boat on a pond".into(),
        width: 128,
        height: 128,
        num_frames: 9,
        steps: 300,
        seed: Some(13),
        output_format: OutputFormat::PngFrames as i32,
        ..Default::default()
    }
}

/// Each PNG frame's bytes, from a stream that must have ended with Done.
fn frames(c: &Collected, what: &str) -> Vec<Vec<u8>> {
    c.finished_frames(request().num_frames, what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_etcd_is_fenced_out_by_the_stores_next_owner() {
    let Some(etcd) = Etcd::start().await else { return };
    let state = tempfile::tempdir().unwrap();
    let relay = Relay::to(etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap()).await;
    #[rustfmt::skip]
    let common = ["--cluster", "fence", "--heartbeat", HEARTBEAT, "--step-timeout", "60s", "--state", state.path().to_str().unwrap(),
        "--checkpoint-every", "4", "--max-ranks", "2"];
    let mut a = Server::start_with(&[&["--etcd", relay.endpoint.as_str()][..], &common].concat());
    a.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;
    let mut client = a.client().await;
    let workers: Vec<Worker> = ["f0", "f1"].iter().map(|id| Worker::start(&etcd, "fence", id)).collect();
    let ids = ["f0", "f1"];
    wait_idle(&mut client, &ids, &workers.iter().collect::<Vec<_>>()).await;
    let expected = frames(&generate(&mut client, request()).await, "undisturbed");
    wait_idle(&mut client, &ids, &workers.iter().collect::<Vec<_>>()).await;

    let mut call = client.clone();
    let fenced = tokio::spawn(async move { generate(&mut call, request()).await });
    let (id, cut_at) = running_past(&mut client, 4).await;
    relay.cut();
    // B stands by until A's claim lapses (A cannot renew it), then owns the store and adopts.
    let b = Server::start_with(&[&["--etcd", etcd.endpoint().as_str()][..], &common].concat());
    let exit = a.wait_exit(Duration::from_secs(60)).await;
    let logs = |b: &Server| format!("--- A:\n{}\n--- B:\n{}", a.log(), b.log());
    assert!(exit.is_some_and(|s| !s.success()), "A stops with an error once a worker says it is superseded: {exit:?}\n{}", logs(&b));
    let a_log = a.log();
    assert!(a_log.contains("lost the state store") && a_log.contains("a worker says so"), "A says why it stopped:\n{}", logs(&b));
    let stream = fenced.await.unwrap();
    assert_eq!(stream.status.as_ref().map(|s| s.code()), Some(tonic::Code::Unavailable), "A's client is told to reattach: {:?}", stream.status);

    b.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;
    let mut client = b.client().await;
    let resumed = watch(&mut client, &id).await;
    assert_eq!(frames(&resumed, "finished by B"), expected, "the job B took over gives the undisturbed frames\n{}", logs(&b));
    let record = client.get_job(GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(record.state, JobState::Succeeded as i32);
    // A wrote nothing of the job after B took it (a failed record would not have been resumed).
    let b_log = b.log();
    let resumed_line = b_log.lines().find(|l| l.contains("resuming a stored job")).unwrap_or_else(|| panic!("B did not resume the stored job:\n{b_log}"));
    // B adopts the run where it stands, waiting for a checkpoint A sent every rank to finish;
    // unless A was fenced out in the middle of sending one (the ranks that got it wait for the
    // others): B then resumes from the stored checkpoint instead. Either way the
    // frames are the undisturbed ones (above).
    let adopted = b_log.contains("adopting the job from the workers that still run it");
    assert!(adopted || b_log.contains("cannot be adopted"), "B neither adopted A's run nor said why not:\n{b_log}");
    eprintln!("B: {}", &resumed_line[resumed_line.find("resuming").unwrap_or(0)..]);
    let stopped =
        a_log.lines().find(|l| l.contains("a later coordinator drives the job's workers")).unwrap_or_else(|| panic!("A's job was not superseded:\n{a_log}"));
    eprintln!("etcd cut off from A at step {cut_at}; then A: {stopped}");
}
