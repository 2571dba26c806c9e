//! `tessera`: the command-line entry point (golden checks and benchmarks today; `generate`,
//! `serve` and `status` as the cluster lands).

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
