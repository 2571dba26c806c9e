//! Every worker error as a gRPC status with its reason (`tessera_proto::reason`): bad inputs are
//! the caller's (INVALID_FIELD, naming the field), a broken collective group PEER_LOST (the job
//! lost a peer), a stop CANCELLED, membership (etcd) trouble UNAVAILABLE, everything else INTERNAL.

use crate::WorkerError;
use tessera_proto::reason::{status, Reason};

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        match e {
            WorkerError::InvalidInput { field, .. } => status(Reason::InvalidField, Some(field), msg),
            WorkerError::Collective(_) => status(Reason::PeerLost, None, msg),
            WorkerError::Cancelled(_) => status(Reason::Cancelled, None, msg),
            WorkerError::Membership(_) => status(Reason::Unavailable, None, msg),
            WorkerError::Io { .. }
            | WorkerError::Config { .. }
            | WorkerError::Safetensors { .. }
            | WorkerError::MissingTensor { .. }
            | WorkerError::UnexpectedTensors { .. }
            | WorkerError::BadTensor { .. }
            | WorkerError::Tokenizer { .. }
            | WorkerError::Kernel(_) => status(Reason::Internal, None, msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::reason::{failure, Failure};

    #[test]
    fn errors_carry_their_reason_and_field() {
        let s = tonic::Status::from(WorkerError::input("num_frames", "18 is not 4k + 1"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(failure(&s), Some(Failure { reason: Reason::InvalidField, field: Some("num_frames".into()) }));
        let s = tonic::Status::from(WorkerError::Collective("peer 2 hung up".into()));
        assert_eq!((s.code(), failure(&s).map(|f| f.reason)), (tonic::Code::Aborted, Some(Reason::PeerLost)));
    }
}
