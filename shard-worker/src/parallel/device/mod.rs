//! Sequence parallelism of the bf16 model on device buffers: the collectives (NCCL between GPUs,
//! or a host communicator under the host emulation), ring/Ulysses/USP attention, and the sharded
//! forward. The same strategies as the CPU model's, with the data staying on the device.

mod attention;
mod comm;
mod forward;
#[cfg(test)]
mod tests;

pub use attention::ShardedDeviceAttention;
pub use comm::{DeviceComm, HostDeviceComm, NcclDeviceComm, NcclGroup};
pub use forward::DeviceShard;
