//! `tessera`: the command-line entry point: `generate` (a video on this machine), golden checks
//! and benchmarks (`serve` and `status` as the cluster lands).

mod cli;
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
    /// Generate a video from a prompt on this machine (CPU), writing MP4, GIF or PNG frames.
    Generate(cli::generate::GenerateArgs),
    /// Run golden reference cases and compare with their stated tolerance.
    Golden(cli::golden::GoldenArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tessera_kernels::threads::init_threads(cli.threads) {
        eprintln!("error: --threads {}: {e}", cli.threads);
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Golden(args) => cli::golden::run(args),
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
