//! The coordinator's Prometheus metrics, each described once with its unit: the queue, jobs by
//! outcome and their latency, per-phase and per-step latency, tokens processed and the last job's
//! throughput, workers by state, failures by cause. Gauges that mirror state (queue depth,
//! workers) are refreshed when scraped.

use crate::CoordinatorError;
use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::time::Duration;
use tessera_proto::v1::{Worker, WorkerState};
use tessera_telemetry::STEP_BUCKETS;

/// Latency buckets in seconds, from a fast tiny job to a long high-resolution one.
const JOB_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0];

/// The metrics (cheap to clone: every field is a handle).
#[derive(Clone)]
pub struct CoordinatorMetrics {
    queue_depth: IntGauge,
    queue_held: IntGauge,
    jobs_running: IntGauge,
    jobs: IntCounterVec,
    job_duration: HistogramVec,
    phase_duration: HistogramVec,
    step_duration: Histogram,
    tokens: IntCounter,
    tokens_per_second: Gauge,
    workers: IntGaugeVec,
    failures: IntCounterVec,
    rejected: IntCounterVec,
    predicted_duration: Histogram,
    run_duration: Histogram,
    prediction_ratio: Histogram,
    prediction_error: Gauge,
    store_owner: IntGauge,
}

/// Buckets of actual over predicted run time: within 10 % in the middle, factors out to 100.
const RATIO_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0, 4.0, 10.0, 100.0];

fn metric_error(e: prometheus::Error) -> CoordinatorError {
    CoordinatorError::Internal(format!("registering a metric: {e}"))
}

impl CoordinatorMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, CoordinatorError> {
        let m = Self {
            queue_depth: IntGauge::new("tessera_queue_depth", "Jobs waiting in the queue (jobs).").map_err(metric_error)?,
            queue_held: IntGauge::new("tessera_queue_held", "Jobs waiting in the queue only because their tenant runs its --max-running-per-tenant (jobs).")
                .map_err(metric_error)?,
            jobs_running: IntGauge::new("tessera_jobs_running", "Jobs running now (jobs).").map_err(metric_error)?,
            store_owner: IntGauge::new(
                "tessera_store_owner",
                "Whether this coordinator owns its state store: 1, or 0 while it stands by for it or has none (boolean).",
            )
            .map_err(metric_error)?,
            jobs: IntCounterVec::new(Opts::new("tessera_jobs_total", "Jobs ended, by outcome (succeeded, failed, cancelled) (jobs)."), &["outcome"])
                .map_err(metric_error)?,
            job_duration: HistogramVec::new(
                HistogramOpts::new("tessera_job_duration_seconds", "Time from a job's acceptance to its end, by outcome (seconds).")
                    .buckets(JOB_BUCKETS.to_vec()),
                &["outcome"],
            )
            .map_err(metric_error)?,
            phase_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tessera_phase_duration_seconds",
                    "Time a succeeded job spent in each phase: queued, preparing, denoising, decoding, encoding (seconds).",
                )
                .buckets(JOB_BUCKETS.to_vec()),
                &["phase"],
            )
            .map_err(metric_error)?,
            step_duration: Histogram::with_opts(
                HistogramOpts::new("tessera_step_duration_seconds", "Wall time of one denoising step across the job's ranks (seconds).")
                    .buckets(STEP_BUCKETS.to_vec()),
            )
            .map_err(metric_error)?,
            tokens: IntCounter::new("tessera_tokens_total", "Video tokens through the transformer: tokens x forwards per step x steps (tokens).")
                .map_err(metric_error)?,
            tokens_per_second: Gauge::new("tessera_tokens_per_second", "Denoising throughput of the last succeeded job (tokens per second).")
                .map_err(metric_error)?,
            workers: IntGaugeVec::new(Opts::new("tessera_workers", "Workers known to the coordinator, by state (workers)."), &["state"])
                .map_err(metric_error)?,
            failures: IntCounterVec::new(Opts::new("tessera_job_failures_total", "Accepted jobs that did not succeed, by cause (jobs)."), &["cause"])
                .map_err(metric_error)?,
            rejected: IntCounterVec::new(
                Opts::new("tessera_requests_rejected_total", "Generate requests refused before acceptance, by cause (requests)."),
                &["cause"],
            )
            .map_err(metric_error)?,
            predicted_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tessera_job_predicted_seconds",
                    "The planner's run time (preparing, denoising, decoding) of each succeeded job it planned (seconds).",
                )
                .buckets(JOB_BUCKETS.to_vec()),
            )
            .map_err(metric_error)?,
            run_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tessera_job_run_seconds",
                    "Actual run time (preparing, denoising, decoding) of each succeeded job the planner planned (seconds).",
                )
                .buckets(JOB_BUCKETS.to_vec()),
            )
            .map_err(metric_error)?,
            prediction_ratio: Histogram::with_opts(
                HistogramOpts::new("tessera_job_prediction_ratio", "Actual over predicted run time of each succeeded planned job (ratio; 1 is exact).")
                    .buckets(RATIO_BUCKETS.to_vec()),
            )
            .map_err(metric_error)?,
            prediction_error: Gauge::new("tessera_job_prediction_error", "Actual over predicted run time minus 1, of the last succeeded planned job (ratio).")
                .map_err(metric_error)?,
        };
        registry.register(Box::new(m.queue_depth.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.queue_held.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.predicted_duration.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.run_duration.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.prediction_ratio.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.prediction_error.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.jobs_running.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.store_owner.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.jobs.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.job_duration.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.phase_duration.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.step_duration.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.tokens.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.tokens_per_second.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.workers.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.failures.clone())).map_err(metric_error)?;
        registry.register(Box::new(m.rejected.clone())).map_err(metric_error)?;
        // Every label value exists from the start, so a scrape before the first job shows zeros.
        for outcome in ["succeeded", "failed", "cancelled"] {
            m.jobs.with_label_values(&[outcome]);
        }
        for state in STATES {
            m.workers.with_label_values(&[state.1]);
        }
        Ok(m)
    }

    /// Metrics on a registry of their own (tests, and servers that export none).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry")
    }

    /// The metrics of this process, registered in Prometheus' default registry on first use.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<CoordinatorMetrics> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Self::new(prometheus::default_registry()).unwrap_or_else(|_| Self::unregistered())).clone()
    }

    /// Jobs waiting now, and of them those held by their tenant's running cap.
    pub fn set_queue_depth(&self, queued: usize, held: usize) {
        self.queue_depth.set(queued as i64);
        self.queue_held.set(held as i64);
    }

    /// Whether this coordinator owns its state store now.
    pub fn set_store_owner(&self, owner: bool) {
        self.store_owner.set(i64::from(owner));
    }

    /// A job took its slot.
    pub fn job_started(&self) {
        self.jobs_running.inc();
    }

    /// A job gave its slot back.
    pub fn job_done(&self) {
        self.jobs_running.dec();
    }

    /// Mirrors the workers' states (called before each scrape).
    pub fn refresh_workers(&self, workers: &[Worker]) {
        for (state, name) in STATES {
            self.workers.with_label_values(&[name]).set(workers.iter().filter(|w| w.state == state as i32).count() as i64);
        }
    }

    /// A denoising step took `d`.
    pub fn step(&self, d: Duration) {
        self.step_duration.observe(d.as_secs_f64());
    }

    /// A job succeeded after `total` (since acceptance); `phases` are its phase times and
    /// `tokens` the tokens it put through the transformer in `denoising`.
    pub fn succeeded(&self, total: Duration, phases: [(&str, Duration); 5], tokens: u64, denoising: Duration) {
        self.jobs.with_label_values(&["succeeded"]).inc();
        self.job_duration.with_label_values(&["succeeded"]).observe(total.as_secs_f64());
        for (phase, d) in phases {
            self.phase_duration.with_label_values(&[phase]).observe(d.as_secs_f64());
        }
        self.tokens.inc_by(tokens);
        if denoising > Duration::ZERO {
            self.tokens_per_second.set(tokens as f64 / denoising.as_secs_f64());
        }
    }

    /// A succeeded job the planner had predicted `predicted` for ran `actual` (preparing,
    /// denoising, decoding).
    pub fn prediction(&self, predicted: Duration, actual: Duration) {
        let (p, a) = (predicted.as_secs_f64(), actual.as_secs_f64());
        self.predicted_duration.observe(p);
        self.run_duration.observe(a);
        if p > 0.0 {
            self.prediction_ratio.observe(a / p);
            self.prediction_error.set(a / p - 1.0);
        }
    }

    /// An accepted job ended without succeeding (`cancelled` when it was stopped).
    pub fn ended_badly(&self, total: Duration, error: &CoordinatorError, cancelled: bool) {
        let outcome = if cancelled { "cancelled" } else { "failed" };
        self.jobs.with_label_values(&[outcome]).inc();
        self.job_duration.with_label_values(&[outcome]).observe(total.as_secs_f64());
        self.failures.with_label_values(&[cause(error)]).inc();
    }

    /// A request was refused before acceptance.
    pub fn rejected(&self, error: &CoordinatorError) {
        self.rejected.with_label_values(&[cause(error)]).inc();
    }
}

/// Worker states and their label values.
const STATES: [(WorkerState, &str); 4] =
    [(WorkerState::Starting, "starting"), (WorkerState::Idle, "idle"), (WorkerState::Busy, "busy"), (WorkerState::Draining, "draining")];

/// A short, stable label for what went wrong.
pub fn cause(e: &CoordinatorError) -> &'static str {
    match e {
        CoordinatorError::InvalidArgument { .. } | CoordinatorError::InvalidInputVideo { .. } => "invalid_argument",
        CoordinatorError::Cluster(tessera_cluster::ClusterError::InvalidInput { .. }) => "invalid_argument",
        CoordinatorError::Cluster(tessera_cluster::ClusterError::Membership(_)) => "unavailable",
        CoordinatorError::Cluster(tessera_cluster::ClusterError::Shape(_)) => "internal",
        CoordinatorError::InvalidVideo { .. } | CoordinatorError::Encode { .. } | CoordinatorError::Io { .. } => "output",
        CoordinatorError::WorkerFailed { .. } => "worker_failed",
        CoordinatorError::WorkersBusy { .. } => "workers_busy",
        CoordinatorError::WorkersDraining { .. } => "workers_draining",
        CoordinatorError::QueueFull { .. } => "queue_full",
        CoordinatorError::TenantQueueFull { .. } => "tenant_queue_full",
        CoordinatorError::PriorityNotAllowed { .. } => "priority_not_allowed",
        CoordinatorError::InputFramesFull { .. } => "input_frames_full",
        CoordinatorError::DoesNotFit(_) => "does_not_fit",
        CoordinatorError::NotFound { .. } => "not_found",
        CoordinatorError::Unauthenticated(_) => "unauthenticated",
        CoordinatorError::Cancelled(_) => "cancelled",
        CoordinatorError::DeadlineExceeded(_) => "deadline_exceeded",
        CoordinatorError::Unavailable(_) => "unavailable",
        CoordinatorError::Store(_) => "state_store",
        CoordinatorError::Superseded(_) => "superseded",
        CoordinatorError::OutputGone { .. } => "output_gone",
        CoordinatorError::Internal(_) => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn metrics_move_and_are_described_once_with_their_unit() {
        let r = Registry::new();
        let m = CoordinatorMetrics::new(&r).unwrap();
        let before = text(&r);
        assert!(before.contains("tessera_jobs_total{outcome=\"succeeded\"} 0"), "{before}");
        m.set_queue_depth(3, 1);
        m.job_started();
        m.refresh_workers(&[
            Worker { state: WorkerState::Idle as i32, ..Default::default() },
            Worker { state: WorkerState::Busy as i32, ..Default::default() },
        ]);
        m.step(Duration::from_millis(40));
        let phases = [
            ("queued", Duration::ZERO),
            ("preparing", Duration::from_millis(5)),
            ("denoising", Duration::from_secs(2)),
            ("decoding", Duration::from_millis(50)),
            ("encoding", Duration::from_millis(5)),
        ];
        m.succeeded(Duration::from_secs(3), phases, 1000, Duration::from_secs(2));
        m.ended_badly(Duration::from_secs(1), &CoordinatorError::Cancelled("x".into()), true);
        m.rejected(&CoordinatorError::invalid_argument("width", "bad"));
        m.prediction(Duration::from_secs(2), Duration::from_millis(2500));
        m.set_store_owner(true);
        let after = text(&r);
        for line in [
            "tessera_store_owner 1",
            "tessera_queue_depth 3",
            "tessera_queue_held 1",
            "tessera_jobs_running 1",
            "tessera_workers{state=\"idle\"} 1",
            "tessera_workers{state=\"busy\"} 1",
            "tessera_workers{state=\"draining\"} 0",
            "tessera_step_duration_seconds_count 1",
            "tessera_jobs_total{outcome=\"succeeded\"} 1",
            "tessera_jobs_total{outcome=\"cancelled\"} 1",
            "tessera_tokens_total 1000",
            "tessera_tokens_per_second 500",
            "tessera_job_failures_total{cause=\"cancelled\"} 1",
            "tessera_requests_rejected_total{cause=\"invalid_argument\"} 1",
            "tessera_phase_duration_seconds_count{phase=\"denoising\"} 1",
            "tessera_job_predicted_seconds_sum 2",
            "tessera_job_run_seconds_sum 2.5",
            "tessera_job_prediction_ratio_bucket{le=\"1.25\"} 1",
            "tessera_job_prediction_ratio_bucket{le=\"1.1\"} 0",
            "tessera_job_prediction_error 0.25",
        ] {
            assert!(after.lines().any(|l| l == line), "{line} missing:\n{after}");
        }
        // One HELP line per metric, each naming its unit.
        let helps: Vec<&str> = after.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert_eq!(helps.len(), 17, "{helps:#?}");
        for h in helps {
            assert!(h.ends_with(").") && h.contains('('), "no unit in {h}");
        }
    }
}
