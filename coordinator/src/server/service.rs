//! The `tessera.v1.Tessera` service: Generate (validate, queue, stream), GetJob, CancelJob,
//! ListWorkers and ListJobs, over the shared [`ServiceState`].

use super::auth::{principal, Principal};
use super::jobs::{pb_timestamp, StopReason, StopSignal, Timings};
use super::runner::{drive, DriverJob};
use super::ServiceState;
use crate::request::validate;
use crate::CoordinatorError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tessera_cluster::JobPlan;
use tessera_proto::v1::tessera_server::Tessera;
use tessera_proto::v1::{
    generate_event::Event, Accepted, CancelJobRequest, CancelJobResponse, GenerateEvent, GenerateRequest, GetJobRequest, Job, JobState, ListJobsRequest,
    ListJobsResponse, ListWorkersRequest, ListWorkersResponse, Phase, Progress,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

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

fn is_final(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled].iter().any(|s| *s as i32 == state)
}

#[tonic::async_trait]
impl Tessera for TesseraService {
    type GenerateStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let state = &self.state;
        if state.is_draining() {
            return Err(CoordinatorError::Unavailable("the server is shutting down and takes no new jobs".into()).into());
        }
        let accepted = Instant::now();
        let tenant = principal(&request).tenant;
        let deadline = grpc_timeout(request.metadata()).map(|d| accepted + d);
        let caller = request.metadata().clone();
        let exec = &state.executor;
        let admitted = async {
            let valid = validate(request.into_inner(), &exec.defaults(), &exec.models(), exec.max_tokens(), draw_seed)?;
            exec.check(&valid)?;
            let mut valid = valid;
            // Media is decoded once, here: not for a queue that is full anyway, and garbage is
            // refused before the job is accepted. The job keeps the frames, not the bytes.
            if !valid.request.input_video.is_empty() || !valid.request.input_image.is_empty() {
                state.scheduler.check_room()?;
            }
            super::input::prepare_request_video_blocking(&mut valid, &state.media_decodes).await?;
            // The frames count against what accepted jobs may hold, until this job's driver ends.
            let held = valid.video.as_ref().map(|v| state.held_input.take(v.rgb.len() as u64)).transpose()?;
            // An input image likewise.
            if !valid.request.input_image.is_empty() {
                let bytes = std::mem::take(&mut valid.request.input_image);
                valid.image = Some(std::sync::Arc::new(crate::input_image::decode_blocking(bytes).await?));
            }
            Ok::<_, CoordinatorError>((valid, held))
        };
        let (mut valid, held_input) = admitted.await.inspect_err(|e| state.metrics.rejected(e))?;
        // The plan joins the job's spec: the group that runs it is the size it says.
        let plan = exec.plan(&valid).inspect_err(|e| state.metrics.rejected(e))?;
        let layout = JobPlan { ranks: plan.ranks, ulysses: plan.ulysses, cfg_parallel: plan.cfg_parallel };
        valid.spec = valid.spec.clone().planned(layout).map_err(CoordinatorError::from)?;
        let id = state.jobs.new_id();
        let stop = StopSignal::default();
        let recorded = valid.request.clone();
        let seed = valid.request.seed.unwrap_or_default();
        let record = Job {
            job_id: id.clone(),
            state: JobState::Queued as i32,
            request: Some(recorded.clone()),
            plan: Some(plan.clone()),
            progress: Some(Progress { phase: Phase::Queued as i32, total_steps: valid.request.steps, ..Default::default() }),
            created: Some(pb_timestamp(SystemTime::now())),
            seed,
            tenant,
            ..Default::default()
        };
        state.jobs.insert(record, stop.clone());
        let (position, admission) = match state.scheduler.enqueue(&id, valid.request.priority) {
            Ok(q) => q,
            Err(e) => {
                state.jobs.remove(&id);
                state.metrics.rejected(&e);
                return Err(e.into());
            }
        };
        state.metrics.set_queue_depth(state.scheduler.queued());
        // The job's span (child of the caller's, from `traceparent`) covers its queueing and run.
        let span = tracing::info_span!("job", job_id = %id, model = %valid.request.model, tokens = valid.spec.tokens(), steps = valid.request.steps, ranks = plan.ranks, ulysses = plan.ulysses, ring = plan.ring);
        tessera_telemetry::set_parent_from_metadata(&span, &caller);
        span.in_scope(|| tracing::info!(job = %id, position, tokens = valid.spec.tokens(), steps = valid.request.steps, "job accepted"));
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let accepted_msg = Accepted { job_id: id.clone(), plan: Some(plan), queue_position: position as u32, seed, effective_request: Some(recorded) };
        tx.try_send(Ok(GenerateEvent { event: Some(Event::Accepted(accepted_msg)) }))
            .map_err(|_| Status::internal("a new stream refused its first message"))?;
        let job = super::executor::ExecJob { id, request: valid };
        tokio::spawn(
            drive(state.clone(), DriverJob { job, accepted, client: tx, stop, deadline, send_timeout: state.send_timeout, _held_input: held_input }, admission)
                .instrument(span),
        );
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
