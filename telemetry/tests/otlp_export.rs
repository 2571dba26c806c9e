//! `init` with a real OTLP/gRPC export to the in-process receiver: spans of this process arrive
//! with `service.name`, the resource attributes and their parent links, a span whose parent came
//! from another process's `traceparent` joins that trace, DEBUG spans stay out unless RUST_LOG
//! asks for them, and dropping the guard flushes what is buffered.

use tessera_telemetry::receiver::{TestReceiver, TraceTree};
use tessera_telemetry::{current_context_map, init, set_parent_from_map, TelemetryArgs, TRACEPARENT};

#[test]
fn spans_reach_the_collector_with_resource_and_parents() {
    let receiver = TestReceiver::start().unwrap();
    let args = TelemetryArgs { otlp_endpoint: Some(receiver.endpoint()), trace_sample_ratio: 1.0, ..Default::default() };
    let guard = init("telemetry-test", &args, &[("tessera.worker_id", "w-7".to_string())]).unwrap();
    assert!(guard.is_exporting());
    assert!(init("again", &args, &[]).is_err(), "a second init is refused");

    let remote_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (root_trace, carried) = {
        let root = tracing::info_span!("root", job_id = "j-1");
        let _in = root.enter();
        tracing::info_span!("child", step = 3u32).in_scope(|| {
            tracing::info!("an event inside");
            tracing::debug_span!("debug_child").in_scope(|| ());
        });
        (tessera_telemetry::current_trace_id().unwrap(), current_context_map())
    };
    // As a worker does with a request's trace_context: a span adopting a remote parent.
    let remote = tracing::info_span!("adopted");
    let map = [(TRACEPARENT.to_string(), format!("00-{remote_trace}-00f067aa0ba902b7-01"))].into();
    assert!(set_parent_from_map(&remote, &map));
    remote.in_scope(|| tracing::info_span!("under_adopted").in_scope(|| ()));
    drop(remote);
    // Nothing was exported yet (batches leave every 5 s): the guard's drop must flush, and the
    // spans are at the collector once it returns.
    assert_eq!(receiver.spans().len(), 0, "exported before the batch was due");
    drop(guard);
    let spans = receiver.spans();
    let tree = TraceTree::new(&spans, &root_trace);
    let root = tree.named("root")[0];
    let child = tree.named("child")[0];
    assert_eq!(root.parent_span_id, "", "root is a root");
    assert_eq!(child.parent_span_id, root.span_id);
    assert_eq!((root.attr("job_id"), child.attr("step")), (Some("j-1"), Some("3")));
    assert_eq!(carried[TRACEPARENT], format!("00-{root_trace}-{}-01", root.span_id), "the map named the current span");
    assert!(tree.named("debug_child").is_empty(), "DEBUG spans are not exported by default");
    for s in &spans {
        assert_eq!(s.service_name, "telemetry-test");
        assert_eq!(s.resource.get("tessera.worker_id").map(String::as_str), Some("w-7"));
    }
    let remote_tree = TraceTree::new(&spans, remote_trace);
    let adopted = remote_tree.named("adopted")[0];
    assert_eq!(adopted.parent_span_id, "00f067aa0ba902b7");
    assert!(remote_tree.descends_from(remote_tree.named("under_adopted")[0], "00f067aa0ba902b7"));
    assert_eq!(spans.len(), 4, "{spans:#?}");
}
