//! Tessera's compute layer: the operations the Wan models need on the host tensor
//! (`tessera_cluster::Tensor`, re-exported here)
//! (matrix products, tiled attention with log-sum-exp, norms, 3-D RoPE, activations),
//! implemented on the CPU in f32 ([`cpu`]) and on CUDA GPUs ([`cuda`], chosen at run time), and
//! the one seam the models are written against ([`backend::Ops`]: `cpu`, `bf16-host`, `cuda`).
//! Every CUDA kernel is tested against its CPU twin.

pub mod backend;
pub mod cpu;
pub mod cuda;
mod error;
pub mod random;
pub mod simd;

pub use error::KernelError;
/// The host tensor, the device enum and the CPU thread pool live in `tessera_cluster` (the
/// coordinator shares them without linking the kernels).
pub use tessera_cluster::{threads, Device, Tensor};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
