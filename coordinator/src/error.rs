//! The error type of the coordinator library, and its exhaustive mapping onto gRPC status codes.

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
    /// The model code failed (load, forward, decode).
    #[error(transparent)]
    Worker(#[from] tessera_worker::WorkerError),
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = e.to_string();
        match e {
            CoordinatorError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            CoordinatorError::Worker(_) => tonic::Status::internal(msg),
        }
    }
}
