//! NCCL between the GPUs of a sequence-parallel group: the unique id that names a group (made by
//! one process, carried to the others as 128 bytes), a communicator per group with grouped
//! send/receive exchanges (all-gather and all-to-all with uneven parts) on the device's stream, and
//! ring hops on a side stream so a transfer runs while the device computes.
//!
//! NCCL is loaded at run time like the rest of CUDA; [`nccl_available`] says whether it is there.
//! `ncclGetUniqueId` needs no GPU, so ids can be made and carried on any machine with the library.

use super::device::CudaDevice;
use crate::{KernelError, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use cudarc::nccl::NcclType;

/// Bytes in an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// Whether the NCCL library (`libnccl.so`) can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library under its known names; nothing is called.
    unsafe { sys::is_culib_present() }
}

fn nccl_missing() -> KernelError {
    KernelError::CudaUnavailable(super::CudaMissing::Nccl)
}

/// The NCCL version, e.g. 22703 for 2.27.3.
pub fn nccl_version() -> Result<i32> {
    if !nccl_available() {
        return Err(nccl_missing());
    }
    cudarc::nccl::result::get_nccl_version().map_err(|e| KernelError::cuda("ncclGetVersion", format!("{e:?}")))
}

/// The id every member of one NCCL group is created with. Made once (by rank 0's process, which
/// hosts NCCL's rendezvous until the group has formed) and sent to the others as bytes.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (starts NCCL's rendezvous listener in this process; needs no GPU).
    pub fn new() -> Result<Self> {
        if !nccl_available() {
            return Err(nccl_missing());
        }
        let id = cudarc::nccl::result::get_uniqueid().map_err(|e| KernelError::cuda("ncclGetUniqueId", format!("{e:?}")))?;
        Ok(Self(id))
    }

    /// The id's 128 bytes, to send to the other members.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    /// An id received as bytes; anything but 128 bytes is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let raw: [u8; NCCL_ID_BYTES] = bytes
            .try_into()
            .map_err(|_| KernelError::invalid("NcclId::from_bytes", format!("an NCCL unique id is {NCCL_ID_BYTES} bytes, not {}", bytes.len())))?;
        Ok(Self(sys::ncclUniqueId { internal: raw.map(|b| b as std::ffi::c_char) }))
    }
}

fn check(op: &'static str, r: sys::ncclResult_t) -> Result<()> {
    if r == sys::ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(KernelError::cuda(op, format!("{r:?}")))
    }
}

/// The raw communicator handle, owned.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// every call goes through the `Mutex` in `NcclComm`.
unsafe impl Send for RawComm {}

/// One member of an NCCL group on a [`CudaDevice`]. Exchanges run on the device's stream, in order
/// with its kernels; ring hops run on a side stream of this communicator. Every member must make
/// the same calls in the same order.
pub struct NcclComm {
    comm: Mutex<RawComm>,
    /// The same handle, for [`NcclAbort`] (which must not wait for the lock).
    abort: NcclAbort,
    dev: Arc<CudaDevice>,
    side: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

/// Aborts a communicator from any thread: its pending and running operations end (a transfer
/// waiting for a dead peer never would), later calls on it fail, and it is freed. For a job that
/// is released or whose group has failed.
#[derive(Clone)]
pub struct NcclAbort {
    raw: usize,
    aborted: Arc<AtomicBool>,
}

impl std::fmt::Debug for NcclAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclAbort(aborted: {})", self.aborted.load(Ordering::SeqCst))
    }
}

impl NcclAbort {
    /// Aborts the communicator (once; later calls do nothing).
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is live (it is freed only here or, when never aborted, by the
            // owner's Drop, which checks the same flag); NCCL allows aborting a communicator whose
            // operations another thread is blocked on.
            unsafe {
                let _ = sys::ncclCommAbort(self.raw as sys::ncclComm_t);
            }
        }
    }

    /// Whether the communicator was aborted.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {} on cuda:{})", self.rank, self.size, self.dev.ordinal())
    }
}

/// Fails unless `r` lies inside a buffer of `len` elements.
fn region(op: &'static str, what: &str, len: usize, r: &Range<usize>) -> Result<()> {
    if r.start > r.end || r.end > len {
        return Err(KernelError::shape(op, format!("{what} {r:?} of a buffer of {len}")));
    }
    Ok(())
}

impl NcclComm {
    /// Joins the group named by `id` as `rank` of `size` (blocks until every member has joined).
    pub fn init(dev: Arc<CudaDevice>, id: &NcclId, rank: usize, size: usize) -> Result<Self> {
        const OP: &str = "ncclCommInitRank";
        if !nccl_available() {
            return Err(nccl_missing());
        }
        if rank >= size {
            return Err(KernelError::invalid(OP, format!("rank {rank} of a group of {size}")));
        }
        dev.context().bind_to_thread().map_err(|e| KernelError::cuda(OP, e))?;
        let (n, r) = (i32::try_from(size).map_err(|_| KernelError::invalid(OP, "group too large"))?, rank as i32);
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId (possibly via
        // bytes); the device's context is current on this thread.
        check(OP, unsafe { sys::ncclCommInitRank(&mut comm, n, id.0, r) })?;
        Self::wrap(dev, comm, rank, size)
    }

    fn wrap(dev: Arc<CudaDevice>, comm: sys::ncclComm_t, rank: usize, size: usize) -> Result<Self> {
        let side = dev.context().new_stream().map_err(|e| KernelError::cuda("new_stream", e))?;
        let abort = NcclAbort { raw: comm as usize, aborted: Arc::new(AtomicBool::new(false)) };
        Ok(Self { comm: Mutex::new(RawComm(comm)), abort, dev, side, rank, size })
    }

    /// A subgroup: the members that give the same `color` form one communicator, ranked by `key`
    /// (every member of this group must call it).
    pub fn split(&self, color: usize, key: usize) -> Result<Self> {
        const OP: &str = "ncclCommSplit";
        let comm = self.lock()?;
        self.dev.context().bind_to_thread().map_err(|e| KernelError::cuda(OP, e))?;
        let mut sub = std::ptr::null_mut();
        // SAFETY: `comm.0` is a live communicator (held under its lock); `sub` is a valid
        // out-pointer; a null config inherits the parent's.
        check(OP, unsafe { sys::ncclCommSplit(comm.0, color as i32, key as i32, &mut sub, std::ptr::null_mut()) })?;
        let mut n = 0;
        let mut r = 0;
        // SAFETY: `sub` was just created by ncclCommSplit.
        check("ncclCommCount", unsafe { sys::ncclCommCount(sub, &mut n) })?;
        // SAFETY: as above.
        check("ncclCommUserRank", unsafe { sys::ncclCommUserRank(sub, &mut r) })?;
        Self::wrap(self.dev.clone(), sub, r as usize, n as usize)
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Members in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbort {
        self.abort.clone()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RawComm>> {
        if self.abort.is_aborted() {
            return Err(KernelError::cuda("nccl", "the communicator was aborted (its job was released or its group failed)"));
        }
        self.comm.lock().map_err(|_| KernelError::cuda("nccl", "communicator lock poisoned"))
    }

    /// Sends `send[send_parts[j]]` to member `j` and receives member `j`'s part into
    /// `recv[recv_parts[j]]`, for every member at once (one NCCL group call; this member's own part
    /// is a device copy). Part lengths must agree pairwise between members. Queued on the device's
    /// stream.
    pub fn exchange<T: NcclType + cudarc::driver::DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        send_parts: &[Range<usize>],
        recv: &mut CudaSlice<T>,
        recv_parts: &[Range<usize>],
    ) -> Result<()> {
        const OP: &str = "nccl exchange";
        if send_parts.len() != self.size || recv_parts.len() != self.size {
            return Err(KernelError::shape(OP, format!("{} send and {} receive parts in a group of {}", send_parts.len(), recv_parts.len(), self.size)));
        }
        for (p, r) in send_parts.iter().enumerate() {
            region(OP, &format!("send part {p}"), send.len(), r)?;
        }
        for (p, r) in recv_parts.iter().enumerate() {
            region(OP, &format!("receive part {p}"), recv.len(), r)?;
        }
        let me = self.rank;
        if send_parts[me].len() != recv_parts[me].len() {
            return Err(KernelError::shape(OP, format!("own part: {} sent, {} expected", send_parts[me].len(), recv_parts[me].len())));
        }
        let stream = self.dev.stream().clone();
        if !send_parts[me].is_empty() {
            let src = send.slice(send_parts[me].clone());
            let mut dst = recv.slice_mut(recv_parts[me].clone());
            stream.memcpy_dtod(&src, &mut dst).map_err(|e| KernelError::cuda(OP, e))?;
        }
        let comm = self.lock()?;
        self.dev.context().bind_to_thread().map_err(|e| KernelError::cuda(OP, e))?;
        let (sp, _gs) = send.device_ptr(&stream);
        let (rp, _gr) = recv.device_ptr_mut(&stream);
        let size = std::mem::size_of::<T>() as u64;
        check("ncclGroupStart", unsafe_group_start())?;
        let mut result = Ok(());
        for peer in (0..self.size).filter(|&p| p != me) {
            let (s, r) = (&send_parts[peer], &recv_parts[peer]);
            if !s.is_empty() {
                // SAFETY: the region lies inside `send` (checked above), which outlives the
                // queued transfer: the caller's buffer is borrowed and stream work precedes any
                // later write or free on the same stream.
                result = result.and(check("ncclSend", unsafe {
                    sys::ncclSend((sp + s.start as u64 * size) as *const _, s.len(), T::as_nccl_type(), peer as i32, comm.0, stream.cu_stream() as _)
                }));
            }
            if !r.is_empty() {
                // SAFETY: as above, for the region of `recv`.
                result = result.and(check("ncclRecv", unsafe {
                    sys::ncclRecv((rp + r.start as u64 * size) as *mut _, r.len(), T::as_nccl_type(), peer as i32, comm.0, stream.cu_stream() as _)
                }));
            }
        }
        let end = check("ncclGroupEnd", unsafe_group_end());
        result.and(end)
    }

    /// Starts one hop of a ring on the side stream: sends `send[..send_len]` to the next member and
    /// receives the previous member's block into `recv[..recv_len]`, after the work already queued
    /// on the device's stream. The device goes on computing; [`ring_wait`](Self::ring_wait) makes
    /// its stream wait for the hop. Neither buffer may be written before then.
    pub fn ring_start<T: NcclType + cudarc::driver::DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        send_len: usize,
        recv: &mut CudaSlice<T>,
        recv_len: usize,
    ) -> Result<()> {
        const OP: &str = "nccl ring hop";
        region(OP, "send", send.len(), &(0..send_len))?;
        region(OP, "receive", recv.len(), &(0..recv_len))?;
        let comm = self.lock()?;
        self.dev.context().bind_to_thread().map_err(|e| KernelError::cuda(OP, e))?;
        // The hop reads what the device stream wrote and overwrites what it read: wait for it.
        self.side.join(self.dev.stream()).map_err(|e| KernelError::cuda(OP, e))?;
        let (next, prev) = ((self.rank + 1) % self.size, (self.rank + self.size - 1) % self.size);
        let (sp, _gs) = send.device_ptr(&self.side);
        let (rp, _gr) = recv.device_ptr_mut(&self.side);
        check("ncclGroupStart", unsafe_group_start())?;
        // SAFETY: both regions lie inside their buffers (checked above); the caller keeps both
        // buffers alive and unwritten until `ring_wait`, which orders the device stream after
        // the hop.
        let s = check("ncclSend", unsafe { sys::ncclSend(sp as *const _, send_len, T::as_nccl_type(), next as i32, comm.0, self.side.cu_stream() as _) });
        // SAFETY: as above.
        let r = check("ncclRecv", unsafe { sys::ncclRecv(rp as *mut _, recv_len, T::as_nccl_type(), prev as i32, comm.0, self.side.cu_stream() as _) });
        let end = check("ncclGroupEnd", unsafe_group_end());
        s.and(r).and(end)
    }

    /// Orders the device's stream after the last hop started by [`ring_start`](Self::ring_start).
    pub fn ring_wait(&self) -> Result<()> {
        self.dev.stream().join(&self.side).map_err(|e| KernelError::cuda("nccl ring wait", e))
    }
}

fn unsafe_group_start() -> sys::ncclResult_t {
    // SAFETY: ncclGroupStart only opens a group on this thread.
    unsafe { sys::ncclGroupStart() }
}

fn unsafe_group_end() -> sys::ncclResult_t {
    // SAFETY: closes the group opened by `unsafe_group_start` on this thread.
    unsafe { sys::ncclGroupEnd() }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.abort.is_aborted() {
            return;
        }
        let _ = self.dev.synchronize();
        let _ = self.side.synchronize();
        // Claims the handle: a concurrent abort now does nothing.
        if !self.abort.aborted.swap(true, Ordering::SeqCst) {
            if let Ok(c) = self.comm.get_mut() {
                // SAFETY: the communicator is live and no call on it is in flight (both streams
                // are drained); it is not used after this.
                unsafe {
                    let _ = sys::ncclCommDestroy(c.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_128_bytes() {
        let raw: Vec<u8> = (0..128).map(|i| (i * 7 % 256) as u8).collect();
        let id = NcclId::from_bytes(&raw).unwrap();
        assert_eq!(id.to_bytes(), raw);
        let err = NcclId::from_bytes(&raw[..100]).unwrap_err().to_string();
        assert!(err.contains("128 bytes, not 100"), "{err}");
    }

    /// NCCL makes ids without a GPU (toolchain.md); CI installs the library, so there it must work.
    #[test]
    fn a_fresh_id_is_made_without_a_gpu_when_nccl_is_installed() {
        if !nccl_available() {
            assert!(std::env::var_os("CI").is_none(), "CI must provide libnccl.so (see .ci/run)");
            eprintln!("libnccl.so is not on the library path: skipped");
            assert!(matches!(NcclId::new(), Err(KernelError::CudaUnavailable(super::super::CudaMissing::Nccl))));
            return;
        }
        let (a, b) = (NcclId::new().unwrap(), NcclId::new().unwrap());
        assert_ne!(a.to_bytes(), b.to_bytes(), "two groups get different ids");
        assert!(a.to_bytes().iter().any(|&x| x != 0));
        assert!(nccl_version().unwrap() >= 21800);
    }
}
