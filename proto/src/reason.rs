//! Why a call failed, in a form programs act on: every error status Tessera returns (public and
//! internal API alike) carries a `google.rpc.ErrorInfo` in its details, with a [`Reason`] (domain
//! [`DOMAIN`]) and, for a bad request, the offending field in its metadata under `field`. Clients,
//! the CLI and the coordinator decide by reason (retry, busy worker, which flag to name), never by
//! message text. Each reason has one gRPC code, so a given failure is the same code everywhere.

use std::collections::HashMap;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of Tessera's reasons.
pub const DOMAIN: &str = "tessera";

/// The metadata key naming the offending request field (INVALID_FIELD).
pub const FIELD_KEY: &str = "field";

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A request field (named in the metadata) is malformed or out of range: INVALID_ARGUMENT.
    InvalidField,
    /// A feature the request asks for is not served: UNIMPLEMENTED.
    Unimplemented,
    /// The worker already runs another job (another coordinator's): FAILED_PRECONDITION. The
    /// coordinator tries another group.
    WorkerBusy,
    /// A worker of the job stopped answering, left the cluster, timed out or failed: UNAVAILABLE.
    /// The job is lost; submitting it again may succeed.
    WorkerLost,
    /// Internal API: the job's collective group broke on this worker because a peer vanished:
    /// ABORTED. The coordinator reports the peer as the lost worker.
    PeerLost,
    /// The job was cancelled: CANCELLED.
    Cancelled,
    /// The job ran past its deadline: DEADLINE_EXCEEDED.
    DeadlineExceeded,
    /// The queue is full: RESOURCE_EXHAUSTED. Retry later.
    QueueFull,
    /// No such job: NOT_FOUND.
    NotFound,
    /// The call carries no credentials, or ones the server does not accept: UNAUTHENTICATED.
    Unauthenticated,
    /// The caller may not do what it asked: PERMISSION_DENIED. Internal API: the call about a job
    /// lacks that job's secret. Public API: a priority above what the caller's groups allow (the
    /// field `priority`).
    PermissionDenied,
    /// The service cannot take the call now (no healthy worker serves the model, the membership
    /// store is unreachable, the server is shutting down): UNAVAILABLE.
    Unavailable,
    /// A state of the server, not of the request, prevents the call (a missing library, a job
    /// still joining its group, output the encoder cannot write): FAILED_PRECONDITION.
    Precondition,
    /// The job fits no group of the cluster's workers (memory per rank, with the best plan on
    /// every worker that serves the model): FAILED_PRECONDITION. Submitting it again fails the
    /// same way until larger or more devices join.
    DoesNotFit,
    /// Internal API: a coordinator that owned the state store after the caller did (its epoch is
    /// higher: `capability::COORDINATOR_EPOCH_KEY`) drives this worker now: FAILED_PRECONDITION.
    /// The caller lost its store without knowing it yet (cut off from etcd) and stops.
    Superseded,
    /// A fault of the server: INTERNAL.
    Internal,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 16] = [
        Self::InvalidField,
        Self::Unimplemented,
        Self::WorkerBusy,
        Self::WorkerLost,
        Self::PeerLost,
        Self::Cancelled,
        Self::DeadlineExceeded,
        Self::QueueFull,
        Self::NotFound,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::Unavailable,
        Self::Precondition,
        Self::DoesNotFit,
        Self::Superseded,
        Self::Internal,
    ];

    /// The `ErrorInfo.reason` string (UPPER_SNAKE_CASE).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidField => "INVALID_FIELD",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::WorkerBusy => "WORKER_BUSY",
            Self::WorkerLost => "WORKER_LOST",
            Self::PeerLost => "PEER_LOST",
            Self::Cancelled => "CANCELLED",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::QueueFull => "QUEUE_FULL",
            Self::NotFound => "NOT_FOUND",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Precondition => "PRECONDITION",
            Self::DoesNotFit => "DOES_NOT_FIT",
            Self::Superseded => "SUPERSEDED",
            Self::Internal => "INTERNAL",
        }
    }

    /// The reason named `s`, if Tessera has one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The one gRPC code this reason is returned with.
    pub fn code(self) -> Code {
        match self {
            Self::InvalidField => Code::InvalidArgument,
            Self::Unimplemented => Code::Unimplemented,
            Self::WorkerBusy | Self::Precondition | Self::DoesNotFit | Self::Superseded => Code::FailedPrecondition,
            Self::WorkerLost | Self::Unavailable => Code::Unavailable,
            Self::PeerLost => Code::Aborted,
            Self::Cancelled => Code::Cancelled,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::QueueFull => Code::ResourceExhausted,
            Self::NotFound => Code::NotFound,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Internal => Code::Internal,
        }
    }
}

/// A status for a bad request field: INVALID_ARGUMENT naming `field`.
pub fn invalid_field(field: &str, message: impl Into<String>) -> tonic::Status {
    status(Reason::InvalidField, Some(field), message)
}

/// What a status says about why it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The reason.
    pub reason: Reason,
    /// The offending request field: for [`Reason::InvalidField`], and for
    /// [`Reason::PermissionDenied`] of a field's value the caller may not ask for.
    pub field: Option<String>,
}

/// A status with `reason`'s code, `message`, and the reason (and `field`, if any) in its details.
pub fn status(reason: Reason, field: Option<&str>, message: impl Into<String>) -> tonic::Status {
    let mut metadata = HashMap::new();
    if let Some(f) = field {
        metadata.insert(FIELD_KEY.to_string(), f.to_string());
    }
    tonic::Status::with_error_details(reason.code(), message, ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata))
}

/// The reason (and field) a Tessera status carries; None for a status without Tessera's
/// `ErrorInfo` (a transport error, another service's).
pub fn failure(status: &tonic::Status) -> Option<Failure> {
    let info = status.get_details_error_info()?;
    if info.domain != DOMAIN {
        return None;
    }
    Some(Failure { reason: Reason::parse(&info.reason)?, field: info.metadata.get(FIELD_KEY).cloned() })
}

/// Whether `status` carries `reason`.
pub fn has_reason(status: &tonic::Status, reason: Reason) -> bool {
    failure(status).is_some_and(|f| f.reason == reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_a_status() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let s = status(r, Some("num_frames"), "why");
            assert_eq!((s.code(), s.message()), (r.code(), "why"));
            assert_eq!(failure(&s), Some(Failure { reason: r, field: Some("num_frames".into()) }));
            assert!(has_reason(&s, r));
        }
        let plain = tonic::Status::invalid_argument("no details");
        assert_eq!(failure(&plain), None);
        let other = tonic::Status::with_error_details(Code::Internal, "x", ErrorDetails::with_error_info("INTERNAL", "elsewhere", HashMap::new()));
        assert_eq!(failure(&other), None, "another domain's reason is not ours");
        assert_eq!(failure(&status(Reason::WorkerBusy, None, "busy")).unwrap().field, None);
    }
}
