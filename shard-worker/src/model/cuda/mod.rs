//! The Wan 2.1 transformer on a CUDA GPU in bf16, as diffusers runs it with the transformer loaded
//! in bf16 (reference/wan2.1.md §1.4): the time embedder and the modulation in f32, LayerNorms in
//! f32, matrix products, attention and the FFN in bf16, the residual stream stored in bf16 with
//! the gated adds done in f32. Built from the kernels of `tessera_kernels::cuda`.
//!
//! The model is written once against [`Ops`] (`ops.rs`): [`CudaOps`] runs the CUDA kernels,
//! [`HostOps`] emulates them on the host with the same contracts and roundings, so the model's
//! orchestration — layouts, strides, offsets, the bf16 data flow — is tested against the golden
//! cases on any machine, and the CUDA forward is compared with it on a GPU.

mod attention;
mod block;
mod contract;
mod cuda_ops;
mod embedding;
#[cfg(test)]
mod emulation_tests;
mod host_ops;
mod ops;
mod transformer;
mod weights;

pub(crate) use attention::flash;
pub use attention::{DeviceSelfAttention, LocalDeviceAttention, QkvRows};
pub use cuda_ops::CudaOps;
pub use embedding::DeviceConditions;
pub use host_ops::HostOps;
pub use ops::{at, at_mut, At, AtMut, Elem, NormArgs, Ops};
pub use transformer::{CudaWanTransformer, DeviceTransformer, EmulatedWanTransformer};
