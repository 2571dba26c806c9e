//! [`TelemetryError`]: why tracing could not be set up.

use thiserror::Error;

/// Why [`crate::init`] failed; each names the flag or variable to fix.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// The sampling ratio is not a number from 0 to 1.
    #[error("--trace-sample-ratio {value}: must be a number from 0 to 1")]
    InvalidSampleRatio {
        /// The value given.
        value: f64,
    },
    /// The collector endpoint is not a usable `http://HOST:PORT` URL.
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS file of the exporter is missing, unreadable, not PEM, or given without its pair or
    /// without an https:// endpoint.
    #[error("{flag}: {reason}")]
    Tls {
        /// The flag (and its variable) at fault.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The OTLP exporter could not be built.
    #[error("--otlp-endpoint {endpoint:?}: cannot set up the OTLP exporter: {reason}")]
    Exporter {
        /// The endpoint given.
        endpoint: String,
        /// The exporter's error.
        reason: String,
    },
    /// The metrics address is not `HOST:PORT` (or `off`), or cannot be bound.
    #[error("--metrics-listen {value}: {reason}")]
    InvalidMetricsAddress {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `RUST_LOG` is not a valid filter.
    #[error("RUST_LOG {value:?}: {reason}")]
    InvalidLogFilter {
        /// The variable's value.
        value: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The export thread could not start.
    #[error("cannot start the span export thread: {0}")]
    Runtime(#[from] std::io::Error),
    /// Another global subscriber was installed first.
    #[error("the process's tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}
