//! Tessera's coordinator library: what the `tessera` command and the coordinator server share —
//! validation of public requests, the planner, writing decoded frames as video files (MP4, GIF, PNG frames), and
//! the public gRPC server.

pub mod error;
pub mod input_image;
pub mod plan;
pub mod request;
pub mod server;
pub mod video;

pub use error::{CoordinatorError, InputVideoProblem};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CoordinatorError>;
