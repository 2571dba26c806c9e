//! Installs the process's tracing: a `tracing` subscriber that logs to stderr (filtered by
//! `RUST_LOG`) and, when an OTLP endpoint is given, exports spans to it over gRPC (TLS for an
//! https:// collector) with a parent-based ratio sampler and a resource naming the process. The exporter runs on a small
//! runtime of its own, so it keeps working whatever the server's runtime is doing, and the
//! [`TelemetryGuard`] flushes what is buffered when it is dropped.

use crate::{Result, TelemetryArgs, TelemetryError};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::time::Duration;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The instrumentation scope name of Tessera's spans.
pub const TRACER_NAME: &str = "tessera";

/// How long dropping the guard waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the exporter alive; dropping it exports the spans still buffered and stops the exporter
/// (so the spans of a process that exits reach the collector). Keep it until `main` returns.
#[must_use = "dropping the guard stops the span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
    exporting: bool,
}

impl TelemetryGuard {
    /// True when spans are exported to a collector.
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports the spans ended so far now (the exporter otherwise sends them in batches every
    /// few seconds).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "flushing the spans failed");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown_with_timeout(FLUSH_TIMEOUT) {
                // The subscriber still logs to stderr.
                tracing::warn!(error = %e, "the last spans may not have reached the collector");
            }
        }
        if let Some(rt) = self.runtime.take() {
            // Nothing is left to run on it; not waiting also makes the drop safe in async code.
            rt.shutdown_background();
        }
    }
}

/// Sets up a server's tracing: logs to stderr filtered by `RUST_LOG` (default `info`); with
/// `args`' endpoint, spans (INFO and above, and whatever `RUST_LOG` enables besides) exported
/// over OTLP gRPC as `service.name` = `service_name` with the extra resource `attributes` (e.g.
/// `[("tessera.worker_id", id)]`); and the W3C TraceContext propagator as the global one. Without
/// an endpoint no span is recorded at all, so tracing costs nothing, and trace context is not
/// passed on. Fails if a global subscriber is already installed.
pub fn init(service_name: &str, args: &TelemetryArgs, attributes: &[(&str, String)]) -> Result<TelemetryGuard> {
    install(service_name, args, attributes, Mode { default_log: "info", record_without_export: false })
}

/// Like [`init`], for a client command: logs default to `warn` (they would disturb its output),
/// and spans are recorded even without an endpoint, so that the trace context it sends with its
/// calls is real (its trace id names the trace the servers export).
pub fn init_client(service_name: &str, args: &TelemetryArgs, attributes: &[(&str, String)]) -> Result<TelemetryGuard> {
    install(service_name, args, attributes, Mode { default_log: "warn", record_without_export: true })
}

struct Mode {
    default_log: &'static str,
    record_without_export: bool,
}

/// The log filter: `RUST_LOG`, or `default` when it is unset or empty.
fn log_filter(default: &str) -> Result<EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::builder().parse(&v).map_err(|e| TelemetryError::InvalidLogFilter { value: v.clone(), reason: e.to_string() })
        }
        _ => Ok(EnvFilter::new(default)),
    }
}

/// A collector URL tonic can dial: `http://HOST:PORT` or `https://HOST:PORT` (a bare
/// `HOST:PORT` gets `http://`).
fn collector_url(endpoint: &str) -> Result<String> {
    let bad = |reason: &str| TelemetryError::InvalidEndpoint { endpoint: endpoint.to_string(), reason: reason.to_string() };
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
    }
    let parsed = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if parsed.uri().host().is_none_or(str::is_empty) {
        return Err(bad("no host; expected http://HOST:PORT"));
    }
    Ok(url)
}

/// A PEM file's bytes; errors name the flag and its variable.
fn read_pem(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| TelemetryError::Tls { flag, reason: format!("{}: {e}", path.display()) })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TelemetryError::Tls { flag, reason: format!("{}: not a PEM file (no -----BEGIN line)", path.display()) });
    }
    Ok(bytes)
}

const CERTIFICATE_FLAG: &str = "--otlp-certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)";
const CLIENT_CERTIFICATE_FLAG: &str = "--otlp-client-certificate (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)";
const CLIENT_KEY_FLAG: &str = "--otlp-client-key (OTEL_EXPORTER_OTLP_CLIENT_KEY)";

/// The exporter's TLS settings for `url`: `None` for http://; for https://, the collector's CA
/// (or the system's roots) and this process's certificate when one is given.
fn collector_tls(url: &str, args: &TelemetryArgs) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    let client = (&args.otlp_client_certificate, &args.otlp_client_key);
    if !url.starts_with("https://") {
        if args.otlp_certificate.is_some() || client.0.is_some() || client.1.is_some() {
            let flag = if args.otlp_certificate.is_some() { CERTIFICATE_FLAG } else { CLIENT_CERTIFICATE_FLAG };
            return Err(TelemetryError::Tls { flag, reason: format!("TLS files for the plain-text collector {url}; use https://") });
        }
        return Ok(None);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match &args.otlp_certificate {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read_pem(CERTIFICATE_FLAG, ca)?)),
        None => tls.with_native_roots(),
    };
    match client {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(read_pem(CLIENT_CERTIFICATE_FLAG, cert)?, read_pem(CLIENT_KEY_FLAG, key)?))
        }
        (Some(_), None) => return Err(TelemetryError::Tls { flag: CLIENT_KEY_FLAG, reason: "missing: the client certificate needs its key".into() }),
        (None, Some(_)) => return Err(TelemetryError::Tls { flag: CLIENT_CERTIFICATE_FLAG, reason: "missing: the key needs its certificate".into() }),
    }
    Ok(Some(tls))
}

fn install(service_name: &str, args: &TelemetryArgs, attributes: &[(&str, String)], mode: Mode) -> Result<TelemetryGuard> {
    args.validate()?;
    let endpoint = args.endpoint().map(collector_url).transpose()?;
    let tls = endpoint.as_deref().map(|url| collector_tls(url, args)).transpose()?.flatten();
    let log = log_filter(mode.default_log)?;
    // What the exporter sees: INFO and above from everywhere, plus what RUST_LOG turns on (e.g.
    // `tessera_worker::parallel=debug` for the per-layer collective spans).
    let export_filter = LevelFilter::INFO.or(log_filter(mode.default_log)?);

    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attributes.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.clone())))
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(args.trace_sample_ratio)));
    let mut guard = TelemetryGuard { provider: None, runtime: None, exporting: false };
    if let Some(url) = &endpoint {
        // The tonic channel's tasks live on this runtime, for as long as the guard.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("tessera-otlp").enable_all().build()?;
        let exporter = {
            let _inside = runtime.enter();
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(url.clone());
            let builder = match tls {
                Some(tls) => builder.with_tls_config(tls),
                None => builder,
            };
            builder.build().map_err(|e| TelemetryError::Exporter { endpoint: url.clone(), reason: e.to_string() })?
        };
        let exporter = crate::export::ReportingExporter::new(exporter, url.clone());
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_sampler(sampler).with_resource(resource).build();
        guard = TelemetryGuard { provider: Some(provider), runtime: Some(runtime), exporting: true };
    } else if mode.record_without_export {
        guard.provider = Some(SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource).build());
    }
    let otel = guard.provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(TRACER_NAME)).with_filter(export_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).with_filter(log);
    tracing_subscriber::registry().with(fmt).with(otel).try_init().map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(url) = &endpoint {
        tracing::info!(endpoint = %url, service = service_name, sample_ratio = args.trace_sample_ratio, "exporting spans over OTLP");
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_are_checked() {
        assert_eq!(collector_url("http://otel:4317").unwrap(), "http://otel:4317");
        assert_eq!(collector_url("127.0.0.1:4317").unwrap(), "http://127.0.0.1:4317");
        assert_eq!(collector_url("https://otel:4317").unwrap(), "https://otel:4317");
        assert!(collector_url("ftp://otel:21").is_err());
        assert!(collector_url("http://").is_err());
        assert!(collector_url("http://a b:1").is_err());
    }

    #[test]
    fn bad_arguments_fail_before_anything_is_installed() {
        let err = init("t", &TelemetryArgs { trace_sample_ratio: -1.0, ..Default::default() }, &[]).err().unwrap();
        assert!(matches!(err, TelemetryError::InvalidSampleRatio { .. }), "{err}");
        let err = init("t", &TelemetryArgs { otlp_endpoint: Some("ftp://x:1".into()), ..Default::default() }, &[]).err().unwrap();
        assert!(matches!(err, TelemetryError::InvalidEndpoint { .. }), "{err}");
        let dir = std::env::temp_dir().join(format!("tessera-otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let with = |endpoint: &str, ca: Option<&std::path::Path>, cert: bool, key: bool| TelemetryArgs {
            otlp_endpoint: Some(endpoint.into()),
            otlp_certificate: ca.map(Into::into),
            otlp_client_certificate: cert.then(|| pem.clone()),
            otlp_client_key: key.then(|| pem.clone()),
            ..Default::default()
        };
        let tls_error = |a: &TelemetryArgs| match collector_tls(a.endpoint().unwrap(), a) {
            Err(TelemetryError::Tls { flag, reason }) => format!("{flag}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert!(tls_error(&with("http://x:1", Some(&pem), false, false)).contains("use https://"));
        assert!(tls_error(&with("https://x:1", Some(&pem), true, false)).starts_with("--otlp-client-key"));
        assert!(tls_error(&with("https://x:1", Some(&dir.join("none.pem")), false, false)).starts_with("--otlp-certificate"));
        assert!(collector_tls("https://x:1", &with("https://x:1", Some(&pem), true, true)).unwrap().is_some());
        assert!(collector_tls("http://x:1", &with("http://x:1", None, false, false)).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
