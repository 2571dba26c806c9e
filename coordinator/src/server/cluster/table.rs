//! The coordinator's view of the workers: the records membership reports, the workers this
//! coordinator has reserved for its running jobs, and the choice of a job's group and parallel
//! plan. Pure bookkeeping, no I/O: the executor feeds it membership events and asks it questions.

use std::collections::{BTreeMap, HashMap};
use tessera_cluster::membership::{MembershipEvent, MembershipSnapshot, WorkerRecord, WorkerState};
use tessera_cluster::JobPlan;

/// The reservation of a held worker (no job of this coordinator has that id: job ids are `j-…`).
const HELD: &str = "(held: busy elsewhere)";

/// The workers as membership last reported them, and this coordinator's reservations.
#[derive(Debug, Default)]
pub struct WorkerTable {
    workers: BTreeMap<String, WorkerRecord>,
    /// Worker id → the job it was reserved for.
    reserved: HashMap<String, String>,
}

/// A job's group: its workers in rank order, whether they split into CFG halves, and the Ulysses
/// degree among the ranks of a sequence-parallel group.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The workers, rank 0 first.
    pub workers: Vec<WorkerRecord>,
    /// Ulysses degree (ranks = ulysses × ring, × 2 with CFG-parallel).
    pub ulysses: usize,
    /// Whether half the ranks run the conditional pass and half the unconditional one.
    pub cfg_parallel: bool,
}

impl Group {
    /// The group's layout as the job's plan.
    pub fn plan(&self) -> JobPlan {
        JobPlan { ranks: self.workers.len() as u32, ulysses: self.ulysses as u32, cfg_parallel: self.cfg_parallel }
    }
}

impl WorkerTable {
    /// Replaces the table's records with a fresh listing (reservations are kept).
    pub fn reset(&mut self, snapshot: &MembershipSnapshot) {
        self.workers = snapshot.workers.iter().map(|w| (w.worker_id.clone(), w.clone())).collect();
    }

    /// Applies one membership change (a held worker's change lifts the hold).
    pub fn apply(&mut self, event: &MembershipEvent) {
        let id = match event {
            MembershipEvent::Joined(w) | MembershipEvent::Updated(w) => {
                self.workers.insert(w.worker_id.clone(), w.clone());
                &w.worker_id
            }
            MembershipEvent::Left(id) => {
                self.workers.remove(id);
                id
            }
        };
        if self.reserved.get(id).is_some_and(|j| j == HELD) {
            self.reserved.remove(id);
        }
    }

    /// Leaves `workers` out of groups until their records change (they refused a job as busy
    /// while membership still showed them idle).
    pub fn hold(&mut self, workers: &[String]) {
        for w in workers {
            self.reserved.entry(w.clone()).or_insert_with(|| HELD.to_string());
        }
    }

    /// Every registered worker, sorted by id.
    pub fn records(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    /// Whether worker `id` is registered.
    pub fn contains(&self, id: &str) -> bool {
        self.workers.contains_key(id)
    }

    /// Models some registered worker serves, sorted, each once.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.workers.values().map(|w| w.model.clone()).collect();
        m.sort();
        m.dedup();
        m
    }

    /// A worker serving `model` (the first by id), for its model facts.
    pub fn any_serving(&self, model: &str) -> Option<&WorkerRecord> {
        self.workers.values().find(|w| w.model == model)
    }

    fn is_free(&self, w: &WorkerRecord) -> bool {
        w.state == WorkerState::Idle && !self.reserved.contains_key(&w.worker_id)
    }

    /// Whether each of `ids` is free or no longer a member.
    pub fn all_free_or_gone(&self, ids: &[&str]) -> bool {
        ids.iter().all(|id| self.workers.get(*id).is_none_or(|w| self.is_free(w)))
    }

    /// Idle, unreserved workers (of every model).
    pub fn free_count(&self) -> usize {
        self.workers.values().filter(|w| self.is_free(w)).count()
    }

    /// How many new jobs could start now: groups of at most `max_ranks` workers (0 = no limit:
    /// one group of all the free workers) out of the free ones.
    pub fn formable_groups(&self, max_ranks: usize) -> usize {
        let free = self.free_count();
        match max_ranks {
            0 => usize::from(free > 0),
            k => free.div_ceil(k),
        }
    }

    /// How large a group for `model` can be: its live workers (idle or busy, here or for another
    /// coordinator) of the device kind that has most of them (a group runs on one kind). The
    /// plan's ranks are at most this; a job waits for that many to be free.
    pub fn capacity(&self, model: &str) -> usize {
        self.group_kind(model).len()
    }

    /// The live workers of `model` (idle or busy) of the device kind that has most of them, in id
    /// order: what a job's group is planned on.
    pub fn group_kind(&self, model: &str) -> Vec<&WorkerRecord> {
        let live = |w: &&WorkerRecord| w.model == model && matches!(w.state, WorkerState::Idle | WorkerState::Busy);
        let gpus: Vec<&WorkerRecord> = self.workers.values().filter(live).filter(|w| on_gpu(w)).collect();
        let cpus: Vec<&WorkerRecord> = self.workers.values().filter(live).filter(|w| !on_gpu(w)).collect();
        if gpus.len() >= cpus.len() {
            gpus
        } else {
            cpus
        }
    }

    /// Reserves a group of exactly `ranks` free workers serving `model` for `job`, in id order,
    /// on one kind of device: GPU workers when enough are free (they talk through NCCL), else
    /// CPU workers. The layout is the plan's (`plan`, when it is for a group of this size and its
    /// Ulysses degree divides a sequence-parallel group and the model's heads), else no
    /// CFG-parallel and the largest Ulysses degree that divides both; the rest forms rings.
    /// `None` until that many are free: the job runs on the group its plan said.
    pub fn reserve(&mut self, job: &str, model: &str, ranks: usize, plan: Option<JobPlan>) -> Option<Group> {
        let free: Vec<&WorkerRecord> = self.workers.values().filter(|w| w.model == model && self.is_free(w)).collect();
        let kind = |gpu: bool| free.iter().filter(|w| on_gpu(w) == gpu).take(ranks).map(|w| (*w).clone()).collect::<Vec<WorkerRecord>>();
        let workers = [kind(true), kind(false)].into_iter().find(|g| ranks > 0 && g.len() == ranks)?;
        for w in &workers {
            self.reserved.insert(w.worker_id.clone(), job.to_string());
        }
        let heads = workers.iter().map(|w| w.model_info.attention_heads as usize).min().unwrap_or(0);
        let plan = plan.filter(|p| p.ranks as usize == workers.len() && (!p.cfg_parallel || workers.len().is_multiple_of(2)));
        let cfg_parallel = plan.is_some_and(|p| p.cfg_parallel);
        let sp = workers.len() / if cfg_parallel { 2 } else { 1 };
        let fits = |u: &usize| *u > 0 && sp.is_multiple_of(*u) && (heads == 0 || heads.is_multiple_of(*u));
        let ulysses = plan.map(|p| p.ulysses as usize).filter(fits).unwrap_or_else(|| ulysses_degree(sp, heads));
        Some(Group { workers, ulysses, cfg_parallel })
    }

    /// Reserves `workers` for `job` as they are (busy with it: a job taken over from a coordinator
    /// that died, see `take_over_orphans`).
    pub fn adopt(&mut self, job: &str, workers: &[WorkerRecord]) {
        for w in workers {
            self.reserved.insert(w.worker_id.clone(), job.to_string());
        }
    }

    /// Frees the workers reserved for `job`.
    pub fn release(&mut self, job: &str) {
        self.reserved.retain(|_, j| j != job);
    }

    /// The job a worker is reserved for by this coordinator.
    pub fn reserved_for(&self, worker: &str) -> Option<&str> {
        self.reserved.get(worker).map(String::as_str)
    }
}

/// Whether a worker runs its model on a GPU (its record lists a `cuda…` device).
pub fn on_gpu(w: &WorkerRecord) -> bool {
    w.devices.iter().any(|d| d.starts_with("cuda"))
}

/// Most workers a job of `tokens` tokens may use: `max_ranks` (0 = no limit), never more ranks
/// than tokens.
pub fn group_limit(max_ranks: usize, tokens: usize) -> usize {
    if max_ranks == 0 { usize::MAX } else { max_ranks }.min(tokens.max(1))
}

/// The largest Ulysses degree dividing both `ranks` and `heads` (1 when heads are unknown).
pub fn ulysses_degree(ranks: usize, heads: usize) -> usize {
    if heads == 0 {
        return 1;
    }
    (1..=ranks).rev().find(|u| ranks.is_multiple_of(*u) && heads.is_multiple_of(*u)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_cluster::membership::ModelInfo;

    fn worker(id: &str, model: &str, state: WorkerState) -> WorkerRecord {
        let mut w = WorkerRecord::starting(id, format!("{id}:1"), format!("{id}:2"), model, vec!["cpu".into()], 0);
        w.state = state;
        if state == WorkerState::Busy {
            w.job_id = Some("other".into());
        }
        w.model_info = ModelInfo { attention_heads: 12, ..Default::default() };
        w
    }

    fn table(workers: &[WorkerRecord]) -> WorkerTable {
        let mut t = WorkerTable::default();
        t.reset(&MembershipSnapshot { workers: workers.to_vec(), revision: 1 });
        t
    }

    #[test]
    fn groups_take_free_workers_of_the_model_in_id_order() {
        let mut t = table(&[
            worker("c", "tiny", WorkerState::Idle),
            worker("a", "tiny", WorkerState::Idle),
            worker("b", "tiny", WorkerState::Busy),
            worker("d", "wan", WorkerState::Idle),
            worker("e", "tiny", WorkerState::Starting),
        ]);
        assert_eq!(t.models(), ["tiny", "wan"]);
        assert_eq!(t.free_count(), 3);
        assert_eq!(t.capacity("tiny"), 3, "a, b (busy) and c; e is still starting");
        assert!(t.reserve("j0", "tiny", 3, None).is_none(), "a group of 3 waits for b");
        let g = t.reserve("j1", "tiny", 2, None).unwrap();
        let ids: Vec<_> = g.workers.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(g.ulysses, 2);
        assert_eq!(t.reserved_for("a"), Some("j1"));
        assert!(t.reserve("j2", "tiny", 1, None).is_none(), "every free tiny worker is taken");
        assert_eq!(t.formable_groups(0), 1, "the wan worker is still free");
        t.release("j1");
        assert_eq!(t.reserve("j3", "tiny", 1, None).unwrap().workers.len(), 1);
    }

    /// A plan for the group's size gives its layout, CFG halves included; a plan for another size
    /// (workers left since) falls back to no halves and the largest Ulysses degree.
    #[test]
    fn the_plans_layout_is_reserved_when_the_group_is_its_size() {
        let ids = ["a", "b", "c", "d"];
        let mut t = table(&ids.map(|id| worker(id, "tiny", WorkerState::Idle)));
        let halves = JobPlan { ranks: 4, ulysses: 2, cfg_parallel: true };
        let g = t.reserve("j1", "tiny", 4, Some(halves)).unwrap();
        assert_eq!((g.cfg_parallel, g.ulysses, g.plan()), (true, 2, halves));
        assert_eq!(g.plan().ring(), 1);
        t.release("j1");
        // the plan said 4 ranks, 3 are asked: no halves, Ulysses 3 (divides 3 ranks and 12 heads)
        let g = t.reserve("j2", "tiny", 3, Some(halves)).unwrap();
        assert_eq!((g.cfg_parallel, g.ulysses), (false, 3));
        t.release("j2");
        // a Ulysses degree that does not divide a half is replaced by one that does
        let g = t.reserve("j3", "tiny", 4, Some(JobPlan { ranks: 4, ulysses: 4, cfg_parallel: true })).unwrap();
        assert_eq!((g.cfg_parallel, g.ulysses), (true, 2));
    }

    #[test]
    fn a_group_runs_on_one_kind_of_device_gpus_first() {
        let on = |id: &str, device: &str| {
            let mut w = worker(id, "tiny", WorkerState::Idle);
            w.devices = vec![device.into()];
            w
        };
        let mut t = table(&[on("a", "cpu"), on("b", "cuda:0"), on("c", "cpu"), on("d", "cuda:1 NVIDIA H100")]);
        let ids = |g: Group| g.workers.iter().map(|w| w.worker_id.clone()).collect::<Vec<_>>();
        assert_eq!(t.capacity("tiny"), 2, "two of each kind: a group has at most 2");
        assert_eq!(ids(t.reserve("j1", "tiny", 2, None).unwrap()), ["b", "d"]);
        assert_eq!(ids(t.reserve("j2", "tiny", 2, None).unwrap()), ["a", "c"], "the CPU workers form the next group");
    }

    #[test]
    fn survivors_count_as_back_when_free_or_gone() {
        let mut t = table(&[worker("a", "tiny", WorkerState::Idle), worker("b", "tiny", WorkerState::Busy)]);
        assert!(t.all_free_or_gone(&["a", "gone"]));
        assert!(!t.all_free_or_gone(&["a", "b"]), "b is busy");
        t.reserve("j", "tiny", 1, None).unwrap();
        assert!(!t.all_free_or_gone(&["a"]), "a is reserved");
    }

    #[test]
    fn max_ranks_splits_the_free_workers_into_groups() {
        let t = table(&(0..5).map(|i| worker(&format!("w{i}"), "tiny", WorkerState::Idle)).collect::<Vec<_>>());
        assert_eq!(t.formable_groups(0), 1);
        assert_eq!(t.formable_groups(2), 3);
        assert_eq!(t.formable_groups(5), 1);
        assert_eq!(table(&[]).formable_groups(2), 0);
    }

    #[test]
    fn a_group_is_never_larger_than_the_job_has_tokens() {
        assert_eq!(group_limit(0, 3), 3);
        assert_eq!(group_limit(2, 3), 2);
        assert_eq!(group_limit(0, 0), 1);
    }

    #[test]
    fn membership_events_update_the_table() {
        let mut t = table(&[worker("a", "tiny", WorkerState::Idle)]);
        t.apply(&MembershipEvent::Joined(worker("b", "tiny", WorkerState::Idle)));
        assert_eq!(t.free_count(), 2);
        t.apply(&MembershipEvent::Updated(worker("a", "tiny", WorkerState::Busy)));
        assert_eq!(t.free_count(), 1);
        t.apply(&MembershipEvent::Left("b".into()));
        assert_eq!(t.free_count(), 0);
        assert!(!t.contains("b") && t.contains("a"));
    }

    #[test]
    fn a_held_worker_is_left_out_until_its_record_changes() {
        let mut t = table(&[worker("a", "tiny", WorkerState::Idle), worker("b", "tiny", WorkerState::Idle)]);
        t.hold(&["a".into()]);
        assert!(t.reserve("j0", "tiny", 2, None).is_none(), "a is held");
        let g = t.reserve("j1", "tiny", 1, None).unwrap();
        assert_eq!(g.workers.len(), 1);
        assert_eq!(g.workers[0].worker_id, "b");
        t.release("j1");
        assert_eq!(t.free_count(), 1, "releasing a job does not lift a hold");
        t.apply(&MembershipEvent::Updated(worker("a", "tiny", WorkerState::Busy)));
        t.apply(&MembershipEvent::Updated(worker("a", "tiny", WorkerState::Idle)));
        assert_eq!(t.free_count(), 2);
    }

    #[test]
    fn ulysses_degree_divides_ranks_and_heads() {
        assert_eq!(ulysses_degree(1, 12), 1);
        assert_eq!(ulysses_degree(3, 12), 3);
        assert_eq!(ulysses_degree(4, 2), 2);
        assert_eq!(ulysses_degree(5, 12), 1);
        assert_eq!(ulysses_degree(8, 12), 4);
        assert_eq!(ulysses_degree(4, 0), 1);
    }
}
