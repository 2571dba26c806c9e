//! Sequence parallelism: the token sequence of a job is split into contiguous ranges over ranks,
//! and self-attention joins the shards by ring, Ulysses or both (USP), written once over the
//! backend seam and one collective trait (`device`): NCCL between GPUs, or a transport of host
//! messages (in-process threads, or TCP between worker processes).

mod comm;
pub mod device;
mod forward;
mod handshake;
mod plan;
mod tcp;
mod timings;
mod transport;

pub use comm::{bytes_to_f32, f32_to_bytes, CommCounts, CommStats, Communicator, PendingRecv, RingTicket, Traffic};
pub use forward::{missing_nccl_id, run_in_process, run_local_group, LocalTransport, ShardContext, ShardOps};
pub use plan::{shard_ranges, ParallelPlan};
pub use tcp::{TcpOptions, TcpTransport, PROTOCOL_VERSION};
pub use timings::AttentionTimings;
pub use transport::{InProcessTransport, Transport};
