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
