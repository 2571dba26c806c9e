//! The `tessera.v1.Tessera` service: Generate (validate, queue, stream), WatchJob (reattach),
//! GetJob, CancelJob, ListWorkers and ListJobs, over the shared [`ServiceState`].

use super::auth::{principal, Principal};
use super::cluster::random_bytes;
use super::feed::{follow, replay_finished};
use super::jobs::{pb_timestamp, StopReason, Timings};
use super::launch::{decode_media, launch, Launch};
use super::queue::Admit;
use super::ServiceState;
use crate::request::validate;
use crate::CoordinatorError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tessera_cluster::JobPlan;
use tessera_proto::v1::tessera_server::Tessera;
use tessera_proto::v1::{
    CancelJobRequest, CancelJobResponse, GenerateEvent, GenerateRequest, GetJobRequest, Job, JobState, ListJobsRequest, ListJobsResponse, ListWorkersRequest,
    ListWorkersResponse, Phase, Progress, WatchJobRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

/// Messages buffered per Generate stream before the job waits for its client.
const STREAM_BUFFER: usize = 16;
/// ListJobs' default and largest page.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 1000;

/// The public service (cheap to clone).
#[derive(Clone)]
pub struct TesseraService {
    state: Arc<ServiceState>,
}

impl TesseraService {
    /// A service over `state`.
    pub fn new(state: Arc<ServiceState>) -> Self {
        Self { state }
    }

    /// The record of job `id` if `caller` may see it. Another tenant's job is NOT_FOUND, as a
    /// job that does not exist: its id tells the caller nothing.
    fn visible_job(&self, caller: &Principal, id: &str) -> Result<Job, Status> {
        self.state.jobs.get(id).filter(|j| caller.may_see(&j.tenant)).ok_or_else(|| not_found(id))
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`), if any and
/// well-formed (as tonic, a malformed header is ignored).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A seed for a request without one: time and a counter, mixed.
fn draw_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    super::jobs::splitmix64(t ^ super::jobs::splitmix64(COUNTER.fetch_add(1, Ordering::Relaxed)))
}

fn job_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(CoordinatorError::invalid_argument("job_id", "is required").into());
    }
    Ok(id)
}

fn not_found(id: &str) -> Status {
    CoordinatorError::NotFound { what: format!("job {id:?} (finished jobs are kept for a limited time)") }.into()
}

/// Whether a job in `state` has ended.
pub fn is_final(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled].iter().any(|s| *s as i32 == state)
}

#[tonic::async_trait]
impl Tessera for TesseraService {
    type GenerateStream = ReceiverStream<Result<GenerateEvent, Status>>;
    type WatchJobStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let state = &self.state;
        if state.is_draining() {
            return Err(CoordinatorError::Unavailable("the server is shutting down and takes no new jobs".into()).into());
        }
        let accepted_at = Instant::now();
        let who = principal(&request);
        let tenant = who.tenant;
        let deadline = grpc_timeout(request.metadata()).map(|d| accepted_at + d);
        let caller = request.metadata().clone();
        let exec = &state.executor;
        let admitted = async {
            let mut valid = validate(request.into_inner(), &exec.defaults(), &exec.models(), exec.max_tokens(), draw_seed)?;
            state.scheduler.limits().check_priority(valid.request.priority, who.any_priority)?;
            exec.check(&valid)?;
            let (held, media) = decode_media(state, &mut valid, &tenant, Admit::New).await?;
            // The plan joins the job's spec: the group that runs it is the size it says.
            let plan = exec.plan(&valid)?;
            let layout = JobPlan { ranks: plan.ranks, ulysses: plan.ulysses, cfg_parallel: plan.cfg_parallel };
            valid.spec = valid.spec.clone().planned(layout)?;
            Ok::<_, CoordinatorError>((valid, held, media, plan))
        };
        let (valid, held, media, plan) = admitted.await.inspect_err(|e| state.metrics.rejected(e))?;
        let id = state.jobs.new_id();
        let seed = valid.request.seed.unwrap_or_default();
        let record = Job {
            job_id: id.clone(),
            state: JobState::Queued as i32,
            request: Some(valid.request.clone()),
            plan: Some(plan.clone()),
            progress: Some(Progress { phase: Phase::Queued as i32, total_steps: valid.request.steps, ..Default::default() }),
            created: Some(pb_timestamp(SystemTime::now())),
            seed,
            tenant,
            ..Default::default()
        };
        // The job's span (child of the caller's, from `traceparent`) covers its queueing and run.
        let span = tracing::info_span!("job", job_id = %id, model = %valid.request.model, tokens = valid.spec.tokens(), steps = valid.request.steps, ranks = plan.ranks, ulysses = plan.ulysses, ring = plan.ring);
        tessera_telemetry::set_parent_from_metadata(&span, &caller);
        let (tokens, steps) = (valid.spec.tokens(), valid.request.steps);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let secret = random_bytes()?;
        let launch_job = Launch {
            record,
            valid,
            secret,
            resume: None,
            client: Some(tx),
            deadline,
            held,
            media,
            accepted_at,
            stored: false,
            adopted: false,
            span: span.clone(),
        };
        let accepted = launch(state, launch_job).await.inspect_err(|e| state.metrics.rejected(e))?;
        span.in_scope(|| tracing::info!(job = %id, position = accepted.queue_position, tokens, steps, "job accepted"));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = principal(&request);
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        let record = self.visible_job(&caller, id)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let chunk_size = self.state.chunk_size;
        if let Some(feed) = self.state.feeds.get(id) {
            tokio::spawn(follow(feed, tx, chunk_size));
        } else if is_final(record.state) {
            let gone = |why: &str| CoordinatorError::OutputGone { job: id.to_string(), why: why.into() };
            let store = self.state.store.clone().ok_or_else(|| gone("this server keeps no output (it runs without --state)"))?;
            let stored = store.get(id).await?.ok_or_else(|| gone("its retention time is over"))?;
            tokio::spawn(replay_finished(store, record, stored, tx, chunk_size));
        } else {
            return Err(CoordinatorError::Unavailable(format!("job {id} is not running here yet; retry")).into());
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let caller = principal(&request);
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        self.visible_job(&caller, id).map(Response::new)
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let caller = principal(&request);
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        let jobs = &self.state.jobs;
        let record = self.visible_job(&caller, id)?;
        let Some(stop) = jobs.stop_signal(id) else { return Err(not_found(id)) };
        if is_final(record.state) {
            return Ok(Response::new(CancelJobResponse { state: record.state }));
        }
        stop.stop(StopReason::Cancelled);
        let state = if self.state.scheduler.remove(id) {
            // Out of the queue at once; its driver ends the stream.
            let waited = record.created.and_then(|c| {
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok().map(|now| now.saturating_sub(Duration::new(c.seconds as u64, c.nanos as u32)))
            });
            let t = Timings { queued: waited.unwrap_or_default(), total: waited.unwrap_or_default(), ..Default::default() };
            jobs.finish(id, JobState::Cancelled, Some(StopReason::Cancelled.error().to_string()), &t);
            JobState::Cancelled
        } else {
            // Running (or just leaving the queue): it stops at the next step boundary.
            JobState::Running
        };
        tracing::info!(job = %id, ?state, "cancel requested");
        Ok(Response::new(CancelJobResponse { state: state as i32 }))
    }

    async fn list_workers(&self, request: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let model = request.into_inner().model;
        let workers = self.state.executor.workers().into_iter().filter(|w| model.is_empty() || w.model == model).collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let caller = principal(&request);
        let req = request.into_inner();
        let states = req
            .states
            .iter()
            .map(|&s| JobState::try_from(s).map_err(|_| Status::from(CoordinatorError::invalid_argument("states", format!("{s} is not a job state")))))
            .collect::<Result<Vec<_>, _>>()?;
        let limit = match req.limit as usize {
            0 => LIST_DEFAULT,
            n => n.min(LIST_MAX),
        };
        Ok(Response::new(ListJobsResponse { jobs: self.state.jobs.list(&states, caller.listing_filter(), limit) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(with("3M"), Some(Duration::from_secs(180)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(with("5x"), None);
        assert_eq!(with("S"), None);
        assert_eq!(with("123456789S"), None, "at most 8 digits");
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
        assert_ne!(draw_seed(), draw_seed());
    }
}
