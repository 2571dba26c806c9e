//! The shard worker's internal gRPC service (`tessera.worker.v1.ShardWorker`): the coordinator
//! prepares a job on every rank, sends each denoising step to all of them, checkpoints, and has
//! every rank decode a band of rows of the frames, rank 0 joining and streaming them. The ranks of a job talk to each other directly over the TCP
//! collective transport, on the collective address each worker advertises, or, on GPUs, through
//! NCCL with the unique id that rank 0's worker made (CreateNcclId). Every job-scoped call
//! passes the coordinator-epoch fence first (`fence`).

mod fence;
mod job;
mod metrics;
mod nccl_id;
mod request;
mod run;
mod status;

pub use job::{JobCheckpoint, JobSetup, StepReport};
pub use metrics::WorkerMetrics;
pub use request::params_from_spec;

use crate::pipeline::{VideoInput, WanPipeline};
use crate::WorkerError;
use fence::EpochFence;
use job::{Command, JobHandle};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tessera_cluster::{codec, JobSpec};
use tessera_proto::reason::{invalid_field, status, Reason};
use tessera_proto::v1::{Worker, WorkerState};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::shard_worker_server::ShardWorker;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How a worker describes itself and joins job groups.
#[derive(Clone, Debug)]
pub struct WorkerIdentity {
    /// Unique worker id.
    pub worker_id: String,
    /// The model name requests use.
    pub model: String,
    /// Internal gRPC address (what the coordinator dials).
    pub address: String,
    /// Address the job's other ranks connect to for collectives.
    pub collective: SocketAddr,
    /// Compute devices: "cpu", or "cuda:N" when the transformer runs on a GPU ([`device_name`]).
    pub devices: Vec<String>,
    /// Memory available for jobs, bytes.
    pub memory_bytes: u64,
    /// How long PrepareJob waits for the other ranks.
    pub connect_timeout: Duration,
    /// A job that gets no command for this long is dropped (its coordinator is gone).
    pub job_idle_timeout: Duration,
    /// What this worker accepts: PrepareJob checks every request against them (the one check of
    /// `pipeline::limits`) before anything is allocated.
    pub limits: crate::pipeline::limits::Limits,
}

/// The service: one loaded pipeline, at most one job at a time. Cheap to clone (shared state).
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

/// A job in the worker's table: still joining its group (cancellable), or running.
enum Slot {
    Preparing(tokio_util::sync::CancellationToken),
    Ready(Arc<JobHandle>),
}

/// A job on this worker: its capability and where it stands.
struct Claimed {
    secret: JobCapability,
    slot: Slot,
}

/// A job's secret as PrepareJob gave it; later calls must present it.
struct JobCapability(Vec<u8>);

impl JobCapability {
    /// Whether the call's metadata carries this secret (compared in constant time).
    fn admits(&self, metadata: &tonic::metadata::MetadataMap) -> bool {
        use subtle::ConstantTimeEq;
        tessera_proto::capability::job_secret(metadata).is_some_and(|s| bool::from(s.as_slice().ct_eq(&self.0)))
    }
}

/// PERMISSION_DENIED for a call about job `id` without its secret.
fn not_the_jobs_holder(id: &str) -> Status {
    status(
        Reason::PermissionDenied,
        None,
        format!("job {id:?}: the call does not carry the job's secret (metadata {})", tessera_proto::capability::JOB_SECRET_KEY),
    )
}

struct Inner {
    pipe: Arc<WanPipeline>,
    me: WorkerIdentity,
    /// The collective port, held for the worker's life (each job accepts on a clone), so that no
    /// other process can take it between jobs.
    collective: std::net::TcpListener,
    /// At most one job; it claims the worker from the moment PrepareJob accepts it.
    jobs: Mutex<HashMap<String, Claimed>>,
    /// The job this worker runs now, published for membership.
    running: watch::Sender<Option<String>>,
    draining: AtomicBool,
    metrics: WorkerMetrics,
    /// The coordinator epochs of the calls so far: an earlier coordinator's calls are refused.
    fence: EpochFence,
}

impl Inner {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claimed>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the job now running (if any) after the table changed.
    fn publish(&self, jobs: &HashMap<String, Claimed>) {
        let now = jobs.keys().next().cloned();
        self.metrics.set_busy(&self.me.worker_id, now.is_some());
        self.running.send_if_modified(|v| {
            let changed = *v != now;
            *v = now;
            changed
        });
    }

    /// Drops job `id` if it is still the handle `which` (not a later job of the same id).
    fn forget(&self, id: &str, which: &std::sync::Weak<JobHandle>) {
        let mut jobs = self.table();
        if matches!(jobs.get(id).map(|c| &c.slot), Some(Slot::Ready(h)) if std::ptr::eq(Arc::as_ptr(h), which.as_ptr())) {
            jobs.remove(id);
            self.publish(&jobs);
        }
    }
}

impl WorkerService {
    /// A service running `pipe` as `me`, its jobs' collectives accepted on `collective` (bound
    /// by the caller at start, on `me.collective`'s port).
    pub fn new(pipe: Arc<WanPipeline>, me: WorkerIdentity, collective: std::net::TcpListener) -> Self {
        let metrics = WorkerMetrics::global();
        metrics.introduce(&me.worker_id);
        let inner = Inner {
            pipe,
            me,
            collective,
            jobs: Mutex::new(HashMap::new()),
            running: watch::channel(None).0,
            draining: AtomicBool::new(false),
            metrics,
            fence: EpochFence::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Job `id`, for a call whose `metadata` carries the job's secret and no earlier coordinator's
    /// epoch (whose epoch then fences out the earlier ones).
    fn job(&self, id: &str, metadata: &tonic::metadata::MetadataMap) -> Result<Arc<JobHandle>, Status> {
        let epoch = self.inner.fence.check(metadata)?;
        let job = match self.inner.table().get(id) {
            Some(c) if !c.secret.admits(metadata) => Err(not_the_jobs_holder(id)),
            Some(Claimed { slot: Slot::Ready(h), .. }) => Ok(h.clone()),
            Some(Claimed { slot: Slot::Preparing(_), .. }) => Err(status(Reason::Precondition, None, format!("job {id:?} is still joining its group"))),
            None => Err(status(Reason::NotFound, None, format!("job {id:?} is not on this worker"))),
        }?;
        self.inner.fence.raise(epoch);
        Ok(job)
    }

    /// The job running now (`None` when idle), updated as jobs start and end.
    pub fn running(&self) -> watch::Receiver<Option<String>> {
        self.inner.running.subscribe()
    }

    /// From now on PrepareJob is refused (UNAVAILABLE); the running job goes on.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// The worker's identity.
    pub fn identity(&self) -> &WorkerIdentity {
        &self.inner.me
    }

    /// The worker's record, as `ListWorkers` shows it.
    pub fn describe(&self) -> Worker {
        let me = &self.inner.me;
        let jobs = self.inner.table();
        let job_id = jobs.keys().next().cloned().unwrap_or_default();
        let state = match (jobs.is_empty(), self.inner.draining.load(Ordering::SeqCst)) {
            (false, _) => WorkerState::Busy,
            (true, true) => WorkerState::Draining,
            (true, false) => WorkerState::Idle,
        };
        Worker {
            worker_id: me.worker_id.clone(),
            address: me.address.clone(),
            model: me.model.clone(),
            devices: me.devices.clone(),
            memory_bytes: me.memory_bytes,
            state: state as i32,
            job_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// A PrepareJob's claim on the worker: if the request goes away before the joining ends (its
/// caller hung up), dropping this abandons the joining and frees the worker.
struct Claim {
    inner: Arc<Inner>,
    job_id: String,
    cancel: tokio_util::sync::CancellationToken,
    /// Set once PrepareJob settles the slot itself.
    settled: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.cancel.cancel();
        let mut jobs = self.inner.table();
        // Only this claim's slot: it is the one whose token was just cancelled.
        if matches!(jobs.get(&self.job_id).map(|c| &c.slot), Some(Slot::Preparing(c)) if c.is_cancelled()) {
            jobs.remove(&self.job_id);
            self.inner.publish(&jobs);
        }
    }
}

/// How a worker's record names the device its transformer runs on: `cpu` or `cuda:N` (the
/// coordinator gives groups with a `cuda...` device an NCCL id).
pub fn device_name(device: tessera_kernels::Device) -> String {
    match device {
        tessera_kernels::Device::Cpu => "cpu".to_string(),
        tessera_kernels::Device::Cuda(n) => format!("cuda:{n}"),
    }
}

/// Memory available to this machine's jobs (Linux `MemAvailable`), if known.
pub fn memory_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The measured rates of `device` when it is the CPU, split over `sharing` workers that run on it
/// at once (the planner's figures for CPU workers); `None` for GPUs, whose kinds the planner
/// knows by name, and when the measurement fails.
pub fn compute_figures(device: tessera_kernels::Device, sharing: usize) -> Option<tessera_cluster::membership::ComputeFigures> {
    match device {
        tessera_kernels::Device::Cpu => tessera_kernels::cpu::measure::measure()
            .inspect_err(|e| tracing::warn!(error = %e, "could not measure the CPU's rates; jobs are planned without them"))
            .ok()
            .map(|f| {
                let n = sharing.max(1) as f64;
                tessera_cluster::membership::ComputeFigures { flops: f.flops / n, bytes_per_s: f.bytes_per_s / n }
            }),
        tessera_kernels::Device::Cuda(_) => None,
    }
}

/// Resolves `host:port` peers (names or IPs) to socket addresses.
async fn resolve_peers(peers: &[String]) -> Result<Vec<SocketAddr>, Status> {
    let mut out = Vec::with_capacity(peers.len());
    for p in peers {
        if let Ok(a) = p.parse::<SocketAddr>() {
            out.push(a);
            continue;
        }
        let mut found = tokio::net::lookup_host(p.as_str()).await.map_err(|e| invalid_field("peers", format!("peers: {p:?}: {e}")))?;
        out.push(found.next().ok_or_else(|| invalid_field("peers", format!("peers: {p:?} resolves to no address")))?);
    }
    Ok(out)
}

/// Runs `f` on a blocking thread and maps its error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| status(Reason::Internal, None, format!("worker task failed: {e}")))?.map_err(Status::from)
}

/// [`blocking`] inside `span` (so the job thread's work for it is in the span too).
async fn blocking_in<T: Send + 'static>(span: tracing::Span, f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static) -> Result<T, Status> {
    blocking(move || span.in_scope(f)).await
}

/// A request's span, child of the coordinator's span named in the request's `trace_context`.
fn traced(span: tracing::Span, trace_context: &HashMap<String, String>) -> tracing::Span {
    tessera_telemetry::set_parent_from_map(&span, trace_context);
    span
}

impl WorkerService {
    /// PrepareJob's work (see the trait method, which counts the outcome).
    async fn prepare(&self, request: Request<pb::PrepareJobRequest>) -> Result<Response<pb::PrepareJobResponse>, Status> {
        let epoch = self.inner.fence.check(request.metadata())?;
        let r = request.into_inner();
        let me = &self.inner.me;
        if r.job_id.is_empty() {
            return Err(invalid_field("job_id", "job_id: required"));
        }
        if !tessera_proto::capability::JOB_SECRET_RANGE.contains(&r.job_secret.len()) {
            let range = tessera_proto::capability::JOB_SECRET_RANGE;
            return Err(invalid_field("job_secret", format!("job_secret: {} bytes (from {} to {})", r.job_secret.len(), range.start(), range.end())));
        }
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(status(Reason::Unavailable, None, format!("worker {} is shutting down and takes no new job", me.worker_id)));
        }
        if !r.init_latents.is_empty() {
            return Err(status(Reason::Unimplemented, Some("init_latents"), "init_latents: send input_frames for video-to-video"));
        }
        // The job spec, checked with the coordinator's code against this worker's limits, before
        // anything is allocated or claimed; its factors must be this model's.
        let spec = r.spec.as_ref().ok_or_else(|| invalid_field("spec", "spec: required"))?;
        let spec = JobSpec::from_message(spec, &me.limits).map_err(spec_refused)?;
        if spec.factors() != self.inner.pipe.factors() {
            let detail = format!("spec.model_factors: {:?}, but this worker's model has {:?}", spec.factors(), self.inner.pipe.factors());
            return Err(invalid_field("spec.model_factors", detail));
        }
        let plan = spec.plan().ok_or_else(|| invalid_field("spec.ranks", "spec.ranks: the plan (ranks, ulysses) is required"))?;
        if r.rank >= plan.ranks {
            return Err(invalid_field("rank", format!("rank: {} in a group of {}", r.rank, plan.ranks)));
        }
        let mut params = params_from_spec(&spec);
        // Input frames: Wan's video-to-video input (with a strength), or the history of a video a
        // diffusion-forcing job extends (its shape is checked with the parameters).
        let frames = r.input_frames.as_ref().map(|f| codec::input_frames_video(f).map_err(WorkerError::from).map_err(Status::from)).transpose()?;
        match (frames, spec.request().strength, spec.request().extend) {
            (Some(video), Some(strength), false) => params.video = Some(VideoInput { video, strength: strength.into() }),
            (Some(video), None, true) => params.history = Some(video),
            (None, None, false) => {}
            (Some(_), None, false) => return Err(invalid_field("spec.strength", "spec.strength: required with input_frames")),
            (None, Some(_), _) => return Err(invalid_field("input_frames", "input_frames: required with spec.strength")),
            (None, None, true) => return Err(invalid_field("input_frames", "input_frames: required with spec.extend_video")),
            (Some(_), Some(_), true) => return Err(invalid_field("spec.strength", "spec.strength: a video extension takes none")),
        }
        match (&r.input_image, spec.request().image) {
            (Some(m), Some(size)) => {
                let rgb = codec::input_image(m, size).map_err(WorkerError::from).map_err(Status::from)?;
                params.image = Some(crate::image::RgbImage::new(size.height as usize, size.width as usize, rgb.to_vec()).map_err(Status::from)?);
            }
            (None, None) => {}
            (Some(_), None) => return Err(invalid_field("spec.image", "spec.image: required with input_image")),
            (None, Some(_)) => return Err(invalid_field("input_image", "input_image: required with spec.image")),
        }
        let pipe = &self.inner.pipe;
        match (&params.image, pipe.is_image_to_video(), pipe.is_image_to_video() || pipe.is_diffusion_forcing()) {
            (Some(_), _, false) => {
                return Err(invalid_field("input_image", "input_image: this worker's model is neither an image-to-video nor a diffusion-forcing model"))
            }
            (None, true, _) => {
                return Err(invalid_field("input_image", "input_image: this worker's model is an image-to-video model and needs the input image"))
            }
            _ => {}
        }
        // The input video's shape against the spec's sizes (the sizes were checked above).
        params.validate(spec.factors(), &me.limits).map_err(Status::from)?;
        let nccl_id = nccl_id::parse_nccl_id(&r.nccl_unique_id)?;
        let peers = resolve_peers(&r.peers).await?;
        if plan.ranks as usize != peers.len() {
            return Err(invalid_field("peers", format!("peers: {} for a group of {} ranks", peers.len(), plan.ranks)));
        }
        // Claim the worker now: a second PrepareJob is refused while this one joins its group,
        // and ReleaseJob can abandon the joining.
        let cancel = tokio_util::sync::CancellationToken::new();
        {
            let mut jobs = self.inner.table();
            if let Some(other) = jobs.keys().next() {
                return Err(status(Reason::WorkerBusy, None, format!("worker {} is busy with job {other:?}", me.worker_id)));
            }
            jobs.insert(r.job_id.clone(), Claimed { secret: JobCapability(r.job_secret.clone()), slot: Slot::Preparing(cancel.clone()) });
            self.inner.publish(&jobs);
        }
        self.inner.fence.raise(epoch);
        let mut claim = Claim { inner: self.inner.clone(), job_id: r.job_id.clone(), cancel: cancel.clone(), settled: false };
        let setup = JobSetup {
            job_id: r.job_id.clone(),
            rank: r.rank as usize,
            peers,
            ulysses: plan.ulysses as usize,
            cfg: if plan.cfg_parallel { 2 } else { 1 },
            session: r.session,
            secret: r.job_secret.clone(),
            connect_timeout: me.connect_timeout,
            idle_timeout: me.job_idle_timeout,
            cancel: cancel.clone(),
            resume: r.resume.as_ref().map(|cp| resume_from(cp, spec.request().forcing.is_some())).transpose().map_err(Status::from)?,
            nccl_id,
            params,
        };
        let (collective, listener) = (me.collective, self.inner.collective.try_clone());
        let pipe = self.inner.pipe.clone();
        let started = std::time::Instant::now();
        let span = traced(tracing::info_span!("prepare_job", job_id = %r.job_id, rank = r.rank, world = plan.ranks, ulysses = plan.ulysses), &r.trace_context);
        let handle = blocking_in(span.clone(), move || {
            let listener = listener.map_err(|e| WorkerError::Collective(format!("the collective port {collective}: {e}")))?;
            job::start(pipe, setup, listener)
        })
        .await;
        claim.settled = true;
        let mut jobs = self.inner.table();
        let claimed = matches!(jobs.get(&r.job_id).map(|c| &c.slot), Some(Slot::Preparing(c)) if !c.is_cancelled());
        let handle = match handle {
            Ok(h) if claimed => h,
            Ok(_) => {
                // Released while joining: the handle is dropped here, which ends its thread.
                let refused = status(Reason::Cancelled, None, format!("job {:?} was released while it joined its group", r.job_id));
                tessera_telemetry::mark_error(&span, refused.message());
                return Err(refused);
            }
            Err(status) => {
                if claimed {
                    jobs.remove(&r.job_id);
                    self.inner.publish(&jobs);
                }
                tessera_telemetry::mark_error(&span, status.message());
                return Err(status);
            }
        };
        let (tokens, total_steps) = (handle.tokens.clone(), handle.total_steps);
        let mut ended = handle.ended();
        let handle = Arc::new(handle);
        jobs.insert(r.job_id.clone(), Claimed { secret: JobCapability(r.job_secret), slot: Slot::Ready(handle.clone()) });
        self.inner.publish(&jobs);
        drop(jobs);
        // The job leaves the table when its thread ends (failed peer, idle timeout) or at ReleaseJob.
        // (A weak reference: the task must not keep the command channel open after ReleaseJob.)
        let (inner, handle) = (self.inner.clone(), Arc::downgrade(&handle));
        tokio::spawn(async move {
            let _ = ended.wait_for(|e| *e).await;
            inner.forget(&r.job_id, &handle);
        });
        Ok(Response::new(pb::PrepareJobResponse {
            token_start: tokens.start as u64,
            token_end: tokens.end as u64,
            seconds: started.elapsed().as_secs_f64(),
            total_steps: total_steps as u32,
        }))
    }
}

#[tonic::async_trait]
impl ShardWorker for WorkerService {
    async fn prepare_job(&self, request: Request<pb::PrepareJobRequest>) -> Result<Response<pb::PrepareJobResponse>, Status> {
        let result = self.prepare(request).await;
        self.inner.metrics.prepare(&self.inner.me.worker_id, result.is_ok());
        result
    }

    async fn create_nccl_id(&self, request: Request<pb::CreateNcclIdRequest>) -> Result<Response<pb::CreateNcclIdResponse>, Status> {
        let nccl_unique_id = nccl_id::create_nccl_id(&request.into_inner().job_id).await?;
        Ok(Response::new(pb::CreateNcclIdResponse { nccl_unique_id }))
    }

    async fn step(&self, request: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let job = self.job(&request.get_ref().job_id, request.metadata())?;
        let r = request.into_inner();
        let index = r.step as usize;
        let span = traced(
            tracing::info_span!("step", job_id = %r.job_id, rank = job.rank, step = r.step, communication_s = tracing::field::Empty, bytes_sent = tracing::field::Empty),
            &r.trace_context,
        );
        let report = blocking_in(span.clone(), move || {
            let (tx, rx) = mpsc::channel();
            job.send(Command::Step(index, tx))?;
            rx.recv().map_err(|_| WorkerError::Collective("the job ended during the step".into()))?
        })
        .await
        .inspect_err(|s| tessera_telemetry::mark_error(&span, s.message()))?;
        span.record("communication_s", report.communication_seconds);
        span.record("bytes_sent", report.bytes_sent);
        self.inner.metrics.step(&self.inner.me.worker_id, report.seconds, report.communication_seconds, report.bytes_sent);
        Ok(Response::new(pb::StepResponse {
            step: r.step,
            seconds: report.seconds,
            communication_seconds: report.communication_seconds,
            bytes_sent: report.bytes_sent,
            chunks_done: report.chunks_done as u32,
        }))
    }

    async fn checkpoint(&self, request: Request<pb::CheckpointRequest>) -> Result<Response<pb::CheckpointResponse>, Status> {
        let job = self.job(&request.get_ref().job_id, request.metadata())?;
        let (rank, tokens) = (job.rank, job.tokens.clone());
        let cp = blocking(move || {
            let (tx, rx) = mpsc::channel();
            job.send(Command::Checkpoint(tx))?;
            rx.recv().map_err(|_| WorkerError::Collective("the job has ended".into()))?
        })
        .await?;
        // Rank 0 answers with the whole state, gathered from the group; the others with none.
        let (latent_shape, latents, sampler_state) = match cp.state {
            Some((latents, state)) => (latents.shape().iter().map(|&d| d as u32).collect(), codec::f32_bytes(latents.data()), state),
            None => Default::default(),
        };
        Ok(Response::new(pb::CheckpointResponse {
            steps_done: cp.steps_done as u32,
            rank: rank as u32,
            latent_shape,
            latents,
            sampler_state,
            token_start: tokens.start as u64,
            token_end: tokens.end as u64,
        }))
    }

    type DecodeStream = ReceiverStream<Result<pb::DecodedFrames, Status>>;

    async fn decode(&self, request: Request<pb::DecodeRequest>) -> Result<Response<Self::DecodeStream>, Status> {
        let job = self.job(&request.get_ref().job_id, request.metadata())?;
        let r = request.into_inner();
        let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel(2);
        let span = traced(tracing::info_span!("decode", job_id = %r.job_id, rank = job.rank), &r.trace_context);
        span.in_scope(|| job.send(Command::Decode(frames_tx))).map_err(Status::from)?;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            while let Some(chunk) = frames_rx.recv().await {
                let msg = chunk.and_then(|(first, t)| Ok(codec::decoded_frames_message(&t, first as u32)?)).map_err(Status::from);
                if out_tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn fetch_latents(&self, request: Request<pb::FetchLatentsRequest>) -> Result<Response<pb::JobLatents>, Status> {
        let job = self.job(&request.get_ref().job_id, request.metadata())?;
        let latents = blocking(move || {
            let (tx, rx) = mpsc::channel();
            job.send(Command::Latents(tx))?;
            rx.recv().map_err(|_| WorkerError::Collective("the job has ended".into()))?
        })
        .await?;
        // Rank 0 answers with the whole latent, gathered from the group; the others with none.
        match latents {
            Some(latents) => Ok(Response::new(codec::latents_message(&latents).map_err(WorkerError::from)?)),
            None => Ok(Response::new(pb::JobLatents::default())),
        }
    }

    async fn release_job(&self, request: Request<pb::ReleaseJobRequest>) -> Result<Response<pb::ReleaseJobResponse>, Status> {
        // Dropping the handle closes the command channel; the job thread ends after its current command.
        let epoch = self.inner.fence.check(request.metadata())?;
        let mut jobs = self.inner.table();
        let id = &request.get_ref().job_id;
        match jobs.get(id) {
            Some(c) if !c.secret.admits(request.metadata()) => return Err(not_the_jobs_holder(id)),
            Some(_) => self.inner.fence.raise(epoch),
            None => {}
        }
        match jobs.remove(id).map(|c| c.slot) {
            Some(Slot::Preparing(cancel)) => cancel.cancel(),
            // A GPU rank may be blocked in NCCL on a peer that is gone: end that wait too.
            Some(Slot::Ready(handle)) => handle.abort_collectives(),
            None => {}
        }
        self.inner.publish(&jobs);
        Ok(Response::new(pb::ReleaseJobResponse {}))
    }

    async fn adopt_job(&self, request: Request<pb::AdoptJobRequest>) -> Result<Response<pb::AdoptJobResponse>, Status> {
        let job = self.job(&request.get_ref().job_id, request.metadata())?;
        let (rank, ranks, total_steps) = (job.rank as u32, job.ranks as u32, job.total_steps as u32);
        tracing::info!(job_id = %request.get_ref().job_id, rank, "a new coordinator adopts the job");
        // Where the run stands now, without waiting for a command in flight (a step may run for
        // minutes); the decode restarts after it, in the commands' order.
        let (progress, busy) = job.state.now();
        job.send(Command::Adopt).map_err(Status::from)?;
        let busy = match busy {
            job::Busy::Idle => 0,
            job::Busy::Step => 1,
            job::Busy::Other => 2,
        };
        Ok(Response::new(pb::AdoptJobResponse {
            rank,
            ranks,
            steps_done: progress.steps_done as u32,
            total_steps,
            chunks_done: progress.chunks_done as u32,
            busy,
        }))
    }

    async fn describe(&self, _request: Request<pb::DescribeRequest>) -> Result<Response<pb::DescribeResponse>, Status> {
        Ok(Response::new(pb::DescribeResponse { worker: Some(self.describe()), collective_address: self.inner.me.collective.to_string() }))
    }
}

/// A refused spec as INVALID_FIELD naming `spec.FIELD` (the field of the internal request).
fn spec_refused(e: tessera_cluster::ClusterError) -> Status {
    match e {
        tessera_cluster::ClusterError::InvalidInput { field, detail } => {
            let field = format!("spec.{field}");
            invalid_field(&field, format!("{field}: {detail}"))
        }
        other => Status::from(WorkerError::from(other)),
    }
}

/// A checkpoint (another group's) as the place a run resumes from.
/// A checkpoint as the resumed run reads it (a diffusion-forcing job's when `forcing`).
fn resume_from(cp: &pb::CheckpointResponse, forcing: bool) -> Result<job::Resume, WorkerError> {
    job::Resume::parse(cp.steps_done as usize, codec::checkpoint_latents(cp)?, &cp.sampler_state, forcing)
}
