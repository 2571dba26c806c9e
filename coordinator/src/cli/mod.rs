//! The subcommands of `tessera`.

pub mod bench;
mod bench_sharded;
mod bench_text;
mod bench_timing;
mod bench_vae;
mod embedded;
mod flags;
pub mod generate;
pub mod golden;
mod remote;
pub mod serve;
pub mod status;

/// The in-process sequence-parallel flags shared by `generate` and `serve`.
#[derive(clap::Args)]
pub struct RankArgs {
    /// Sequence-parallel ranks for the denoising (in-process workers, threads of this process).
    #[arg(long, env = "TESSERA_RANKS", default_value_t = 1)]
    pub ranks: usize,
    /// Ulysses (all-to-all) degree among the ranks; the rest is ring. Must divide ranks and heads.
    #[arg(long, env = "TESSERA_ULYSSES", default_value_t = 1)]
    pub ulysses: usize,
    /// How the ranks talk: `inproc` (mailboxes) or `tcp` (real sockets on loopback).
    #[arg(long, env = "TESSERA_TRANSPORT", default_value = "inproc")]
    pub transport: String,
}

impl RankArgs {
    /// The transport named by `--transport`.
    pub fn transport(&self) -> anyhow::Result<tessera_worker::parallel::LocalTransport> {
        tessera_worker::parallel::LocalTransport::from_name(&self.transport)
            .ok_or_else(|| anyhow::anyhow!("--transport {}: expected inproc or tcp", self.transport))
    }
}
