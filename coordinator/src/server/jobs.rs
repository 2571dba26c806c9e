//! Job records (what GetJob / ListJobs return) and the stop switch every job carries: the table
//! of queued, running and finished jobs, finished ones kept for a configurable time.

use crate::CoordinatorError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tessera_proto::v1::{Job, JobState, Phase, PhaseTimings};
use tokio::sync::Notify;

/// Why a job is being stopped before it finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// CancelJob asked for it.
    Cancelled,
    /// The client dropped its Generate stream.
    ClientGone,
    /// The client's deadline passed.
    Deadline,
    /// The server is shutting down.
    Shutdown,
}

impl StopReason {
    /// The error the job ends with (and the status its stream ends with).
    pub fn error(self) -> CoordinatorError {
        match self {
            Self::Cancelled => CoordinatorError::Cancelled("the job was cancelled by CancelJob".into()),
            Self::ClientGone => CoordinatorError::Cancelled("the client closed its Generate call".into()),
            Self::Deadline => CoordinatorError::DeadlineExceeded("the client's deadline passed before the job finished".into()),
            Self::Shutdown => CoordinatorError::Unavailable("the server shut down before the job finished; retry".into()),
        }
    }

    /// The state the job's record ends in.
    pub fn final_state(self) -> JobState {
        match self {
            Self::Cancelled | Self::ClientGone | Self::Shutdown => JobState::Cancelled,
            Self::Deadline => JobState::Failed,
        }
    }
}

/// A job's stop switch, shared by the service, the job's driver and the executor: the first
/// reason given wins; the executor checks it between steps.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    reason: OnceLock<StopReason>,
    notify: Notify,
}

impl StopSignal {
    /// Asks the job to stop; returns false if it was already asked (the first reason stays).
    pub fn stop(&self, reason: StopReason) -> bool {
        let first = self.inner.reason.set(reason).is_ok();
        self.inner.notify.notify_waiters();
        first
    }

    /// Why it was asked to stop, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        self.inner.reason.get().copied()
    }

    /// Whether it was asked to stop.
    pub fn is_stopped(&self) -> bool {
        self.reason().is_some()
    }

    /// Waits until it is asked to stop.
    pub async fn stopped(&self) -> StopReason {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.reason() {
                return r;
            }
            notified.await;
        }
    }
}

/// A `google.protobuf.Duration`.
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs().min(i64::MAX as u64) as i64, nanos: d.subsec_nanos() as i32 }
}

/// A `google.protobuf.Timestamp`.
pub fn pb_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Time spent in each phase of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Waiting in the queue.
    pub queued: Duration,
    /// Text encoding, noise.
    pub preparing: Duration,
    /// Denoising steps.
    pub denoising: Duration,
    /// VAE decode.
    pub decoding: Duration,
    /// File encoding and sending.
    pub encoding: Duration,
    /// From acceptance to the end.
    pub total: Duration,
}

impl Timings {
    /// As the public message.
    pub fn to_pb(&self) -> PhaseTimings {
        let d = |x: Duration| Some(pb_duration(x));
        PhaseTimings {
            queued: d(self.queued),
            preparing: d(self.preparing),
            denoising: d(self.denoising),
            decoding: d(self.decoding),
            encoding: d(self.encoding),
            total: d(self.total),
        }
    }
}

struct Entry {
    job: Job,
    stop: StopSignal,
    created: u64,
    finished_at: Option<Instant>,
}

/// Every job the coordinator knows; finished jobs are dropped `retention` after they end.
pub struct JobTable {
    entries: Mutex<HashMap<String, Entry>>,
    retention: Duration,
    counter: AtomicU64,
}

impl JobTable {
    /// An empty table keeping finished records for `retention`.
    pub fn new(retention: Duration) -> Self {
        Self { entries: Mutex::new(HashMap::new()), retention, counter: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new, unique job id (`j-` and 16 hex digits, unguessable enough to not be enumerable).
    pub fn new_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let mixed = splitmix64(t ^ splitmix64(n ^ std::process::id() as u64));
        format!("j-{mixed:016x}")
    }

    /// Adds a record (state QUEUED, `created` set by the caller) with its stop switch.
    pub fn insert(&self, job: Job, stop: StopSignal) {
        let created = self.counter.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(job.job_id.clone(), Entry { job, stop, created, finished_at: None });
    }

    /// Takes a record out (a job that never got queued).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// A copy of job `id`'s record.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().get(id).map(|e| e.job.clone())
    }

    /// Job `id`'s stop switch.
    pub fn stop_signal(&self, id: &str) -> Option<StopSignal> {
        self.lock().get(id).map(|e| e.stop.clone())
    }

    /// Changes job `id`'s record (nothing if it is gone).
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(e) = self.lock().get_mut(id) {
            f(&mut e.job);
        }
    }

    /// Marks job `id` finished: its final state, error and timings; it expires after the
    /// retention time. The first call wins: a finished record is not changed again.
    pub fn finish(&self, id: &str, state: JobState, error: Option<String>, timings: &Timings) {
        if let Some(e) = self.lock().get_mut(id).filter(|e| e.finished_at.is_none()) {
            e.job.state = state as i32;
            e.job.progress.get_or_insert_with(Default::default).phase = Phase::Done as i32;
            e.job.error = error.unwrap_or_default();
            e.job.timings = Some(timings.to_pb());
            e.job.finished = Some(pb_timestamp(SystemTime::now()));
            e.finished_at = Some(Instant::now());
        }
    }

    /// Records in one of `states` (all when empty), newest first, at most `limit`.
    pub fn list(&self, states: &[JobState], limit: usize) -> Vec<Job> {
        let map = self.lock();
        let mut picked: Vec<&Entry> = map.values().filter(|e| states.is_empty() || states.iter().any(|s| *s as i32 == e.job.state)).collect();
        picked.sort_by_key(|e| std::cmp::Reverse(e.created));
        picked.into_iter().take(limit).map(|e| e.job.clone()).collect()
    }

    /// Drops finished records older than the retention time; returns how many went.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.finished_at.is_none_or(|t| now.saturating_duration_since(t) < self.retention));
        before - map.len()
    }

    /// Ids of jobs that have not finished.
    pub fn unfinished(&self) -> Vec<String> {
        self.lock().values().filter(|e| e.finished_at.is_none()).map(|e| e.job.job_id.clone()).collect()
    }
}

/// SplitMix64: a bijective 64-bit mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> Job {
        Job { job_id: id.into(), state: JobState::Queued as i32, ..Default::default() }
    }

    #[test]
    fn records_are_listed_newest_first_filtered_and_expire_after_retention() {
        let table = JobTable::new(Duration::from_millis(50));
        let (a, b) = (table.new_id(), table.new_id());
        assert_ne!(a, b);
        assert!(a.starts_with("j-") && a.len() == 18, "{a}");
        table.insert(job(&a), StopSignal::default());
        table.insert(job(&b), StopSignal::default());
        table.update(&b, |j| j.state = JobState::Running as i32);
        let ids = |v: Vec<Job>| v.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(table.list(&[], 10)), [b.clone(), a.clone()]);
        assert_eq!(ids(table.list(&[JobState::Running], 10)), std::slice::from_ref(&b));
        assert_eq!(ids(table.list(&[], 1)), std::slice::from_ref(&b));
        table.finish(&a, JobState::Succeeded, None, &Timings { total: Duration::from_secs(2), ..Default::default() });
        let rec = table.get(&a).unwrap();
        assert_eq!(rec.state, JobState::Succeeded as i32);
        assert!(rec.finished.is_some());
        assert_eq!(rec.progress.unwrap().phase, Phase::Done as i32);
        assert_eq!(rec.timings.unwrap().total.unwrap().seconds, 2);
        table.finish(&a, JobState::Failed, Some("late".into()), &Timings::default());
        assert_eq!(table.get(&a).unwrap().state, JobState::Succeeded as i32, "the first end stays");
        assert_eq!(table.unfinished(), std::slice::from_ref(&b));
        assert_eq!(table.sweep(Instant::now()), 0, "kept during the retention time");
        assert_eq!(table.sweep(Instant::now() + Duration::from_millis(60)), 1);
        assert!(table.get(&a).is_none());
        assert!(table.get(&b).is_some(), "unfinished jobs never expire");
    }

    #[tokio::test]
    async fn the_first_stop_reason_wins_and_wakes_waiters() {
        let stop = StopSignal::default();
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.stopped().await }
        });
        tokio::task::yield_now().await;
        assert!(!stop.is_stopped());
        assert!(stop.stop(StopReason::Deadline));
        assert!(!stop.stop(StopReason::Cancelled));
        assert_eq!(waiter.await.unwrap(), StopReason::Deadline);
        assert_eq!(stop.stopped().await, StopReason::Deadline);
        assert_eq!(StopReason::Deadline.final_state(), JobState::Failed);
        assert_eq!(tonic::Status::from(StopReason::Deadline.error()).code(), tonic::Code::DeadlineExceeded);
        assert_eq!(tonic::Status::from(StopReason::ClientGone.error()).code(), tonic::Code::Cancelled);
    }
}
