//! `tessera`: the command-line entry point: `generate` (a video on this machine, or through a
//! coordinator), `serve` (the coordinator's public gRPC server), `status`, `watch`, `plan`, golden
//! checks and benchmarks. Built without the `embedded` feature (the coordinator image), it has no
//! models: `serve --etcd`, `status`, `watch`, `plan` and `generate --server` only.

mod cli;
#[cfg(feature = "embedded")]
mod sys;

use clap::{Parser, Subcommand};

/// Tessera: serving Wan 2.1 video diffusion transformers.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    /// CPU threads for compute (0 = one per core).
    #[arg(long, global = true, env = "TESSERA_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a video from a prompt on this machine (CPU or GPU, --device) or through a
    /// coordinator (--server), writing MP4, GIF or PNG frames.
    Generate(Box<cli::generate::GenerateArgs>),
    /// Serve the public gRPC API (Generate, WatchJob, GetJob, CancelJob, ListWorkers, ListJobs; health,
    /// reflection), with jobs on in-process workers or, with --etcd, on `tessera-worker`
    /// services found through etcd.
    Serve(Box<cli::serve::ServeArgs>),
    /// Show a coordinator's health, workers and jobs.
    Status(cli::status::StatusArgs),
    /// Reattach to a job on a coordinator: its progress from now on and its whole output.
    Watch(cli::watch::WatchArgs),
    /// Whether a job fits a group of devices and how long it will take: tokens, FLOPs, per-rank
    /// memory, bytes moved, predicted seconds, the best plan; --calibration against published
    /// figures.
    Plan(Box<cli::plan::PlanArgs>),
    /// Run golden reference cases and compare with their stated tolerance.
    #[cfg(feature = "embedded")]
    Golden(cli::golden::GoldenArgs),
    /// Benchmarks that print figures.
    #[cfg(feature = "embedded")]
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tessera_cluster::threads::init_threads(cli.threads) {
        eprintln!("error: --threads {}: {e}", cli.threads);
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(*args),
        Command::Serve(args) => cli::serve::run(*args),
        Command::Status(args) => cli::status::run(args),
        Command::Watch(args) => cli::watch::run(args),
        Command::Plan(args) => cli::plan::run(*args),
        #[cfg(feature = "embedded")]
        Command::Golden(args) => cli::golden::run(args),
        #[cfg(feature = "embedded")]
        Command::Bench(cmd) => cli::bench::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
