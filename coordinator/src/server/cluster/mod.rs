//! [`ClusterExecutor`]: jobs run on `tessera-worker` processes found through membership (etcd in
//! a cluster). A background task lists the workers and follows membership from the listed
//! revision (listing again after any break), keeping a [`WorkerTable`]. A job waits for a group
//! of free workers serving its model, reserves it, runs over the internal API ([`drive`]) and
//! frees it. Slots (jobs that may start) follow the free workers; a worker that joins is used by
//! the next job, one that leaves ends the job it was in.

mod admission;
mod adopt;
mod drive;
mod table;

pub use admission::{admit, evaluate_group, predicted_fields};
pub(crate) use drive::random_bytes;
pub use drive::DriveLimits;
#[cfg(feature = "embedded")]
pub(crate) use drive::MAX_MESSAGE;
pub use table::{group_limit, ulysses_degree, Group, WorkerTable};

use super::executor::{ExecEvent, ExecFuture, ExecJob, ExecReport, JobExecutor};
use super::jobs::StopSignal;
use crate::request::{RequestDefaults, ValidRequest};
use crate::CoordinatorError;
use drive::{run_on_group, DriveContext};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tessera_cluster::membership::{Membership, WorkerRecord, WorkerState};
use tessera_proto::v1::{Plan, Worker};
use tokio::sync::{mpsc, watch};

/// How often a job chooses a group again after workers refused it as busy.
const BUSY_RETRIES: u32 = 5;

/// Settings of a [`ClusterExecutor`].
#[derive(Clone)]
pub struct ClusterExecutorConfig {
    /// Where the workers register.
    pub membership: Arc<dyn Membership>,
    /// Most workers one job uses (0 = every free worker of its model).
    pub max_ranks: usize,
    /// The operator's token budget of a job (0: none, every job is planned by memory; workers
    /// that cannot be planned keep `DEFAULT_MAX_TOKENS`).
    pub max_tokens: usize,
    /// The model of requests that name none (default: the first served, by name).
    pub default_model: Option<String>,
    /// Time limits of the calls to workers.
    pub limits: DriveLimits,
    /// How many times a job whose group lost a worker goes on, on a new group, from its last
    /// checkpoint (0: a lost worker ends the job).
    pub recover_attempts: u32,
    /// How long a job going on from a checkpoint (recovering, moving off a draining worker, or
    /// resumed by a new coordinator) waits for a group of its plan's size, such as the lost
    /// worker's replacement, before it goes on with another plan on the workers there are. With
    /// its plan, its video is the undisturbed run's byte for byte.
    pub recover_wait: Duration,
    /// How often (in steps) the run is checkpointed from rank 0, for recovery and the state store
    /// (0: never; a diffusion-forcing run is checkpointed at its chunks' ends).
    pub checkpoint_every: u32,
    /// Something the executor waits for, beyond the membership's first listing, before it is
    /// ready: the in-process workers' model loading (`None` for workers found in etcd).
    pub startup: Option<watch::Receiver<Startup>>,
    /// Mutual TLS to the workers (`--tls-*`): this coordinator's certificate, and the CA the
    /// workers' certificates must chain to, followed as they are renewed. `None`: plain HTTP/2
    /// (in-process workers, tests).
    pub tls: Option<std::sync::Arc<tessera_cluster::tls::InternalTls>>,
}

/// How the start of the executor's own workers goes (in-process workers load their model first).
#[derive(Clone, Debug, PartialEq)]
pub enum Startup {
    /// Still loading.
    Loading,
    /// This many workers are registered (the executor is ready once its table lists them).
    Ready(usize),
    /// They never will be: why (a model that does not load, a port that cannot be bound).
    Failed(String),
}

struct Shared {
    table: Mutex<WorkerTable>,
    /// Bumped at every table change (jobs waiting for workers watch it).
    version: watch::Sender<u64>,
    live: watch::Sender<BTreeSet<String>>,
    /// The workers whose records say they drain.
    draining_workers: watch::Sender<BTreeSet<String>>,
    slots: watch::Sender<usize>,
    /// Jobs holding a group.
    running: AtomicUsize,
    /// Set once the first listing arrived.
    ready: watch::Sender<bool>,
    draining: AtomicBool,
    max_ranks: usize,
    tls: Option<std::sync::Arc<tessera_cluster::tls::InternalTls>>,
    /// Jobs taken over from workers that still run them (a coordinator died), with their groups
    /// (reserved): each goes on there when it runs.
    adopted: Mutex<HashMap<String, (Group, adopt::Adopted)>>,
    /// Held through each [`Shared::publish`], so that publishes run one at a time.
    publishing: Mutex<()>,
}

impl Shared {
    fn new(max_ranks: usize, tls: Option<std::sync::Arc<tessera_cluster::tls::InternalTls>>) -> Self {
        Self {
            table: Mutex::new(WorkerTable::default()),
            version: watch::channel(0).0,
            live: watch::channel(BTreeSet::new()).0,
            draining_workers: watch::channel(BTreeSet::new()).0,
            slots: watch::channel(0).0,
            running: AtomicUsize::new(0),
            ready: watch::channel(false).0,
            draining: AtomicBool::new(false),
            max_ranks,
            tls,
            adopted: Mutex::new(HashMap::new()),
            publishing: Mutex::new(()),
        }
    }

    fn table(&self) -> MutexGuard<'_, WorkerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the table's consequences: live ids, slots, the change counter. Every change of
    /// the table, the running jobs or the adopted ones is followed by a publish; they run one at
    /// a time, so the last one reads every change before it. (Run side by side, a publish that
    /// read the table before a change could send after the publish of that change, and leave
    /// the slots stale: the job task's end and the membership follower's update of its workers
    /// race so, and a job accepted next waited for a slot that never came.)
    fn publish(&self) {
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let (live, draining, formable) = {
            let t = self.table();
            let draining = t.records().filter(|w| w.state == WorkerState::Draining).map(|w| w.worker_id.clone()).collect::<BTreeSet<_>>();
            (t.records().map(|w| w.worker_id.clone()).collect::<BTreeSet<_>>(), draining, t.formable_groups(self.max_ranks))
        };
        self.draining_workers.send_if_modified(|d| {
            let changed = *d != draining;
            *d = draining;
            changed
        });
        self.live.send_if_modified(|l| {
            let changed = *l != live;
            *l = live;
            changed
        });
        // Adopted jobs not started yet hold their groups: a slot each.
        let adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner()).len();
        let slots = if self.draining.load(Ordering::SeqCst) { 0 } else { self.running.load(Ordering::SeqCst) + formable + adopted };
        // Tests widen the window between reading and sending, where publishes side by side race.
        #[cfg(test)]
        std::thread::sleep(Duration::from_micros(50));
        self.slots.send_if_modified(|s| {
            let changed = *s != slots;
            *s = slots;
            changed
        });
        self.version.send_modify(|v| *v += 1);
    }
}

/// Runs jobs on `tessera-worker` services over the internal API, wherever they run: other hosts,
/// other processes, or in this one (`EmbeddedWorkers`) (see the module docs).
pub struct ClusterExecutor {
    config: ClusterExecutorConfig,
    shared: Arc<Shared>,
    follower: tokio::task::JoinHandle<()>,
}

impl ClusterExecutor {
    /// Checks the settings and starts following membership (on the current tokio runtime).
    pub fn start(config: ClusterExecutorConfig) -> Result<Self, CoordinatorError> {
        if config.default_model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(CoordinatorError::invalid_argument("model", "the default model name must not be empty"));
        }
        let shared = Arc::new(Shared::new(config.max_ranks, config.tls.clone()));
        let follower = tokio::spawn(follow(config.membership.clone(), shared.clone()));
        Ok(Self { config, shared, follower })
    }

    fn default_model(&self) -> Option<String> {
        self.config.default_model.clone().or_else(|| self.shared.table().models().into_iter().next())
    }
}

impl Drop for ClusterExecutor {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Keeps the table in step with membership: list, then watch from the listed revision; after a
/// break (store unreachable, history compacted), wait a heartbeat and list again.
async fn follow(membership: Arc<dyn Membership>, shared: Arc<Shared>) {
    let pause = membership.heartbeat().period();
    loop {
        let listed = async {
            let snapshot = membership.list().await?;
            let watch = membership.watch_from(snapshot.revision).await?;
            Ok::<_, tessera_cluster::ClusterError>((snapshot, watch))
        };
        match listed.await {
            Ok((snapshot, mut watch)) => {
                tracing::info!(workers = snapshot.workers.len(), revision = snapshot.revision, "membership listed");
                shared.table().reset(&snapshot);
                shared.publish();
                shared.ready.send_replace(true);
                while let Some(event) = watch.next().await {
                    match event {
                        Ok(event) => {
                            tracing::info!(?event, "membership changed");
                            shared.table().apply(&event);
                            shared.publish();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "membership watch broke; listing again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the workers; retrying"),
        }
        tokio::time::sleep(pause).await;
    }
}

impl JobExecutor for ClusterExecutor {
    fn models(&self) -> Vec<String> {
        self.shared.table().models()
    }

    fn defaults(&self) -> RequestDefaults {
        let model = self.default_model().unwrap_or_default();
        let base = RequestDefaults { model: model.clone(), ..RequestDefaults::default() };
        let table = self.shared.table();
        match table.any_serving(&model).map(|w| w.model_info.clone()) {
            Some(i) if i.width > 0 && i.height > 0 && i.num_frames > 0 && i.steps > 0 => RequestDefaults {
                width: i.width,
                height: i.height,
                num_frames: i.num_frames,
                steps: i.steps,
                factors: i.factors,
                forcing: i.forcing,
                image_to_video: i.image_to_video,
                ..base
            },
            _ => base,
        }
    }

    fn max_tokens(&self) -> usize {
        match self.config.max_tokens {
            0 => usize::MAX,
            n => n,
        }
    }

    fn check(&self, request: &ValidRequest) -> Result<(), CoordinatorError> {
        if request.request.model.is_empty() {
            return Err(CoordinatorError::Unavailable("no worker has registered yet, so there is no default model; name the model or retry later".into()));
        }
        Ok(())
    }

    fn plan(&self, request: &ValidRequest) -> Result<Plan, CoordinatorError> {
        let table = self.shared.table();
        let model = &request.request.model;
        let spec = &request.spec;
        let admitted = admit(model, spec, &table.group_kind(model), self.config.max_ranks, self.config.max_tokens)?;
        let (ranks, ulysses) = (admitted.ranks as u32, admitted.ulysses as u32);
        let (predicted_duration, predicted_peak_bytes_per_rank) = predicted_fields(admitted.evaluation.as_ref());
        let cfg_parallel = admitted.cfg_parallel;
        Ok(Plan {
            // The group is chosen when the job starts.
            worker_ids: Vec::new(),
            ranks,
            ulysses,
            ring: ranks / if cfg_parallel { 2 } else { 1 } / ulysses.max(1),
            cfg_parallel,
            tokens: spec.tokens() as u64,
            forwards_per_step: spec.forwards_per_step(),
            generated_width: spec.generated_size().1,
            generated_height: spec.generated_size().0,
            predicted_duration,
            predicted_peak_bytes_per_rank,
        })
    }

    fn slots(&self) -> watch::Receiver<usize> {
        self.shared.slots.subscribe()
    }

    fn workers(&self) -> Vec<Worker> {
        self.shared.table().records().map(Worker::from).collect()
    }

    fn wait_ready(&self) -> Pin<Box<dyn Future<Output = Result<(), CoordinatorError>> + Send + '_>> {
        let mut ready = self.shared.ready.subscribe();
        let mut startup = self.config.startup.clone();
        let mut version = self.shared.version.subscribe();
        let shared = self.shared.clone();
        Box::pin(async move {
            ready.wait_for(|r| *r).await.map_err(|_| CoordinatorError::Internal("the membership follower went away".into()))?;
            let Some(startup) = &mut startup else { return Ok(()) };
            let outcome = startup.wait_for(|s| *s != Startup::Loading).await.map(|s| s.clone());
            let workers = match outcome {
                Ok(Startup::Ready(n)) => n,
                Ok(Startup::Failed(why)) => return Err(CoordinatorError::Unavailable(why)),
                Ok(Startup::Loading) | Err(_) => return Err(CoordinatorError::Internal("the workers' start-up went away".into())),
            };
            // Ready once the table lists them, so that the first request gets their model's
            // defaults and factors.
            while shared.table().records().count() < workers {
                version.changed().await.map_err(|_| CoordinatorError::Internal("the membership follower went away".into()))?;
            }
            Ok(())
        })
    }

    fn run(&self, job: ExecJob, events: mpsc::Sender<ExecEvent>, stop: StopSignal) -> ExecFuture {
        let shared = self.shared.clone();
        let (max_ranks, limits) = (self.config.max_ranks, self.config.limits);
        let (recover_attempts, every, recover_wait) = (self.config.recover_attempts, self.config.checkpoint_every, self.config.recover_wait);
        Box::pin(async move {
            let (mut busy_retries, mut recoveries, mut migrations) = (0, 0, 0);
            // Until then the job waits for a group of its plan's size: it goes on from a
            // checkpoint, whose run it must continue as it was.
            let mut keep_plan_until = job.resume.as_ref().map(|_| Instant::now() + recover_wait);
            let last_checkpoint = std::sync::Mutex::new(job.resume.clone());
            let mut resume = job.resume.clone();
            // A job taken over from its workers goes on with them first.
            let mut taken_over = shared.adopted.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
            loop {
                let (group, adopted) = match taken_over.take() {
                    Some((group, progress)) => (group, Some(progress)),
                    None => (wait_for_group(&shared, &job, max_ranks, keep_plan_until, &stop).await?, None),
                };
                shared.running.fetch_add(1, Ordering::SeqCst);
                shared.publish();
                let ids: Vec<&str> = group.workers.iter().map(|w| w.worker_id.as_str()).collect();
                tracing::info!(job = %job.id, workers = ?ids, ulysses = group.ulysses, "job starts on its group");
                // (An adopted run needs no checkpoint to start from; a later recovery takes the last.)
                let from = resume.take().filter(|_| adopted.is_none());
                let attempt = Attempt { group: &group, resume: from, adopted, checkpoint_every: every, last_checkpoint: &last_checkpoint };
                let result = run_reserved(&shared, &job, attempt, events.clone(), &stop, limits).await;
                shared.table().release(&job.id);
                shared.running.fetch_sub(1, Ordering::SeqCst);
                shared.publish();
                match result {
                    // Another coordinator took some of the workers first: leave them out until
                    // their records change, and choose again.
                    Err(CoordinatorError::WorkersBusy { workers }) if busy_retries < BUSY_RETRIES && !stop.is_stopped() => {
                        busy_retries += 1;
                        tracing::info!(job = %job.id, ?workers, busy_retries, "workers busy with another job; choosing again");
                        shared.table().hold(&workers);
                        shared.publish();
                    }
                    // A worker of the group drains: go on from the checkpoint just taken, on a group
                    // without it (its plan's, when enough workers are free).
                    Err(CoordinatorError::WorkersDraining { workers }) if migrations < MAX_MIGRATIONS && !stop.is_stopped() => {
                        migrations += 1;
                        resume = last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        keep_plan_until = Some(Instant::now() + recover_wait);
                        let from = resume.as_ref().map_or(0, |c| c.steps_done);
                        tracing::info!(job = %job.id, ?workers, migrations, from_step = from, "workers of the job's group drain: moving it to another group");
                    }
                    // The group lost a worker: go on from the last checkpoint on a new group.
                    Err(e @ CoordinatorError::WorkerFailed { .. })
                        if recoveries < recover_attempts
                            && !stop.is_stopped()
                            && !matches!(&e, CoordinatorError::WorkerFailed { refused_field: Some(_), .. }) =>
                    {
                        recoveries += 1;
                        resume = last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        keep_plan_until = Some(Instant::now() + recover_wait);
                        let from = resume.as_ref().map_or(0, |c| c.steps_done);
                        tracing::warn!(job = %job.id, error = %e, recoveries, from_step = from, "the job's group failed; recovering on a new group");
                        // The ranks that lost their peer were released and come back idle within
                        // a heartbeat or so: give them that long, so the job goes on with all of them.
                        if let CoordinatorError::WorkerFailed { worker, .. } = &e {
                            let failed = worker.split(" (").next().unwrap_or_default();
                            let survivors: Vec<&str> = group.workers.iter().map(|w| w.worker_id.as_str()).filter(|id| *id != failed).collect();
                            wait_until_free(&shared, &survivors, SURVIVOR_WAIT, &stop).await;
                        }
                    }
                    r => return r,
                }
            }
        })
    }

    fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.publish();
    }

    fn take_over_orphans(&self, job: &ExecJob) -> Pin<Box<dyn Future<Output = Option<u32>> + Send + '_>> {
        let job = job.clone();
        Box::pin(async move { take_over_orphans(&self.shared, &job).await })
    }

    fn abandon(&self, job: &ExecJob) {
        let Some((group, _)) = self.shared.adopted.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id) else { return };
        tracing::info!(job = %job.id, "the adopted job left without running: releasing its workers");
        self.shared.table().release(&job.id);
        self.shared.publish();
        let (job, tls) = (job.clone(), self.shared.tls.clone());
        tokio::spawn(async move { adopt::release_on(&group.workers, &job, tls.as_deref()).await });
    }
}

/// How often a job moves off draining workers (a bound: every move is from a checkpoint, and
/// draining workers are left out of the next group).
const MAX_MIGRATIONS: u32 = 8;

/// How long a recovering job waits for the surviving ranks of its failed group to be free again.
const SURVIVOR_WAIT: Duration = Duration::from_secs(3);

/// Returns once every worker of `ids` still in membership is free (idle and unreserved), after
/// `limit`, or when the job is stopped.
async fn wait_until_free(shared: &Shared, ids: &[&str], limit: Duration, stop: &StopSignal) {
    let until = Instant::now() + limit;
    while Instant::now() < until && !stop.is_stopped() {
        if shared.table().all_free_or_gone(ids) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a resumed job waits for the workers that still held it to report themselves free.
const ORPHAN_WAIT: Duration = Duration::from_secs(10);

/// A coordinator that died mid-job left its workers running it (until their idle timeout). When
/// they are the whole group of the job's plan and agree where the run stands, the job is adopted:
/// its group is reserved and it goes on there from that step (returned), losing nothing. Else
/// they are released, and the job resumes from its checkpoint on a group of its own. The job's
/// secret is the capability to do either.
async fn take_over_orphans(shared: &Shared, job: &ExecJob) -> Option<u32> {
    let holders: Vec<WorkerRecord> = shared.table().records().filter(|w| w.job_id.as_deref() == Some(job.id.as_str())).cloned().collect();
    if holders.is_empty() {
        return None;
    }
    let ids: Vec<&str> = holders.iter().map(|w| w.worker_id.as_str()).collect();
    if let Some(plan) = job.request.spec.plan() {
        if let Some((workers, progress)) = adopt::adopt_on(&holders, job, plan, shared.tls.as_deref()).await {
            let order: Vec<&str> = workers.iter().map(|w| w.worker_id.as_str()).collect();
            tracing::info!(job = %job.id, workers = ?order, from_step = progress.steps_done, "adopting the job from the workers that still run it");
            shared.table().adopt(&job.id, &workers);
            let group = Group { workers, ulysses: plan.ulysses as usize, cfg_parallel: plan.cfg_parallel };
            shared.adopted.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id.clone(), (group, progress));
            shared.publish();
            return Some(progress.steps_done);
        }
    }
    tracing::info!(job = %job.id, workers = ?ids, "releasing the job on the workers that still hold it");
    adopt::release_on(&holders, job, shared.tls.as_deref()).await;
    // Their records turn idle within a heartbeat or so; the job then reserves a group as usual.
    let until = Instant::now() + ORPHAN_WAIT;
    while Instant::now() < until {
        if !shared.table().records().any(|w| w.job_id.as_deref() == Some(job.id.as_str())) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

type SharedCheckpoint = Arc<tessera_proto::worker::v1::CheckpointResponse>;

/// One try of a job on one group.
struct Attempt<'a> {
    group: &'a Group,
    resume: Option<SharedCheckpoint>,
    adopted: Option<adopt::Adopted>,
    checkpoint_every: u32,
    last_checkpoint: &'a std::sync::Mutex<Option<SharedCheckpoint>>,
}

async fn run_reserved(
    shared: &Shared,
    job: &ExecJob,
    attempt: Attempt<'_>,
    events: mpsc::Sender<ExecEvent>,
    stop: &StopSignal,
    limits: DriveLimits,
) -> Result<ExecReport, CoordinatorError> {
    let cx = DriveContext {
        job,
        tls: shared.tls.as_deref(),
        input_frames: job.request.video.clone(),
        events: &events,
        stop,
        live: shared.live.subscribe(),
        draining: shared.draining_workers.subscribe(),
        limits,
        resume: attempt.resume,
        adopted: attempt.adopted,
        checkpoint_every: attempt.checkpoint_every,
        last_checkpoint: attempt.last_checkpoint,
    };
    run_on_group(attempt.group, cx).await
}

/// Waits until a group of free workers serving the job's model can be reserved (or the job is
/// stopped); fails at once when no live worker serves the model at all. Until `keep_plan_until`,
/// only a group of the plan's size will do, even when fewer workers are live.
async fn wait_for_group(
    shared: &Shared,
    job: &ExecJob,
    max_ranks: usize,
    keep_plan_until: Option<Instant>,
    stop: &StopSignal,
) -> Result<Group, CoordinatorError> {
    let model = &job.request.request.model;
    let mut version = shared.version.subscribe();
    loop {
        {
            let mut table = shared.table();
            if !table.models().iter().any(|m| m == model) {
                return Err(CoordinatorError::Unavailable(format!("no live worker serves model {model:?}")));
            }
            // The group the plan said, unless workers left since (then, once the job need not keep
            // its plan, the largest there is; the job's record gets the plan that runs).
            let plan = job.request.spec.plan();
            let planned = plan.map_or_else(|| group_limit(max_ranks, job.request.spec.tokens()), |p| p.ranks as usize);
            let keep_plan = plan.is_some() && keep_plan_until.is_some_and(|until| Instant::now() < until);
            let ranks = if keep_plan { planned } else { planned.min(table.capacity(model)).max(1) };
            // the plan's layout when the group is the size it said
            if let Some(group) = table.reserve(&job.id, model, ranks, plan) {
                return Ok(group);
            }
        }
        // (Past `keep_plan_until` the job chooses again, whatever the table.)
        let plan_wait = keep_plan_until.filter(|until| Instant::now() < *until);
        tokio::select! {
            changed = version.changed() => if changed.is_err() {
                return Err(CoordinatorError::Internal("the worker table went away".into()));
            },
            _ = tokio::time::sleep_until(plan_wait.unwrap_or_else(Instant::now).into()), if plan_wait.is_some() => {
                tracing::info!(job = %job.id, "no group of the job's plan came in time: it goes on with the workers there are");
            }
            reason = stop.stopped() => return Err(reason.error()),
        }
    }
}

/// The default time limits of internal API calls.
impl Default for DriveLimits {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), prepare: Duration::from_secs(600), step: Duration::from_secs(600), decode: Duration::from_secs(1800) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;
    use tessera_cluster::membership::MembershipEvent;

    /// Publishes from two threads, each after its own change (a job starting and ending, its
    /// worker's record going busy and idle), leave the slots as the final state says: however
    /// they interleave, no publish sends a count it read before the other thread's last change
    /// after that change's own publish.
    #[test]
    fn the_last_publish_reads_every_change_before_it() {
        let record = |state| WorkerRecord { state, ..WorkerRecord::starting("w", "h:1", "h:2", "m", vec!["cpu".into()], 0) };
        for trial in 0..100 {
            let shared = Arc::new(Shared::new(1, None));
            shared.table().apply(&MembershipEvent::Joined(record(WorkerState::Idle)));
            shared.publish();
            let start = Arc::new(std::sync::Barrier::new(2));
            let job = {
                let (shared, start) = (shared.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..20 {
                        shared.running.fetch_add(1, SeqCst);
                        shared.publish();
                        shared.running.fetch_sub(1, SeqCst);
                        shared.publish();
                    }
                })
            };
            let follower = {
                let (shared, start) = (shared.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for state in [WorkerState::Busy, WorkerState::Idle].repeat(20) {
                        shared.table().apply(&MembershipEvent::Updated(record(state)));
                        shared.publish();
                    }
                })
            };
            job.join().unwrap();
            follower.join().unwrap();
            // No job runs, and the one worker is idle: one job could start.
            assert_eq!(*shared.slots.borrow(), 1, "trial {trial}: the slots were left stale");
        }
    }
}
