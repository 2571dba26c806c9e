//! A job's driver: one task per accepted (or resumed) job, owning its Generate stream when it has
//! one. It waits for a slot (or for a cancel, the client going away, the deadline), runs the job
//! on the executor, turns the executor's events into Progress and Chunk messages, the record's
//! updates, the job's feed (what WatchJob streams) and, with a state store, what is stored of it
//! ([`Persisted`]); it ends the stream with Done or the job's error status.

use super::executor::{ExecEvent, ExecJob, ExecReport, OutputFile};
use super::feed::{chunks, event, FeedEnd, JobFeed};
use super::jobs::{pb_duration, StopReason, StopSignal, Timings};
use super::persist::Persisted;
use super::scheduler::Admission;
use super::ServiceState;
use crate::CoordinatorError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_proto::v1::{generate_event::Event, Done, GenerateEvent, JobState, Phase, Progress};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

/// The sending half of a Generate stream.
pub type ClientSender = mpsc::Sender<Result<GenerateEvent, Status>>;

/// Learns how long decoding and encoding take per output pixel-frame, to estimate the time left
/// after the last step.
#[derive(Debug, Default)]
pub struct Estimator {
    secs_per_pixel_frame: Mutex<Option<f64>>,
}

impl Estimator {
    /// Records a finished job's decode + encode time for `pixel_frames` = width·height·frames.
    pub fn record(&self, after_denoise: Duration, pixel_frames: u64) {
        if pixel_frames == 0 {
            return;
        }
        let rate = after_denoise.as_secs_f64() / pixel_frames as f64;
        let mut r = self.secs_per_pixel_frame.lock().unwrap_or_else(|e| e.into_inner());
        // An exponential average: recent jobs count most, one odd job does not dominate.
        *r = Some(r.map_or(rate, |old| 0.7 * old + 0.3 * rate));
    }

    /// Expected decode + encode time for `pixel_frames` (zero before any job finished).
    pub fn after_denoise(&self, pixel_frames: u64) -> Duration {
        let r = *self.secs_per_pixel_frame.lock().unwrap_or_else(|e| e.into_inner());
        r.map_or(Duration::ZERO, |r| Duration::from_secs_f64(r * pixel_frames as f64))
    }
}

/// Everything the driver needs besides the shared state.
pub struct DriverJob {
    /// The job for the executor.
    pub job: ExecJob,
    /// When it was accepted.
    pub accepted: Instant,
    /// Its Generate stream (`None` for a job resumed after a restart: watchers follow its feed).
    pub client: Option<ClientSender>,
    /// What WatchJob streams of it.
    pub feed: Arc<JobFeed>,
    /// Its durable side, with a state store.
    pub persisted: Option<Persisted>,
    /// Its stop switch.
    pub stop: StopSignal,
    /// The client's deadline.
    pub deadline: Option<Instant>,
    /// Longest one message may wait for the client to read (its HTTP/2 window to open) before
    /// the job is stopped: a client that stops reading cannot pin a job and its workers.
    pub send_timeout: Duration,
    /// The job's share of the held input frames, given back when the driver ends.
    pub _held_input: Option<super::input::HeldShare>,
}

/// Progress bookkeeping of a running job.
struct Tracker {
    accepted: Instant,
    phase: Phase,
    done: u32,
    total: u32,
    /// A diffusion-forcing job's chunks finished and in all.
    chunks: (u32, u32),
    denoise_started: Option<Instant>,
    after_denoise: Duration,
    /// The planner's duration of the run and when the run started (its Plan event).
    predicted: Option<(Instant, Duration)>,
    /// When decoding began (the estimate then counts down `after_denoise`).
    decode_started: Option<Instant>,
}

impl Tracker {
    fn progress(&self) -> Progress {
        let estimate = match self.denoise_started {
            Some(t) if self.done > 0 && self.phase == Phase::Denoising => {
                let per_step = t.elapsed() / self.done;
                Some(pb_duration(per_step * self.total.saturating_sub(self.done) + self.after_denoise))
            }
            // before the first step: the planner's duration, less what has run
            _ if self.done == 0 && matches!(self.phase, Phase::Queued | Phase::Preparing | Phase::Denoising) => {
                self.predicted.map(|(since, total)| pb_duration(total.saturating_sub(since.elapsed())))
            }
            // decoding and encoding: what they usually take for this many frames, less what ran
            _ => self.decode_started.map(|t| pb_duration(self.after_denoise.saturating_sub(t.elapsed()))),
        };
        Progress {
            phase: self.phase as i32,
            step: self.done,
            total_steps: self.total,
            elapsed: Some(pb_duration(self.accepted.elapsed())),
            estimated_remaining: estimate,
            chunks_done: self.chunks.0,
            total_chunks: self.chunks.1,
        }
    }
}

/// How much earlier than this server's reckoning of a deadline (arrival + `grpc-timeout`) the
/// client's own can fall: the client's timer starts before the call crosses the network (and, on a
/// first call, before its connection is made), so it may give up and close while this server
/// still counts a few milliseconds to go. Seen in CI: a 1 ms deadline closed before it was due here.
const CLIENT_DEADLINE_LEAD: Duration = Duration::from_millis(100);

/// Why a job stops when its client has gone away (its call closed, or a send to it failed) at
/// `now`: a caller whose deadline has passed, or is due within [`CLIENT_DEADLINE_LEAD`], goes
/// away because of it, and that is the reason; otherwise it left of its own accord. Both ways of
/// noticing use this one rule: the deadline's own watcher may not have run yet when a send finds
/// the call closed.
fn client_gone(deadline: Option<Instant>, now: Instant) -> StopReason {
    if deadline.is_some_and(|at| now + CLIENT_DEADLINE_LEAD >= at) {
        StopReason::Deadline
    } else {
        StopReason::ClientGone
    }
}

/// Drives one job from the queue (its slot arrives on `admission`) to its end.
pub async fn drive(state: Arc<ServiceState>, d: DriverJob, admission: Admission) {
    let id = d.job.id.clone();
    // Watchers turn the client's disconnect and its deadline into stop reasons.
    let watch_client = d.client.clone().map(|client| {
        let (stop, deadline) = (d.stop.clone(), d.deadline);
        tokio::spawn(async move {
            client.closed().await;
            stop.stop(client_gone(deadline, Instant::now()));
        })
    });
    let watch_deadline = d.deadline.map(|at| {
        let stop = d.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            stop.stop(StopReason::Deadline);
        })
    });

    let slot = async {
        tokio::select! {
            slot = admission => slot.ok(),
            _ = d.stop.stopped() => None,
        }
    }
    .instrument(tracing::info_span!("queued"))
    .await;
    let outcome = match slot {
        // A job stopped just as its slot came does not start.
        Some(slot) if !d.stop.is_stopped() => {
            state.metrics.job_started();
            let r = run(&state, &d).await;
            state.metrics.job_done();
            drop(slot);
            r
        }
        _ => {
            state.scheduler.remove(&id);
            state.executor.abandon(&d.job);
            let reason = d.stop.reason().unwrap_or(StopReason::Shutdown);
            let timings = Timings { queued: d.accepted.elapsed(), total: d.accepted.elapsed(), ..Default::default() };
            Outcome { result: Err(reason.error()), timings, total_bytes: 0, steps: 0, predicted: None }
        }
    };
    for w in watch_client.into_iter().chain(watch_deadline) {
        w.abort();
    }
    finish(&state, &d, outcome).await;
}

/// How long the last message of a stream may wait for a slow client.
const FINAL_SEND: Duration = Duration::from_secs(10);

struct Outcome {
    result: Result<ExecReport, CoordinatorError>,
    timings: Timings,
    total_bytes: u64,
    /// Denoising steps run.
    steps: u32,
    /// The planner's duration of the run (preparing, denoising, decoding), when it planned it.
    predicted: Option<Duration>,
}

/// Records the end and tells the client and the watchers (the record first, so a client that
/// reads the stream's end and then calls GetJob sees the final state).
async fn finish(state: &ServiceState, d: &DriverJob, o: Outcome) {
    let id = &d.job.id;
    let end = match o.result {
        Ok(report) => {
            state.jobs.finish(id, JobState::Succeeded, None, &o.timings);
            let t = &o.timings;
            let phases = [("queued", t.queued), ("preparing", t.preparing), ("denoising", t.denoising), ("decoding", t.decoding), ("encoding", t.encoding)];
            let r = &d.job.request;
            state.metrics.succeeded(t.total, phases, r.spec.tokens() as u64 * u64::from(r.spec.forwards_per_step()) * o.steps as u64, t.denoising);
            if let Some(predicted) = o.predicted {
                state.metrics.prediction(predicted, t.preparing + t.denoising + t.decoding);
            }
            tracing::info!(job = %id, total_s = o.timings.total.as_secs_f64(), bytes = o.total_bytes, "job succeeded");
            let done = Done {
                job_id: id.clone(),
                timings: Some(o.timings.to_pb()),
                total_bytes: o.total_bytes,
                num_frames: report.frames,
                width: report.width,
                height: report.height,
            };
            FeedEnd::Done(done)
        }
        Err(e) => {
            let job_state = match &e {
                CoordinatorError::Cancelled(_) | CoordinatorError::Unavailable(_) | CoordinatorError::Superseded(_) => JobState::Cancelled,
                _ => JobState::Failed,
            };
            let job_state = d.stop.reason().map_or(job_state, StopReason::final_state);
            state.jobs.finish(id, job_state, Some(e.to_string()), &o.timings);
            state.metrics.ended_badly(o.timings.total, &e, job_state == JobState::Cancelled);
            tracing::info!(job = %id, state = ?job_state, error = %e, "job ended");
            tessera_telemetry::mark_error(&tracing::Span::current(), &e);
            // With a state store, a job stopped by the shutdown is resumed by the next coordinator.
            // One whose workers a later owner of the store drives is that owner's: this coordinator
            // writes nothing more of it, and stops.
            let superseded = matches!(e, CoordinatorError::Superseded(_));
            if superseded {
                state.fence.supersede(e.to_string());
            }
            let handed_over = d.persisted.is_some() && (d.stop.reason() == Some(StopReason::Shutdown) || superseded);
            let status = match handed_over {
                true => Status::unavailable(format!(
                    "the server shut down before the job finished; it goes on when a coordinator starts again on the same state store: WatchJob {id} reattaches"
                )),
                false => Status::from(e),
            };
            if !handed_over {
                if let Some(p) = &d.persisted {
                    p.finished(state.jobs.get(id)).await;
                }
            }
            FeedEnd::Failed(status)
        }
    };
    if let (Some(p), FeedEnd::Done(_)) = (&d.persisted, &end) {
        p.finished(state.jobs.get(id)).await;
    }
    d.feed.end(end.clone());
    state.feeds.close(id);
    if let Some(client) = &d.client {
        // The client may be gone: that is fine.
        let _ = tokio::time::timeout(FINAL_SEND, client.send(super::feed::end_message(end))).await;
    }
}

/// Runs the job on the executor, forwarding its events.
async fn run(state: &ServiceState, d: &DriverJob) -> Outcome {
    let started = Instant::now();
    let queued = started - d.accepted;
    let req = &d.job.request.request;
    let pixel_frames = req.width as u64 * req.height as u64 * req.num_frames as u64;
    let mut tracker = Tracker {
        accepted: d.accepted,
        phase: Phase::Preparing,
        done: 0,
        total: d.job.request.spec.planned_steps(),
        chunks: (0, d.job.request.spec.chunks().map_or(0, |c| c.chunks.len() as u32)),
        denoise_started: None,
        after_denoise: state.estimator.after_denoise(pixel_frames),
        predicted: None,
        decode_started: None,
    };
    state.jobs.update(&d.job.id, |j| {
        j.state = JobState::Running as i32;
        j.progress = Some(tracker.progress());
    });
    if let Some(p) = &d.persisted {
        p.save(state.jobs.get(&d.job.id)).await;
    }
    tracing::info!(job = %d.job.id, queued_s = queued.as_secs_f64(), "job started");

    let (tx, mut rx) = mpsc::channel(64);
    // In the job's span: what the executor does (and asks of workers) belongs to the job's trace.
    let exec = tokio::spawn(state.executor.run(d.job.clone(), tx, d.stop.clone()).in_current_span());
    let mut total_bytes = 0u64;
    let mut last_step = Instant::now();
    // Every sender is dropped when the executor is done, which ends this loop.
    while let Some(ev) = rx.recv().await {
        let message = match ev {
            ExecEvent::Phase(p) => {
                tracker.phase = p;
                if p == Phase::Denoising {
                    tracker.denoise_started = Some(Instant::now());
                    last_step = Instant::now();
                }
                if p == Phase::Decoding {
                    tracker.decode_started = Some(Instant::now());
                }
                Some(Event::Progress(tracker.progress()))
            }
            ExecEvent::Step { done, total, chunks } => {
                state.metrics.step(last_step.elapsed());
                last_step = Instant::now();
                (tracker.done, tracker.total, tracker.chunks) = (done, total, chunks);
                Some(Event::Progress(tracker.progress()))
            }
            ExecEvent::Plan(plan) => {
                let predicted = plan.predicted_duration.and_then(|p| Duration::try_from(p).ok());
                tracker.predicted = predicted.map(|p| (Instant::now(), p));
                state.jobs.update(&d.job.id, |j| j.plan = Some(plan));
                if let Some(p) = &d.persisted {
                    p.save(state.jobs.get(&d.job.id)).await;
                }
                None
            }
            ExecEvent::Checkpoint(checkpoint) => {
                if let Some(p) = &d.persisted {
                    p.checkpoint(state.jobs.get(&d.job.id), &checkpoint).await;
                }
                None
            }
            ExecEvent::File(file) => {
                total_bytes += file.bytes.len() as u64;
                if let Some(p) = &d.persisted {
                    p.output(&file).await;
                }
                let file = Arc::new(file);
                d.feed.file(file.clone());
                send_file(d, &file, state.chunk_size).await;
                None
            }
        };
        if let Some(Event::Progress(p)) = &message {
            let p = *p;
            state.jobs.update(&d.job.id, |j| j.progress = Some(p));
            d.feed.progress(p);
        }
        if let Some(m) = message {
            send(d, event(m)).await;
        }
    }
    let result = match exec.await {
        Ok(r) => r,
        Err(e) => Err(CoordinatorError::Internal(format!("the job's task failed: {e}"))),
    };
    // A stop that came after the last event still wins: the client may not have everything.
    let result = match (result, d.stop.reason()) {
        (_, Some(reason)) => Err(reason.error()),
        (r, None) => r,
    };
    let mut timings = Timings { queued, total: d.accepted.elapsed(), ..Default::default() };
    if let Ok(report) = &result {
        (timings.preparing, timings.denoising, timings.decoding, timings.encoding) = (report.preparing, report.denoising, report.decoding, report.encoding);
        state.estimator.record(report.decoding + report.encoding, pixel_frames);
    }
    Outcome { result, timings, total_bytes, steps: tracker.done, predicted: tracker.predicted.map(|(_, d)| d) }
}

/// Sends one message unless the job is stopping (or has no client); a client that is gone, or
/// that does not take the message within the send timeout, stops the job.
async fn send(d: &DriverJob, message: GenerateEvent) {
    let Some(client) = &d.client else { return };
    if d.stop.is_stopped() {
        return;
    }
    tokio::select! {
        sent = tokio::time::timeout(d.send_timeout, client.send(Ok(message))) => match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => { d.stop.stop(client_gone(d.deadline, Instant::now())); }
            Err(_) => {
                tracing::warn!(job = %d.job.id, timeout_s = d.send_timeout.as_secs_f64(), "the client stopped reading its stream: stopping the job");
                d.stop.stop(StopReason::ClientStalled(d.send_timeout));
            }
        },
        _ = d.stop.stopped() => {}
    }
}

/// Sends a file to the client as chunks of at most `chunk_size` bytes.
async fn send_file(d: &DriverJob, file: &OutputFile, chunk_size: usize) {
    if d.client.is_none() {
        return;
    }
    for chunk in chunks(file, chunk_size) {
        send(d, event(Event::Chunk(chunk))).await;
        if d.stop.is_stopped() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gone_after_its_deadline_stops_the_job_for_the_deadline() {
        let now = Instant::now();
        let (past, ahead) = (now - Duration::from_millis(40), now + Duration::from_secs(1));
        assert_eq!(client_gone(Some(past), now), StopReason::Deadline);
        assert_eq!(client_gone(Some(now), now), StopReason::Deadline);
        // the client's clock ran ahead of ours: its deadline, due here within the lead
        assert_eq!(client_gone(Some(now + Duration::from_micros(500)), now), StopReason::Deadline);
        assert_eq!(client_gone(Some(now + CLIENT_DEADLINE_LEAD), now), StopReason::Deadline);
        assert_eq!(client_gone(Some(now + CLIENT_DEADLINE_LEAD + Duration::from_millis(1)), now), StopReason::ClientGone);
        assert_eq!(client_gone(Some(ahead), now), StopReason::ClientGone);
        assert_eq!(client_gone(None, now), StopReason::ClientGone);
    }

    #[test]
    fn the_estimator_learns_the_time_after_the_last_step() {
        let e = Estimator::default();
        assert_eq!(e.after_denoise(1000), Duration::ZERO);
        e.record(Duration::from_secs(2), 1000);
        assert_eq!(e.after_denoise(2000), Duration::from_secs(4));
        e.record(Duration::from_secs(4), 1000);
        let t = e.after_denoise(1000).as_secs_f64();
        assert!((t - (0.7 * 2.0 + 0.3 * 4.0)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn remaining_time_is_predicted_then_estimated_once_a_step_is_done() {
        let mut t = Tracker {
            accepted: Instant::now(),
            phase: Phase::Denoising,
            done: 0,
            total: 10,
            chunks: (0, 0),
            denoise_started: Some(Instant::now() - Duration::from_secs(2)),
            after_denoise: Duration::from_secs(1),
            predicted: None,
            decode_started: None,
        };
        assert!(t.progress().estimated_remaining.is_none());
        // the planner's prediction stands in before the first step
        t.predicted = Some((Instant::now() - Duration::from_secs(5), Duration::from_secs(100)));
        let planned = t.progress().estimated_remaining.unwrap();
        assert!((94..=95).contains(&planned.seconds), "{planned:?}");
        t.done = 2;
        let left = t.progress().estimated_remaining.unwrap();
        // 8 steps at about a second each, plus a second after the last step.
        assert!((8..=10).contains(&left.seconds), "{left:?}");
        assert_eq!(t.progress().step, 2);
        // decoding counts down what decode and encode take after the last step
        (t.phase, t.done, t.decode_started) = (Phase::Decoding, 10, Some(Instant::now()));
        let left = t.progress().estimated_remaining.unwrap();
        assert!(left.seconds <= 1 && (left.seconds, left.nanos) != (0, 0), "{left:?}");
    }
}
