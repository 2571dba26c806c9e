//! `tessera status`: what a coordinator is doing: its health, its workers and its jobs.

use super::remote::{connect, status_error};
use anyhow::{Context, Result};
use clap::Args;
use std::process::ExitCode;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{Job, JobState, ListJobsRequest, ListWorkersRequest, Phase, Worker, WorkerState};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Arguments of `tessera status`.
#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's public address (`HOST:PORT` or a URL).
    #[arg(long, env = "TESSERA_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    /// Most jobs to list, newest first.
    #[arg(long, env = "TESSERA_STATUS_LIMIT", default_value_t = 20)]
    limit: u32,
}

fn state_name<T: std::fmt::Debug, E>(s: Result<T, E>) -> String {
    s.map(|v| format!("{v:?}").to_uppercase()).unwrap_or_else(|_| "?".into())
}

fn worker_line(w: &Worker) -> String {
    let job = if w.job_id.is_empty() { String::new() } else { format!("  job {}", w.job_id) };
    format!(
        "  {:<12} {:<9} model {}  {}  {:.1} GiB  {}  v{}{job}",
        w.worker_id,
        state_name(WorkerState::try_from(w.state)),
        w.model,
        w.devices.join(", "),
        w.memory_bytes as f64 / (1u64 << 30) as f64,
        w.address,
        w.version
    )
}

fn job_line(j: &Job) -> String {
    let progress = j.progress.as_ref().map_or(String::new(), |p| {
        let phase = state_name(Phase::try_from(p.phase)).to_lowercase();
        format!("{phase} step {}/{}", p.step, p.total_steps)
    });
    let (prompt, size) = j.request.as_ref().map_or((String::new(), String::new()), |r| {
        let mut prompt: String = r.prompt.chars().take(40).collect();
        if r.prompt.chars().count() > 40 {
            prompt.push('…');
        }
        (prompt, format!("{}x{}x{}", r.width, r.height, r.num_frames))
    });
    let total = j.timings.as_ref().and_then(|t| t.total).map_or(String::new(), |d| format!("  {:.1}s", d.seconds as f64 + d.nanos as f64 * 1e-9));
    let error = if j.error.is_empty() { String::new() } else { format!("  ({})", j.error) };
    let by = if j.tenant.is_empty() { String::new() } else { format!("  by {}", j.tenant) };
    let on = j.plan.as_ref().filter(|p| !p.worker_ids.is_empty()).map_or(String::new(), |p| format!("  on {}", p.worker_ids.join(",")));
    format!("  {}  {:<9} {:<22} {size:<12} {prompt:?}{total}{by}{on}{error}", j.job_id, state_name(JobState::try_from(j.state)), progress)
}

/// Prints the coordinator's health, workers and jobs.
pub fn run(args: StatusArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let channel = connect(&args.server, "--server").await?;
        let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await.map_err(status_error)?.into_inner();
        let serving = ServingStatus::try_from(health.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
        println!("coordinator {}: {serving}", args.server);
        let mut client = TesseraClient::new(channel);
        let workers = client.list_workers(ListWorkersRequest::default()).await.map_err(status_error)?.into_inner().workers;
        println!("workers ({}):", workers.len());
        workers.iter().for_each(|w| println!("{}", worker_line(w)));
        let jobs = client.list_jobs(ListJobsRequest { states: Vec::new(), limit: args.limit }).await.map_err(status_error)?.into_inner().jobs;
        println!("jobs ({}, newest first):", jobs.len());
        jobs.iter().for_each(|j| println!("{}", job_line(j)));
        Ok(ExitCode::SUCCESS)
    })
}
