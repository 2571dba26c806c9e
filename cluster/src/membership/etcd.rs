//! Membership in etcd: each worker's record under `/tessera/<cluster>/workers/<id>`, attached to
//! a lease that a background task keeps alive; a prefix get for the list and a prefix watch from
//! the list's revision for the changes. [`EtcdClaim`]s, under `/tessera/<cluster>/owners/<what>`,
//! name the one process that does something for the cluster, leased the same way. Every call is bounded by the heartbeat's request timeout,
//! and a watch that stays quiet for a heartbeat asks etcd for a progress report, so a dead or
//! unreachable etcd surfaces as an error within a lease TTL rather than a hang. (No HTTP/2 pings:
//! etcd closes connections that ping more often than its `--grpc-keepalive-min-time`, 5 s.)

use super::{
    validate_id, worker_key, workers_prefix, Heartbeat, LeaseHandle, LostSignal, Membership, MembershipEvent, MembershipSnapshot, MembershipWatch,
    Registration, WatchItem, WorkerRecord,
};
use crate::{ClusterError, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions,
    WatchResponse, WatchStream,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Membership in an etcd cluster (v3 API).
#[derive(Clone)]
pub struct EtcdMembership {
    client: Client,
    /// Where the records live and how to read them back.
    keys: Arc<KeySpace>,
    heartbeat: Heartbeat,
}

/// The cluster's key prefix, the request timeout, and the endpoints for error messages.
struct KeySpace {
    cluster: String,
    prefix: String,
    endpoints: String,
    timeout: Duration,
}

impl KeySpace {
    fn error(&self, what: &str, detail: impl std::fmt::Display) -> ClusterError {
        ClusterError::Membership(format!("etcd {} (cluster `{}`): {what}: {detail}", self.endpoints, self.cluster))
    }

    /// Runs one etcd request within the request timeout; `what` names it in errors.
    async fn call<T>(&self, what: &str, request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.error(what, e)),
            Err(_) => Err(self.error(what, format!("no answer within {:?}", self.timeout))),
        }
    }

    /// The worker id a key names, if it is a well-formed key under the prefix.
    fn worker_id<'k>(&self, key: &'k [u8]) -> Result<&'k str> {
        let key = std::str::from_utf8(key).map_err(|_| self.error("key", "not UTF-8"))?;
        let id = key.strip_prefix(&self.prefix).ok_or_else(|| self.error("key", format!("`{key}` is outside {}", self.prefix)))?;
        validate_id("worker_id", id)?;
        Ok(id)
    }

    /// A stored record, checked against the id its key names.
    fn record(&self, key: &[u8], value: &[u8]) -> Result<WorkerRecord> {
        let id = self.worker_id(key)?;
        let record = WorkerRecord::from_json(value)?;
        if record.worker_id != id {
            return Err(self.error("record", format!("key names worker `{id}` but the record says `{}`", record.worker_id)));
        }
        Ok(record)
    }

    /// One watch event as a membership change with its revision; malformed entries (written by
    /// something other than a worker) are logged and skipped.
    fn event(&self, event: &etcd_client::Event) -> Option<(u64, MembershipEvent)> {
        let kv = event.kv()?;
        let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        let change = match event.event_type() {
            EventType::Put => {
                self.record(kv.key(), kv.value()).map(|r| if kv.version() == 1 { MembershipEvent::Joined(r) } else { MembershipEvent::Updated(r) })
            }
            EventType::Delete => self.worker_id(kv.key()).map(|id| MembershipEvent::Left(id.to_string())),
        };
        match change {
            Ok(change) => Some((revision, change)),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping a malformed membership entry");
                None
            }
        }
    }
}

/// The lease TTL etcd is asked for: whole seconds, rounded up, at least one.
fn etcd_ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1)
}

/// Whether etcd said the lease does not exist (expired or revoked): etcd answers lease calls on an
/// unknown lease with NOT_FOUND (`ErrGRPCLeaseNotFound`). A keep-alive that finds no lease is
/// reported by etcd-client itself as `LeaseKeepAliveError` with only a message (no code), the one
/// place a text is read: the client library's own wording, not a server's.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::NotFound,
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("not found"),
        _ => false,
    }
}

impl EtcdMembership {
    /// Connects to etcd at `endpoints` (`http://host:port`) for the workers of `cluster`, and
    /// checks the connection with one read. Every timing comes from `heartbeat`.
    pub async fn connect(endpoints: &[String], cluster: &str, heartbeat: Heartbeat) -> Result<Self> {
        Self::connect_tls(endpoints, cluster, heartbeat, None).await
    }

    /// [`Self::connect`], over TLS when `tls` is given (`https://host:port` endpoints; etcd's CA,
    /// and this process's certificate for an etcd that requires client certificates, each
    /// connection with the files as they are then). Connections go to the first endpoint that
    /// answers ([`super::dial`]).
    pub async fn connect_tls(endpoints: &[String], cluster: &str, heartbeat: Heartbeat, tls: Option<Arc<crate::tls::EtcdTls>>) -> Result<Self> {
        validate_id("cluster", cluster)?;
        if endpoints.is_empty() {
            return Err(ClusterError::input("etcd_endpoints", "no etcd endpoint given"));
        }
        let scheme = if tls.is_some() { "https://" } else { "http://" };
        if let Some(e) = endpoints.iter().find(|e| e.contains("://") && !e.starts_with(scheme)) {
            return Err(ClusterError::input(
                "etcd_endpoints",
                format!("{e}: with TLS to etcd {} the endpoints are {scheme}...", if tls.is_some() { "on" } else { "off" }),
            ));
        }
        let timeout = heartbeat.request_timeout();
        let keys = Arc::new(KeySpace { cluster: cluster.to_string(), prefix: workers_prefix(cluster), endpoints: endpoints.join(","), timeout });
        let dialer = super::dial::Dialer::new(endpoints, tls, timeout)?;
        let channel = tonic::transport::Endpoint::from_shared(dialer.first_url())
            .map_err(|e| ClusterError::input("etcd_endpoints", e.to_string()))?
            .timeout(timeout)
            .connect_with_connector_lazy(dialer);
        let client = keys.call("connect", Client::from_channel(etcd_client::Channel::Tonic(channel), Some(ConnectOptions::new()))).await?;
        let membership = Self { client, keys, heartbeat };
        membership.list().await?;
        Ok(membership)
    }

    /// The cluster name the workers are registered under.
    pub fn cluster(&self) -> &str {
        &self.keys.cluster
    }

    /// The cluster's job records, over this connection (`/tessera/<cluster>/jobs/`).
    pub fn job_records(&self) -> Result<crate::records::EtcdRecords> {
        crate::records::EtcdRecords::new(self.client.clone(), &self.keys.cluster, &self.keys.endpoints, self.keys.timeout)
    }

    /// Puts `value` at `key` under a new lease, kept alive from then on, if no live lease holds
    /// the key (`None` then: nothing is written). `holder` names the lease's owner in logs.
    async fn create_leased(&self, key: &str, value: Vec<u8>, holder: &str) -> Result<Option<Leased>> {
        let hb = self.heartbeat;
        let mut leases = self.client.lease_client();
        let grant = self.keys.call("grant lease", leases.grant(etcd_ttl_secs(hb.lease_ttl()), None)).await?;
        let lease = grant.id();
        let handle = EtcdLease { client: self.client.clone(), keys: self.keys.clone(), key: key.to_string(), lease };
        // Create the key only if no live lease holds it.
        let txn =
            Txn::new().when([Compare::create_revision(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
        let mut kv = self.client.kv_client();
        let created = self.keys.call(&format!("create {key}"), kv.txn(txn)).await;
        if !matches!(&created, Ok(r) if r.succeeded()) {
            // Best effort: an unrevoked lease holds nothing and lapses on its own.
            let _ = handle.revoke().await;
            return created.map(|_| None);
        }
        let (lost_tx, lost) = watch::channel(None);
        let keep_alive = tokio::spawn(Self::keep_alive(self.client.lease_client(), lease, holder.to_string(), hb, lost_tx));
        let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0));
        Ok(Some(Leased { handle, ttl, keep_alive, lost }))
    }

    /// Claims `/tessera/<cluster>/owners/<what>` for `holder` when no live process holds it:
    /// the claim, or (`Err`) who holds it now. A holder that dies without releasing its claim
    /// loses it when its lease lapses, within a lease TTL.
    pub async fn try_claim(&self, what: &str, holder: &str) -> Result<std::result::Result<EtcdClaim, String>> {
        validate_id("what", what)?;
        let key = format!("/tessera/{}/owners/{what}", self.keys.cluster);
        if let Some(leased) = self.create_leased(&key, holder.as_bytes().to_vec(), holder).await? {
            tracing::info!(key, holder, lease = leased.handle.lease, "claimed");
            return Ok(Ok(EtcdClaim { leased, holder: holder.to_string() }));
        }
        let mut kv = self.client.kv_client();
        let now = self.keys.call(&format!("read {key}"), kv.get(key.as_str(), None)).await?;
        // (Released since: the next try takes it.)
        let held_by = now.kvs().first().map_or_else(|| "nobody (released just now)".to_string(), |kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok(Err(held_by))
    }

    /// Renews the lease every keep-alive period. Transport failures are retried (a restarted
    /// etcd keeps its leases); the task reports `lost` and ends only when etcd says the lease is
    /// gone. `worker_id` names the lease's holder in logs.
    async fn keep_alive(mut leases: LeaseClient, lease: i64, worker_id: String, heartbeat: Heartbeat, lost: LostSignal) {
        let mut ticks = tokio::time::interval(heartbeat.keep_alive_period());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            ticks.tick().await;
            let outcome = match tokio::time::timeout(heartbeat.request_timeout(), beat(&mut leases, lease, &mut stream)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Beat::Failed(format!("no answer within {:?}", heartbeat.request_timeout()))),
            };
            match outcome {
                Ok(()) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(worker_id, lease, after = ?since.elapsed(), "membership keep-alive recovered");
                    }
                }
                Err(Beat::Gone) => {
                    tracing::warn!(worker_id, lease, "lease expired in etcd: what it held is gone (a worker is out of the cluster)");
                    lost.send_replace(Some(format!("lease {lease:x} expired in etcd")));
                    return;
                }
                Err(Beat::Failed(detail)) => {
                    stream = None;
                    if failing_since.is_none() {
                        tracing::warn!(worker_id, lease, error = %detail, "membership keep-alive failed; retrying every heartbeat");
                        failing_since = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    /// Forwards the events of `stream` (whose first response is `first`) until it breaks, then
    /// sends the error and ends. After a quiet heartbeat it requests a progress report, and an
    /// etcd that does not answer within the request timeout counts as gone.
    async fn pump(keys: Arc<KeySpace>, heartbeat: Heartbeat, mut stream: WatchStream, first: WatchResponse, tx: mpsc::UnboundedSender<WatchItem>) {
        let mut next = Some(first);
        loop {
            let received = match next.take() {
                Some(r) => Ok(Some(r)),
                None => match tokio::time::timeout(heartbeat.period(), stream.message()).await {
                    Ok(received) => received,
                    Err(_quiet) => {
                        if let Err(e) = stream.request_progress().await {
                            let _ = tx.send(Err(keys.error("watch broken", e)));
                            return;
                        }
                        match tokio::time::timeout(heartbeat.request_timeout(), stream.message()).await {
                            Ok(received) => received,
                            Err(_) => {
                                let detail = format!("no answer to a progress request within {:?}", heartbeat.request_timeout());
                                let _ = tx.send(Err(keys.error("watch broken", detail)));
                                return;
                            }
                        }
                    }
                },
            };
            let response = match received {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let _ = tx.send(Err(keys.error("watch", "etcd closed the watch stream")));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(keys.error("watch broken", e)));
                    return;
                }
            };
            if response.canceled() {
                let _ = tx.send(Err(watch_canceled(&keys, &response)));
                return;
            }
            for change in response.events().iter().filter_map(|e| keys.event(e)) {
                if tx.send(Ok(change)).is_err() {
                    return; // the watch was dropped
                }
            }
        }
    }
}

/// Why etcd canceled a watch.
fn watch_canceled(keys: &KeySpace, response: &WatchResponse) -> ClusterError {
    if response.compact_revision() > 0 {
        keys.error("watch", format!("history before revision {} was compacted; list again", response.compact_revision()))
    } else {
        keys.error("watch canceled", response.cancel_reason())
    }
}

/// How one keep-alive round went wrong.
enum Beat {
    /// etcd says the lease no longer exists.
    Gone,
    /// No answer (connection broken, timeout); worth retrying.
    Failed(String),
}

/// One keep-alive round trip, opening the keep-alive stream first if there is none.
async fn beat(leases: &mut LeaseClient, lease: i64, stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>) -> std::result::Result<(), Beat> {
    let (keeper, responses) = match stream {
        Some(open) => open,
        None => {
            // Opening the stream does one keep-alive round trip itself.
            let opened = leases.keep_alive(lease).await.map_err(|e| if lease_not_found(&e) { Beat::Gone } else { Beat::Failed(e.to_string()) })?;
            *stream = Some(opened);
            return Ok(());
        }
    };
    keeper.keep_alive().await.map_err(|e| Beat::Failed(e.to_string()))?;
    match responses.message().await {
        Ok(Some(r)) if r.ttl() > 0 => Ok(()),
        Ok(Some(_)) => Err(Beat::Gone),
        Ok(None) => Err(Beat::Failed("etcd closed the keep-alive stream".into())),
        Err(e) => Err(Beat::Failed(e.to_string())),
    }
}

/// A key created under a lease that a task keeps alive.
struct Leased {
    handle: EtcdLease,
    /// The TTL etcd granted.
    ttl: Duration,
    keep_alive: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

/// A claim of [`EtcdMembership::try_claim`]: this process is the one that does `what` until it
/// releases the claim, or its lease is lost. Dropping it stops the keep-alive (the lease then
/// lapses within its TTL); [`EtcdClaim::release`] frees it at once.
pub struct EtcdClaim {
    leased: Leased,
    holder: String,
}

impl EtcdClaim {
    /// Waits until the claim is lost (etcd says its lease expired: this process was cut off from
    /// etcd for longer than the TTL) and says why.
    pub async fn lost(&mut self) -> String {
        let reason = self.leased.lost.wait_for(Option::is_some).await.map(|r| r.clone().unwrap_or_default());
        format!("the claim of {} on {}: {}", self.holder, self.leased.handle.key, reason.unwrap_or_else(|_| "keep-alive task ended".into()))
    }

    /// The lease's time to live as granted.
    pub fn ttl(&self) -> Duration {
        self.leased.ttl
    }

    /// Frees the claim at once (revokes its lease).
    pub async fn release(self) -> Result<()> {
        self.leased.keep_alive.abort();
        self.leased.handle.revoke().await
    }
}

impl Drop for EtcdClaim {
    fn drop(&mut self) {
        self.leased.keep_alive.abort();
    }
}

/// The etcd handle on one worker's lease.
struct EtcdLease {
    client: Client,
    keys: Arc<KeySpace>,
    key: String,
    lease: i64,
}

#[async_trait::async_trait]
impl LeaseHandle for EtcdLease {
    async fn put(&self, record: &WorkerRecord) -> Result<()> {
        record.validate()?;
        let value = record.to_json()?;
        let mut kv = self.client.kv_client();
        let what = format!("update worker `{}`", record.worker_id);
        self.keys.call(&what, kv.put(self.key.as_str(), value, Some(PutOptions::new().with_lease(self.lease)))).await?;
        Ok(())
    }

    async fn revoke(&self) -> Result<()> {
        let mut leases = self.client.lease_client();
        let what = format!("revoke lease {:x} of {}", self.lease, self.key);
        let revoked = self
            .keys
            .call(&what, async {
                match leases.revoke(self.lease).await {
                    Err(e) if lease_not_found(&e) => Ok(()), // already expired: the record is gone
                    other => other.map(drop),
                }
            })
            .await;
        revoked
    }
}

#[async_trait::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, record: WorkerRecord) -> Result<Registration> {
        record.validate()?;
        let key = worker_key(&self.keys.cluster, &record.worker_id);
        let Some(leased) = self.create_leased(&key, record.to_json()?, &record.worker_id).await? else {
            let detail =
                format!("already registered (its lease is alive; a restarted worker can register once it lapses, within {:?})", self.heartbeat.lease_ttl());
            return Err(self.keys.error(&format!("register worker `{}`", record.worker_id), detail));
        };
        tracing::info!(worker_id = record.worker_id, lease = leased.handle.lease, ttl = ?leased.ttl, "registered in etcd");
        Ok(Registration::new(record, leased.ttl, Box::new(leased.handle), leased.keep_alive, leased.lost))
    }

    async fn list(&self) -> Result<MembershipSnapshot> {
        let mut kv = self.client.kv_client();
        let response = self.keys.call("list workers", kv.get(self.keys.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = response.header().map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
        let mut workers = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            match self.keys.record(kv.key(), kv.value()) {
                Ok(record) => workers.push(record),
                Err(e) => tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping a malformed membership entry"),
            }
        }
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(MembershipSnapshot { workers, revision })
    }

    async fn watch_from(&self, revision: u64) -> Result<MembershipWatch> {
        let start = i64::try_from(revision)
            .ok()
            .and_then(|r| r.checked_add(1))
            .ok_or_else(|| ClusterError::input("revision", format!("{revision} is out of range")))?;
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut watches = self.client.watch_client();
        let keys = &self.keys;
        // The first response confirms that etcd created the watch (or says why not).
        let (stream, first) = keys
            .call("watch", async {
                let mut stream = watches.watch(keys.prefix.as_str(), Some(options)).await?;
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .await?;
        let first = match first {
            Some(first) if first.canceled() => return Err(watch_canceled(keys, &first)),
            Some(first) => first,
            None => return Err(keys.error("watch", "etcd closed the watch stream at once")),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(Self::pump(self.keys.clone(), self.heartbeat, stream, first, tx));
        Ok(MembershipWatch::new(rx, revision, Some(pump)))
    }

    fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttl_is_whole_seconds_rounded_up() {
        assert_eq!(etcd_ttl_secs(Duration::from_millis(300)), 1);
        assert_eq!(etcd_ttl_secs(Duration::from_secs(6)), 6);
        assert_eq!(etcd_ttl_secs(Duration::from_millis(6001)), 7);
        assert_eq!(etcd_ttl_secs(Duration::ZERO), 1);
    }

    #[test]
    fn keys_are_parsed_and_checked_against_the_record() {
        let keys = KeySpace { cluster: "c".into(), prefix: workers_prefix("c"), endpoints: "http://x".into(), timeout: Duration::from_secs(1) };
        assert_eq!(keys.worker_id(b"/tessera/c/workers/w-1").unwrap(), "w-1");
        assert!(keys.worker_id(b"/tessera/c/workers/a/b").is_err());
        assert!(keys.worker_id(b"/tessera/other/workers/w").is_err());
        let record = WorkerRecord::starting("w-1", "a:1", "a:2", "m", vec!["cpu".into()], 1);
        let json = record.to_json().unwrap();
        assert_eq!(keys.record(b"/tessera/c/workers/w-1", &json).unwrap(), record);
        let err = keys.record(b"/tessera/c/workers/w-2", &json).unwrap_err().to_string();
        assert!(err.contains("key names worker `w-2`"), "{err}");
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_within_the_timeout() {
        let hb = Heartbeat::new(Duration::from_millis(100)).unwrap();
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let started = std::time::Instant::now();
        let err = EtcdMembership::connect(&[format!("http://127.0.0.1:{port}")], "c", hb).await.err().expect("no etcd there").to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(EtcdMembership::connect(&[], "c", hb).await.is_err());
        assert!(EtcdMembership::connect(&["http://127.0.0.1:1".into()], "a/b", hb).await.is_err());
    }
}
