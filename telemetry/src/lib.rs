//! Tessera's tracing: the process's `tracing` subscriber (logs to stderr, spans exported over OTLP
//! gRPC when an endpoint is configured) and the W3C trace context carried between processes, in
//! gRPC metadata (client → coordinator) and in the `trace_context` map of the internal requests
//! (coordinator → workers), so that one trace shows a whole job.
//!
//! A server calls [`init`] once at start and keeps the returned [`TelemetryGuard`] until it exits
//! (dropping it flushes the spans still buffered). A span whose parent lives in another process
//! takes it with [`set_parent_from_metadata`] / [`set_parent_from_map`] right after it is created;
//! the caller's side fills the carrier with [`inject_metadata`] / [`current_context_map`].
//!
//! Metrics: every metric of a process registers in Prometheus' default registry; [`serve_metrics`]
//! exposes them at `GET /metrics` on the address of [`MetricsArgs`].

mod args;
mod error;
mod export;
mod health;
mod install;
mod metrics;
mod propagation;
#[cfg(feature = "test-receiver")]
pub mod receiver;

pub use args::{parse_sample_ratio, TelemetryArgs};
pub use error::TelemetryError;
pub use health::Serving;
pub use install::{init, init_client, TelemetryGuard, TRACER_NAME};
pub use metrics::{metrics_text, serve_metrics, MetricsArgs, STEP_BUCKETS};
pub use propagation::{
    context_map, current_context_map, current_trace_id, inject_metadata, mark_error, set_parent_from_map, set_parent_from_metadata, trace_id, TRACEPARENT,
    TRACESTATE,
};

/// Results of this crate.
pub type Result<T> = std::result::Result<T, TelemetryError>;
