//! The Wan 2.1 diffusion transformer (diffusers `WanTransformer3DModel`), text- and image-to-video,
//! written once over the backend seam `tessera_kernels::backend::Ops`: f32 on the CPU, bf16 on a
//! CUDA GPU, and bf16 under the GPU path's host twin (reference/wan2.1.md §1.3, §1.4).

mod attention;
mod block;
mod dispatch;
mod embedding;
#[cfg(test)]
mod emulation_tests;
mod layers;
mod patch;
mod transformer;
mod weights;

pub use attention::{visible_flash, LocalAttention, QkvRows, SelfAttention, Visibility};
pub use dispatch::{DitFamily, DitModel};
pub use embedding::Conditions;
pub use layers::Linear;
pub use patch::PatchGrid;
pub use transformer::{CpuWanTransformer, CudaWanTransformer, DitInputs, EmulatedWanTransformer, ForwardOptions, PatchInputs, WanTransformer};
pub(crate) use weights::{load_rounded, round_stream, round_to, DeviceLinear};
