//! Tessera's compute layer: a small tensor type and the operations the Wan models need
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
mod tensor;
pub mod threads;

pub use error::KernelError;
pub use tensor::{Device, Tensor};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;
