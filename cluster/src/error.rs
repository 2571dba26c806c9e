//! The errors of the shared cluster layer.

/// A tensor's shape does not fit its data (or an operation's expectation).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("shape mismatch in {op}: {detail}")]
pub struct ShapeError {
    /// The operation that was called.
    pub op: &'static str,
    /// What did not fit.
    pub detail: String,
}

impl ShapeError {
    pub(crate) fn new(op: &'static str, detail: impl Into<String>) -> Self {
        Self { op, detail: detail.into() }
    }
}

/// Everything the shared cluster layer refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A setting, a request field or a message from the network is out of bounds; names it.
    #[error("invalid input `{field}`: {detail}")]
    InvalidInput {
        /// The field that is wrong.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// Worker membership failed: the store (etcd) is unreachable or timed out, a lease was lost,
    /// a worker id is taken, or a watch broke.
    #[error("membership: {0}")]
    Membership(String),
    /// A tensor's shape does not fit its data.
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

impl ClusterError {
    /// An [`ClusterError::InvalidInput`] naming `field`.
    pub fn input(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidInput { field, detail: detail.into() }
    }
}
