//! What the coordinator and the workers share, and nothing that computes a model: the job spec
//! and its one check (`job`, `limits`, `defaults`), worker membership and records (etcd or in
//! process), the store of job records (`records`: etcd), the codecs of the internal API (latents, checkpoints, frames), the host tensor and the
//! CPU thread pool, durations in settings, the HTTP/2 limits of every gRPC server (`http2`), TLS inside (`tls`), the transformer's configuration (its shape, which the
//! planner sizes jobs with), the chunking of diffusion-forcing long videos. The coordinator's server links this crate, not the
//! models, CUDA or the tokenizer; the workers and the kernels build on it.

pub mod codec;
pub mod defaults;
pub mod duration;
mod error;
pub mod forcing;
pub mod http2;
pub mod job;
pub mod limits;
pub mod membership;
pub mod records;
mod tensor;
pub mod threads;
pub mod tls;
pub mod transformer_config;

pub use error::{ClusterError, ShapeError};
pub use job::{ImageSize, JobPlan, JobRequest, JobSpec};
pub use tensor::{Device, Tensor};
pub use transformer_config::TransformerConfig;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ClusterError>;
