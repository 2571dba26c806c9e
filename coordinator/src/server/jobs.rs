//! Job records (what GetJob / ListJobs return) and the stop switch every job carries: the table
//! of queued, running and finished jobs, finished ones kept for a configurable time.

use crate::CoordinatorError;
use prost::Message;
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
    /// The client stopped reading its Generate stream (its flow-control window stayed shut) for
    /// longer than the server's send timeout.
    ClientStalled(Duration),
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
            Self::ClientStalled(after) => {
                CoordinatorError::Cancelled(format!("the client stopped reading its Generate stream for {:.0?} (the server's send timeout)", after))
            }
            Self::Deadline => CoordinatorError::DeadlineExceeded("the client's deadline passed before the job finished".into()),
            Self::Shutdown => CoordinatorError::Unavailable("the server shut down before the job finished; retry".into()),
        }
    }

    /// The state the job's record ends in.
    pub fn final_state(self) -> JobState {
        match self {
            Self::Cancelled | Self::ClientGone | Self::ClientStalled(_) | Self::Shutdown => JobState::Cancelled,
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
    /// Order of finishing (the counter's value then); `None` while the job runs or waits.
    finished: Option<(Instant, u64)>,
}

/// How many finished records the table keeps, and in how many bytes (their encoded size): past
/// either, the oldest finished records are evicted. Unfinished jobs are never evicted (the
/// queue's capacity bounds them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLimits {
    /// Most records.
    pub max_records: usize,
    /// Most bytes of records (each counted as its protobuf encoding).
    pub max_bytes: usize,
}

impl Default for RecordLimits {
    /// 10,000 records in 64 MiB (a record with two 2,000-character prompts is about 9 KB).
    fn default() -> Self {
        Self { max_records: 10_000, max_bytes: 64 << 20 }
    }
}

/// The entries and their bytes, under one lock.
#[derive(Default)]
struct Table {
    map: HashMap<String, Entry>,
    bytes: usize,
}

impl Table {
    fn put(&mut self, id: String, entry: Entry) {
        self.bytes += entry.job.encoded_len();
        if let Some(old) = self.map.insert(id, entry) {
            self.bytes -= old.job.encoded_len();
        }
    }

    fn take(&mut self, id: &str) -> Option<Entry> {
        let e = self.map.remove(id)?;
        self.bytes -= e.job.encoded_len();
        Some(e)
    }

    /// Changes an entry, keeping the byte count.
    fn change<T>(&mut self, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let e = self.map.get_mut(id)?;
        let before = e.job.encoded_len();
        let out = f(e);
        self.bytes = self.bytes - before + e.job.encoded_len();
        Some(out)
    }

    /// Evicts the oldest finished records until `limits` hold (or none is left to evict);
    /// returns how many went.
    fn enforce(&mut self, limits: RecordLimits) -> usize {
        if self.map.len() <= limits.max_records && self.bytes <= limits.max_bytes {
            return 0;
        }
        let mut finished: Vec<(u64, String)> = self.map.iter().filter_map(|(id, e)| e.finished.map(|(_, order)| (order, id.clone()))).collect();
        finished.sort_unstable();
        let mut gone = 0;
        for (_, id) in finished {
            if self.map.len() <= limits.max_records && self.bytes <= limits.max_bytes {
                break;
            }
            self.take(&id);
            gone += 1;
        }
        gone
    }
}

/// Every job the coordinator knows; finished jobs are dropped `retention` after they end, or
/// sooner, oldest first, when the records outgrow their [`RecordLimits`].
pub struct JobTable {
    entries: Mutex<Table>,
    retention: Duration,
    limits: RecordLimits,
    counter: AtomicU64,
}

impl JobTable {
    /// An empty table keeping finished records for `retention`, within `limits`.
    pub fn new(retention: Duration, limits: RecordLimits) -> Self {
        Self { entries: Mutex::new(Table::default()), retention, limits, counter: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
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

    /// Adds a record (state QUEUED, `created` set by the caller) with its stop switch; the
    /// oldest finished records make room if the limits require.
    pub fn insert(&self, job: Job, stop: StopSignal) {
        let created = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        table.put(job.job_id.clone(), Entry { job, stop, created, finished: None });
        table.enforce(self.limits);
    }

    /// Adds a finished record read back from the state store (its retention starts now).
    pub fn restore_finished(&self, job: Job) {
        let order = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        table.put(job.job_id.clone(), Entry { job, stop: StopSignal::default(), created: order, finished: Some((Instant::now(), order)) });
        table.enforce(self.limits);
    }

    /// Takes a record out (a job that never got queued).
    pub fn remove(&self, id: &str) {
        self.lock().take(id);
    }

    /// A copy of job `id`'s record.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().map.get(id).map(|e| e.job.clone())
    }

    /// Job `id`'s stop switch.
    pub fn stop_signal(&self, id: &str) -> Option<StopSignal> {
        self.lock().map.get(id).map(|e| e.stop.clone())
    }

    /// Changes job `id`'s record (nothing if it is gone).
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        self.lock().change(id, |e| f(&mut e.job));
    }

    /// Marks job `id` finished: its final state, error and timings; it expires after the
    /// retention time (or sooner, when the limits evict it). The first call wins: a finished
    /// record is not changed again.
    pub fn finish(&self, id: &str, state: JobState, error: Option<String>, timings: &Timings) {
        let order = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        table.change(id, |e| {
            if e.finished.is_some() {
                return;
            }
            e.job.state = state as i32;
            e.job.progress.get_or_insert_with(Default::default).phase = Phase::Done as i32;
            e.job.error = error.unwrap_or_default();
            e.job.timings = Some(timings.to_pb());
            e.job.finished = Some(pb_timestamp(SystemTime::now()));
            e.finished = Some((Instant::now(), order));
        });
        table.enforce(self.limits);
    }

    /// Records in one of `states` (all when empty) of `tenant` (every tenant's when None), newest
    /// first, at most `limit`.
    pub fn list(&self, states: &[JobState], tenant: Option<&str>, limit: usize) -> Vec<Job> {
        let table = self.lock();
        let mut picked: Vec<&Entry> = table
            .map
            .values()
            .filter(|e| states.is_empty() || states.iter().any(|s| *s as i32 == e.job.state))
            .filter(|e| tenant.is_none_or(|t| e.job.tenant == t))
            .collect();
        picked.sort_by_key(|e| std::cmp::Reverse(e.created));
        picked.into_iter().take(limit).map(|e| e.job.clone()).collect()
    }

    /// Drops finished records older than the retention time; returns how many went.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut table = self.lock();
        let old: Vec<String> = table
            .map
            .iter()
            .filter(|(_, e)| e.finished.is_some_and(|(t, _)| now.saturating_duration_since(t) >= self.retention))
            .map(|(id, _)| id.clone())
            .collect();
        old.iter().for_each(|id| {
            table.take(id);
        });
        old.len()
    }

    /// Ids of jobs that have not finished.
    pub fn unfinished(&self) -> Vec<String> {
        self.lock().map.values().filter(|e| e.finished.is_none()).map(|e| e.job.job_id.clone()).collect()
    }

    /// Records held, and their bytes.
    pub fn size(&self) -> (usize, usize) {
        let table = self.lock();
        (table.map.len(), table.bytes)
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
        let table = JobTable::new(Duration::from_millis(50), RecordLimits::default());
        let (a, b) = (table.new_id(), table.new_id());
        assert_ne!(a, b);
        assert!(a.starts_with("j-") && a.len() == 18, "{a}");
        table.insert(job(&a), StopSignal::default());
        table.insert(job(&b), StopSignal::default());
        table.update(&b, |j| j.state = JobState::Running as i32);
        let ids = |v: Vec<Job>| v.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(table.list(&[], None, 10)), [b.clone(), a.clone()]);
        assert_eq!(ids(table.list(&[JobState::Running], None, 10)), std::slice::from_ref(&b));
        assert_eq!(ids(table.list(&[], None, 1)), std::slice::from_ref(&b));
        table.update(&a, |j| j.tenant = "alice".into());
        assert_eq!(ids(table.list(&[], Some("alice"), 10)), std::slice::from_ref(&a), "one tenant's jobs");
        assert!(table.list(&[], Some("bob"), 10).is_empty());
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

    /// Past the record limits the oldest finished records go first, whatever their age; running
    /// and queued jobs stay; the byte count follows every change.
    #[test]
    fn records_are_bounded_in_count_and_bytes_oldest_finished_first() {
        let table = JobTable::new(Duration::from_secs(3600), RecordLimits { max_records: 3, max_bytes: usize::MAX });
        let ids: Vec<String> = (0..5).map(|_| table.new_id()).collect();
        for id in &ids[..3] {
            table.insert(job(id), StopSignal::default());
        }
        // Finished in the order 1, 0; job 2 still runs.
        table.finish(&ids[1], JobState::Succeeded, None, &Timings::default());
        table.finish(&ids[0], JobState::Failed, Some("x".into()), &Timings::default());
        table.insert(job(&ids[3]), StopSignal::default());
        assert!(table.get(&ids[1]).is_none(), "the first to finish is evicted first");
        assert!(table.get(&ids[0]).is_some() && table.get(&ids[2]).is_some() && table.get(&ids[3]).is_some());
        table.insert(job(&ids[4]), StopSignal::default());
        assert!(table.get(&ids[0]).is_none());
        // Only unfinished records are left: the limit gives way rather than drop a live job.
        table.insert(job(&table.new_id()), StopSignal::default());
        assert_eq!(table.size().0, 4);
        assert_eq!(table.unfinished().len(), 4);

        // Bytes: a record with a long prompt counts its encoding.
        let long = |id: &str| Job { request: Some(tessera_proto::v1::GenerateRequest { prompt: "p".repeat(2000), ..Default::default() }), ..job(id) };
        let one = long("j-0000000000000000").encoded_len();
        let table = JobTable::new(Duration::from_secs(3600), RecordLimits { max_records: 100, max_bytes: 2 * one + one / 2 });
        let ids: Vec<String> = (0..3).map(|_| table.new_id()).collect();
        for id in &ids {
            table.insert(long(id), StopSignal::default());
            table.finish(id, JobState::Succeeded, None, &Timings::default());
        }
        let (n, bytes) = table.size();
        assert!(n == 2 && bytes <= 2 * one + one / 2, "{n} records, {bytes} bytes");
        assert!(table.get(&ids[0]).is_none());
        table.update(&ids[2], |j| j.error = "e".repeat(10));
        assert_eq!(table.size().1, table.list(&[], None, 10).iter().map(|j| j.encoded_len()).sum::<usize>(), "bytes follow updates");
        table.remove(&ids[2]);
        assert_eq!(table.size().1, table.list(&[], None, 10).iter().map(|j| j.encoded_len()).sum::<usize>());
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
