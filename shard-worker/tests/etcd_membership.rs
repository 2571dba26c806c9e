//! `EtcdMembership` against a real etcd (Debian's `etcd-server`), started by each test on free
//! loopback ports with a private data folder and killed at the end: registration, list, watch,
//! update, revoke, lease expiry of a killed worker, a lease lost behind the worker's back, etcd
//! stopped and restarted under a live watch and registration, and malformed entries.
//!
//! Without `etcd` on PATH the tests skip with a printed reason, except under `CI=true`, where
//! they fail with an install hint.

mod common;

use common::etcd::{heartbeat, Etcd, PROMPTLY};

use std::time::{Duration, Instant};
use tessera_worker::membership::{EtcdMembership, Heartbeat, Membership, MembershipEvent, MembershipWatch, WorkerRecord, WorkerState};

fn record(id: &str, port: u16) -> WorkerRecord {
    WorkerRecord::starting(
        id,
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 100),
        "wan2.1-t2v-1.3b",
        vec!["cuda:0 NVIDIA H100 80GB HBM3".into()],
        80 << 30,
    )
}

async fn connect(etcd: &Etcd, cluster: &str) -> EtcdMembership {
    EtcdMembership::connect(&etcd.endpoints(), cluster, heartbeat()).await.unwrap()
}

/// The next event of a watch, failing the test on an error or after `limit`.
async fn next_event(watch: &mut MembershipWatch, limit: Duration) -> MembershipEvent {
    match tokio::time::timeout(limit, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no membership event within {limit:?}"),
    }
}

fn ids(workers: &[WorkerRecord]) -> Vec<&str> {
    workers.iter().map(|r| r.worker_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_register_list_watch_update_and_revoke() {
    let Some(etcd) = Etcd::start().await else { return };
    let coordinator = connect(&etcd, "test").await;
    let start = coordinator.list().await.unwrap();
    assert!(start.workers.is_empty());
    let mut watch = coordinator.watch_from(start.revision).await.unwrap();

    // Each worker has its own connection, as separate processes would, on a slower heartbeat so
    // that a prompt revoke is told apart from a lapsed lease even on a loaded machine.
    let slow = Heartbeat::new(Duration::from_secs(1)).unwrap();
    let m0 = EtcdMembership::connect(&etcd.endpoints(), "test", slow).await.unwrap();
    let m1 = EtcdMembership::connect(&etcd.endpoints(), "test", slow).await.unwrap();
    let mut w0 = m0.register(record("w0", 7000)).await.unwrap();
    let w1 = m1.register(record("w1", 7001)).await.unwrap();
    assert_eq!(w0.lease_ttl(), slow.lease_ttl(), "granted TTL");

    let snap = coordinator.list().await.unwrap();
    assert_eq!(ids(&snap.workers), ["w0", "w1"]);
    assert_eq!(snap.workers[1], record("w1", 7001));
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Joined(record("w0", 7000)));
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Joined(record("w1", 7001)));

    // Another cluster's namespace is separate; a taken id is refused.
    assert!(connect(&etcd, "other").await.list().await.unwrap().workers.is_empty());
    let err = m1.register(record("w0", 7009)).await.err().expect("duplicate id refused").to_string();
    assert!(err.contains("already registered"), "{err}");

    w0.update(WorkerState::Idle, None).await.unwrap();
    w0.update(WorkerState::Busy, Some("job-42".into())).await.unwrap();
    let mut idle = record("w0", 7000);
    idle.state = WorkerState::Idle;
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Updated(idle));
    match next_event(&mut watch, PROMPTLY).await {
        MembershipEvent::Updated(r) => assert_eq!((r.state, r.job_id.as_deref()), (WorkerState::Busy, Some("job-42"))),
        e => panic!("expected an update, got {e:?}"),
    }

    // Graceful shutdown: gone at once, well before the lease would lapse.
    let revoked = Instant::now();
    w1.revoke().await.unwrap();
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Left("w1".into()));
    assert!(revoked.elapsed() < slow.lease_ttl() - Duration::from_secs(1), "revoke took {:?}", revoked.elapsed());
    let snap = coordinator.list().await.unwrap();
    assert_eq!(ids(&snap.workers), ["w0"]);
    assert_eq!(snap.workers[0].job_id.as_deref(), Some("job-42"));
    assert_eq!(watch.revision(), snap.revision, "the watch has seen everything up to the list");
    w0.revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_disappears_within_its_lease_ttl_while_a_live_one_stays() {
    let Some(etcd) = Etcd::start().await else { return };
    let coordinator = connect(&etcd, "test").await;
    let live = connect(&etcd, "test").await.register(record("live", 7000)).await.unwrap();
    let doomed = connect(&etcd, "test").await.register(record("doomed", 7001)).await.unwrap();
    let ttl = doomed.lease_ttl();
    let snap = coordinator.list().await.unwrap();
    assert_eq!(ids(&snap.workers), ["doomed", "live"]);
    let mut watch = coordinator.watch_from(snap.revision).await.unwrap();

    // SIGKILL: the keep-alive task stops and nothing revokes the lease.
    tokio::time::sleep(heartbeat().period() * 2).await;
    let killed = Instant::now();
    drop(doomed);
    assert_eq!(next_event(&mut watch, ttl + PROMPTLY).await, MembershipEvent::Left("doomed".into()));
    let gone_after = killed.elapsed();
    eprintln!("killed worker left after {gone_after:?} (granted lease TTL {ttl:?})");
    // The lease was renewed about one heartbeat before the kill (allow for a starved task), and
    // etcd checks expiry every 500 ms.
    assert!(gone_after >= ttl / 4, "gone after {gone_after:?}: before the lease could lapse");
    assert!(gone_after <= ttl + Duration::from_secs(2), "gone after {gone_after:?}, lease TTL {ttl:?}");

    // The live worker has kept its lease alive through several TTLs.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(ids(&coordinator.list().await.unwrap().workers), ["live"]);
    assert!(live.lost_reason().is_none());
    assert!(tokio::time::timeout(Duration::from_millis(300), watch.next()).await.is_err(), "no other change");
    live.revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_in_etcd_is_reported_to_the_worker() {
    let Some(etcd) = Etcd::start().await else { return };
    let members = connect(&etcd, "test").await;
    let mut reg = members.register(record("w0", 7000)).await.unwrap();
    let snap = members.list().await.unwrap();
    let mut watch = members.watch_from(snap.revision).await.unwrap();

    // An operator (or etcd after a long partition) ends the lease behind the worker's back.
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let stored = raw.get("/tessera/test/workers/w0", None).await.unwrap();
    let lease = stored.kvs()[0].lease();
    assert_ne!(lease, 0, "the record is attached to a lease");
    raw.lease_revoke(lease).await.unwrap();

    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Left("w0".into()));
    let lost = tokio::time::timeout(PROMPTLY, reg.lost()).await.expect("the keep-alive notices").to_string();
    assert!(lost.contains("expired"), "{lost}");
    let err = reg.update(WorkerState::Idle, None).await.unwrap_err().to_string();
    assert!(err.contains("cannot update"), "{err}");
    assert!(members.list().await.unwrap().workers.is_empty(), "no resurrection");
    reg.revoke().await.unwrap(); // revoking a lease already gone is fine
                                 // The worker can register again.
    members.register(record("w0", 7000)).await.unwrap().revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_the_list_revision_misses_nothing_and_repeats_nothing() {
    let Some(etcd) = Etcd::start().await else { return };
    let m = connect(&etcd, "test").await;
    let mut regs = Vec::new();
    for i in 0..3 {
        regs.push(m.register(record(&format!("w{i}"), 7000 + i)).await.unwrap());
    }
    let snap = m.list().await.unwrap();
    // Changes between the list and the watch: the watch must replay exactly these.
    regs[1].update(WorkerState::Idle, None).await.unwrap();
    regs.remove(2).revoke().await.unwrap();
    let mut watch = m.watch_from(snap.revision).await.unwrap();
    let late = m.register(record("w9", 7009)).await.unwrap();

    let mut replay: std::collections::BTreeMap<String, WorkerRecord> = snap.workers.into_iter().map(|r| (r.worker_id.clone(), r)).collect();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = next_event(&mut watch, PROMPTLY).await;
        match &event {
            MembershipEvent::Joined(r) | MembershipEvent::Updated(r) => {
                replay.insert(r.worker_id.clone(), r.clone());
            }
            MembershipEvent::Left(id) => {
                replay.remove(id);
            }
        }
        seen.push(event);
    }
    assert!(matches!(&seen[0], MembershipEvent::Updated(r) if r.worker_id == "w1" && r.state == WorkerState::Idle), "{seen:?}");
    assert_eq!(seen[1], MembershipEvent::Left("w2".into()));
    assert_eq!(seen[2], MembershipEvent::Joined(record("w9", 7009)));
    assert!(tokio::time::timeout(Duration::from_millis(500), watch.next()).await.is_err(), "nothing repeated");
    assert_eq!(replay.into_values().collect::<Vec<_>>(), m.list().await.unwrap().workers);
    late.revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_under_the_prefix_are_skipped() {
    let Some(etcd) = Etcd::start().await else { return };
    let m = connect(&etcd, "test").await;
    let snap = m.list().await.unwrap();
    let mut watch = m.watch_from(snap.revision).await.unwrap();
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    raw.put("/tessera/test/workers/junk", "{not json", None).await.unwrap();
    let impostor = serde_json::to_vec(&record("someone-else", 7000)).unwrap();
    raw.put("/tessera/test/workers/impostor", impostor, None).await.unwrap();
    let reg = m.register(record("w0", 7000)).await.unwrap();
    // The valid registration comes through; the junk before it was skipped.
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Joined(record("w0", 7000)));
    assert_eq!(ids(&m.list().await.unwrap().workers), ["w0"]);
    reg.revoke().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_is_an_error_not_a_hang_and_a_restart_is_survived() {
    let Some(mut etcd) = Etcd::start().await else { return };
    let coordinator = connect(&etcd, "test").await;
    let worker = connect(&etcd, "test").await;
    let mut reg = worker.register(record("w0", 7000)).await.unwrap();
    let snap = coordinator.list().await.unwrap();
    let mut watch = coordinator.watch_from(snap.revision).await.unwrap();

    etcd.stop();
    let stopped = Instant::now();
    let err = match tokio::time::timeout(PROMPTLY, watch.next()).await {
        Ok(Some(Err(e))) => e.to_string(),
        other => panic!("expected the watch to report the broken connection, got {other:?}"),
    };
    assert!(err.contains(&etcd.endpoint()) && err.contains("watch"), "{err}");
    eprintln!("watch error after {:?}: {err}", stopped.elapsed());
    assert!(watch.next().await.is_none(), "the watch ends after its error");

    let started = Instant::now();
    let err = coordinator.list().await.unwrap_err().to_string();
    assert!(err.contains("list workers"), "{err}");
    assert!(started.elapsed() < heartbeat().request_timeout() + Duration::from_secs(2), "list took {:?}", started.elapsed());
    let err = reg.update(WorkerState::Idle, None).await.unwrap_err();
    assert!(matches!(err, tessera_cluster::ClusterError::Membership(_)), "{err}");
    assert!(coordinator.watch_from(snap.revision).await.is_err());
    assert!(reg.lost_reason().is_none(), "an unreachable etcd is not a lost lease");

    // etcd comes back with its data: the same clients reconnect, the worker's lease survived,
    // and the coordinator resumes its watch where it broke off.
    etcd.restart().await;
    let resumed = tokio::time::timeout(PROMPTLY, async {
        loop {
            if let Ok(snap) = coordinator.list().await {
                return snap;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the coordinator reconnects");
    assert_eq!(ids(&resumed.workers), ["w0"]);
    let mut watch = coordinator.watch_from(watch.revision()).await.unwrap();
    let updated = tokio::time::timeout(PROMPTLY, async {
        loop {
            if reg.update(WorkerState::Idle, None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(updated.is_ok(), "the worker reconnects");
    match next_event(&mut watch, PROMPTLY).await {
        MembershipEvent::Updated(r) => assert_eq!(r.state, WorkerState::Idle),
        e => panic!("expected the update, got {e:?}"),
    }
    // The keep-alive resumed: the registration outlives several TTLs after the restart.
    tokio::time::sleep(reg.lease_ttl() * 3).await;
    assert_eq!(ids(&coordinator.list().await.unwrap().workers), ["w0"]);
    assert!(reg.lost_reason().is_none());
    reg.revoke().await.unwrap();
    assert_eq!(next_event(&mut watch, PROMPTLY).await, MembershipEvent::Left("w0".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_is_detected_by_timeouts_and_the_expired_lease_reported_after() {
    let Some(etcd) = Etcd::start().await else { return };
    let m = connect(&etcd, "test").await;
    let reg = m.register(record("w0", 7000)).await.unwrap();
    let snap = m.list().await.unwrap();
    let mut watch = m.watch_from(snap.revision).await.unwrap();

    etcd.signal("-STOP");
    let frozen = Instant::now();
    let err = match tokio::time::timeout(PROMPTLY, watch.next()).await {
        Ok(Some(Err(e))) => e.to_string(),
        other => {
            etcd.signal("-CONT");
            panic!("expected the watch to give up on a silent etcd, got {other:?}")
        }
    };
    let detected = frozen.elapsed();
    let listing = Instant::now();
    let list = m.list().await;
    let list_took = listing.elapsed();
    etcd.signal("-CONT");
    assert!(list_took < heartbeat().request_timeout() + Duration::from_secs(3), "list took {list_took:?}");
    eprintln!("frozen etcd: watch error after {detected:?}: {err}");
    assert!(err.contains("progress request"), "{err}");
    let bound = heartbeat().period() * 2 + heartbeat().request_timeout() + Duration::from_secs(3);
    assert!(detected <= bound, "detected after {detected:?}, expected within {bound:?}");
    let list_err = list.unwrap_err().to_string();
    // tonic's request timeout or ours, whichever fires first: both are the heartbeat's.
    assert!(list_err.contains("list workers") && (list_err.contains("no answer within") || list_err.contains("Timeout")), "{list_err}");

    // Frozen for longer than the lease TTL: once thawed, etcd expires the lease (a frozen etcd
    // does not refresh leases the way a restarted one does), and the worker is told.
    let snap = tokio::time::timeout(PROMPTLY, async {
        loop {
            if let Ok(snap) = m.list().await {
                return snap;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("etcd answers again");
    let mut reg = reg;
    let lost = tokio::time::timeout(PROMPTLY, reg.lost()).await.expect("the keep-alive learns the lease expired").to_string();
    assert!(lost.contains("expired"), "{lost}");
    assert!(m.list().await.unwrap().workers.is_empty(), "listed after the thaw: {:?}", ids(&snap.workers));
    // It registers again.
    m.register(record("w0", 7000)).await.unwrap().revoke().await.unwrap();
}
