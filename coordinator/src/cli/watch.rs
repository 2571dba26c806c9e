//! `tessera watch JOB_ID`: reattaches to a job on a coordinator (after the Generate call was lost,
//! or the coordinator restarted): shows its progress from now on and writes its whole output, as
//! `generate --server` would have.

use super::remote::{api_client, format_of, receive, status_error, Reattach, REATTACH_FOR};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_proto::v1::{OutputFormat, WatchJobRequest};

/// Arguments of `tessera watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// The job's id (as `generate` printed it, or `status` lists it).
    job_id: String,
    /// The coordinator's public address (`HOST:PORT` or a URL).
    #[arg(long, env = "TESSERA_SERVER", default_value = "127.0.0.1:50051")]
    server: String,
    /// Where the output goes: a file (MP4, GIF, latents) or a folder for PNG frames; the job's
    /// own output format decides.
    #[arg(long, short = 'o', env = "TESSERA_OUTPUT")]
    output: PathBuf,
    /// No progress bar or progress lines.
    #[arg(long, short = 'q', env = "TESSERA_QUIET")]
    quiet: bool,
    /// When the stream breaks (the coordinator restarted) while the job goes on, how long to wait
    /// for the coordinator to serve again and reattach; 0 never reattaches.
    #[arg(long, env = "TESSERA_REATTACH_FOR", default_value = REATTACH_FOR)]
    reattach_for: String,
}

/// Runs `tessera watch`.
pub fn run(args: WatchArgs) -> Result<ExitCode> {
    if args.job_id.trim().is_empty() {
        anyhow::bail!("JOB_ID: must not be empty");
    }
    let within = tessera_cluster::duration::parse_duration(&args.reattach_for).map_err(|e| anyhow::anyhow!("--reattach-for: {e}"))?;
    let reattach = Reattach { server: args.server.clone(), within };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let mut client = api_client(&args.server).await?;
        let stream = client.watch_job(WatchJobRequest { job_id: args.job_id.clone() }).await.map_err(status_error)?.into_inner();
        let format = format_of(&args.output).unwrap_or(OutputFormat::Mp4);
        receive(stream, &args.output, format, args.quiet, 0, &reattach).await
    })
}
