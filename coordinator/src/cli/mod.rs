//! The subcommands of `tessera`.

pub mod bench;
mod bench_sharded;
pub mod generate;
pub mod golden;
