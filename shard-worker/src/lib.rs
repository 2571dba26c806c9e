//! Tessera's shard worker library: the Wan 2.1 models (diffusion transformer, UMT5 text encoder,
//! VAE), the flow-matching samplers and the whole pipeline, loading diffusers snapshot folders,
//! sequence-parallel attention, and the pieces a worker process runs.

/// Durations in settings (shared: `tessera_cluster::duration`).
pub use tessera_cluster::duration;
mod error;
pub mod golden;
pub mod image;
/// Worker membership and records (shared with the coordinator: `tessera_cluster::membership`).
pub use tessera_cluster::membership;
pub mod model;
pub mod on_backend;
pub mod parallel;
pub mod pipeline;
pub mod sampler;
pub mod server;
pub mod text;
pub mod transformer_config;
pub mod vae;
pub mod weights;

pub use error::WorkerError;
pub use model::{DitInputs, DitModel, WanTransformer};
pub use transformer_config::{TransformerConfig, TransformerPreset};
pub use vae::{VaeConfig, VaePreset, WanVae};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, WorkerError>;
