//! Span export to an https:// collector: a receiver serving TLS with a certificate of a throwaway
//! CA (rcgen) gets the spans of a process given that CA (`--otlp-certificate`, the standard
//! `OTEL_EXPORTER_OTLP_CERTIFICATE`). One test per process: `init` installs the global subscriber.

use tessera_telemetry::receiver::TestReceiver;
use tessera_telemetry::{init, TelemetryArgs};

#[test]
fn spans_reach_an_https_collector_that_the_given_ca_signed() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let receiver = TestReceiver::start_tls(tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem())).unwrap();
    assert!(receiver.endpoint().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let args = TelemetryArgs { otlp_endpoint: Some(receiver.endpoint()), otlp_certificate: Some(ca_file), ..Default::default() };
    let guard = init("telemetry-tls-test", &args, &[]).unwrap();
    tracing::info_span!("over_tls", job_id = "j-tls").in_scope(|| tracing::info!("inside"));
    // Dropping the guard flushes the batch; the spans are at the collector once it returns.
    drop(guard);
    let spans = receiver.spans();
    assert!(spans.iter().any(|s| s.name == "over_tls" && s.attr("job_id") == Some("j-tls")), "{spans:?}");
}
