//! The error type of the coordinator library.

use std::path::PathBuf;

/// Everything the coordinator library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Writing or creating a file or folder failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Frames or video settings are unusable (size, frame rate, sample count, values).
    #[error("invalid video `{field}`: {detail}")]
    InvalidVideo {
        /// The setting or input that is wrong.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// An encoder or muxer failed.
    #[error("{format} encoding: {detail}")]
    Encode {
        /// The output format (`mp4`, `gif`, `png`).
        format: &'static str,
        /// What the encoder reported.
        detail: String,
    },
}

impl CoordinatorError {
    pub(crate) fn invalid_video(field: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidVideo { field, detail: detail.into() }
    }

    pub(crate) fn encode(format: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Encode { format, detail: detail.to_string() }
    }
}
