//! Collectives on the backend's buffers, one trait for sequence parallelism: NCCL between GPUs
//! ([`NcclDeviceComm`]), and the same operations over a host [`Communicator`] for the backends
//! whose buffers live in host memory ([`HostDeviceComm`]: the f32 CPU model and the host twin of
//! the CUDA model), over in-process or TCP transports.

use super::super::comm::{CommStats, Communicator, RingTicket, Traffic};
use super::super::plan::ParallelPlan;
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use tessera_kernels::backend::{CudaOps, Elem, HostBackend, Ops};
use tessera_kernels::cuda::nccl::{NcclAbort, NcclComm, NcclId};
use tessera_kernels::cuda::CudaSlice;

/// The collectives of one group of ranks on device buffers of `O`. Every member makes the same
/// calls in the same order. At most one ring hop is in flight per communicator.
pub trait DeviceComm<O: Ops>: Send + Sync {
    /// This member's position in the group.
    fn rank(&self) -> usize;
    /// Members in the group.
    fn size(&self) -> usize;
    /// Sends `send[send_parts[j]]` to member `j` and receives member `j`'s part into
    /// `recv[recv_parts[j]]`, for every `j` (own part included, as a copy). Part lengths must
    /// agree pairwise; `traffic` says how to count the bytes.
    #[allow(clippy::too_many_arguments)]
    fn exchange<T: Elem>(
        &self,
        ops: &O,
        traffic: Traffic,
        send: &O::Buf<T>,
        send_parts: &[Range<usize>],
        recv: &mut O::Buf<T>,
        recv_parts: &[Range<usize>],
    ) -> Result<()>;
    /// Starts a ring hop: `send[..send_len]` to the next member, the previous member's block into
    /// `recv[..recv_len]`. The caller computes meanwhile, touching neither buffer's regions for
    /// writing, then calls [`ring_wait`](Self::ring_wait) with the same receive buffer.
    fn ring_start<T: Elem>(&self, ops: &O, send: &O::Buf<T>, send_len: usize, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()>;
    /// Completes the hop started last: `recv[..recv_len]` holds the previous member's block.
    fn ring_wait<T: Elem>(&self, ops: &O, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()>;
}

fn check_parts(what: &str, parts: &[Range<usize>], size: usize, len: usize) -> Result<()> {
    if parts.len() != size {
        return Err(WorkerError::Collective(format!("{} {what} parts in a group of {size}", parts.len())));
    }
    match parts.iter().find(|r| r.start > r.end || r.end > len) {
        Some(r) => Err(WorkerError::Collective(format!("{what} part {r:?} of a buffer of {len}"))),
        None => Ok(()),
    }
}

/// Bytes of `count` elements of `T`.
fn bytes_of<T: Elem>(count: usize) -> u64 {
    count as u64 * T::BYTES
}

/// A host [`Communicator`] carrying a host backend's buffers (values as little-endian bytes).
pub struct HostDeviceComm<'a> {
    comm: &'a Communicator,
    pending: Mutex<Option<RingTicket>>,
}

impl<'a> HostDeviceComm<'a> {
    /// Device collectives over `comm`.
    pub fn new(comm: &'a Communicator) -> Self {
        Self { comm, pending: Mutex::new(None) }
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Option<RingTicket>>> {
        self.pending.lock().map_err(|_| WorkerError::Collective("ring state lock poisoned".into()))
    }
}

fn encode<T: Elem>(values: &[T]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * T::BYTES as usize);
    T::put_le(values, &mut out);
    Bytes::from(out)
}

/// Writes the values of `bytes` into `dst`, which they must fill exactly.
fn decode_into<T: Elem>(what: &str, bytes: &[u8], dst: &mut [T]) -> Result<()> {
    if bytes.len() as u64 != bytes_of::<T>(dst.len()) {
        return Err(WorkerError::Collective(format!("{what}: {} bytes arrived for {} values of {} bytes", bytes.len(), dst.len(), T::BYTES)));
    }
    dst.copy_from_slice(&T::get_le(bytes));
    Ok(())
}

impl<O: HostBackend> DeviceComm<O> for HostDeviceComm<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn exchange<T: Elem>(
        &self,
        _ops: &O,
        traffic: Traffic,
        send: &O::Buf<T>,
        send_parts: &[Range<usize>],
        recv: &mut O::Buf<T>,
        recv_parts: &[Range<usize>],
    ) -> Result<()> {
        let (send, recv) = (O::host(send), O::host_mut(recv));
        let size = self.comm.size();
        check_parts("send", send_parts, size, send.len())?;
        check_parts("receive", recv_parts, size, recv.len())?;
        let parts = send_parts.iter().map(|r| encode(&send[r.clone()])).collect();
        let got = self.comm.exchange_bytes(parts, traffic)?;
        for (j, (bytes, r)) in got.iter().zip(recv_parts).enumerate() {
            decode_into(&format!("part from member {j}"), bytes, &mut recv[r.clone()])?;
        }
        Ok(())
    }

    fn ring_start<T: Elem>(&self, _ops: &O, send: &O::Buf<T>, send_len: usize, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()> {
        let (send, recv) = (O::host(send), O::host(recv));
        let (Some(data), true) = (send.get(..send_len), recv_len <= recv.len()) else {
            return Err(WorkerError::Collective(format!(
                "ring hop of {send_len} values from a buffer of {}, {recv_len} into one of {}",
                send.len(),
                recv.len()
            )));
        };
        let mut pending = self.pending()?;
        if pending.is_some() {
            return Err(WorkerError::Collective("a ring hop started before the last one was waited for".into()));
        }
        *pending = Some(self.comm.ring_post(encode(data))?);
        Ok(())
    }

    fn ring_wait<T: Elem>(&self, _ops: &O, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()> {
        let recv = O::host_mut(recv);
        let ticket = self.pending()?.take().ok_or_else(|| WorkerError::Collective("ring wait without a hop in flight".into()))?;
        let bytes = self.comm.ring_take(ticket)?;
        let have = recv.len();
        let dst = recv.get_mut(..recv_len).ok_or_else(|| WorkerError::Collective(format!("ring block of {recv_len} values into a buffer of {have}")))?;
        decode_into("ring block", &bytes, dst)
    }
}

/// NCCL between the GPUs of a group: exchanges on the device's stream, ring hops on a side stream
/// overlapping the attention kernels. Bytes are counted in the job's shared counters.
pub struct NcclDeviceComm {
    comm: NcclComm,
    stats: Arc<CommStats>,
}

impl NcclDeviceComm {
    /// Wraps a communicator; bytes are added to `stats`.
    pub fn new(comm: NcclComm, stats: Arc<CommStats>) -> Self {
        Self { comm, stats }
    }
}

impl DeviceComm<CudaOps> for NcclDeviceComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn exchange<T: Elem>(
        &self,
        _ops: &CudaOps,
        traffic: Traffic,
        send: &CudaSlice<T>,
        send_parts: &[Range<usize>],
        recv: &mut CudaSlice<T>,
        recv_parts: &[Range<usize>],
    ) -> Result<()> {
        self.comm.exchange(send, send_parts, recv, recv_parts)?;
        let me = self.rank();
        let others = |parts: &[Range<usize>]| parts.iter().enumerate().filter(|(j, _)| *j != me).map(|(_, r)| r.len()).sum::<usize>();
        self.stats.record(traffic, bytes_of::<T>(others(send_parts)), bytes_of::<T>(others(recv_parts)));
        Ok(())
    }

    fn ring_start<T: Elem>(&self, _ops: &CudaOps, send: &CudaSlice<T>, send_len: usize, recv: &mut CudaSlice<T>, recv_len: usize) -> Result<()> {
        self.comm.ring_start(send, send_len, recv, recv_len)?;
        self.stats.record(Traffic::Ring, bytes_of::<T>(send_len), bytes_of::<T>(recv_len));
        Ok(())
    }

    fn ring_wait<T: Elem>(&self, _ops: &CudaOps, _recv: &mut CudaSlice<T>, _recv_len: usize) -> Result<()> {
        Ok(self.comm.ring_wait()?)
    }
}

/// The NCCL communicators of one rank of a sequence-parallel job: the world (for the output
/// all-gather), its Ulysses group and its ring group (split from the world).
pub struct NcclGroup {
    /// All ranks.
    pub world: NcclDeviceComm,
    /// The ranks exchanging heads by all-to-all.
    pub ulysses: NcclDeviceComm,
    /// The ranks passing key/value blocks around.
    pub ring: NcclDeviceComm,
}

impl NcclGroup {
    /// Joins the group named by `id` as `rank` of `plan` on the model's device (blocks until all
    /// ranks have joined); bytes are counted in `stats`.
    pub fn join(ops: &CudaOps, id: &NcclId, rank: usize, plan: ParallelPlan, stats: Arc<CommStats>) -> Result<Self> {
        let world = NcclComm::init(ops.device().clone(), id, rank, plan.ranks())?;
        // Ulysses groups are runs of `ulysses` consecutive ranks; ring groups take every
        // `ulysses`-th rank (ParallelPlan's layout), each ranked by position.
        let ulysses = world.split(rank / plan.ulysses, rank % plan.ulysses)?;
        let ring = world.split(rank % plan.ulysses, rank / plan.ulysses)?;
        let wrap = |c| NcclDeviceComm::new(c, stats.clone());
        Ok(Self { world: wrap(world), ulysses: wrap(ulysses), ring: wrap(ring) })
    }

    /// Handles that abort all three communicators from another thread (see [`NcclAbort`]).
    pub fn abort_handles(&self) -> Vec<NcclAbort> {
        [&self.world, &self.ulysses, &self.ring].iter().map(|c| c.comm.abort_handle()).collect()
    }
}
