//! The error type of the worker library.

use std::path::PathBuf;

/// Everything the worker library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file is malformed or describes an unsupported model.
    #[error("config {path}: {detail}")]
    Config {
        /// The file (or preset name).
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A safetensors file is malformed.
    #[error("safetensors {path}: {detail}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the model needs is absent from the weights.
    #[error("missing tensor `{name}` in {source_desc}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// Where it was looked for.
        source_desc: String,
    },
    /// The weights hold tensors the model does not use.
    #[error("unexpected tensors in {source_desc}: {names:?}")]
    UnexpectedTensors {
        /// Their names (first few).
        names: Vec<String>,
        /// Where they were found.
        source_desc: String,
    },
    /// A tensor has the wrong shape or an unsupported dtype.
    #[error("tensor `{name}`: {detail}")]
    BadTensor {
        /// The tensor name.
        name: String,
        /// Expected versus found.
        detail: String,
    },
    /// Inputs of a forward pass do not fit the model.
    #[error("invalid input `{field}`: {detail}")]
    InvalidInput {
        /// The input that is wrong.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// A collective operation failed: a peer vanished, sent garbage, or never answered.
    #[error("collective: {0}")]
    Collective(String),
    /// The run was stopped between two steps on request (cancel, deadline, client gone).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A tokenizer file could not be read or a text could not be tokenized.
    #[error("tokenizer {path}: {detail}")]
    Tokenizer {
        /// The tokenizer file (or folder).
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Worker membership failed: the store (etcd) is unreachable or timed out, a lease was lost,
    /// a worker id is taken, or a watch broke.
    #[error("membership: {0}")]
    Membership(String),
    /// A compute kernel failed.
    #[error(transparent)]
    Kernel(#[from] tessera_kernels::KernelError),
}

impl From<tessera_cluster::ShapeError> for WorkerError {
    fn from(e: tessera_cluster::ShapeError) -> Self {
        Self::Kernel(e.into())
    }
}

/// The shared cluster layer's errors, as the same kinds here (a refused field stays a refused field).
impl From<tessera_cluster::ClusterError> for WorkerError {
    fn from(e: tessera_cluster::ClusterError) -> Self {
        use tessera_cluster::ClusterError;
        match e {
            ClusterError::InvalidInput { field, detail } => Self::InvalidInput { field, detail },
            ClusterError::Membership(m) => Self::Membership(m),
            ClusterError::Shape(s) => s.into(),
        }
    }
}

impl WorkerError {
    pub(crate) fn input(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidInput { field, detail: detail.into() }
    }
}
