//! The CUDA backend: device selection at run time, kernels written in CUDA C (`kernels/cuda/*.cu`)
//! compiled by NVRTC for the device's architecture on first use and cached, their launch
//! wrappers, matrix products through cuBLASLt, and NCCL between the GPUs of a group.
//!
//! `cudarc` is loaded dynamically, so this module always compiles and links without CUDA; every
//! entry point checks first that the libraries and a device are there ([`DeviceChoice::resolve`],
//! [`CudaDevice::open`]) and returns [`crate::KernelError::CudaUnavailable`] otherwise.
//!
//! Buffers are `cudarc` device slices: bf16 (`half::bf16`) for matrix-product operands and
//! attention inputs, f32 for the residual stream, norms' parameters, latents and log-sum-exps.
//! Every kernel has a CPU twin in [`crate::cpu`] with the same contract; the GPU test suite
//! (`kernels/tests/gpu_kernels.rs`) compares them on random inputs.

mod arch;
pub mod attention;
pub mod biased_attention;
mod device;
mod elem;
pub mod elementwise;
pub mod gemm;
mod launch;
pub mod nccl;
pub mod norm;
pub mod patch;
pub mod sampler;
pub mod source;
pub mod video;

pub use arch::{Arch, CudaMissing, MIN_ARCH};
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
pub use device::{cuda_status, CudaDevice, DeviceChoice};
pub use elem::OutputElem;
pub use half::bf16;
