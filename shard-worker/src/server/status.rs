//! Every worker error as a gRPC status: bad inputs are the caller's (INVALID_ARGUMENT), a broken
//! collective group ABORTED (the job lost a peer), a stop CANCELLED, membership (etcd) trouble
//! UNAVAILABLE, everything else INTERNAL.

use crate::WorkerError;

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        match e {
            WorkerError::InvalidInput { .. } => tonic::Status::invalid_argument(msg),
            WorkerError::Collective(_) => tonic::Status::aborted(msg),
            WorkerError::Cancelled(_) => tonic::Status::cancelled(msg),
            WorkerError::Membership(_) => tonic::Status::unavailable(msg),
            WorkerError::Io { .. }
            | WorkerError::Config { .. }
            | WorkerError::Safetensors { .. }
            | WorkerError::MissingTensor { .. }
            | WorkerError::UnexpectedTensors { .. }
            | WorkerError::BadTensor { .. }
            | WorkerError::Tokenizer { .. }
            | WorkerError::Kernel(_) => tonic::Status::internal(msg),
        }
    }
}
