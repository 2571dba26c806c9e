//! Collectives on the backend's buffers, one trait for sequence parallelism: NCCL between GPUs
//! ([`NcclDeviceComm`]), and the same operations over a host [`Communicator`] for any backend
//! ([`HostDeviceComm`], over in-process or TCP transports): host backends' buffers (the f32 CPU
//! model, the bf16 twin) are read in place, device buffers are staged through host memory — so
//! every parallel plan also runs with its ranks as threads sharing one GPU.

use super::super::comm::{CommStats, Communicator, RingTicket, Traffic};
use super::super::plan::ParallelPlan;
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use tessera_kernels::backend::{at_mut, CudaOps, Elem, Ops};
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

/// A host [`Communicator`] carrying a backend's buffers (values as little-endian bytes): read in
/// place when they live in host memory ([`Ops::host_view`]), else downloaded first; what arrives is
/// written into the destination region ([`Ops::upload_into`]).
pub struct HostDeviceComm<'a> {
    comm: &'a Communicator,
    pending: Mutex<Option<RingTicket>>,
    /// Stage every buffer through a download, even host ones (tests the device path on the CPU).
    always_stage: bool,
}

impl<'a> HostDeviceComm<'a> {
    /// Device collectives over `comm`.
    pub fn new(comm: &'a Communicator) -> Self {
        Self { comm, pending: Mutex::new(None), always_stage: false }
    }

    /// As [`new`](Self::new), staging host buffers through downloads and uploads as device
    /// buffers are: the path a GPU takes, for tests on machines without one.
    pub fn staged(comm: &'a Communicator) -> Self {
        Self { always_stage: true, ..Self::new(comm) }
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Option<RingTicket>>> {
        self.pending.lock().map_err(|_| WorkerError::Collective("ring state lock poisoned".into()))
    }

    /// The values of `buf[..len]` on the host: in place, or downloaded.
    fn read<'b, O: Ops, T: Elem>(&self, ops: &O, buf: &'b O::Buf<T>, len: usize) -> Result<std::borrow::Cow<'b, [T]>> {
        let have = ops.len(buf);
        if len > have {
            return Err(WorkerError::Collective(format!("{len} values of a buffer of {have}")));
        }
        Ok(match ops.host_view(buf).filter(|_| !self.always_stage) {
            Some(v) => std::borrow::Cow::Borrowed(&v[..len]),
            None => {
                let mut all = ops.download(buf)?;
                all.truncate(len);
                std::borrow::Cow::Owned(all)
            }
        })
    }
}

fn encode<T: Elem>(values: &[T]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * T::BYTES as usize);
    T::put_le(values, &mut out);
    Bytes::from(out)
}

/// Writes the values of `bytes` into `dst[range]` on the device, which they must fill exactly.
fn decode_into<O: Ops, T: Elem>(ops: &O, what: &str, bytes: &[u8], dst: &mut O::Buf<T>, range: Range<usize>) -> Result<()> {
    if bytes.len() as u64 != bytes_of::<T>(range.len()) {
        return Err(WorkerError::Collective(format!("{what}: {} bytes arrived for {} values of {} bytes", bytes.len(), range.len(), T::BYTES)));
    }
    Ok(ops.upload_into(&T::get_le(bytes), at_mut(dst, range.start))?)
}

impl<O: Ops> DeviceComm<O> for HostDeviceComm<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn exchange<T: Elem>(
        &self,
        ops: &O,
        traffic: Traffic,
        send: &O::Buf<T>,
        send_parts: &[Range<usize>],
        recv: &mut O::Buf<T>,
        recv_parts: &[Range<usize>],
    ) -> Result<()> {
        let size = self.comm.size();
        check_parts("send", send_parts, size, ops.len(send))?;
        check_parts("receive", recv_parts, size, ops.len(recv))?;
        let host = self.read(ops, send, send_parts.iter().map(|r| r.end).max().unwrap_or(0))?;
        let parts = send_parts.iter().map(|r| encode(&host[r.clone()])).collect();
        let got = self.comm.exchange_bytes(parts, traffic)?;
        for (j, (bytes, r)) in got.iter().zip(recv_parts).enumerate() {
            decode_into(ops, &format!("part from member {j}"), bytes, recv, r.clone())?;
        }
        Ok(())
    }

    fn ring_start<T: Elem>(&self, ops: &O, send: &O::Buf<T>, send_len: usize, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()> {
        if send_len > ops.len(send) || recv_len > ops.len(recv) {
            return Err(WorkerError::Collective(format!(
                "ring hop of {send_len} values from a buffer of {}, {recv_len} into one of {}",
                ops.len(send),
                ops.len(recv)
            )));
        }
        let mut pending = self.pending()?;
        if pending.is_some() {
            return Err(WorkerError::Collective("a ring hop started before the last one was waited for".into()));
        }
        *pending = Some(self.comm.ring_post(encode(&self.read(ops, send, send_len)?))?);
        Ok(())
    }

    fn ring_wait<T: Elem>(&self, ops: &O, recv: &mut O::Buf<T>, recv_len: usize) -> Result<()> {
        let ticket = self.pending()?.take().ok_or_else(|| WorkerError::Collective("ring wait without a hop in flight".into()))?;
        let bytes = self.comm.ring_take(ticket)?;
        let have = ops.len(recv);
        if recv_len > have {
            return Err(WorkerError::Collective(format!("ring block of {recv_len} values into a buffer of {have}")));
        }
        decode_into(ops, "ring block", &bytes, recv, 0..recv_len)
    }
}

/// How long a rank waits for its NCCL group to form. Every rank has passed a barrier on the job's
/// transport just before (`ShardContext::join_device_group`), so this only runs out when a member
/// dies in between; NCCL's own init would wait forever.
pub const NCCL_INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

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

/// The NCCL communicators of one rank of a job: its sequence-parallel group (its CFG half, or
/// every rank), that group's Ulysses and ring groups, and its CFG pair (split from the world).
pub struct NcclGroup {
    /// The rank's sequence-parallel group (output all-gather, the latent's gather to rank 0).
    pub sequence: NcclDeviceComm,
    /// The ranks exchanging heads by all-to-all.
    pub ulysses: NcclDeviceComm,
    /// The ranks passing key/value blocks around.
    pub ring: NcclDeviceComm,
    /// The ranks of both halves holding the same tokens (CFG-parallel; alone otherwise).
    pub cfg: NcclDeviceComm,
}

impl NcclGroup {
    /// Joins the group named by `id` as `rank` of `plan` on the model's device (blocks until all
    /// ranks have joined); bytes are counted in `stats`.
    pub fn join(ops: &CudaOps, id: &NcclId, rank: usize, plan: ParallelPlan, stats: Arc<CommStats>) -> Result<Self> {
        let world = NcclComm::init_timeout(ops.device().clone(), id, rank, plan.ranks(), NCCL_INIT_TIMEOUT)?;
        // ParallelPlan's layout: a CFG half is a run of sequence-parallel ranks; inside it Ulysses
        // groups are runs of `ulysses` consecutive ranks and ring groups take every `ulysses`-th
        // rank; a CFG pair is the ranks of each half at the same place. Each is ranked by position.
        let (half, q, u) = (plan.half(rank), plan.sequence_rank(rank), plan.ulysses);
        let sequence = world.split(half, q)?;
        let ulysses = world.split(rank / u, rank % u)?;
        let ring = world.split(half * u + q % u, q / u)?;
        let cfg = world.split(q, half)?;
        drop(world);
        let wrap = |c| NcclDeviceComm::new(c, stats.clone());
        Ok(Self { sequence: wrap(sequence), ulysses: wrap(ulysses), ring: wrap(ring), cfg: wrap(cfg) })
    }

    /// Handles that abort all three communicators from another thread (see [`NcclAbort`]).
    pub fn abort_handles(&self) -> Vec<NcclAbort> {
        [&self.sequence, &self.ulysses, &self.ring, &self.cfg].iter().map(|c| c.comm.abort_handle()).collect()
    }
}
