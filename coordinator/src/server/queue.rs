//! The bounded job queue, fair between tenants. Higher priority goes first. Among equal
//! priorities tenants take turns: the next job is the first waiting job of the tenant that runs
//! the fewest jobs, of those the tenant whose last job started longest ago (or never), and a
//! tenant's own jobs go in arrival order. So a tenant that queues fifty jobs holds up another
//! tenant's one job by at most one of them, and not at all while it already runs more jobs than
//! the other. Limits bound what
//! new jobs may take: the whole queue, and each tenant's share of it. Jobs already accepted (a
//! coordinator's restart queues its unfinished jobs again) are queued whatever the limits say.
//! An operator may also cap the jobs one tenant runs at once: a tenant at its cap is passed over,
//! and its jobs wait, while others' jobs take the free groups; a run adopted from its workers
//! goes on whatever the cap.
//! Entries can be removed by id at any time (cancellation, a client that went away, a passed
//! deadline).

use crate::CoordinatorError;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// How many jobs may wait, and how far a tenant may raise its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most jobs waiting in the queue.
    pub max_queued: usize,
    /// Most jobs of one tenant waiting in the queue (0: only `max_queued` bounds them).
    pub max_queued_per_tenant: usize,
    /// Most jobs of one tenant running at once (0: no cap). A tenant at its cap waits even
    /// when a group is free, so that one tenant's hours-long jobs cannot hold every group.
    /// Accepted jobs are held to it too (they wait; none is refused); adopted runs are not.
    pub max_running_per_tenant: usize,
    /// Highest priority a caller may ask for unless its groups allow any (`auth::PRIORITY_GROUP`,
    /// `auth::ADMIN_GROUP`): without it, priority would let any tenant jump the turns.
    pub max_priority: i32,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self { max_queued: 64, max_queued_per_tenant: 16, max_running_per_tenant: 0, max_priority: 0 }
    }
}

impl QueueLimits {
    /// PERMISSION_DENIED naming `priority` when a caller that may not ask for any priority
    /// asks for more than [`max_priority`](Self::max_priority).
    pub fn check_priority(&self, priority: i32, any_priority: bool) -> Result<(), CoordinatorError> {
        if !any_priority && priority > self.max_priority {
            return Err(CoordinatorError::PriorityNotAllowed { asked: priority, max: self.max_priority });
        }
        Ok(())
    }
}

/// Whether a job joining the queue is held to its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A new job: refused when the queue, or its tenant's share of it, is full.
    New,
    /// A job accepted before (resumed from the state store): it is queued whatever the limits
    /// say, so that nothing accepted is lost, and waits for its tenant's running cap.
    Accepted,
    /// A job whose run its workers still hold (adopted from a coordinator that died): queued
    /// whatever the limits say, and started whatever its tenant's running cap, since its
    /// workers run it already and no other job could use them meanwhile.
    Adopted,
}

/// A job taken from the queue to run.
#[derive(Debug)]
pub struct Taken<T> {
    /// Its id.
    pub id: String,
    /// Its tenant, which counts it as running until [`JobQueue::finished`].
    pub tenant: String,
    /// What was queued with it.
    pub item: T,
}

/// A waiting job.
#[derive(Debug)]
struct Entry<T> {
    tenant: String,
    priority: i32,
    seq: u64,
    /// Whether its tenant's running cap holds it (all but adopted runs).
    capped: bool,
    item: T,
}

/// What a tenant has been given: its jobs running now (taken from the queue and not yet
/// [`finished`](JobQueue::finished)) and when its last job was taken (a count of the jobs taken
/// before it; 0: none was).
#[derive(Clone, Copy, Debug, Default)]
struct Served {
    running: usize,
    last: u64,
}

/// Which waiting job goes first: priority (higher first), then its tenant's [`Served`] (fewer
/// running, then served longer ago), then arrival.
type Key = (Reverse<i32>, usize, u64, u64);

/// A bounded queue of `T` keyed by job id, fair between tenants (see the module docs).
#[derive(Debug)]
pub struct JobQueue<T> {
    limits: QueueLimits,
    next_seq: u64,
    entries: HashMap<String, Entry<T>>,
    /// Tenants with jobs running or served before, kept while they run or wait.
    served: HashMap<String, Served>,
    /// Jobs taken so far.
    taken: u64,
}

impl<T> JobQueue<T> {
    /// An empty queue held to `limits`.
    pub fn new(limits: QueueLimits) -> Self {
        Self { limits, next_seq: 0, entries: HashMap::new(), served: HashMap::new(), taken: 0 }
    }

    /// The limits new jobs are held to.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries that wait only for their tenant's running cap: their tenant runs its most jobs.
    pub fn held(&self) -> usize {
        self.entries.values().filter(|e| self.held_by_cap(e, self.served_of(&e.tenant))).count()
    }

    /// Adds `item` for job `id` of `tenant` at `priority`; returns how many entries will leave
    /// before it. A new job finding the queue, or its tenant's share, full is refused
    /// ([`CoordinatorError::QueueFull`], [`CoordinatorError::TenantQueueFull`]); an id already
    /// queued is a bug of the caller and refused as invalid.
    pub fn push(&mut self, id: &str, tenant: &str, priority: i32, admit: Admit, item: T) -> Result<usize, CoordinatorError> {
        if self.entries.contains_key(id) {
            return Err(CoordinatorError::invalid_argument("job_id", format!("{id:?} is already queued")));
        }
        if admit == Admit::New {
            self.check_room(tenant)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let capped = admit != Admit::Adopted;
        self.entries.insert(id.to_string(), Entry { tenant: tenant.to_string(), priority, seq, capped, item });
        self.position(id).ok_or_else(|| CoordinatorError::Internal(format!("job {id} left the queue as it joined")))
    }

    /// [`CoordinatorError::QueueFull`] when the queue holds its most jobs,
    /// [`CoordinatorError::TenantQueueFull`] when `tenant` holds its most.
    pub fn check_room(&self, tenant: &str) -> Result<(), CoordinatorError> {
        let QueueLimits { max_queued, max_queued_per_tenant, .. } = self.limits;
        if self.entries.len() >= max_queued {
            return Err(CoordinatorError::QueueFull { limit: max_queued });
        }
        if max_queued_per_tenant > 0 && self.entries.values().filter(|e| e.tenant == tenant).count() >= max_queued_per_tenant {
            return Err(CoordinatorError::TenantQueueFull { tenant: tenant.to_string(), limit: max_queued_per_tenant });
        }
        Ok(())
    }

    /// Takes the entry that runs next and counts it as running for its tenant until
    /// [`finished`](Self::finished). None when nothing waits, or when every tenant that waits
    /// runs its most jobs already.
    pub fn pop(&mut self) -> Option<Taken<T>> {
        let id = self
            .entries
            .iter()
            .filter(|(_, e)| !self.held_by_cap(e, self.served_of(&e.tenant)))
            .min_by_key(|(_, e)| self.key(e, self.served_of(&e.tenant)))
            .map(|(id, _)| id.clone())?;
        let entry = self.entries.remove(&id)?;
        self.taken += 1;
        let served = self.served.entry(entry.tenant.clone()).or_default();
        served.running += 1;
        served.last = self.taken;
        Some(Taken { id, tenant: entry.tenant, item: entry.item })
    }

    /// A job of `tenant` taken from the queue stopped running.
    pub fn finished(&mut self, tenant: &str) {
        if let Some(s) = self.served.get_mut(tenant) {
            s.running = s.running.saturating_sub(1);
        }
        self.forget_idle(tenant);
    }

    /// Takes job `id` out of the queue, if it is there.
    pub fn remove(&mut self, id: &str) -> Option<T> {
        let entry = self.entries.remove(id)?;
        self.forget_idle(&entry.tenant);
        Some(entry.item)
    }

    /// Forgets what `tenant` was served once it neither runs nor waits (it then counts as
    /// served longest ago, as a tenant never served does).
    fn forget_idle(&mut self, tenant: &str) {
        if self.served.get(tenant).is_some_and(|s| s.running == 0) && !self.entries.values().any(|e| e.tenant == tenant) {
            self.served.remove(tenant);
        }
    }

    /// Whether entry `e`, of a tenant that was `served` so, waits for its tenant's running cap:
    /// the cap holds it (all but adopted runs) and the tenant runs its most jobs.
    fn held_by_cap(&self, e: &Entry<T>, served: Served) -> bool {
        let cap = self.limits.max_running_per_tenant;
        e.capped && cap > 0 && served.running >= cap
    }

    fn served_of(&self, tenant: &str) -> Served {
        self.served.get(tenant).copied().unwrap_or_default()
    }

    fn key(&self, e: &Entry<T>, served: Served) -> Key {
        (Reverse(e.priority), served.running, served.last, e.seq)
    }

    /// Entries that leave before job `id` (None when it is not queued), if no job arrives or
    /// ends meanwhile. The jobs of tenants at their running cap count after every other, in the
    /// turns they would take without the cap: when they leave depends on which jobs end first.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.order().iter().position(|queued| queued == id)
    }

    /// Takes every entry, in the order they would have run.
    pub fn drain(&mut self) -> Vec<(String, T)> {
        let order = self.order();
        order.into_iter().filter_map(|id| self.entries.remove(&id).map(|e| (id, e.item))).collect()
    }

    /// The ids in the order they leave if no job arrives or ends meanwhile: [`pop`](Self::pop)
    /// played out, each tenant's next job on a heap. Tenants that reach their running cap are
    /// set aside until no other job is left; their jobs then follow as if there were no cap.
    /// Adopted runs, which the cap does not hold, have the highest priority (above any
    /// request's), so a tenant's next job is one the cap holds only once its adopted ones left.
    fn order(&self) -> Vec<String> {
        let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, e) in &self.entries {
            by_tenant.entry(&e.tenant).or_default().push(id);
        }
        let mut tenants: Vec<(Served, Vec<&str>)> = by_tenant
            .into_iter()
            .map(|(tenant, mut ids)| {
                // A tenant's own jobs leave best first: its served state is the same for all.
                ids.sort_unstable_by_key(|id| self.key(&self.entries[*id], Served::default()));
                ids.reverse();
                (self.served_of(tenant), ids)
            })
            .collect();
        let next = |tenants: &[(Served, Vec<&str>)], t: usize| tenants[t].1.last().map(|id| Reverse((self.key(&self.entries[*id], tenants[t].0), t)));
        let mut heap: BinaryHeap<_> = (0..tenants.len()).filter_map(|t| next(&tenants, t)).collect();
        let (mut order, mut taken) = (Vec::with_capacity(self.entries.len()), self.taken);
        let (mut capped, mut uncapped) = (Vec::new(), false);
        loop {
            let Some(Reverse((key, t))) = heap.pop() else {
                if capped.is_empty() {
                    break;
                }
                uncapped = true;
                heap.extend(capped.drain(..));
                continue;
            };
            let held = tenants[t].1.last().is_some_and(|id| self.held_by_cap(&self.entries[*id], tenants[t].0));
            if !uncapped && held {
                capped.push(Reverse((key, t)));
                continue;
            }
            let Some(id) = tenants[t].1.pop() else { continue };
            order.push(id.to_string());
            taken += 1;
            tenants[t].0 = Served { running: tenants[t].0.running + 1, last: taken };
            heap.extend(next(&tenants, t));
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_queued: usize, max_queued_per_tenant: usize) -> QueueLimits {
        QueueLimits { max_queued, max_queued_per_tenant, ..QueueLimits::default() }
    }

    #[test]
    fn priorities_above_the_bound_need_a_group_that_allows_them() {
        let l = QueueLimits { max_priority: 10, ..QueueLimits::default() };
        assert!(l.check_priority(10, false).is_ok() && l.check_priority(-100, false).is_ok());
        let err = l.check_priority(11, false).unwrap_err();
        assert!(matches!(err, CoordinatorError::PriorityNotAllowed { asked: 11, max: 10 }), "{err:?}");
        assert!(err.to_string().contains("11") && err.to_string().contains("10"), "{err}");
        assert!(l.check_priority(100, true).is_ok());
    }

    #[test]
    fn higher_priority_first_then_arrival_order() {
        let mut q = JobQueue::new(limits(10, 0));
        assert_eq!(q.push("a", "t", 0, Admit::New, ()).unwrap(), 0);
        assert_eq!(q.push("b", "t", 0, Admit::New, ()).unwrap(), 1);
        assert_eq!(q.push("c", "t", 5, Admit::New, ()).unwrap(), 0, "a higher priority goes ahead of everything");
        assert_eq!(q.push("d", "t", -3, Admit::New, ()).unwrap(), 3);
        assert_eq!(q.push("e", "t", 5, Admit::New, ()).unwrap(), 1, "after the earlier job of the same priority");
        assert_eq!(q.position("b"), Some(3));
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|t| t.id)).collect();
        assert_eq!(order, ["c", "e", "a", "b", "d"]);
        assert!(q.is_empty());
    }

    /// Tenants take turns at equal priority; a tenant with jobs running waits behind one with
    /// none; priority still comes first; positions foretell the order jobs leave in.
    #[test]
    fn tenants_take_turns_at_equal_priority() {
        let mut q = JobQueue::new(limits(100, 0));
        for i in 0..5 {
            q.push(&format!("a{i}"), "alice", 0, Admit::New, ()).unwrap();
        }
        assert_eq!(q.push("b0", "bob", 0, Admit::New, ()).unwrap(), 1, "after alice's first, not her five");
        assert_eq!(q.push("b1", "bob", 0, Admit::New, ()).unwrap(), 3);
        assert_eq!(q.push("c0", "carol", 0, Admit::New, ()).unwrap(), 2, "carol's first goes before everyone's second");
        // A higher priority goes first, whoever's; it is one of alice's turns, so her others
        // each wait one turn more.
        assert_eq!(q.push("h", "alice", 1, Admit::New, ()).unwrap(), 0);
        let foretold: Vec<usize> = ["h", "b0", "c0", "a0", "b1", "a1", "a2"].iter().map(|id| q.position(id).unwrap()).collect();
        assert_eq!(foretold, [0, 1, 2, 3, 4, 5, 6]);
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|t| t.id)).take(4).collect();
        assert_eq!(order, ["h", "b0", "c0", "a0"], "the order foretold");
        // alice runs h and a0 now; bob b0, carol c0.
        q.push("d0", "dave", 0, Admit::New, ()).unwrap();
        assert_eq!(q.position("d0"), Some(0), "dave runs nothing: he goes before tenants that do");
        assert_eq!(q.pop().unwrap().id, "d0");
        q.finished("alice");
        q.finished("alice");
        // alice runs none now, bob one: alice's next goes first; then both run one, and bob was
        // served longer ago.
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|t| t.id)).collect();
        assert_eq!(order, ["a1", "b1", "a2", "a3", "a4"]);
    }

    #[test]
    fn full_queue_refuses_naming_the_limit_and_removal_frees_a_place() {
        let mut q = JobQueue::new(limits(2, 0));
        q.push("a", "t", 0, Admit::New, 1).unwrap();
        q.push("b", "u", 0, Admit::New, 2).unwrap();
        let err = q.push("c", "v", 0, Admit::New, 3).unwrap_err();
        assert!(matches!(err, CoordinatorError::QueueFull { limit: 2 }), "{err:?}");
        assert!(err.to_string().contains('2'), "{err}");
        assert_eq!(q.remove("a"), Some(1));
        assert_eq!(q.remove("a"), None);
        assert_eq!(q.position("b"), Some(0));
        q.push("c", "t", 0, Admit::New, 3).unwrap();
        assert!(matches!(q.push("b", "t", 1, Admit::New, 4), Err(CoordinatorError::InvalidArgument { field: "job_id", .. })), "an id queued twice is refused");
        assert_eq!(q.drain(), [("b".to_string(), 2), ("c".to_string(), 3)]);
        assert_eq!(q.len(), 0);
        assert_eq!(q.position("b"), None);
    }

    /// A tenant holding its share is refused naming itself and the limit; others still queue;
    /// accepted jobs join past every limit.
    #[test]
    fn a_tenant_holds_at_most_its_share_and_accepted_jobs_are_never_refused() {
        let mut q = JobQueue::new(limits(4, 2));
        q.push("a0", "alice", 0, Admit::New, ()).unwrap();
        q.push("a1", "alice", 0, Admit::New, ()).unwrap();
        let err = q.push("a2", "alice", 0, Admit::New, ()).unwrap_err();
        assert!(matches!(&err, CoordinatorError::TenantQueueFull { tenant, limit: 2 } if tenant == "alice"), "{err:?}");
        assert!(err.to_string().contains("alice") && err.to_string().contains('2'), "{err}");
        q.push("b0", "bob", 0, Admit::New, ()).unwrap();
        q.push("a2", "alice", 0, Admit::Accepted, ()).unwrap();
        assert!(matches!(q.push("c0", "carol", 0, Admit::New, ()), Err(CoordinatorError::QueueFull { limit: 4 })));
        q.push("c0", "carol", 0, Admit::Accepted, ()).unwrap();
        assert_eq!(q.len(), 5, "accepted jobs are queued past both limits");
        assert_eq!(q.remove("a0"), Some(()));
        assert!(matches!(q.check_room("alice"), Err(CoordinatorError::QueueFull { .. })), "the whole queue is still over its limit");
    }

    /// A tenant at its running cap is passed over though it came first: its jobs wait (none
    /// leaves while only they wait), whatever their priority, accepted ones too, and start as
    /// its jobs end; positions put them after every other tenant's. A run adopted from its
    /// workers starts whatever the cap.
    #[test]
    fn a_tenant_at_its_running_cap_waits_while_others_start() {
        let mut q = JobQueue::new(QueueLimits { max_running_per_tenant: 2, ..limits(100, 0) });
        for i in 0..4 {
            q.push(&format!("a{i}"), "alice", 0, Admit::New, ()).unwrap();
        }
        assert_eq!(q.pop().unwrap().id, "a0");
        assert_eq!(q.pop().unwrap().id, "a1");
        assert!(q.pop().is_none(), "alice runs her most: her jobs wait though a group is free");
        assert_eq!((q.position("a2"), q.position("a3")), (Some(0), Some(1)));
        assert_eq!(q.push("b0", "bob", -5, Admit::New, ()).unwrap(), 0, "bob goes first, at a lower priority, while alice is at her cap");
        q.push("a4", "alice", 9, Admit::Accepted, ()).unwrap();
        assert_eq!(q.position("a4"), Some(1), "an accepted job of hers waits too; the first of hers by priority");
        let adopted = crate::server::executor::ADOPTED_PRIORITY;
        assert_eq!(q.push("r", "alice", adopted, Admit::Adopted, ()).unwrap(), 0, "her adopted run goes on whatever her cap");
        assert_eq!(q.pop().unwrap().id, "r");
        assert_eq!(q.pop().unwrap().id, "b0");
        assert!(q.pop().is_none());
        q.finished("alice");
        assert!(q.pop().is_none(), "she still runs two");
        q.finished("alice");
        assert_eq!(q.pop().unwrap().id, "a4", "one of her jobs ended: one more starts");
        assert!(q.pop().is_none());
        q.finished("alice");
        q.finished("alice");
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|t| t.id)).collect();
        assert_eq!(order, ["a2", "a3"]);
        assert!(q.is_empty());
    }

    /// Whatever the tenants, priorities, jobs running, jobs served before and running caps, the
    /// order that positions foretell is the order in which the jobs leave; the jobs left waiting
    /// for their tenants' jobs to end are the last foretold.
    #[test]
    fn positions_foretell_the_order_jobs_leave_in() {
        let mut state = 7u64;
        let mut draw = |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for round in 0..60 {
            let cap = draw(3) as usize;
            let mut q = JobQueue::new(QueueLimits { max_running_per_tenant: cap, ..limits(1000, 0) });
            let mut running = Vec::new();
            for i in 0..40 {
                let tenant = format!("t{}", draw(5));
                let (priority, admit) = match draw(8) {
                    0 => (crate::server::executor::ADOPTED_PRIORITY, Admit::Adopted),
                    1 => (draw(3) as i32 - 1, Admit::Accepted),
                    _ => (draw(3) as i32 - 1, Admit::New),
                };
                q.push(&format!("j{i}"), &tenant, priority, admit, ()).unwrap();
                match draw(4) {
                    0 => running.extend(q.pop().map(|t| t.tenant)),
                    1 if !running.is_empty() => {
                        let t: String = running.swap_remove(draw(running.len() as u64) as usize);
                        q.finished(&t);
                    }
                    2 => {
                        q.remove(&format!("j{}", draw(i + 1)));
                    }
                    _ => {}
                }
            }
            let mut foretold: Vec<(usize, String)> = q.entries.keys().map(|id| (q.position(id).unwrap(), id.clone())).collect();
            foretold.sort();
            let foretold: Vec<String> = foretold.into_iter().map(|(_, id)| id).collect();
            let left: Vec<String> = std::iter::from_fn(|| q.pop().map(|t| t.id)).collect();
            assert_eq!(foretold[..left.len()], left, "round {round}, cap {cap}");
            for id in &foretold[left.len()..] {
                let running = q.served_of(&q.entries[id].tenant).running;
                assert!(q.entries[id].capped && cap > 0 && running >= cap, "round {round}: {id} waits, its tenant running {running} of {cap}");
            }
        }
    }
}
