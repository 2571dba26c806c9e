//! The error type of the coordinator library, and its exhaustive mapping onto reasons
//! (`tessera_proto::reason`) and with them gRPC status codes.

use std::path::PathBuf;
use tessera_proto::reason::{status, Reason};

/// Everything the coordinator library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is invalid; `field` is its name in `GenerateRequest`.
    #[error("invalid {field}: {detail}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// Writing or creating a file or folder failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Frames or video settings are unusable (size, frame rate, sample count, values).
    #[error("invalid video `{field}`: {detail}")]
    InvalidVideo {
        /// The setting or input that is wrong.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// An input video (request field `input_video`, `tessera generate --input-video`) cannot be
    /// used: unknown format, unsupported content, corrupt or truncated data, beyond the decoding
    /// limits, or too few frames.
    #[error("invalid input_video ({problem}): {detail}")]
    InvalidInputVideo {
        /// The kind of problem.
        problem: InputVideoProblem,
        /// What exactly is wrong.
        detail: String,
    },
    /// An encoder or muxer failed.
    #[error("{format} encoding: {detail}")]
    Encode {
        /// The output format (`mp4`, `gif`, `png`).
        format: &'static str,
        /// What the encoder reported.
        detail: String,
    },
    /// The shared layer refused something (a size check, a message from a worker) or membership
    /// failed.
    #[error(transparent)]
    Cluster(#[from] tessera_cluster::ClusterError),
    /// The job fits no group the cluster's workers could form; the message gives the numbers
    /// (per-rank peak memory of the best plan on every worker against what a device offers).
    #[error("the job does not fit: {0}")]
    DoesNotFit(String),
    /// The job queue is full.
    #[error("the job queue is full ({limit} jobs waiting); retry later")]
    QueueFull {
        /// The queue's capacity.
        limit: usize,
    },
    /// The caller asked for a queue priority above what its groups allow.
    #[error("priority {asked}: a caller outside the token file's groups `priority` and `admin` may ask for at most {max}")]
    PriorityNotAllowed {
        /// The priority asked for.
        asked: i32,
        /// The highest it may ask for.
        max: i32,
    },
    /// The caller's tenant already has as many jobs waiting as one tenant may.
    #[error("tenant {tenant:?} has {limit} jobs waiting, as many as one tenant may; retry once one of them has started")]
    TenantQueueFull {
        /// The tenant (the caller's own).
        tenant: String,
        /// Most jobs of one tenant waiting.
        limit: usize,
    },
    /// Accepted jobs already hold as many decoded input frames as the server keeps.
    #[error("the server holds {held} bytes of decoded input frames of accepted jobs, and this job's {wanted} would pass its {limit}; retry later")]
    InputFramesFull {
        /// Bytes held now.
        held: u64,
        /// This job's frames.
        wanted: u64,
        /// The bound (`--max-input-bytes-held`).
        limit: u64,
    },
    /// Something named by the caller does not exist (or no longer: finished jobs expire).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, e.g. `job "j-12"`.
        what: String,
    },
    /// The caller is not authenticated (no bearer token, or one the token file does not list).
    /// The message never holds the token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The job was cancelled (by CancelJob, or because its client went away).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The client's deadline passed before the job finished.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A remote shard worker failed the job's call (it died, lost a peer, timed out or refused).
    #[error("worker {worker} failed during {during}: {detail}")]
    WorkerFailed {
        /// The worker's id and address.
        worker: String,
        /// What the job was doing (prepare, step N, decode...).
        during: String,
        /// The request field the worker refused (it answered INVALID_FIELD naming it): the
        /// caller's fault. None when the worker was lost (died, left, timed out, failed).
        refused_field: Option<String>,
        /// The worker's message, or the transport error.
        detail: String,
    },
    /// Workers chosen for a job refused it because they run another job (one another coordinator
    /// gave them after this one's view of membership was taken).
    #[error("workers {} are busy with another job", workers.join(", "))]
    WorkersBusy {
        /// Their ids.
        workers: Vec<String>,
    },
    /// Workers of the job's group drain (a rolling update replaces them): the job moves to another
    /// group from the checkpoint taken at this step boundary.
    #[error("workers {} are draining", workers.join(", "))]
    WorkersDraining {
        /// Their ids.
        workers: Vec<String>,
    },
    /// The service cannot take or finish the work now (starting, shutting down, no workers).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The state store (job records, checkpoints, outputs) failed or cannot be reached.
    #[error("state store: {0}")]
    Store(String),
    /// A worker answered that a coordinator which took the state store after this one drives it
    /// now: this coordinator lost its store (cut off from etcd longer than its lease) and stops,
    /// leaving the job's record to the store's new owner.
    #[error("another coordinator owns the state store now: {0}")]
    Superseded(String),
    /// A finished job whose output the server no longer keeps (or never kept: no state store).
    #[error("the output of job {job} is not kept: {why}")]
    OutputGone {
        /// The job's id.
        job: String,
        /// Why.
        why: String,
    },
    /// A bug or broken invariant on the server side (a job thread panicked, ...).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What is wrong with an input video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputVideoProblem {
    /// The bytes start with no signature of a supported format (MP4, GIF, PNG).
    UnknownFormat,
    /// A known format whose content cannot be decoded here (codec, profile, feature).
    Unsupported,
    /// Damaged or truncated data.
    Corrupt,
    /// Beyond the decoding limits (frame size, decoded pixels).
    TooLarge,
    /// Fewer frames than needed.
    TooFewFrames,
}

impl std::fmt::Display for InputVideoProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnknownFormat => "unknown format",
            Self::Unsupported => "unsupported",
            Self::Corrupt => "corrupt",
            Self::TooLarge => "too large",
            Self::TooFewFrames => "too few frames",
        })
    }
}

impl CoordinatorError {
    pub(crate) fn input_video(problem: InputVideoProblem, detail: impl Into<String>) -> Self {
        Self::InvalidInputVideo { problem, detail: detail.into() }
    }

    pub(crate) fn invalid_video(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidVideo { field, detail: detail.into() }
    }

    /// An invalid request field.
    pub fn invalid_argument(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidArgument { field, detail: detail.into() }
    }

    pub(crate) fn encode(format: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Encode { format, detail: detail.to_string() }
    }
}

impl CoordinatorError {
    /// Why the call failed, as the status's reason, and the request field at fault if any.
    pub fn reason(&self) -> (Reason, Option<&str>) {
        match self {
            Self::InvalidArgument { field, .. } => (Reason::InvalidField, Some(field)),
            Self::InvalidInputVideo { .. } => (Reason::InvalidField, Some("input_video")),
            // A bad frame size or frame count reaching the encoder is the request's fault only if
            // validation missed it; report it as a failed precondition, not a server crash.
            Self::InvalidVideo { .. } => (Reason::Precondition, None),
            Self::Io { .. } | Self::Encode { .. } | Self::Internal(_) => (Reason::Internal, None),
            Self::Cluster(c) => match c {
                tessera_cluster::ClusterError::InvalidInput { field, .. } => (Reason::InvalidField, Some(field)),
                tessera_cluster::ClusterError::Membership(_) => (Reason::Unavailable, None),
                tessera_cluster::ClusterError::Shape(_) => (Reason::Internal, None),
            },
            // A worker refusing the request itself is the caller's fault; anything else means the
            // cluster lost the job (a worker died or timed out): retrying may succeed.
            Self::WorkerFailed { refused_field: Some(field), .. } => (Reason::InvalidField, Some(field)),
            Self::WorkerFailed { .. } => (Reason::WorkerLost, None),
            // The client reattaches to the store's new owner.
            Self::WorkersBusy { .. } | Self::WorkersDraining { .. } | Self::Unavailable(_) | Self::Store(_) | Self::Superseded(_) => {
                (Reason::Unavailable, None)
            }
            Self::OutputGone { .. } => (Reason::Precondition, None),
            Self::QueueFull { .. } | Self::TenantQueueFull { .. } | Self::InputFramesFull { .. } => (Reason::QueueFull, None),
            Self::DoesNotFit(_) => (Reason::DoesNotFit, None),
            Self::NotFound { .. } => (Reason::NotFound, None),
            Self::Unauthenticated(_) => (Reason::Unauthenticated, None),
            Self::PriorityNotAllowed { .. } => (Reason::PermissionDenied, Some("priority")),
            Self::Cancelled(_) => (Reason::Cancelled, None),
            Self::DeadlineExceeded(_) => (Reason::DeadlineExceeded, None),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    /// The reason's one code, the message, and the reason (with the field) in the details.
    fn from(e: CoordinatorError) -> Self {
        let (reason, field) = e.reason();
        status(reason, field, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::reason::{failure, Failure};

    fn why(e: CoordinatorError) -> (tonic::Code, Option<Failure>) {
        let s = tonic::Status::from(e);
        (s.code(), failure(&s))
    }

    #[test]
    fn every_error_carries_its_reason_and_the_reasons_code() {
        let field = |f: &str| Some(f.to_string());
        assert_eq!(
            why(CoordinatorError::invalid_argument("num_frames", "18")),
            (tonic::Code::InvalidArgument, Some(Failure { reason: Reason::InvalidField, field: field("num_frames") }))
        );
        let refused = CoordinatorError::WorkerFailed { worker: "w1".into(), during: "prepare".into(), refused_field: field("world"), detail: "x".into() };
        assert_eq!(why(refused), (tonic::Code::InvalidArgument, Some(Failure { reason: Reason::InvalidField, field: field("world") })));
        // A lost worker is one code (every job runs on workers, in process or not).
        let lost = CoordinatorError::WorkerFailed { worker: "w1".into(), during: "step 3".into(), refused_field: None, detail: "gone".into() };
        assert_eq!(why(lost), (tonic::Code::Unavailable, Some(Failure { reason: Reason::WorkerLost, field: None })));
        let membership = CoordinatorError::Cluster(tessera_cluster::ClusterError::Membership("etcd timed out".into()));
        assert_eq!(why(membership).1.unwrap().reason, Reason::Unavailable);
        assert_eq!(why(CoordinatorError::QueueFull { limit: 3 }).0, tonic::Code::ResourceExhausted);
        let raised = why(CoordinatorError::PriorityNotAllowed { asked: 5, max: 0 });
        assert_eq!((raised.0, raised.1.as_ref().unwrap().reason), (tonic::Code::PermissionDenied, Reason::PermissionDenied));
        assert_eq!(raised.1.unwrap().field.as_deref(), Some("priority"));
        let tenant_full = why(CoordinatorError::TenantQueueFull { tenant: "alice".into(), limit: 2 });
        assert_eq!((tenant_full.0, tenant_full.1.unwrap().reason), (tonic::Code::ResourceExhausted, Reason::QueueFull));
        assert_eq!(why(CoordinatorError::WorkersBusy { workers: vec!["a".into()] }).1.unwrap().reason, Reason::Unavailable);
        assert_eq!(why(CoordinatorError::Superseded("epoch 2 > 1".into())).0, tonic::Code::Unavailable);
    }
}
