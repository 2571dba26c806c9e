//! CPU implementations of every kernel, in f32. These are the reference the CUDA kernels are
//! tested against, and what tests, CI and the embedded mode run on.

pub mod activation;
pub mod attention;
pub mod biased_attention;
pub mod conv;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod measure;
pub mod norm;
pub mod patch;
pub mod qk_norm;
pub mod resample;
pub mod rope;
pub mod sampler;
pub mod video;

pub use activation::{apply_activation, Activation};
pub use attention::{attention, merge_partials, AttentionOutput, AttentionShape};
pub use biased_attention::{biased_attention, RelativeBias};
pub use conv::{conv2d, conv3d, conv3d_pieces, Conv2dParams, Conv3dParams};
pub use elementwise::{gated_residual_add, mul_in_place, residual_add};
pub use embedding::{timestep_embedding, timestep_embedding_f64};
pub use matmul::{gemm_into, linear, linear_into, MatRef, Threads};
pub use norm::{layer_norm, layer_norm_into, rms_norm, LayerNormParams};
pub use patch::{patch_rows, patchify, unpatchify, PatchGeometry};
pub use qk_norm::qk_norm_rope;
pub use rope::{Rope3d, RopeTable};
pub use sampler::{guide, sampler_step, SamplerUpdate, UniPcCorrector, UniPcPredictor, UniPcStep};
pub use video::{channel_rms_norm, transpose, upsample_nearest2x};
