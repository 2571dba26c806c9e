//! The subcommands of `tessera`.

pub mod bench;
mod bench_sharded;
mod bench_vae;
pub mod generate;
pub mod golden;
