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
pub use tessera_cluster::codec::NCCL_ID_BYTES;

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
// every call goes through the `Mutex` in `Shared`.
unsafe impl Send for RawComm {}

/// What a communicator and its abort handles share: the handle under its lock, and whether it was
/// aborted (then NCCL has freed it and nobody may use it again).
struct Shared {
    comm: Mutex<RawComm>,
    /// The same handle, for an abort that cannot take the lock (a call blocked inside NCCL).
    raw: usize,
    aborted: AtomicBool,
}

/// One member of an NCCL group on a [`CudaDevice`]. Exchanges run on the device's stream, in order
/// with its kernels; ring hops run on a side stream of this communicator. Every member must make
/// the same calls in the same order.
pub struct NcclComm {
    shared: Arc<Shared>,
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
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NcclAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclAbort(aborted: {})", self.is_aborted())
    }
}

/// How long an abort waits for a call in progress to finish queueing its work (queueing returns at
/// once; only a call blocked inside NCCL, which the abort is there to end, takes longer).
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

impl NcclAbort {
    /// Aborts the communicator (once; later calls, and calls racing this one, do nothing).
    ///
    /// Safe against a concurrent call on the communicator: the flag is set first, then the abort
    /// takes the call lock, so no call can start on the freed handle (every call checks the flag
    /// under the lock). A call already blocked inside NCCL holds the lock; after [`ABORT_GRACE`]
    /// the abort proceeds without it, which is what `ncclCommAbort` exists for: the blocked call
    /// returns an error and its thread, holding the lock, touches the handle no more.
    pub fn abort(&self) {
        if self.shared.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        let deadline = std::time::Instant::now() + ABORT_GRACE;
        let guard = loop {
            match self.shared.comm.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(1)),
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        // SAFETY: the handle is live: only the first abort (this one, by the flag) or the owner's
        // Drop (which claims the same flag first) frees it. With the lock held no other call is in
        // flight; without it, the holder is blocked inside NCCL, which `ncclCommAbort` ends.
        unsafe {
            let _ = sys::ncclCommAbort(self.shared.raw as sys::ncclComm_t);
        }
        drop(guard);
    }

    /// Whether the communicator was aborted.
    pub fn is_aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst)
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

    /// [`init`](Self::init) with a bound on the wait: NCCL's init has no timeout and blocks until
    /// every member has joined, so it runs on a thread of its own and this call gives up after
    /// `timeout` with an error naming it. (The abandoned thread stays blocked in NCCL until its
    /// rendezvous fails; if the group forms after all, the communicator it makes is freed.)
    pub fn init_timeout(dev: Arc<CudaDevice>, id: &NcclId, rank: usize, size: usize, timeout: std::time::Duration) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = *id;
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                // A receiver gone (timed out) drops the communicator, which frees it.
                let _ = tx.send(Self::init(dev, &id, rank, size));
            })
            .map_err(|e| KernelError::cuda("ncclCommInitRank", format!("cannot start the init thread: {e}")))?;
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) => Err(KernelError::cuda(
                "ncclCommInitRank",
                format!("rank {rank} of {size}: the group did not form within {:.0} s (a member never joined)", timeout.as_secs_f64()),
            )),
        }
    }

    fn wrap(dev: Arc<CudaDevice>, comm: sys::ncclComm_t, rank: usize, size: usize) -> Result<Self> {
        let shared = Arc::new(Shared { comm: Mutex::new(RawComm(comm)), raw: comm as usize, aborted: AtomicBool::new(false) });
        let side = match dev.context().new_stream() {
            Ok(s) => s,
            Err(e) => {
                NcclAbort { shared }.abort();
                return Err(KernelError::cuda("new_stream", e));
            }
        };
        Ok(Self { shared, dev, side, rank, size })
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
        NcclAbort { shared: self.shared.clone() }
    }

    /// The handle, for one call: the lock is taken first and the abort flag checked under it, so
    /// an abort (which sets the flag, then takes the lock) never frees a handle a call is using.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RawComm>> {
        let guard = self.shared.comm.lock().map_err(|_| KernelError::cuda("nccl", "communicator lock poisoned"))?;
        if self.shared.aborted.load(Ordering::SeqCst) {
            return Err(KernelError::cuda("nccl", "the communicator was aborted (its job was released or its group failed)"));
        }
        Ok(guard)
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
        if self.shared.aborted.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.dev.synchronize();
        let _ = self.side.synchronize();
        // Claims the handle under the call lock: a concurrent abort now does nothing.
        let guard = self.shared.comm.lock().unwrap_or_else(|p| p.into_inner());
        if !self.shared.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is live (not aborted, by the flag just claimed) and no call
            // on it is in flight (both streams are drained, and this holds the call lock); it is
            // not used after this.
            unsafe {
                let _ = sys::ncclCommDestroy(guard.0);
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
