//! Admission: jobs wait in the bounded queue (by priority, tenants taking turns) and leave it when
//! the executor has a free slot. A slot is a [`SlotGuard`] handed to the job's driver; dropping it
//! frees the slot, and the job stops counting as its tenant's. The queue's depth is reported as it
//! changes, under the queue's lock, so that reports from tasks side by side arrive in order.

use super::queue::{Admit, JobQueue, QueueLimits};
use crate::CoordinatorError;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, watch, Notify};

/// A running job's claim on an executor slot; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotGuard {
    scheduler: Arc<Scheduler>,
    tenant: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // A job of the tenant ending may free its waiting jobs from its running cap.
        self.scheduler.change(|q| q.finished(&self.tenant));
        self.scheduler.running.fetch_sub(1, Ordering::SeqCst);
        self.scheduler.wake.notify_one();
    }
}

/// Where a queued job's slot arrives; an error means the job left the queue without one
/// (cancelled, or the server is shutting down).
pub type Admission = oneshot::Receiver<SlotGuard>;

/// Where the queue's depth goes each time it changes: the jobs waiting, and of them those held
/// by their tenant's running cap (the `tessera_queue_depth` and `tessera_queue_held` gauges).
pub type DepthReport = Box<dyn Fn(usize, usize) + Send + Sync>;

/// The queue and the count of running jobs.
pub struct Scheduler {
    /// Where each waiting job's slot goes.
    queue: Mutex<JobQueue<oneshot::Sender<SlotGuard>>>,
    running: AtomicUsize,
    wake: Notify,
    closed: AtomicBool,
    depth: DepthReport,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("queue", &self.queue).field("running", &self.running).field("closed", &self.closed).finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler whose queue holds new jobs to `limits`, reporting its depth to `depth` as it
    /// changes.
    pub fn new(limits: QueueLimits, depth: DepthReport) -> Arc<Self> {
        Arc::new(Self { queue: Mutex::new(JobQueue::new(limits)), running: AtomicUsize::new(0), wake: Notify::new(), closed: AtomicBool::new(false), depth })
    }

    fn queue(&self) -> MutexGuard<'_, JobQueue<oneshot::Sender<SlotGuard>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `change` on the queue and reports the depth it leaves, both under the queue's lock.
    fn change<R>(&self, change: impl FnOnce(&mut JobQueue<oneshot::Sender<SlotGuard>>) -> R) -> R {
        let mut queue = self.queue();
        let r = change(&mut queue);
        (self.depth)(queue.len(), queue.held());
        r
    }

    /// Queues job `id` of `tenant`; returns how many queued jobs go before it and where its slot
    /// will arrive. A new job is held to the queue's limits, an accepted one is not.
    pub fn enqueue(&self, id: &str, tenant: &str, priority: i32, admit: Admit) -> Result<(usize, Admission), CoordinatorError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(CoordinatorError::Unavailable("the server is shutting down and takes no new jobs".into()));
        }
        let (tx, rx) = oneshot::channel();
        let ahead = self.change(|q| q.push(id, tenant, priority, admit, tx))?;
        self.wake.notify_one();
        Ok((ahead, rx))
    }

    /// The limits new jobs are held to.
    pub fn limits(&self) -> QueueLimits {
        self.queue().limits()
    }

    /// QUEUE_FULL when no new job of `tenant` could be queued now (the queue checks again when a
    /// job is queued): so that costly admission work is not done for a job that would be refused.
    pub fn check_room(&self, tenant: &str) -> Result<(), CoordinatorError> {
        self.queue().check_room(tenant)
    }

    /// Takes job `id` out of the queue; false if it was not waiting there.
    pub fn remove(&self, id: &str) -> bool {
        self.change(|q| q.remove(id)).is_some()
    }

    /// Queued jobs that go before job `id`.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.queue().position(id)
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.queue().len()
    }

    /// Jobs holding a slot.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Takes no more jobs; empties the queue and returns the ids that were waiting (their
    /// admissions fail).
    pub fn close(&self) -> Vec<String> {
        self.closed.store(true, Ordering::SeqCst);
        self.change(|q| q.drain()).into_iter().map(|(id, _)| id).collect()
    }

    /// Hands slots to queued jobs, best first, while fewer than `slots` jobs run; returns when
    /// the slot publisher goes away.
    pub async fn dispatch(self: Arc<Self>, mut slots: watch::Receiver<usize>) {
        loop {
            let limit = *slots.borrow_and_update();
            while self.running.load(Ordering::SeqCst) < limit {
                let Some(taken) = self.change(|q| q.pop()) else { break };
                self.running.fetch_add(1, Ordering::SeqCst);
                // A job whose driver is gone drops the guard here, which frees the slot again.
                let _ = taken.item.send(SlotGuard { scheduler: self.clone(), tenant: taken.tenant });
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                changed = slots.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn no_report() -> DepthReport {
        Box::new(|_, _| {})
    }

    /// The depth is reported at every change, in the order of the changes, from tasks side by
    /// side too: the last report is the queue's depth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_depth_is_reported_as_the_queue_changes() {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let sched = Scheduler::new(
            QueueLimits { max_queued: 1000, max_queued_per_tenant: 0, ..QueueLimits::default() },
            Box::new(move |d, held| sink.lock().unwrap().push((d, held))),
        );
        let _a = sched.enqueue("a", "t", 0, Admit::New).unwrap();
        let _b = sched.enqueue("b", "t", 0, Admit::New).unwrap();
        assert!(sched.remove("a"));
        assert_eq!(*reports.lock().unwrap(), [(1, 0), (2, 0), (1, 0)]);
        let (slots_tx, slots_rx) = watch::channel(1usize);
        tokio::spawn(sched.clone().dispatch(slots_rx));
        let _b = tokio::time::timeout(Duration::from_secs(1), _b.1).await.unwrap().unwrap();
        assert_eq!(reports.lock().unwrap().last(), Some(&(0, 0)), "the job that left is reported");
        drop(slots_tx);
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let sched = sched.clone();
                tokio::spawn(async move {
                    for i in 0..200 {
                        let id = format!("{t}-{i}");
                        let _queued = sched.enqueue(&id, "t", 0, Admit::New).unwrap();
                        if i % 3 != 0 {
                            sched.remove(&id);
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(reports.lock().unwrap().last().copied(), Some((sched.queued(), 0)));
        assert_eq!(sched.close().len(), 4 * 67);
        assert_eq!(reports.lock().unwrap().last(), Some(&(0, 0)));
    }

    #[test]
    fn room_is_checked_before_costly_admission_work() {
        let sched = Scheduler::new(QueueLimits { max_queued: 1, max_queued_per_tenant: 0, ..QueueLimits::default() }, no_report());
        assert!(sched.check_room("t").is_ok());
        let _queued = sched.enqueue("a", "t", 0, Admit::New).unwrap();
        assert!(matches!(sched.check_room("u"), Err(CoordinatorError::QueueFull { limit: 1 })));
        assert!(sched.remove("a"));
        assert!(sched.check_room("t").is_ok());
    }

    #[tokio::test]
    async fn jobs_leave_the_queue_as_slots_free_best_first() {
        let sched = Scheduler::new(QueueLimits { max_queued: 4, max_queued_per_tenant: 0, ..QueueLimits::default() }, no_report());
        let (slots_tx, slots_rx) = watch::channel(0usize);
        let (_, mut low) = sched.enqueue("low", "t", -1, Admit::New).unwrap();
        let (_, mut high) = sched.enqueue("high", "t", 10, Admit::New).unwrap();
        let (_, mut gone) = sched.enqueue("gone", "t", 0, Admit::New).unwrap();
        assert_eq!(sched.position("low"), Some(2));
        tokio::spawn(sched.clone().dispatch(slots_rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(high.try_recv().is_err(), "no slot before the executor is ready");
        slots_tx.send(1).unwrap();
        let guard = tokio::time::timeout(Duration::from_secs(1), &mut high).await.unwrap().unwrap();
        assert_eq!(sched.running(), 1);
        assert!(sched.remove("gone"));
        assert!(gone.try_recv().is_err());
        assert_eq!(sched.queued(), 1);
        drop(guard);
        let guard = tokio::time::timeout(Duration::from_secs(1), &mut low).await.unwrap().unwrap();
        assert_eq!(sched.running(), 1);
        drop(guard);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sched.running(), 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_frees_its_slot_and_closing_refuses_new_jobs() {
        let sched = Scheduler::new(QueueLimits { max_queued: 4, max_queued_per_tenant: 0, ..QueueLimits::default() }, no_report());
        let (slots_tx, slots_rx) = watch::channel(1usize);
        let (_, dropped) = sched.enqueue("a", "t", 0, Admit::New).unwrap();
        drop(dropped);
        let (_, mut next) = sched.enqueue("b", "t", 0, Admit::New).unwrap();
        tokio::spawn(sched.clone().dispatch(slots_rx));
        let _guard = tokio::time::timeout(Duration::from_secs(1), &mut next).await.unwrap().unwrap();
        let (_, mut waiting) = sched.enqueue("c", "t", 0, Admit::New).unwrap();
        assert_eq!(sched.close(), ["c"]);
        assert!(waiting.try_recv().is_err());
        let err = sched.enqueue("d", "t", 0, Admit::Accepted).unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        drop(slots_tx);
    }

    /// With one slot, the slot goes to the tenant that runs nothing: a tenant's running job
    /// counts against its queued ones until its guard is dropped.
    #[tokio::test]
    async fn a_free_slot_goes_to_the_tenant_that_runs_nothing() {
        let sched = Scheduler::new(QueueLimits { max_queued: 8, max_queued_per_tenant: 0, ..QueueLimits::default() }, no_report());
        let (_slots_tx, slots_rx) = watch::channel(1usize);
        let (_, mut a0) = sched.enqueue("a0", "alice", 0, Admit::New).unwrap();
        let (_, mut a1) = sched.enqueue("a1", "alice", 0, Admit::New).unwrap();
        tokio::spawn(sched.clone().dispatch(slots_rx));
        let guard = tokio::time::timeout(Duration::from_secs(1), &mut a0).await.unwrap().unwrap();
        let (ahead, mut b0) = sched.enqueue("b0", "bob", 0, Admit::New).unwrap();
        assert_eq!(ahead, 0, "bob runs nothing, alice one job: bob goes first though he came later");
        drop(guard);
        let guard = tokio::time::timeout(Duration::from_secs(1), &mut b0).await.unwrap().unwrap();
        assert!(a1.try_recv().is_err(), "alice's second waits for the slot bob took");
        drop(guard);
        let _guard = tokio::time::timeout(Duration::from_secs(1), &mut a1).await.unwrap().unwrap();
    }

    /// A tenant at its running cap leaves a free slot to another tenant's job, and its next job
    /// starts when its running one ends.
    #[tokio::test]
    async fn a_tenant_at_its_cap_leaves_a_free_slot_to_others() {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let limits = QueueLimits { max_queued: 8, max_queued_per_tenant: 0, max_running_per_tenant: 1, ..QueueLimits::default() };
        let sched = Scheduler::new(limits, Box::new(move |d, held| sink.lock().unwrap().push((d, held))));
        let (_slots_tx, slots_rx) = watch::channel(2usize);
        let (_, mut a0) = sched.enqueue("a0", "alice", 0, Admit::New).unwrap();
        let (_, mut a1) = sched.enqueue("a1", "alice", 0, Admit::New).unwrap();
        tokio::spawn(sched.clone().dispatch(slots_rx));
        let guard = tokio::time::timeout(Duration::from_secs(1), &mut a0).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a1.try_recv().is_err(), "alice runs her one job: her next waits though a slot is free");
        assert_eq!((sched.running(), sched.queued()), (1, 1));
        assert_eq!(reports.lock().unwrap().last(), Some(&(1, 1)), "her waiting job is reported as held by her cap");
        let (ahead, mut b0) = sched.enqueue("b0", "bob", 0, Admit::New).unwrap();
        assert_eq!(ahead, 0);
        let _bob = tokio::time::timeout(Duration::from_secs(1), &mut b0).await.unwrap().unwrap();
        drop(guard);
        let _alice = tokio::time::timeout(Duration::from_secs(1), &mut a1).await.unwrap().unwrap();
        assert_eq!((sched.running(), sched.queued()), (2, 0));
        assert_eq!(reports.lock().unwrap().last(), Some(&(0, 0)));
    }
}
