//! An in-process OTLP trace receiver for tests (feature `test-receiver`): serves the collector's
//! `TraceService` over gRPC on a loopback port, on a thread and runtime of its own, and keeps
//! every span it is sent, flattened to [`ReceivedSpan`]s, so a test can check what real
//! processes exported.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// One received span, ids in lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service_name: String,
    /// Every resource attribute of the exporting process.
    pub resource: HashMap<String, String>,
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's attributes, as text.
    pub attributes: HashMap<String, String>,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
    /// The status message when the span's status is ERROR.
    pub error: Option<String>,
}

impl ReceivedSpan {
    /// An attribute's value, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

/// Flattens an export request into spans.
fn flatten(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs.resource.as_ref().map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service_name = resource.get("service.name").cloned().unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attributes(&s.attributes),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    error: s.status.as_ref().filter(|st| st.code == StatusCode::Error as i32).map(|st| st.message.clone()),
                });
            }
        }
    }
    out
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: Request<ExportTraceServiceRequest>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = flatten(request.get_ref());
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).extend(spans);
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver; stops when dropped.
pub struct TestReceiver {
    addr: SocketAddr,
    tls: bool,
    collector: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestReceiver {
    /// Starts a receiver on `127.0.0.1` on a free port.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(None)
    }

    /// Starts a receiver serving TLS with `identity` (a certificate for 127.0.0.1).
    pub fn start_tls(identity: tonic::transport::Identity) -> std::io::Result<Self> {
        Self::start_with(Some(tonic::transport::ServerTlsConfig::new().identity(identity)))
    }

    fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> std::io::Result<Self> {
        let secure = tls.is_some();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(std::io::Error::other)?;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(collector.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name("otlp-receiver".into()).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("otlp receiver: {e}"),
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let served = builder.add_service(service).serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                });
                if let Err(e) = served.await {
                    eprintln!("otlp receiver: {e}");
                }
            })
        })?;
        Ok(Self { addr, tls: secure, collector, stop: Some(stop), thread: Some(thread) })
    }

    /// The URL exporters are given: `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Export calls received so far.
    pub fn requests(&self) -> usize {
        *self.collector.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls until `done` holds for the spans received (then returns them), or `within` has
    /// passed (then returns what came, for the caller's assertion to show).
    pub fn wait_for(&self, within: Duration, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let until = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= until {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The spans of one trace, by span id.
pub struct TraceTree<'a> {
    by_id: HashMap<&'a str, &'a ReceivedSpan>,
}

impl<'a> TraceTree<'a> {
    /// The spans of `spans` in trace `trace_id`.
    pub fn new(spans: &'a [ReceivedSpan], trace_id: &str) -> Self {
        Self { by_id: spans.iter().filter(|s| s.trace_id == trace_id).map(|s| (s.span_id.as_str(), s)).collect() }
    }

    /// Spans in the trace.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when the trace has no span.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The trace's spans named `name`, by start time.
    pub fn named(&self, name: &str) -> Vec<&'a ReceivedSpan> {
        let mut v: Vec<_> = self.by_id.values().copied().filter(|s| s.name == name).collect();
        v.sort_by_key(|s| s.start_unix_nano);
        v
    }

    /// The span's parent in this trace, if received.
    pub fn parent(&self, span: &ReceivedSpan) -> Option<&'a ReceivedSpan> {
        self.by_id.get(span.parent_span_id.as_str()).copied()
    }

    /// True when following parents from `span` (itself excluded) reaches the span `ancestor_id`.
    pub fn descends_from(&self, span: &ReceivedSpan, ancestor_id: &str) -> bool {
        let mut at = span;
        for _ in 0..self.by_id.len() + 1 {
            if at.parent_span_id == ancestor_id {
                return true;
            }
            match self.parent(at) {
                Some(p) => at = p,
                None => return false,
            }
        }
        false
    }

    /// How many spans of each name, sorted by name.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<&str, usize> = HashMap::new();
        for s in self.by_id.values() {
            *m.entry(s.name.as_str()).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        v.sort();
        v
    }
}
