//! Prometheus metrics over HTTP: [`MetricsArgs`] (`--metrics-listen`) and [`serve_metrics`],
//! which answers `GET /metrics` with the text exposition of Prometheus' default registry (where
//! every Tessera metric of the process is registered), after running a refresh hook that brings
//! state-mirroring gauges up to date; and the plain HTTP probes `GET /healthz` (the process
//! answers) and `GET /readyz` (it serves, as its gRPC health says).

use crate::TelemetryError;
use clap::Args;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where the process serves its metrics; flattened into both servers.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct MetricsArgs {
    /// Address of the Prometheus endpoint (`GET /metrics`); `off` serves none. Port 0 picks a
    /// free port (the address is printed).
    #[arg(long = "metrics-listen", env = "TESSERA_METRICS_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_listen: String,
}

impl MetricsArgs {
    /// The address to listen on (`None`: metrics off); the error names the flag.
    pub fn address(&self) -> Result<Option<SocketAddr>, TelemetryError> {
        let v = self.metrics_listen.trim();
        if v.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        v.parse().map(Some).map_err(|e| TelemetryError::InvalidMetricsAddress { value: v.to_string(), reason: format!("{e} (expected HOST:PORT or off)") })
    }

    /// Binds the metrics listener (`None`: metrics off).
    pub async fn bind(&self) -> Result<Option<tokio::net::TcpListener>, TelemetryError> {
        let Some(addr) = self.address()? else { return Ok(None) };
        tokio::net::TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| TelemetryError::InvalidMetricsAddress { value: addr.to_string(), reason: e.to_string() })
    }
}

/// Step latency buckets in seconds: the workers' and the coordinator's step histograms, so the
/// two can be read side by side.
pub const STEP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The text exposition of every metric in Prometheus' default registry.
pub fn metrics_text() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    // Encoding a gathered family into memory fails only for malformed families, which the
    // registry never holds; an empty answer is the fallback.
    let _ = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` on `listener` until the task is aborted (`refresh` runs before each
/// scrape), and the probes: `GET /healthz` is 200 while the process answers, `GET /readyz` 200
/// while `serving` says it serves and 503 otherwise.
pub fn serve_metrics(listener: tokio::net::TcpListener, refresh: Arc<dyn Fn() + Send + Sync>, serving: crate::Serving) -> tokio::task::JoinHandle<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let refresh = refresh.clone();
                async move {
                    refresh();
                    ([(CONTENT_TYPE, prometheus::TEXT_FORMAT)], metrics_text())
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = serving.is_ready();
                async move {
                    match ready {
                        true => (StatusCode::OK, "serving\n"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "not serving\n"),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_checked_and_off_turns_metrics_off() {
        let args = |v: &str| MetricsArgs { metrics_listen: v.into() };
        assert_eq!(args("off").address().unwrap(), None);
        assert_eq!(args("127.0.0.1:9464").address().unwrap(), Some("127.0.0.1:9464".parse().unwrap()));
        let err = args("nowhere").address().unwrap_err().to_string();
        assert!(err.contains("--metrics-listen") && err.contains("nowhere"), "{err}");
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text_after_the_refresh() {
        let gauge = prometheus::IntGauge::new("tessera_test_refreshes", "Scrapes seen by the test (scrapes).").unwrap();
        prometheus::register(Box::new(gauge.clone())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let g = gauge.clone();
        let server = serve_metrics(listener, Arc::new(move || g.inc()), crate::Serving::new("test.v1.Test"));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("text/plain; version=0.0.4"), "{first}");
        assert!(first.contains("tessera_test_refreshes 1"), "{first}");
        assert!(get(addr, "/metrics").await.contains("tessera_test_refreshes 2"));
        server.abort();
    }

    /// The answer to `GET path` on `addr`, status line first.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    /// The HTTP probes follow the serving state that gRPC health checks report.
    #[tokio::test]
    async fn the_http_probes_follow_the_serving_state_of_the_grpc_health_service() {
        use tonic_health::pb::health_server::Health;
        use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
        let serving = crate::Serving::new("test.v1.Test");
        let grpc = serving.health_service();
        let grpc_status = |service: &str| {
            let req = tonic::Request::new(HealthCheckRequest { service: service.into() });
            let grpc = &grpc;
            async move { Health::check(grpc, req).await.map(|r| r.into_inner().status) }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve_metrics(listener, Arc::new(|| {}), serving.clone());
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"), "not serving before set(true)");
        serving.set(true).await;
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert_eq!(grpc_status("").await.unwrap(), ServingStatus::Serving as i32);
        assert_eq!(grpc_status("test.v1.Test").await.unwrap(), ServingStatus::Serving as i32);
        serving.set(false).await;
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        assert_eq!(grpc_status("test.v1.Test").await.unwrap(), ServingStatus::NotServing as i32);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"), "alive while draining");
        server.abort();
    }
}
