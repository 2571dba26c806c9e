//! The worker's Prometheus metrics (labelled by worker id, so the in-process workers of an
//! embedded coordinator stay apart), each described once with its unit: jobs prepared and
//! refused, the job running, this rank's step latency, time waiting on collectives and bytes
//! sent to the other ranks.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use tessera_telemetry::STEP_BUCKETS;

/// The metrics (cheap to clone: every field is a handle).
#[derive(Clone)]
pub struct WorkerMetrics {
    jobs: IntCounterVec,
    busy: IntGaugeVec,
    step_duration: HistogramVec,
    collective_wait: prometheus::CounterVec,
    collective_bytes: IntCounterVec,
}

impl WorkerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            jobs: IntCounterVec::new(
                Opts::new("tessera_worker_jobs_total", "Jobs this worker was asked to prepare, by outcome: prepared or refused (jobs)."),
                &["worker", "outcome"],
            )?,
            busy: IntGaugeVec::new(Opts::new("tessera_worker_busy", "Whether the worker runs a job now (0 or 1)."), &["worker"])?,
            step_duration: HistogramVec::new(
                HistogramOpts::new("tessera_worker_step_duration_seconds", "Wall time of one denoising step on this rank (seconds).")
                    .buckets(STEP_BUCKETS.to_vec()),
                &["worker"],
            )?,
            collective_wait: prometheus::CounterVec::new(
                Opts::new(
                    "tessera_collective_wait_seconds_total",
                    "Time this rank spent waiting on collectives (ring passes, all-to-alls) during steps (seconds).",
                ),
                &["worker"],
            )?,
            collective_bytes: IntCounterVec::new(
                Opts::new("tessera_collective_bytes_total", "Bytes this rank sent to the other ranks of its jobs (bytes)."),
                &["worker"],
            )?,
        };
        registry.register(Box::new(m.jobs.clone()))?;
        registry.register(Box::new(m.busy.clone()))?;
        registry.register(Box::new(m.step_duration.clone()))?;
        registry.register(Box::new(m.collective_wait.clone()))?;
        registry.register(Box::new(m.collective_bytes.clone()))?;
        Ok(m)
    }

    /// The metrics of this process, registered in Prometheus' default registry on first use.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<WorkerMetrics> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Self::new(prometheus::default_registry()).unwrap_or_else(|_| Self::new(&Registry::new()).expect("fresh registry"))).clone()
    }

    /// Makes `worker`'s series exist (zeros) before its first job.
    pub fn introduce(&self, worker: &str) {
        for outcome in ["prepared", "refused"] {
            self.jobs.with_label_values(&[worker, outcome]);
        }
        self.busy.with_label_values(&[worker]).set(0);
        self.collective_bytes.with_label_values(&[worker]);
        self.collective_wait.with_label_values(&[worker]);
    }

    /// A PrepareJob ended: `prepared` or refused.
    pub fn prepare(&self, worker: &str, prepared: bool) {
        self.jobs.with_label_values(&[worker, if prepared { "prepared" } else { "refused" }]).inc();
    }

    /// The worker started (true) or ended (false) running a job.
    pub fn set_busy(&self, worker: &str, busy: bool) {
        self.busy.with_label_values(&[worker]).set(i64::from(busy));
    }

    /// One step on this rank: its wall time, time waiting on collectives, bytes sent.
    pub fn step(&self, worker: &str, seconds: f64, waiting: f64, bytes_sent: u64) {
        self.step_duration.with_label_values(&[worker]).observe(seconds);
        self.collective_wait.with_label_values(&[worker]).inc_by(waiting.max(0.0));
        self.collective_bytes.with_label_values(&[worker]).inc_by(bytes_sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn metrics_move_per_worker_and_are_described_once_with_their_unit() {
        let r = Registry::new();
        let m = WorkerMetrics::new(&r).unwrap();
        m.introduce("w0");
        m.prepare("w0", true);
        m.set_busy("w0", true);
        m.step("w0", 0.04, 0.01, 4096);
        m.step("w0", 0.05, 0.02, 4096);
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "tessera_worker_jobs_total{outcome=\"prepared\",worker=\"w0\"} 1",
            "tessera_worker_jobs_total{outcome=\"refused\",worker=\"w0\"} 0",
            "tessera_worker_busy{worker=\"w0\"} 1",
            "tessera_worker_step_duration_seconds_count{worker=\"w0\"} 2",
            "tessera_collective_bytes_total{worker=\"w0\"} 8192",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert_eq!(helps.len(), 5);
        assert!(helps.iter().all(|h| h.ends_with(").")), "{helps:#?}");
    }
}
