//! W3C trace context (`traceparent`, `tracestate`) between processes: into and out of gRPC
//! metadata (the public API) and string maps (the `trace_context` field of the internal
//! requests). A span takes a remote parent right after it is created, before it is entered or
//! has children; a missing or malformed `traceparent` leaves the span where it is (a new root
//! when nothing is current), never an error.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// gRPC metadata as an OpenTelemetry carrier.
struct Metadata<'a>(&'a MetadataMap);
struct MetadataMut<'a>(&'a mut MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|k| match k {
                KeyRef::Ascii(k) => k.as_str(),
                KeyRef::Binary(k) => k.as_str(),
            })
            .collect()
    }
}

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
            self.0.insert(k, v);
        }
    }
}

/// The context of `span` (invalid when the span is disabled or no OpenTelemetry layer runs).
fn span_context(span: &Span) -> Context {
    span.context()
}

/// `span`'s trace context as `traceparent` (and `tracestate`) entries; empty when the span
/// records nothing (disabled, or no OpenTelemetry layer: a process without an endpoint).
pub fn context_map(span: &Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&span_context(span), &mut map);
    map
}

/// The current span's trace context as `traceparent`/`tracestate` entries: what a
/// `trace_context` field of a worker request carries (see [`context_map`]).
pub fn current_context_map() -> HashMap<String, String> {
    context_map(&Span::current())
}

/// Writes the current span's trace context into gRPC request metadata (nothing when the span
/// records nothing).
pub fn inject_metadata(metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span_context(&Span::current()), &mut MetadataMut(metadata));
}

/// Makes the remote span in `cx` the parent of `span`; false when `cx` holds none or the span
/// cannot take it (disabled, already started, no OpenTelemetry layer).
fn adopt(span: &Span, cx: Context) -> bool {
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// Gives `span` the parent named by a `trace_context` map; returns whether it took one. Call it
/// right after creating the span.
pub fn set_parent_from_map(span: &Span, map: &HashMap<String, String>) -> bool {
    adopt(span, TraceContextPropagator::new().extract_with_context(&Context::new(), map))
}

/// Gives `span` the parent named by a request's `traceparent` metadata; returns whether it took
/// one. Call it right after creating the span.
pub fn set_parent_from_metadata(span: &Span, metadata: &MetadataMap) -> bool {
    adopt(span, TraceContextPropagator::new().extract_with_context(&Context::new(), &Metadata(metadata)))
}

/// Marks `span` as failed (status ERROR with `message`), as trace viewers show it; nothing when
/// the span records nothing.
pub fn mark_error(span: &Span, message: impl std::fmt::Display) {
    span.set_status(opentelemetry::trace::Status::error(message.to_string()));
}

/// `span`'s trace id in hex (as trace viewers show it), if it records one.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span_context(span);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The current span's trace id in hex, if it records one.
pub fn current_trace_id() -> Option<String> {
    trace_id(&Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// An ended span: name, trace id, span id, parent span id.
    type EndedSpan = (String, TraceId, SpanId, SpanId);

    /// Keeps the ended spans in memory.
    #[derive(Clone, Debug, Default)]
    struct Ended(Arc<Mutex<Vec<EndedSpan>>>);

    impl SpanProcessor for Ended {
        fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push((span.name.to_string(), span.span_context.trace_id(), span.span_context.span_id(), span.parent_span_id));
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    impl Ended {
        fn get(&self, name: &str) -> (TraceId, SpanId, SpanId) {
            let v = self.0.lock().unwrap();
            let (_, t, s, p) = v.iter().find(|(n, ..)| n == name).unwrap_or_else(|| panic!("no span {name} in {v:?}"));
            (*t, *s, *p)
        }
    }

    /// Runs `f` with a subscriber that records spans into the returned list.
    fn traced(f: impl FnOnce()) -> Ended {
        let ended = Ended::default();
        let provider = SdkTracerProvider::builder().with_span_processor(ended.clone()).build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
        ended
    }

    #[test]
    fn inject_then_extract_keeps_the_trace_and_names_the_parent() {
        let ended = traced(|| {
            let caller = tracing::info_span!("caller");
            let (map, mut md) = caller.in_scope(|| {
                let mut md = MetadataMap::new();
                inject_metadata(&mut md);
                (current_context_map(), md)
            });
            let tp = &map[TRACEPARENT];
            assert_eq!(tp.len(), 55, "{tp}");
            assert!(tp.starts_with("00-") && tp.ends_with("-01"), "sampled W3C version 00: {tp}");
            assert_eq!(md.get(TRACEPARENT).unwrap().to_str().unwrap(), tp);
            assert_eq!(trace_id(&caller).as_deref(), Some(&tp[3..35]));

            let from_map = tracing::info_span!("from_map");
            assert!(set_parent_from_map(&from_map, &map));
            from_map.in_scope(|| tracing::info_span!("grandchild").in_scope(|| ()));
            let from_metadata = tracing::info_span!("from_metadata");
            md.insert("other", "x".parse().unwrap());
            assert!(set_parent_from_metadata(&from_metadata, &md));
            drop((from_map, from_metadata, caller));
        });
        let (trace, caller, _) = ended.get("caller");
        for name in ["from_map", "from_metadata"] {
            let (t, _, parent) = ended.get(name);
            assert_eq!((t, parent), (trace, caller), "{name}: same trace, the caller as parent");
        }
        let (t, _, parent) = ended.get("grandchild");
        assert_eq!((t, parent), (trace, ended.get("from_map").1), "children follow the adopted parent");
    }

    #[test]
    fn a_malformed_or_missing_traceparent_starts_a_new_trace() {
        let ended = traced(|| {
            for (name, tp) in [
                ("bad_hex", "00-zz000000000000000000000000000000-0000000000000001-01"),
                ("zero_trace", "00-00000000000000000000000000000000-0000000000000001-01"),
                ("short", "00-abc-01"),
            ] {
                let span = tracing::info_span!("s", case = name);
                let map = HashMap::from([(TRACEPARENT.to_string(), tp.to_string())]);
                assert!(!set_parent_from_map(&span, &map), "{name} taken");
                let mut md = MetadataMap::new();
                md.insert(TRACEPARENT, tp.parse().unwrap());
                assert!(!set_parent_from_metadata(&span, &md), "{name} taken from metadata");
            }
            let lone = tracing::info_span!("lone");
            assert!(!set_parent_from_map(&lone, &HashMap::new()));
            assert!(!set_parent_from_metadata(&lone, &MetadataMap::new()));
            assert!(trace_id(&lone).is_some(), "still a recorded span");
        });
        let (t, _, parent) = ended.get("lone");
        assert_ne!(t, TraceId::INVALID);
        assert_eq!(parent, SpanId::INVALID, "a root");
        assert!(ended.0.lock().unwrap().iter().filter(|(n, ..)| n == "s").all(|(_, t, _, p)| *t != TraceId::INVALID && *p == SpanId::INVALID));
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_carried() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("plain");
            let _in = span.enter();
            assert!(current_context_map().is_empty());
            let mut md = MetadataMap::new();
            inject_metadata(&mut md);
            assert!(md.is_empty());
            assert_eq!(current_trace_id(), None);
            let map = HashMap::from([(TRACEPARENT.to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string())]);
            assert!(!set_parent_from_map(&tracing::info_span!("other"), &map), "no layer: nothing to adopt into");
        });
    }

    #[test]
    fn an_unsampled_caller_passes_its_decision_on() {
        let ended = traced(|| {
            let span = tracing::info_span!("remote_unsampled");
            let map = HashMap::from([(TRACEPARENT.to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".to_string())]);
            assert!(set_parent_from_map(&span, &map));
            let tp = span.in_scope(current_context_map).remove(TRACEPARENT).unwrap();
            assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && tp.ends_with("-00"), "{tp}");
        });
        assert!(ended.0.lock().unwrap().is_empty(), "the parent-based default records nothing of an unsampled trace");
    }
}
