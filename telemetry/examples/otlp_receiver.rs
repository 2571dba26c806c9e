//! A local OTLP trace receiver for looking at Tessera's spans without a collector: prints its
//! endpoint, then every few seconds the spans received per service and name (and with `-v`
//! each new span). Run: `cargo run -p tessera-telemetry --features test-receiver --example
//! otlp_receiver [-v]`, then start `tessera serve --otlp-endpoint <printed URL>`.

use std::collections::BTreeMap;
use std::time::Duration;
use tessera_telemetry::receiver::TestReceiver;

fn main() -> std::io::Result<()> {
    let verbose = std::env::args().any(|a| a == "-v");
    let receiver = TestReceiver::start()?;
    println!("listening: {}", receiver.endpoint());
    let mut seen = 0;
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let spans = receiver.spans();
        if spans.len() == seen {
            continue;
        }
        if verbose {
            for s in &spans[seen..] {
                let ms = s.end_unix_nano.saturating_sub(s.start_unix_nano) as f64 * 1e-6;
                println!("{} {} {} parent={} {ms:.2} ms {:?}", s.service_name, s.trace_id, s.name, s.parent_span_id, s.attributes);
            }
        }
        seen = spans.len();
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for s in &spans {
            *counts.entry((s.service_name.clone(), s.name.clone())).or_default() += 1;
        }
        println!("{} spans in {} export calls: {counts:?}", spans.len(), receiver.requests());
    }
}
