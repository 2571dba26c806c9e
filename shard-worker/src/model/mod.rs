//! The Wan 2.1 diffusion transformer (diffusers `WanTransformer3DModel`), text- and image-to-video.

mod attention;
mod block;
pub mod cuda;
mod dispatch;
mod embedding;
mod layers;
mod patch;
mod transformer;

pub use attention::{LocalAttention, SelfAttention};
pub use cuda::{CudaWanTransformer, EmulatedWanTransformer};
pub use dispatch::DitModel;
pub use embedding::Conditions;
pub use layers::Linear;
pub use patch::{patchify, unpatchify, PatchGrid};
pub use transformer::{DitInputs, WanTransformer};
