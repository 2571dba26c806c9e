//! The error type of the compute layer.

/// Everything that can go wrong in a kernel call: shapes that do not fit, bad parameters, a CUDA
/// device that is missing or fails.
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
    /// A CUDA device was asked for and cannot be used; names what is missing.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(crate::cuda::CudaMissing),
    /// A CUDA driver or cuBLASLt call failed.
    #[error("CUDA error in {op}: {detail}")]
    Cuda {
        /// The operation that was running.
        op: &'static str,
        /// The driver's or library's error.
        detail: String,
    },
    /// NVRTC rejected a kernel source; `log` is the compiler's message.
    #[error("NVRTC could not compile {kernel} for {arch}: {log}")]
    KernelCompile {
        /// The kernel source file.
        kernel: &'static str,
        /// The target architecture (`sm_90`, ...).
        arch: String,
        /// The compiler log.
        log: String,
    },
}

impl From<tessera_cluster::ShapeError> for KernelError {
    fn from(e: tessera_cluster::ShapeError) -> Self {
        Self::Shape { op: e.op, detail: e.detail }
    }
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Shape { op, detail: detail.into() }
    }
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid { op, detail: detail.into() }
    }
    pub(crate) fn cuda(op: &'static str, err: impl std::fmt::Display) -> Self {
        Self::Cuda { op, detail: err.to_string() }
    }
}
