//! Without an endpoint `init` installs only the log output: no span is recorded (so tracing adds
//! no work to a job) and no trace context is passed on. A malformed RUST_LOG is an error naming
//! the variable, before anything is installed.

use std::collections::HashMap;
use tessera_telemetry::{current_context_map, init, set_parent_from_map, TelemetryArgs, TelemetryError, TRACEPARENT};

#[test]
fn without_an_endpoint_nothing_is_recorded_or_passed_on() {
    std::env::set_var("RUST_LOG", "info,tessera=nonsense");
    let err = init("t", &TelemetryArgs::default(), &[]).err().expect("a bad RUST_LOG is refused");
    assert!(matches!(err, TelemetryError::InvalidLogFilter { .. }) && err.to_string().starts_with("RUST_LOG"), "{err}");
    std::env::set_var("RUST_LOG", "info");

    let guard = init("t", &TelemetryArgs { otlp_endpoint: Some(" ".into()), trace_sample_ratio: 1.0, ..Default::default() }, &[]).unwrap();
    assert!(!guard.is_exporting());
    let span = tracing::info_span!("job");
    let map = HashMap::from([(TRACEPARENT.to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string())]);
    assert!(!set_parent_from_map(&span, &map), "no OpenTelemetry layer: nothing takes the parent");
    span.in_scope(|| {
        assert!(current_context_map().is_empty(), "nothing to pass on");
        assert_eq!(tessera_telemetry::current_trace_id(), None);
    });
}
