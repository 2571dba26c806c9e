//! The seam between the public service and whatever runs the jobs: [`JobExecutor`]. The service
//! validates, queues and streams; an executor knows its models and workers, plans a job, runs it
//! (reporting phases, steps and output files) and stops it between steps when asked. The one
//! executor is [`super::ClusterExecutor`] (shard workers over the internal API, in etcd or in
//! process); the service is written against this trait, not against the cluster.

use super::jobs::StopSignal;
use crate::request::{RequestDefaults, ValidRequest};
use crate::CoordinatorError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tessera_proto::capability::JOB_SECRET_BYTES;
use tessera_proto::v1::{Phase, Plan, Worker};
use tessera_proto::worker::v1::CheckpointResponse;
use tokio::sync::{mpsc, watch};

/// A job handed to an executor.
#[derive(Clone, Debug)]
pub struct ExecJob {
    /// The job's id.
    pub id: String,
    /// The validated request, defaults applied, seed set (with any input video bytes).
    pub request: ValidRequest,
    /// The job's capability on its workers, drawn at acceptance and kept with its record: every
    /// internal call of the job carries it (a restarted coordinator releases orphans with it).
    pub secret: [u8; JOB_SECRET_BYTES],
    /// Where to go on from: the job's last checkpoint, when a restarted coordinator resumes it.
    pub resume: Option<Arc<CheckpointResponse>>,
    /// Whether the job's record is in a state store, so that the next coordinator on the store
    /// takes it over: stopped by this one's shutdown, its run is left to its workers.
    pub stored: bool,
    /// This coordinator's epoch as owner of the state store (0 without a store): every internal
    /// call of the job carries it, and workers refuse the calls of an earlier owner
    /// ([`super::Fence`]).
    pub epoch: u64,
}

/// One encoded output file (a whole MP4 or GIF, one PNG frame, the latents).
#[derive(Clone, Debug, PartialEq)]
pub struct OutputFile {
    /// Its MIME type.
    pub content_type: &'static str,
    /// For PNG frames, the frame (0-based); 0 otherwise.
    pub frame_index: u32,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// What an executor reports while a job runs, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecEvent {
    /// A phase began (preparing, denoising, decoding, encoding).
    Phase(Phase),
    /// `done` of `total` denoising steps are complete.
    Step {
        /// Steps completed.
        done: u32,
        /// Steps of the run.
        total: u32,
        /// A diffusion-forcing job's chunks finished and chunks in all (0 and 0 for others).
        chunks: (u32, u32),
    },
    /// The job's actual plan, once its workers are chosen (the record's plan is replaced).
    Plan(Plan),
    /// An output file is complete (PNG frames come one by one as they are decoded).
    File(OutputFile),
    /// The run was checkpointed (sent before the step it includes is reported).
    Checkpoint(Arc<CheckpointResponse>),
}

/// How a finished job went, as the executor measured it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecReport {
    /// Frames in the video (the requested count for raw latents).
    pub frames: u32,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Text encoding and initial latents.
    pub preparing: Duration,
    /// Denoising steps.
    pub denoising: Duration,
    /// VAE decode (without the time the encoder took meanwhile).
    pub decoding: Duration,
    /// Encoding the output files.
    pub encoding: Duration,
}

/// The future of a running job.
pub type ExecFuture = Pin<Box<dyn Future<Output = Result<ExecReport, CoordinatorError>> + Send>>;

/// Runs jobs for the public service.
pub trait JobExecutor: Send + Sync + 'static {
    /// Model names served (what `GenerateRequest.model` may name).
    fn models(&self) -> Vec<String>;

    /// Request defaults for the served model (sizes, frames, steps; `model` set to the default model).
    fn defaults(&self) -> RequestDefaults;

    /// Largest token count a job may have (the operator's budget; `usize::MAX` when jobs are
    /// planned by memory instead).
    fn max_tokens(&self) -> usize;

    /// Refuses, before queueing, a valid request this executor cannot run (e.g. conditioning
    /// media it cannot read); errors name the field.
    fn check(&self, request: &ValidRequest) -> Result<(), CoordinatorError>;

    /// Plans the job before it is accepted: how it would run (workers may be left empty until it
    /// is scheduled) and its predicted duration; refuses a job that fits no group of the workers
    /// ([`CoordinatorError::DoesNotFit`], with the numbers).
    fn plan(&self, request: &ValidRequest) -> Result<Plan, CoordinatorError>;

    /// Jobs that may run at once now, published as it changes (0 until ready or while draining).
    fn slots(&self) -> watch::Receiver<usize>;

    /// The workers, with their state.
    fn workers(&self) -> Vec<Worker>;

    /// Resolves when the executor can run jobs (models loaded), or with why it never will.
    fn wait_ready(&self) -> Pin<Box<dyn Future<Output = Result<(), CoordinatorError>> + Send + '_>>;

    /// Runs one job to its end, sending events on `events`; stops at the next step boundary once
    /// `stop` is set (ending with that reason's error). A closed `events` counts as a stop.
    fn run(&self, job: ExecJob, events: mpsc::Sender<ExecEvent>, stop: StopSignal) -> ExecFuture;

    /// Takes no new jobs from now on (workers report DRAINING); running jobs go on.
    fn drain(&self);

    /// Before a job a previous coordinator ran is resumed (that coordinator died mid-job): takes
    /// over what the workers still hold of it. Either they go on with it where their run stands
    /// (the step returned: the job's next run starts there, on them), or they are freed, so that
    /// it (from its checkpoint) and other jobs can be scheduled (`None`).
    fn take_over_orphans(&self, job: &ExecJob) -> Pin<Box<dyn Future<Output = Option<u32>> + Send + '_>>;

    /// A job leaves without running (stopped while queued, or not queued at all): frees what was
    /// kept for it (an adopted run's workers, which are released).
    fn abandon(&self, job: &ExecJob);
}

/// The queue priority of a job whose run was adopted from its workers: above every request's
/// (−100 to 100), so that it leaves the queue first. Its workers run it already, and no other job
/// could use them meanwhile.
pub const ADOPTED_PRIORITY: i32 = i32::MAX;
