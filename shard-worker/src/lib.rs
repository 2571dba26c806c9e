//! Tessera's shard worker library: the Wan 2.1 diffusion transformer (text- and image-to-video),
//! loading diffusers weight folders, and the pieces a worker process runs.

pub mod config;
mod error;
pub mod golden;
pub mod model;
pub mod parallel;
pub mod sampler;
pub mod weights;

pub use config::{TransformerConfig, TransformerPreset};
pub use error::WorkerError;
pub use model::{DitInputs, WanTransformer};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, WorkerError>;
