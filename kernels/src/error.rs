//! The error type of the compute layer.

/// Everything that can go wrong in a kernel call: shapes that do not fit, bad parameters.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Two tensors (or a tensor and a declared shape) disagree.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The operation that was called.
        op: &'static str,
        /// What did not fit.
        detail: String,
    },
    /// A parameter is outside what the operation supports.
    #[error("invalid argument to {op}: {detail}")]
    Invalid {
        /// The operation that was called.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The thread pool could not be configured.
    #[error("thread pool: {0}")]
    Threads(String),
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Shape { op, detail: detail.into() }
    }
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid { op, detail: detail.into() }
    }
}
