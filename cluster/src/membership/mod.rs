//! Worker membership: workers register a [`WorkerRecord`] under a lease and keep it alive; the
//! coordinator lists the workers, then watches for changes from the listed revision, so it never
//! misses or double-counts a change. A worker whose keep-alive stops (process killed) disappears
//! when its lease lapses. Every timing derives from one [`Heartbeat`].
//!
//! Two implementations of the [`Membership`] trait: [`EtcdMembership`] for clusters and
//! [`MemoryMembership`] for the embedded mode and tests.

mod dial;
mod etcd;
mod memory;
mod presence;
mod record;

pub use etcd::{EtcdClaim, EtcdMembership};
pub use memory::MemoryMembership;
pub use presence::Presence;
pub use record::{check_state_and_job, validate_id, worker_key, workers_prefix, ComputeFigures, ModelInfo, WorkerRecord, WorkerState, MAX_ID_LEN};

use crate::{ClusterError, Result};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The default heartbeat: the keep-alive period, from which every other membership timing derives.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A lease lives this many heartbeats without a keep-alive before the worker is out.
pub const LEASE_HEARTBEATS: u32 = 3;

/// The heartbeat of one membership instance and the timings derived from it (tests use a short
/// one; production keeps [`HEARTBEAT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    period: Duration,
}

impl Heartbeat {
    /// The shortest heartbeat accepted.
    pub const MIN: Duration = Duration::from_millis(10);

    /// A heartbeat of `period` (at least [`Heartbeat::MIN`]).
    pub fn new(period: Duration) -> Result<Self> {
        if period < Self::MIN {
            return Err(ClusterError::input("heartbeat", format!("{period:?} is shorter than the minimum {:?}", Self::MIN)));
        }
        Ok(Self { period })
    }

    /// A heartbeat from a duration setting (`2s`, `250ms`; see [`crate::duration`]).
    pub fn parse(value: &str) -> Result<Self> {
        Self::new(crate::duration::parse_duration(value).map_err(|e| ClusterError::input("heartbeat", e))?)
    }

    /// The heartbeat itself.
    pub fn period(self) -> Duration {
        self.period
    }

    /// How often a registration renews its lease: once per heartbeat.
    pub fn keep_alive_period(self) -> Duration {
        self.period
    }

    /// How long a lease lives without renewal: [`LEASE_HEARTBEATS`] heartbeats.
    pub fn lease_ttl(self) -> Duration {
        self.period * LEASE_HEARTBEATS
    }

    /// The longest a single store request (connect, put, list, revoke, one keep-alive) may take:
    /// one lease TTL, beyond which its answer is stale anyway.
    pub fn request_timeout(self) -> Duration {
        self.lease_ttl()
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { period: HEARTBEAT }
    }
}

/// The workers at one revision of the store.
#[derive(Clone, Debug, PartialEq)]
pub struct MembershipSnapshot {
    /// Every registered worker, sorted by id.
    pub workers: Vec<WorkerRecord>,
    /// The store revision the list was read at; pass it to [`Membership::watch_from`].
    pub revision: u64,
}

/// A change to the set of workers.
#[derive(Clone, Debug, PartialEq)]
pub enum MembershipEvent {
    /// A worker registered.
    Joined(WorkerRecord),
    /// A registered worker rewrote its record (state, job).
    Updated(WorkerRecord),
    /// A worker left: it revoked its registration or its lease lapsed. Carries its id.
    Left(String),
}

/// One item of a watch: the event and the store revision it happened at, or the error that ended
/// the watch.
pub(crate) type WatchItem = Result<(u64, MembershipEvent)>;

/// A stream of [`MembershipEvent`]s, in store order. It yields `Err` once when the store is lost
/// (connection broken, history compacted) and then ends; resume with
/// `watch_from(watch.revision())` or list again.
pub struct MembershipWatch {
    events: mpsc::UnboundedReceiver<WatchItem>,
    revision: u64,
    /// The task feeding `events` (etcd); aborted when the watch is dropped.
    pump: Option<tokio::task::JoinHandle<()>>,
}

impl MembershipWatch {
    pub(crate) fn new(events: mpsc::UnboundedReceiver<WatchItem>, revision: u64, pump: Option<tokio::task::JoinHandle<()>>) -> Self {
        Self { events, revision, pump }
    }

    /// The next change; `None` after the watch ended (following an `Err`).
    pub async fn next(&mut self) -> Option<Result<MembershipEvent>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The revision of the last event delivered (at first, the revision the watch started after).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<MembershipEvent>>> {
        self.events.poll_recv(cx).map(|item| {
            item.map(|item| {
                item.map(|(revision, event)| {
                    self.revision = self.revision.max(revision);
                    event
                })
            })
        })
    }
}

impl futures_util::Stream for MembershipWatch {
    type Item = Result<MembershipEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for MembershipWatch {
    fn drop(&mut self) {
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }
}

/// Where workers register and coordinators look them up. Object safe: hold it as
/// `Arc<dyn Membership>`.
#[async_trait::async_trait]
pub trait Membership: Send + Sync {
    /// Registers `record` under a new lease and keeps the lease alive in a background task until
    /// the returned [`Registration`] is revoked or dropped. A worker id that is already
    /// registered (with a live lease) is refused.
    async fn register(&self, record: WorkerRecord) -> Result<Registration>;

    /// Every registered worker and the revision they were read at.
    async fn list(&self) -> Result<MembershipSnapshot>;

    /// The changes after `revision` (exclusive), in order: `watch_from(list().revision)` misses
    /// nothing that happened after the list and repeats nothing the list contained.
    async fn watch_from(&self, revision: u64) -> Result<MembershipWatch>;

    /// The heartbeat this membership runs on.
    fn heartbeat(&self) -> Heartbeat;
}

/// A backend's handle on one lease: rewrite the record under it, or revoke it.
#[async_trait::async_trait]
pub(crate) trait LeaseHandle: Send + Sync {
    /// Stores `record` under the lease (fails if the lease is gone).
    async fn put(&self, record: &WorkerRecord) -> Result<()>;
    /// Revokes the lease, deleting the record; a lease already gone is not an error.
    async fn revoke(&self) -> Result<()>;
}

/// Why a registration's lease was lost, as the keep-alive task reports it (`None` while alive).
pub(crate) type LostSignal = watch::Sender<Option<String>>;

/// A worker's live registration. While it exists a background task renews the lease every
/// heartbeat. [`Registration::revoke`] removes the worker at once (graceful shutdown); dropping it
/// only stops the keep-alive, so the record lingers until the lease lapses, as when the process
/// is killed.
pub struct Registration {
    record: WorkerRecord,
    lease_ttl: Duration,
    lease: Box<dyn LeaseHandle>,
    keep_alive: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

impl Registration {
    pub(crate) fn new(
        record: WorkerRecord,
        lease_ttl: Duration,
        lease: Box<dyn LeaseHandle>,
        keep_alive: tokio::task::JoinHandle<()>,
        lost: watch::Receiver<Option<String>>,
    ) -> Self {
        Self { record, lease_ttl, lease, keep_alive, lost }
    }

    /// The record as last stored.
    pub fn record(&self) -> &WorkerRecord {
        &self.record
    }

    /// The lease's time to live as granted by the store (etcd rounds up to whole seconds).
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Rewrites the record with a new state and job, under the same lease. Fails (and keeps the
    /// old record) when the state and job disagree or the lease was lost.
    pub async fn update(&mut self, state: WorkerState, job_id: Option<String>) -> Result<()> {
        let mut next = self.record.clone();
        next.state = state;
        next.job_id = job_id;
        self.replace(next).await
    }

    /// Rewrites the whole record under the same lease (the worker id must stay the same). Fails
    /// (and keeps the old record) when the record is invalid or the lease was lost.
    pub async fn replace(&mut self, next: WorkerRecord) -> Result<()> {
        next.validate()?;
        if next.worker_id != self.record.worker_id {
            return Err(ClusterError::input("worker_id", format!("a registration of `{}` cannot store `{}`", self.record.worker_id, next.worker_id)));
        }
        if let Some(reason) = self.lost_reason() {
            return Err(ClusterError::Membership(format!("worker `{}`: cannot update, {reason}", self.record.worker_id)));
        }
        self.lease.put(&next).await?;
        self.record = next;
        Ok(())
    }

    /// Stops the keep-alive and revokes the lease, deleting the record at once.
    pub async fn revoke(self) -> Result<()> {
        self.keep_alive.abort();
        self.lease.revoke().await
    }

    /// Why the lease was lost, if it was (it expired or was revoked in the store).
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Waits until the lease is lost (the store says it expired) and says why. A worker that
    /// sees this is out of the cluster and must register again.
    pub async fn lost(&mut self) -> ClusterError {
        let id = &self.record.worker_id;
        match self.lost.wait_for(Option::is_some).await {
            Ok(reason) => ClusterError::Membership(format!("worker `{id}`: {}", reason.as_deref().unwrap_or("lease lost"))),
            Err(_) => ClusterError::Membership(format!("worker `{id}`: keep-alive task ended")),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timing_derives_from_the_heartbeat() {
        let hb = Heartbeat::default();
        assert_eq!(hb.period(), HEARTBEAT);
        assert_eq!(hb.keep_alive_period(), HEARTBEAT);
        assert_eq!(hb.lease_ttl(), HEARTBEAT * LEASE_HEARTBEATS);
        let fast = Heartbeat::new(Duration::from_millis(100)).unwrap();
        assert_eq!(fast.lease_ttl(), Duration::from_millis(300));
        assert_eq!(fast.request_timeout(), fast.lease_ttl());
        assert!(Heartbeat::new(Duration::from_millis(1)).unwrap_err().to_string().contains("heartbeat"));
    }

    #[test]
    fn membership_is_object_safe() {
        fn takes(_: Option<std::sync::Arc<dyn Membership>>) {}
        takes(None);
    }
}
