//! [`ReportingExporter`]: the OTLP exporter, saying on the log when spans cannot reach the
//! collector (once, not per batch) and when they can again, since the SDK itself stays silent.

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Wraps a span exporter and logs its failures and recoveries.
#[derive(Debug)]
pub(crate) struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> ReportingExporter<E> {
    /// Reports `inner`'s failures to send to `endpoint`.
    pub(crate) fn new(inner: E, endpoint: String) -> Self {
        Self { inner, endpoint, failing: AtomicBool::new(false) }
    }

    /// Logs a change between failing and working; returns `result`.
    fn report(&self, result: OTelSdkResult, spans: usize) -> OTelSdkResult {
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(endpoint = %self.endpoint, error = %e, spans, "cannot export spans to the collector; spans are dropped until it answers")
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => tracing::info!(endpoint = %self.endpoint, "exporting spans again"),
            _ => {}
        }
        result
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.report(result, spans)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkError;

    #[test]
    fn failures_are_reported_once_until_recovery() {
        let r = ReportingExporter::new((), "http://c:4317".into());
        assert!(!r.failing.load(Ordering::Relaxed));
        assert!(r.report(Err(OTelSdkError::InternalFailure("down".into())), 3).is_err());
        assert!(r.failing.load(Ordering::Relaxed));
        assert!(r.report(Err(OTelSdkError::InternalFailure("down".into())), 3).is_err());
        assert!(r.report(Ok(()), 3).is_ok());
        assert!(!r.failing.load(Ordering::Relaxed), "recovered");
    }
}
