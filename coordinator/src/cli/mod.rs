//! The subcommands of `tessera`.

pub mod bench;
pub mod golden;
