//! What a GPU is and what keeps one from being used: its architecture, the oldest one the kernels
//! support, and the reasons a device cannot run them (shared by the device and the compiler, which
//! both name them).

/// The oldest architecture the kernels support (bf16 tensor-core `mma.sync`, `cp.async`).
pub const MIN_ARCH: Arch = Arch { major: 8, minor: 0 };

/// A GPU architecture (compute capability), e.g. `sm_90` for 9.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Major compute capability.
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// What keeps a CUDA device from being used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaMissing {
    /// The driver library `libcuda.so` is not installed or not on the library path.
    DriverLibrary,
    /// The driver is there but did not start (its error), e.g. no GPU or a driver mismatch.
    DriverInit(String),
    /// There is no device with this ordinal.
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// The device is older than the kernels support.
    OldDevice {
        /// The device's ordinal.
        ordinal: usize,
        /// Its architecture.
        arch: Arch,
    },
    /// The runtime compiler library `libnvrtc.so` is not installed or not on the library path.
    Nvrtc,
    /// The matrix-product library `libcublasLt.so` is not installed or not on the library path.
    CublasLt,
    /// The collectives library `libnccl.so` is not installed or not on the library path (needed
    /// only by groups of more than one GPU).
    Nccl,
}

impl std::fmt::Display for CudaMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DriverLibrary => f.write_str("the CUDA driver library (libcuda.so) is not installed or not on the library path"),
            Self::DriverInit(e) => write!(f, "the CUDA driver did not initialise: {e}"),
            Self::NoDevice { ordinal, count } => write!(f, "no CUDA device {ordinal}: the driver reports {count} device(s)"),
            Self::OldDevice { ordinal, arch } => write!(f, "CUDA device {ordinal} is {arch}; the kernels need {MIN_ARCH} or newer"),
            Self::Nvrtc => f.write_str("the CUDA runtime compiler (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH"),
            Self::CublasLt => f.write_str("cuBLASLt (libcublasLt.so) is not installed or not on LD_LIBRARY_PATH"),
            Self::Nccl => f.write_str("NCCL (libnccl.so) is not installed or not on LD_LIBRARY_PATH; a group of several GPUs needs it (pip's nvidia-nccl-cu12 ships libnccl.so.2: link it as libnccl.so)"),
        }
    }
}
