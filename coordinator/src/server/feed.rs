//! What WatchJob streams. Of a job that runs here: each job's driver publishes into a [`JobFeed`]
//! (its Accepted, its latest Progress, its output files, its end) and every watcher follows the
//! feed at its own pace; a watcher that falls behind skips Progress messages, never a file. Of a
//! finished job: its record and the output files kept in the state store ([`replay_finished`]).

use super::durable::{Blob, JobStore};
use super::executor::OutputFile;
use crate::CoordinatorError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tessera_proto::state::v1::StoredJob;
use tessera_proto::v1::{generate_event::Event, Accepted, Chunk, Done, GenerateEvent, Progress};
use tessera_proto::v1::{Job, JobState};
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// How a job ended, as its watchers learn it.
#[derive(Clone, Debug)]
pub enum FeedEnd {
    /// It succeeded.
    Done(Done),
    /// It failed or was stopped: the status its Generate stream ended with.
    Failed(Status),
}

/// A job's state as its watchers see it.
#[derive(Clone, Debug, Default)]
pub struct FeedState {
    /// The job's Accepted message.
    pub accepted: Option<Accepted>,
    /// The latest progress.
    pub progress: Option<Progress>,
    /// Every output file so far, in order.
    pub files: Vec<Arc<OutputFile>>,
    /// Set once the job ended.
    pub end: Option<FeedEnd>,
}

/// One job's feed (see the module docs). Dropping it without an end tells watchers the job was
/// lost here (the server is going away).
pub struct JobFeed {
    tx: watch::Sender<FeedState>,
}

impl JobFeed {
    fn new(accepted: Accepted) -> Self {
        Self { tx: watch::channel(FeedState { accepted: Some(accepted), ..Default::default() }).0 }
    }

    /// Publishes the latest progress.
    pub fn progress(&self, p: Progress) {
        self.tx.send_modify(|s| s.progress = Some(p));
    }

    /// Publishes a finished output file.
    pub fn file(&self, f: Arc<OutputFile>) {
        self.tx.send_modify(|s| s.files.push(f));
    }

    /// Publishes the end.
    pub fn end(&self, end: FeedEnd) {
        self.tx.send_modify(|s| s.end = Some(end));
    }

    fn subscribe(&self) -> watch::Receiver<FeedState> {
        self.tx.subscribe()
    }
}

/// The feeds of the jobs that run (or wait) here, by job id.
#[derive(Default)]
pub struct Feeds {
    map: Mutex<HashMap<String, Arc<JobFeed>>>,
}

impl Feeds {
    /// Opens the feed of a newly accepted (or resumed) job.
    pub fn open(&self, id: &str, accepted: Accepted) -> Arc<JobFeed> {
        let feed = Arc::new(JobFeed::new(accepted));
        self.lock().insert(id.to_string(), feed.clone());
        feed
    }

    /// Closes a job's feed once its end is published (later watchers read the stored output).
    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The feed of job `id`, while it runs here.
    pub fn get(&self, id: &str) -> Option<Arc<JobFeed>> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobFeed>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A watcher's copy of what it was sent so far.
#[derive(Default)]
struct Sent {
    accepted: bool,
    progress: Option<Progress>,
    files: usize,
}

/// Streams `feed` to a watcher on `out`, file contents cut into Chunk messages of `chunk_size`
/// bytes, until the job's end is sent (or the watcher goes away).
pub async fn follow(feed: Arc<JobFeed>, out: mpsc::Sender<Result<GenerateEvent, Status>>, chunk_size: usize) {
    let mut rx = feed.subscribe();
    drop(feed);
    let mut sent = Sent::default();
    loop {
        // What to send now, taken under the borrow and sent after it.
        let (accepted, progress, files, end) = {
            let s = rx.borrow_and_update();
            let accepted = (!sent.accepted).then(|| s.accepted.clone()).flatten();
            let progress = s.progress.filter(|p| sent.progress.as_ref() != Some(p));
            let files: Vec<Arc<OutputFile>> = s.files[sent.files.min(s.files.len())..].to_vec();
            (accepted, progress, files, s.end.clone())
        };
        if let Some(a) = accepted {
            sent.accepted = true;
            if out.send(Ok(event(Event::Accepted(a)))).await.is_err() {
                return;
            }
        }
        if let Some(p) = progress {
            sent.progress = Some(p);
            if out.send(Ok(event(Event::Progress(p)))).await.is_err() {
                return;
            }
        }
        for f in files {
            sent.files += 1;
            if !send_file(&out, &f, chunk_size).await {
                return;
            }
        }
        if let Some(end) = end {
            let _ = out.send(end_message(end)).await;
            return;
        }
        if rx.changed().await.is_err() {
            let _ = out.send(Err(Status::unavailable("the job's server went away before it ended; WatchJob again once it is back"))).await;
            return;
        }
    }
}

/// Streams a finished job from its record and the state store: Accepted, its last Progress, its
/// stored output files, and Done (or the status it ended with).
pub async fn replay_finished(store: Arc<JobStore>, record: Job, stored: StoredJob, out: mpsc::Sender<Result<GenerateEvent, Status>>, chunk_size: usize) {
    let id = record.job_id.clone();
    let accepted = Accepted { job_id: id.clone(), plan: record.plan.clone(), queue_position: 0, seed: record.seed, effective_request: record.request.clone() };
    if out.send(Ok(event(Event::Accepted(accepted)))).await.is_err() {
        return;
    }
    if let Some(p) = record.progress {
        if out.send(Ok(event(Event::Progress(p)))).await.is_err() {
            return;
        }
    }
    let state = JobState::try_from(record.state).unwrap_or(JobState::Unspecified);
    if state != JobState::Succeeded {
        let message = format!("job {id} ended {}: {}", state.as_str_name(), record.error);
        let _ = out.send(Err(if state == JobState::Cancelled { Status::cancelled(message) } else { Status::aborted(message) })).await;
        return;
    }
    for (n, o) in stored.outputs.iter().enumerate() {
        let bytes = match store.get_blob(&id, Blob::Output(n)).await {
            Ok(Some(b)) if b.len() as u64 == o.size => b,
            Ok(_) => {
                let _ = out
                    .send(Err(Status::from(CoordinatorError::OutputGone { job: id.clone(), why: format!("output file {n} is missing from the state store") })))
                    .await;
                return;
            }
            Err(e) => {
                let _ = out.send(Err(Status::from(e))).await;
                return;
            }
        };
        let content_type = super::output::static_content_type(&o.content_type);
        let file = OutputFile { content_type, frame_index: o.frame_index, bytes: bytes.to_vec() };
        if !send_file(&out, &file, chunk_size).await {
            return;
        }
    }
    let request = record.request.unwrap_or_default();
    let done = Done {
        job_id: id,
        timings: record.timings,
        total_bytes: stored.outputs.iter().map(|o| o.size).sum(),
        num_frames: request.num_frames,
        width: request.width,
        height: request.height,
    };
    let _ = out.send(Ok(event(Event::Done(done)))).await;
}

/// The stream's last message for an end.
pub fn end_message(end: FeedEnd) -> Result<GenerateEvent, Status> {
    match end {
        FeedEnd::Done(d) => Ok(event(Event::Done(d))),
        FeedEnd::Failed(s) => Err(s),
    }
}

/// A GenerateEvent of `e`.
pub fn event(e: Event) -> GenerateEvent {
    GenerateEvent { event: Some(e) }
}

/// The Chunk messages of a file, `chunk_size` bytes at most each (one, empty, for an empty file).
pub fn chunks(file: &OutputFile, chunk_size: usize) -> impl Iterator<Item = Chunk> + '_ {
    let n = file.bytes.len();
    let size = chunk_size.max(1);
    (0..n.div_ceil(size).max(1)).map(move |i| {
        let (start, end) = (i * size, ((i + 1) * size).min(n));
        Chunk {
            offset: start as u64,
            data: file.bytes[start..end].to_vec(),
            content_type: file.content_type.to_string(),
            frame_index: file.frame_index,
            last: end == n,
        }
    })
}

/// Sends a file as chunks; false once the watcher is gone.
pub async fn send_file(out: &mpsc::Sender<Result<GenerateEvent, Status>>, file: &OutputFile, chunk_size: usize) -> bool {
    for c in chunks(file, chunk_size) {
        if out.send(Ok(event(Event::Chunk(c)))).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: usize, index: u32) -> Arc<OutputFile> {
        Arc::new(OutputFile { content_type: "image/png", frame_index: index, bytes: (0..n).map(|i| i as u8).collect() })
    }

    #[test]
    fn files_are_cut_into_chunks_that_cover_them() {
        let f = file(10, 0);
        let c: Vec<Chunk> = chunks(&f, 4).collect();
        assert_eq!(c.iter().map(|c| (c.offset, c.data.len(), c.last)).collect::<Vec<_>>(), [(0, 4, false), (4, 4, false), (8, 2, true)]);
        let empty = OutputFile { content_type: "video/mp4", frame_index: 0, bytes: Vec::new() };
        assert_eq!(chunks(&empty, 4).count(), 1);
    }

    #[tokio::test]
    async fn a_late_watcher_gets_accepted_the_latest_progress_every_file_and_the_end() {
        let feeds = Feeds::default();
        let feed = feeds.open("j-1", Accepted { job_id: "j-1".into(), ..Default::default() });
        feed.progress(Progress { step: 1, ..Default::default() });
        feed.file(file(3, 0));
        feed.progress(Progress { step: 2, ..Default::default() });
        let (tx, mut rx) = mpsc::channel(64);
        let watcher = tokio::spawn(follow(feeds.get("j-1").unwrap(), tx, 2));
        feed.file(file(1, 1));
        feed.end(FeedEnd::Done(Done { job_id: "j-1".into(), ..Default::default() }));
        feeds.close("j-1");
        drop(feed);
        watcher.await.unwrap();
        let mut got = Vec::new();
        while let Some(m) = rx.recv().await {
            got.push(match m.unwrap().event.unwrap() {
                Event::Accepted(_) => "accepted".to_string(),
                Event::Progress(p) => format!("step {}", p.step),
                Event::Chunk(c) => format!("frame {} @{}", c.frame_index, c.offset),
                Event::Done(_) => "done".into(),
            });
        }
        assert_eq!(got[..2], ["accepted", "step 2"], "the latest progress, not every one");
        assert!(got.contains(&"frame 0 @0".to_string()) && got.contains(&"frame 0 @2".to_string()) && got.contains(&"frame 1 @0".to_string()), "{got:?}");
        assert_eq!(got.last().unwrap(), "done");
        assert!(feeds.get("j-1").is_none());
    }

    #[tokio::test]
    async fn a_feed_dropped_without_an_end_tells_the_watcher() {
        let feeds = Feeds::default();
        let feed = feeds.open("j-2", Accepted::default());
        let (tx, mut rx) = mpsc::channel(8);
        let watcher = tokio::spawn(follow(feed.clone(), tx, 16));
        assert!(matches!(rx.recv().await.unwrap().unwrap().event, Some(Event::Accepted(_))));
        feeds.close("j-2");
        drop(feed);
        watcher.await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
    }
}
