//! What every Tessera process shares, and nothing that computes a model: the host tensor and the
//! CPU thread pool, the one check of a job's sizes and settings (`limits`), durations in settings,
//! worker membership and records (etcd or in process), and the codecs of the internal API (latents,
//! checkpoints, frames). The coordinator's server links this crate, not the models, CUDA or the
//! tokenizer; the workers and the kernels build on it.

pub mod codec;
pub mod defaults;
pub mod duration;
mod error;
pub mod job;
pub mod limits;
pub mod membership;
mod tensor;
pub mod threads;

pub use error::{CoreError, ShapeError};
pub use job::{JobRequest, JobSpec};
pub use tensor::{Device, Tensor};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CoreError>;
