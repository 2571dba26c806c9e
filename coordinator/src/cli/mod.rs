//! The subcommands of `tessera` (`golden`, `bench` and the in-process workers need the
//! `embedded` feature).

#[cfg(feature = "embedded")]
pub mod bench;
#[cfg(feature = "embedded")]
mod bench_sharded;
#[cfg(feature = "embedded")]
mod bench_text;
#[cfg(feature = "embedded")]
mod bench_timing;
#[cfg(feature = "embedded")]
mod bench_vae;
#[cfg(feature = "embedded")]
mod embedded;
mod flags;
pub mod generate;
#[cfg(feature = "embedded")]
pub mod golden;
pub mod plan;
mod reattach;
mod remote;
pub mod serve;
pub mod status;
pub mod watch;
