//! The subcommands of `tessera`.

pub mod bench;
mod bench_sharded;
mod bench_vae;
mod duration;
pub mod generate;
pub mod golden;
mod remote;
pub mod serve;
pub mod status;
