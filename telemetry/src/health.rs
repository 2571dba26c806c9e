//! Whether the process serves: one state told both to gRPC health checks (`grpc.health.v1` on the
//! API port) and to plain HTTP probes (`GET /healthz`, `GET /readyz` on the metrics port, see
//! [`crate::serve_metrics`]), which a kubelet can reach when the API port asks for client
//! certificates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// The serving state of the server as a whole (`""`) and of its one API service.
#[derive(Clone, Debug)]
pub struct Serving {
    reporter: HealthReporter,
    ready: Arc<AtomicBool>,
    service: &'static str,
}

impl Serving {
    /// A state for the API service named `service` (`tessera.v1.Tessera`), not serving until
    /// [`Self::set`] says so (the gRPC side learns it at the first `set`).
    pub fn new(service: &'static str) -> Self {
        Self { reporter: HealthReporter::new(), ready: Arc::new(AtomicBool::new(false)), service }
    }

    /// The `grpc.health.v1.Health` server reporting this state, for a tonic router.
    pub fn grpc_service(&self) -> HealthServer<HealthService> {
        HealthServer::new(self.health_service())
    }

    /// The `grpc.health.v1.Health` implementation reporting this state.
    pub fn health_service(&self) -> HealthService {
        HealthService::from_health_reporter(self.reporter.clone())
    }

    /// Says whether the process serves, to both sides.
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.ready.store(serving, Ordering::SeqCst);
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    /// Whether the process serves (what `/readyz` answers).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}
