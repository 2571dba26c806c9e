//! Sequence parallelism on the backend's buffers: the collectives (NCCL between GPUs, or a host
//! communicator for the host backends), ring/Ulysses/USP attention, and the sharded forward; the
//! data stays where the model runs.

mod attention;
mod comm;
mod forward;
#[cfg(test)]
mod tests;

pub use attention::ShardedDeviceAttention;
pub use comm::{DeviceComm, HostDeviceComm, NcclDeviceComm, NcclGroup};
pub use forward::{gather_rows, swap_with_partner, DeviceShard};
