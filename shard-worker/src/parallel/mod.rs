//! Sequence parallelism: the token sequence of a job is split into contiguous ranges over ranks,
//! and self-attention joins the shards by ring, Ulysses or both (USP). Collectives run over a
//! transport: in-process threads (tests) or TCP between worker processes.

mod attention;
mod comm;
pub mod device;
mod forward;
mod plan;
mod tcp;
mod transport;

pub use attention::{AttentionTimings, ShardedAttention};
pub use comm::{bytes_to_f32, f32_to_bytes, CommCounts, CommStats, Communicator, PendingRecv, RingTicket, Traffic};
pub use forward::{missing_nccl_id, run_in_process, run_local_group, LocalTransport, ShardContext};
pub use plan::{shard_ranges, ParallelPlan};
pub use tcp::{TcpOptions, TcpTransport, PROTOCOL_VERSION};
pub use transport::{InProcessTransport, Transport};
