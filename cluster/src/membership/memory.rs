//! In-process membership for the embedded mode and tests: the same semantics as etcd (revisions,
//! leases that lapse when their keep-alive stops, list then watch without a gap) on a mutex-held
//! map and the tokio clock.

use super::{Heartbeat, LeaseHandle, LostSignal, Membership, MembershipEvent, MembershipSnapshot, MembershipWatch, Registration, WatchItem, WorkerRecord};
use crate::{ClusterError, Result};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How many past events a [`MemoryMembership`] keeps for `watch_from`; older revisions are
/// compacted, like etcd's history.
pub const HISTORY_LIMIT: usize = 4096;

/// Membership held in this process. Clones share the same store, so in the embedded mode the
/// workers and the coordinator each hold one.
#[derive(Clone)]
pub struct MemoryMembership {
    store: Arc<Mutex<Store>>,
    heartbeat: Heartbeat,
}

/// A registered worker.
struct Entry {
    record: WorkerRecord,
    lease: u64,
}

/// Everything, under one lock (never held across an await).
#[derive(Default)]
struct Store {
    /// Revision of the last change (0: none yet).
    revision: u64,
    workers: BTreeMap<String, Entry>,
    /// Live leases: id → (deadline, worker id).
    leases: HashMap<u64, (Instant, String)>,
    next_lease: u64,
    /// The last [`HISTORY_LIMIT`] events, oldest first.
    history: VecDeque<(u64, MembershipEvent)>,
    /// Revision of the newest event dropped from `history` (0: none dropped).
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<WatchItem>>,
}

impl Store {
    /// Records a change at the next revision and tells every watcher.
    fn publish(&mut self, event: MembershipEvent) {
        self.revision += 1;
        let revision = self.revision;
        self.watchers.retain(|w| w.send(Ok((revision, event.clone()))).is_ok());
        if self.history.len() == HISTORY_LIMIT {
            if let Some((old, _)) = self.history.pop_front() {
                self.compacted = old;
            }
        }
        self.history.push_back((revision, event));
    }

    /// Drops a lease and the worker attached to it (a `Left` event if there was one).
    fn end_lease(&mut self, lease: u64) {
        if let Some((_, worker_id)) = self.leases.remove(&lease) {
            if self.workers.get(&worker_id).is_some_and(|e| e.lease == lease) {
                self.workers.remove(&worker_id);
                self.publish(MembershipEvent::Left(worker_id));
            }
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic elsewhere while holding the lock leaves plain data that is still consistent per
    // field; keep serving rather than propagate the poison.
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryMembership {
    /// An empty membership on `heartbeat`.
    pub fn new(heartbeat: Heartbeat) -> Self {
        Self { store: Arc::new(Mutex::new(Store::default())), heartbeat }
    }

    /// Expires `lease` when its deadline passes without renewal; ends with the lease or the store.
    async fn watch_lease_expiry(store: Weak<Mutex<Store>>, lease: u64) {
        loop {
            let deadline = {
                let Some(store) = store.upgrade() else { return };
                let mut s = lock(&store);
                match s.leases.get(&lease) {
                    None => return,
                    Some((deadline, _)) if *deadline <= Instant::now() => {
                        tracing::info!(lease, "membership lease expired");
                        s.end_lease(lease);
                        return;
                    }
                    Some((deadline, _)) => *deadline,
                }
            };
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Renews `lease` every keep-alive period; reports `lost` and ends when the lease is gone.
    async fn keep_alive(store: Weak<Mutex<Store>>, lease: u64, heartbeat: Heartbeat, lost: LostSignal) {
        let mut ticks = tokio::time::interval(heartbeat.keep_alive_period());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(store) = store.upgrade() else {
                lost.send_replace(Some("membership store dropped".into()));
                return;
            };
            let mut s = lock(&store);
            match s.leases.get_mut(&lease) {
                Some((deadline, _)) => *deadline = Instant::now() + heartbeat.lease_ttl(),
                None => {
                    lost.send_replace(Some(format!("lease {lease} expired or was revoked")));
                    return;
                }
            }
        }
    }
}

impl Default for MemoryMembership {
    fn default() -> Self {
        Self::new(Heartbeat::default())
    }
}

/// The memory store's handle on one lease.
struct MemoryLease {
    store: Weak<Mutex<Store>>,
    lease: u64,
}

impl MemoryLease {
    fn store(&self) -> Result<Arc<Mutex<Store>>> {
        self.store.upgrade().ok_or_else(|| ClusterError::Membership("the in-process membership store was dropped".into()))
    }
}

#[async_trait::async_trait]
impl LeaseHandle for MemoryLease {
    async fn put(&self, record: &WorkerRecord) -> Result<()> {
        record.validate()?;
        let store = self.store()?;
        let mut s = lock(&store);
        if !s.leases.contains_key(&self.lease) {
            return Err(ClusterError::Membership(format!("worker `{}`: lease {} expired or was revoked", record.worker_id, self.lease)));
        }
        let entry = Entry { record: record.clone(), lease: self.lease };
        let previous = s.workers.insert(record.worker_id.clone(), entry);
        let event = if previous.is_some() { MembershipEvent::Updated(record.clone()) } else { MembershipEvent::Joined(record.clone()) };
        s.publish(event);
        Ok(())
    }

    async fn revoke(&self) -> Result<()> {
        let store = self.store()?;
        lock(&store).end_lease(self.lease);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Membership for MemoryMembership {
    async fn register(&self, record: WorkerRecord) -> Result<Registration> {
        record.validate()?;
        let lease = {
            let mut s = lock(&self.store);
            if s.workers.contains_key(&record.worker_id) {
                return Err(ClusterError::Membership(format!(
                    "worker `{}` is already registered (its lease is alive; a restarted worker can register once it lapses, within {:?})",
                    record.worker_id,
                    self.heartbeat.lease_ttl()
                )));
            }
            s.next_lease += 1;
            let lease = s.next_lease;
            s.leases.insert(lease, (Instant::now() + self.heartbeat.lease_ttl(), record.worker_id.clone()));
            s.workers.insert(record.worker_id.clone(), Entry { record: record.clone(), lease });
            s.publish(MembershipEvent::Joined(record.clone()));
            lease
        };
        let weak = Arc::downgrade(&self.store);
        tokio::spawn(Self::watch_lease_expiry(weak.clone(), lease));
        let (lost_tx, lost_rx) = watch::channel(None);
        let keep_alive = tokio::spawn(Self::keep_alive(weak.clone(), lease, self.heartbeat, lost_tx));
        let handle = MemoryLease { store: weak, lease };
        Ok(Registration::new(record, self.heartbeat.lease_ttl(), Box::new(handle), keep_alive, lost_rx))
    }

    async fn list(&self) -> Result<MembershipSnapshot> {
        let s = lock(&self.store);
        Ok(MembershipSnapshot { workers: s.workers.values().map(|e| e.record.clone()).collect(), revision: s.revision })
    }

    async fn watch_from(&self, revision: u64) -> Result<MembershipWatch> {
        let mut s = lock(&self.store);
        if revision < s.compacted {
            return Err(ClusterError::Membership(format!("watch from revision {revision}: history up to revision {} was compacted; list again", s.compacted)));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // Past events and the live subscription are taken under one lock: no gap, no repeat.
        for (rev, event) in s.history.iter().filter(|(rev, _)| *rev > revision) {
            // The receiver is alive (held right here), so sending cannot fail.
            let _ = tx.send(Ok((*rev, event.clone())));
        }
        s.watchers.push(tx);
        Ok(MembershipWatch::new(rx, revision, None))
    }

    fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::WorkerState;
    use std::time::Duration;

    fn hb() -> Heartbeat {
        Heartbeat::new(Duration::from_millis(100)).unwrap()
    }

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord::starting(id, "127.0.0.1:7001", "127.0.0.1:7101", "tiny", vec!["cpu".into()], 1 << 30)
    }

    async fn next(w: &mut MembershipWatch) -> MembershipEvent {
        tokio::time::timeout(Duration::from_secs(60), w.next()).await.expect("an event").expect("watch open").expect("no error")
    }

    #[tokio::test(start_paused = true)]
    async fn register_list_update_revoke_in_order() {
        let m = MemoryMembership::new(hb());
        let start = m.list().await.unwrap();
        assert!(start.workers.is_empty());
        let mut w = m.watch_from(start.revision).await.unwrap();

        let mut a = m.register(record("a")).await.unwrap();
        let b = m.register(record("b")).await.unwrap();
        let snap = m.list().await.unwrap();
        assert_eq!(snap.workers.iter().map(|r| r.worker_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(snap.revision, start.revision + 2);

        a.update(WorkerState::Busy, Some("job-1".into())).await.unwrap();
        assert_eq!(a.record().state, WorkerState::Busy);
        b.revoke().await.unwrap();

        assert_eq!(next(&mut w).await, MembershipEvent::Joined(record("a")));
        assert_eq!(next(&mut w).await, MembershipEvent::Joined(record("b")));
        match next(&mut w).await {
            MembershipEvent::Updated(r) => assert_eq!((r.worker_id.as_str(), r.state, r.job_id.as_deref()), ("a", WorkerState::Busy, Some("job-1"))),
            e => panic!("expected an update, got {e:?}"),
        }
        assert_eq!(next(&mut w).await, MembershipEvent::Left("b".into()));
        assert_eq!(w.revision(), start.revision + 4);
        let ids: Vec<_> = m.list().await.unwrap().workers.into_iter().map(|r| r.worker_id).collect();
        assert_eq!(ids, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_and_bad_updates_are_refused() {
        let m = MemoryMembership::new(hb());
        let mut a = m.register(record("a")).await.unwrap();
        let err = m.register(record("a")).await.err().expect("duplicate refused").to_string();
        assert!(err.contains("already registered"), "{err}");
        let mut bad = record("x/y");
        bad.state = WorkerState::Idle;
        assert!(m.register(bad).await.is_err());
        let err = a.update(WorkerState::Busy, None).await.unwrap_err().to_string();
        assert!(err.contains("job_id"), "{err}");
        assert_eq!(a.record().state, WorkerState::Starting, "a refused update keeps the old record");
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_registration_outlives_many_lease_ttls() {
        let m = MemoryMembership::new(hb());
        let reg = m.register(record("a")).await.unwrap();
        tokio::time::sleep(hb().lease_ttl() * 20).await;
        assert_eq!(m.list().await.unwrap().workers.len(), 1);
        assert!(reg.lost_reason().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_registration_lapses_within_the_ttl() {
        let m = MemoryMembership::new(hb());
        let snap = m.list().await.unwrap();
        let mut w = m.watch_from(snap.revision).await.unwrap();
        let reg = m.register(record("a")).await.unwrap();
        assert!(matches!(next(&mut w).await, MembershipEvent::Joined(_)));
        let killed = Instant::now();
        drop(reg); // the keep-alive stops, as when the process is killed
        tokio::time::sleep(hb().lease_ttl() / 2).await;
        assert_eq!(m.list().await.unwrap().workers.len(), 1, "still there before the TTL");
        assert_eq!(next(&mut w).await, MembershipEvent::Left("a".into()));
        let gone_after = killed.elapsed();
        assert!(gone_after <= hb().lease_ttl() + hb().period(), "gone after {gone_after:?}");
        assert!(m.list().await.unwrap().workers.is_empty());
        // The id is free again.
        m.register(record("a")).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_whose_lease_expired_reports_lost_and_refuses_updates() {
        let m = MemoryMembership::new(hb());
        let mut reg = m.register(record("a")).await.unwrap();
        // The store loses the lease behind the registration's back (as etcd does after a long
        // partition): end it directly.
        let lease = lock(&m.store).workers["a"].lease;
        lock(&m.store).end_lease(lease);
        let err = tokio::time::timeout(Duration::from_secs(5), reg.lost()).await.expect("lost reported").to_string();
        assert!(err.contains("expired or was revoked"), "{err}");
        let err = reg.update(WorkerState::Idle, None).await.unwrap_err().to_string();
        assert!(err.contains("cannot update"), "{err}");
        reg.revoke().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_from_a_revision_sees_nothing_twice_and_misses_nothing() {
        let m = MemoryMembership::new(hb());
        let mut regs = Vec::new();
        for i in 0..3 {
            regs.push(m.register(record(&format!("w{i}"))).await.unwrap());
        }
        let snap = m.list().await.unwrap();
        assert_eq!(snap.workers.len(), 3);
        // Changes after the list, before the watch starts: the watch must replay exactly these.
        regs[0].update(WorkerState::Idle, None).await.unwrap();
        regs.pop().unwrap().revoke().await.unwrap();
        let mut w = m.watch_from(snap.revision).await.unwrap();
        // And changes after the watch started.
        m.register(record("w9")).await.unwrap().revoke().await.unwrap();

        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(next(&mut w).await);
        }
        let mut idle = record("w0");
        idle.state = WorkerState::Idle;
        assert_eq!(
            seen,
            [MembershipEvent::Updated(idle), MembershipEvent::Left("w2".into()), MembershipEvent::Joined(record("w9")), MembershipEvent::Left("w9".into())]
        );
        assert!(tokio::time::timeout(Duration::from_secs(1), w.next()).await.is_err(), "no repeated events");

        // Replaying the list's revision onto the list gives the current list.
        let mut replay: BTreeMap<String, WorkerRecord> = snap.workers.into_iter().map(|r| (r.worker_id.clone(), r)).collect();
        for e in seen {
            match e {
                MembershipEvent::Joined(r) | MembershipEvent::Updated(r) => {
                    replay.insert(r.worker_id.clone(), r);
                }
                MembershipEvent::Left(id) => {
                    replay.remove(&id);
                }
            }
        }
        assert_eq!(replay.into_values().collect::<Vec<_>>(), m.list().await.unwrap().workers);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_from_a_compacted_revision_is_an_error() {
        let m = MemoryMembership::new(hb());
        let mut reg = m.register(record("a")).await.unwrap();
        for i in 0..HISTORY_LIMIT {
            let state = if i % 2 == 0 { WorkerState::Idle } else { WorkerState::Draining };
            reg.update(state, None).await.unwrap();
        }
        let err = m.watch_from(0).await.err().expect("compacted").to_string();
        assert!(err.contains("compacted"), "{err}");
        let snap = m.list().await.unwrap();
        assert!(m.watch_from(snap.revision - 10).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn shared_through_a_trait_object() {
        let m: Arc<dyn Membership> = Arc::new(MemoryMembership::new(hb()));
        let reg = m.register(record("a")).await.unwrap();
        assert_eq!(m.list().await.unwrap().workers, [record("a")]);
        reg.revoke().await.unwrap();
        assert!(m.list().await.unwrap().workers.is_empty());
        assert_eq!(m.heartbeat(), hb());
    }
}
