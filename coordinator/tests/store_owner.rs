//! One coordinator per state store, for real: coordinators on one etcd cluster and one `--state`
//! folder. The first owns the store (an etcd claim) and serves; a second stands by, NOT_SERVING,
//! and takes over when the first shuts down (its claim released at once) or is SIGKILLed (its
//! claim lapses with its lease).
//!
//! Needs `etcd`; without it the test skips, except under CI=true, where it fails.

mod common;
#[path = "../../shard-worker/tests/common/etcd.rs"]
mod etcd;

use common::server::Server;
use etcd::Etcd;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;

/// The membership heartbeat (the claim's lease lapses within three of them).
const HEARTBEAT: &str = "250ms";

/// Waits until `server`'s log says `what`.
async fn until_logged(server: &Server, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while !server.log().contains(what) {
        assert!(Instant::now() < until, "never logged {what:?}:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_has_one_coordinator_and_a_standby_takes_over() {
    let Some(etcd) = Etcd::start().await else { return };
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint();
    let flags = ["--etcd", &endpoint, "--cluster", "owner", "--heartbeat", HEARTBEAT, "--state", state.path().to_str().unwrap()];
    let mut first = Server::start_with(&flags);
    first.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;

    // A second coordinator on the same store stands by while the first owns it.
    let second = Server::start_with(&flags);
    until_logged(&second, "another coordinator owns the state store").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(second.health().await, ServingStatus::NotServing, "two coordinators serve one store");
    assert!(first.scrape().await.contains("tessera_store_owner 1"), "the owner says so");
    assert!(second.scrape().await.contains("tessera_store_owner 0"), "the standby says so");

    // The first shuts down: it lets go of the store at once, and the second takes over.
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(30)).await.is_some_and(|s| s.success()), "{}", first.log());
    let stopped = Instant::now();
    second.wait_health(ServingStatus::Serving, Duration::from_secs(10)).await;
    let handover = stopped.elapsed();
    assert!(second.scrape().await.contains("tessera_store_owner 1"), "the new owner says so");

    // A third stands by; the second dies without letting go: its claim lapses with its lease.
    let mut second = second;
    let third = Server::start_with(&flags);
    until_logged(&third, "another coordinator owns the state store").await;
    second.kill();
    let killed = Instant::now();
    third.wait_health(ServingStatus::Serving, Duration::from_secs(30)).await;
    let takeover = killed.elapsed();
    eprintln!("standby serving {handover:?} after the owner's shutdown, {takeover:?} after the owner's SIGKILL");
    assert!(handover < Duration::from_secs(5), "a released store is taken over at once: {handover:?}");
    drop(etcd);
}
