//! `tessera serve --auth-token-file`: calls without a listed bearer token are UNAUTHENTICATED,
//! each tenant sees and cancels only its own jobs (another tenant's is NOT_FOUND), the group
//! `admin` sees all, the CLI clients send `TESSERA_TOKEN`, and no token reaches the log; tenants
//! share the queue fairly.

mod common;

use common::server::{generate, long_request, small_request, Server};
use std::io::Write;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{Accepted, CancelJobRequest, GenerateEvent, GenerateRequest, GetJobRequest, JobState, ListJobsRequest};
use tonic::transport::Channel;
use tonic::{Code, IntoRequest, Request, Streaming};

type Client = TesseraClient<Channel>;

const ALICE: &str = "t0k-alice-5f2c9e41d7";
const BOB: &str = "t0k-bob-8a13c6e0b2";
const ROOT: &str = "t0k-root-77d04b19fe";

/// A long request sent as `token` with `seed`: its Accepted and the stream of its events.
async fn accept_long(mut client: Client, token: &str, seed: u64) -> (Accepted, Streaming<GenerateEvent>) {
    let mut s = client.generate(as_caller(token, GenerateRequest { seed: Some(seed), ..long_request() })).await.unwrap().into_inner();
    let Some(Event::Accepted(acc)) = s.message().await.unwrap().unwrap().event else { panic!("no Accepted") };
    (acc, s)
}

/// `events` once its job ran its first step (within a minute).
async fn first_step(mut events: Streaming<GenerateEvent>) -> Streaming<GenerateEvent> {
    let wait = async {
        loop {
            if let Some(Event::Progress(p)) = events.message().await.unwrap().unwrap().event {
                if p.step >= 1 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), wait).await.expect("the job starts");
    events
}

/// `message` with `authorization: Bearer token`.
fn as_caller<T>(token: &str, message: T) -> Request<T> {
    let mut r = message.into_request();
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn tenants_see_and_cancel_only_their_own_jobs() {
    let mut tokens = tempfile::NamedTempFile::new().unwrap();
    writeln!(tokens, "# token,user,uid,groups\n{ALICE},alice,1001\n{BOB},bob,1002,\"dev\"\n{ROOT},root,0,\"dev,admin\"").unwrap();
    let server = Server::start_serving(&["--auth-token-file", tokens.path().to_str().unwrap()]).await;
    let mut client = server.client().await;

    // No token, or one the file does not list: UNAUTHENTICATED, before anything else is looked at.
    let none = client.list_jobs(ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let forged = client.generate(as_caller("t0k-mallory-000000", small_request(1))).await.unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated, "{forged:?}");
    assert!(!forged.message().contains("mallory"), "the status echoes the token: {}", forged.message());

    // Alice's job is hers: recorded with her tenant, invisible to Bob.
    let done = generate(&mut client, as_caller(ALICE, small_request(2))).await;
    assert!(done.status.is_none(), "{:?}", done.status);
    let id = done.job_id();
    let job = client.get_job(as_caller(ALICE, GetJobRequest { job_id: id.clone() })).await.unwrap().into_inner();
    assert_eq!((job.tenant.as_str(), job.state), ("alice", JobState::Succeeded as i32));
    let hidden = client.get_job(as_caller(BOB, GetJobRequest { job_id: id.clone() })).await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    let unknown = client.get_job(as_caller(BOB, GetJobRequest { job_id: "j-0000000000000000".into() })).await.unwrap_err();
    assert_eq!(hidden.message().replace(&id, "ID"), unknown.message().replace("j-0000000000000000", "ID"), "another tenant's job reads as no job");
    let cancel = client.cancel_job(as_caller(BOB, CancelJobRequest { job_id: id.clone() })).await.unwrap_err();
    assert_eq!(cancel.code(), Code::NotFound, "{cancel:?}");
    let lister = client.clone();
    let listed = |token: &'static str| {
        let mut c = lister.clone();
        async move { c.list_jobs(as_caller(token, ListJobsRequest::default())).await.unwrap().into_inner().jobs.into_iter().map(|j| j.job_id).collect::<Vec<_>>() }
    };
    assert_eq!(listed(ALICE).await, std::slice::from_ref(&id));
    assert!(listed(BOB).await.is_empty(), "Bob lists Alice's job");
    let bobs = generate(&mut client, as_caller(BOB, small_request(3))).await;
    let bob_id = bobs.job_id();
    assert_eq!(listed(BOB).await, std::slice::from_ref(&bob_id));
    // The admin group sees everyone's.
    assert_eq!(listed(ROOT).await, [bob_id.clone(), id.clone()]);
    let seen = client.get_job(as_caller(ROOT, GetJobRequest { job_id: id.clone() })).await.unwrap().into_inner();
    assert_eq!(seen.tenant, "alice");

    // The CLI client sends TESSERA_TOKEN.
    let status = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(["status", "--server", &server.addr]).env_remove("TESSERA_TOKEN");
        if let Some(t) = token {
            cmd.env("TESSERA_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = status(Some(ALICE));
    assert!(ok && out.contains(&id) && out.contains("by alice") && !out.contains(&bob_id), "{out}");
    let (ok, out) = status(None);
    assert!(!ok && out.contains("UNAUTHENTICATED"), "{out}");
    let (ok, out) = status(Some(ROOT));
    assert!(ok && out.contains(&id) && out.contains(&bob_id), "{out}");

    let log = server.log();
    for token in [ALICE, BOB, ROOT, "mallory"] {
        assert!(!log.contains(token), "the server log holds a token: {log}");
    }
}

/// A tenant holds at most `--max-queued-per-tenant` jobs waiting (the next is RESOURCE_EXHAUSTED
/// naming it and the limit, counted under its own cause), while another tenant still queues; a
/// tenant that runs nothing goes ahead of one that runs a job, though it came later; and only
/// the group `priority` jumps the turns with a priority above `--max-tenant-priority` (0).
#[tokio::test]
async fn a_tenant_holds_its_share_of_the_queue_and_tenants_take_turns() {
    let mut tokens = tempfile::NamedTempFile::new().unwrap();
    writeln!(tokens, "{ALICE},alice,1001\n{BOB},bob,1002\n{ROOT},ops,1003,\"priority\"").unwrap();
    let server = Server::start_serving(&["--auth-token-file", tokens.path().to_str().unwrap(), "--max-queued-per-tenant", "2"]).await;
    let mut client = server.client().await;
    let caller = client.clone();
    let accept = |token: &'static str, seed: u64| accept_long(caller.clone(), token, seed);
    // Alice's first job runs; her next two wait.
    let (running, first) = accept(ALICE, 1).await;
    let _first = first_step(first).await;
    let (a1, _s1) = accept(ALICE, 2).await;
    let (a2, _s2) = accept(ALICE, 3).await;
    assert_eq!((a1.queue_position, a2.queue_position), (0, 1));
    let refused = client.generate(as_caller(ALICE, small_request(4))).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("\"alice\"") && refused.message().contains("2 jobs waiting"), "{}", refused.message());
    // Bob still queues, ahead of Alice's waiting jobs: he runs nothing, she runs one.
    let (b0, _b) = accept(BOB, 5).await;
    assert_eq!(b0.queue_position, 0, "Bob's first job waits behind none of Alice's");
    let job = client.get_job(as_caller(ALICE, GetJobRequest { job_id: a1.job_id.clone() })).await.unwrap().into_inner();
    assert_eq!(job.state, JobState::Queued as i32);
    // Bob may not jump the turns; ops, in the group `priority`, may.
    let raised = client.generate(as_caller(BOB, GenerateRequest { priority: 1, ..small_request(6) })).await.unwrap_err();
    assert_eq!(raised.code(), Code::PermissionDenied, "{raised:?}");
    assert!(raised.message().contains("priority 1") && raised.message().contains("at most 0"), "{}", raised.message());
    let why = tessera_proto::reason::failure(&raised).expect("a reason");
    assert_eq!((why.reason, why.field.as_deref()), (tessera_proto::reason::Reason::PermissionDenied, Some("priority")));
    let (ops, _o) = {
        let mut c = caller.clone();
        let mut s = c.generate(as_caller(ROOT, GenerateRequest { priority: 50, ..long_request() })).await.unwrap().into_inner();
        let Some(Event::Accepted(acc)) = s.message().await.unwrap().unwrap().event else { panic!("no Accepted") };
        (acc, s)
    };
    assert_eq!(ops.queue_position, 0, "a priority of 50 goes before every waiting job");
    let metrics = server.scrape().await;
    assert!(metrics.lines().any(|l| l.starts_with("tessera_requests_rejected_total{cause=\"tenant_queue_full\"} 1")), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("tessera_requests_rejected_total{cause=\"priority_not_allowed\"} 1")), "{metrics}");
    for (token, id) in [(ALICE, running.job_id), (ALICE, a1.job_id), (ALICE, a2.job_id), (BOB, b0.job_id), (ROOT, ops.job_id)] {
        client.cancel_job(as_caller(token, CancelJobRequest { job_id: id })).await.unwrap();
    }
}

/// With `--max-running-per-tenant 1` and two workers in groups of one: a tenant's second job
/// waits though a worker is free, another tenant's later job takes that worker, and the waiting
/// job starts once the tenant's running one ends.
#[tokio::test]
async fn a_tenant_at_its_running_cap_leaves_the_free_worker_to_another() {
    let mut tokens = tempfile::NamedTempFile::new().unwrap();
    writeln!(tokens, "{ALICE},alice,1001\n{BOB},bob,1002").unwrap();
    let flags = ["--auth-token-file", tokens.path().to_str().unwrap(), "--workers", "2", "--max-ranks", "1", "--max-running-per-tenant", "1"];
    let server = Server::start_serving(&flags).await;
    let mut client = server.client().await;
    let caller = client.clone();
    let accept = |token: &'static str, seed: u64| accept_long(caller.clone(), token, seed);
    let (a0, s0) = accept(ALICE, 1).await;
    let _s0 = first_step(s0).await;
    let (a1, s1) = accept(ALICE, 2).await;
    assert_eq!(a1.queue_position, 0);
    let (b0, sb) = accept(BOB, 3).await;
    assert_eq!(b0.queue_position, 0, "Bob goes before Alice's waiting job: she runs her most");
    let _sb = first_step(sb).await;
    let state = |id: String| {
        let mut c = caller.clone();
        async move { c.get_job(as_caller(ALICE, GetJobRequest { job_id: id })).await.unwrap().into_inner().state }
    };
    assert_eq!(state(a1.job_id.clone()).await, JobState::Queued as i32, "Alice's second job waits while Bob's runs on the other worker");
    let metrics = server.scrape().await;
    assert!(metrics.lines().any(|l| l == "tessera_queue_held 1"), "the metric tells the cap from a shortage: {metrics}");
    client.cancel_job(as_caller(ALICE, CancelJobRequest { job_id: a0.job_id.clone() })).await.unwrap();
    let _s1 = first_step(s1).await;
    assert_eq!(state(a1.job_id.clone()).await, JobState::Running as i32);
    for (token, id) in [(ALICE, a1.job_id), (BOB, b0.job_id)] {
        client.cancel_job(as_caller(token, CancelJobRequest { job_id: id })).await.unwrap();
    }
}
