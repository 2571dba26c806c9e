//! Tessera's coordinator library: the public API's request handling, job planning and video
//! output. The `tessera` binary (src/main.rs) is its command-line front end.

pub mod error;
pub mod request;

pub use error::CoordinatorError;
