//! Tessera's coordinator library: what the `tessera` command and the coordinator server share.
//! Today: writing decoded frames as video files (MP4, GIF, PNG frames).

mod error;
pub mod video;

pub use error::CoordinatorError;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CoordinatorError>;
