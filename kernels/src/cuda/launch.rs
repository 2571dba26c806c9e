//! What the launch wrappers share: launch shapes, buffer-length and alignment checks, device
//! pointers of optional arguments, and launching with the error mapped.

use super::CudaDevice;
use crate::{KernelError, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, SyncOnDrop};

/// Threads per block of the element-wise and per-row kernels.
pub(crate) const THREADS: u32 = 256;

/// A grid-stride launch over `n` elements: enough blocks to fill the device, no more than needed.
pub(crate) fn elementwise(dev: &CudaDevice, n: usize) -> Result<LaunchConfig> {
    let fill = dev.multiprocessors() * 8;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, fill.max(1));
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Blocks striding over `rows` rows (as many as fill the device), threads over a row.
pub(crate) fn row_stride(dev: &CudaDevice, rows: usize) -> LaunchConfig {
    let blocks = rows.clamp(1, (dev.multiprocessors() * 8).max(1));
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub(crate) fn per_row(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    let r = u32::try_from(rows).ok().filter(|&r| r < (1 << 31)).ok_or_else(|| KernelError::invalid(op, format!("{rows} rows is too many for one launch")))?;
    Ok(LaunchConfig { grid_dim: (r.max(1), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Fails unless the buffer `name` holds at least `need` elements.
pub(crate) fn check_len(op: &'static str, name: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(KernelError::shape(op, format!("{name} has {have} elements, needs {need}")));
    }
    Ok(())
}

/// Fails unless the device address of `name` is a multiple of `bytes`.
pub(crate) fn check_aligned(op: &'static str, name: &str, ptr: u64, bytes: u64) -> Result<()> {
    if !ptr.is_multiple_of(bytes) {
        return Err(KernelError::invalid(op, format!("{name} must start at a multiple of {bytes} bytes (address {ptr:#x})")));
    }
    Ok(())
}

/// A value that fits the kernel's `int` parameter.
pub(crate) fn as_i32(op: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::invalid(op, format!("{name} = {v} does not fit the kernel's 32-bit index")))
}

/// The device address of an input (reads are ordered after earlier writes on `stream`).
pub(crate) fn ptr<'a, T>(v: &'a impl DevicePtr<T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    v.device_ptr(stream)
}

/// The device address of an output.
pub(crate) fn ptr_mut<'a, T>(v: &'a mut impl DevicePtrMut<T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    v.device_ptr_mut(stream)
}

/// The device address of an optional input, 0 (a null pointer to the kernel) when absent.
pub(crate) fn opt_ptr<'a, T, P: DevicePtr<T>>(v: Option<&'a P>, stream: &'a CudaStream) -> (u64, Option<SyncOnDrop<'a>>) {
    match v {
        Some(v) => {
            let (p, g) = v.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// Queues the launch.
pub(crate) fn launch(op: &'static str, mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every wrapper checks, before building `args`, that the buffers hold what the kernel
    // reads and writes for this configuration, and pushes the arguments in the order and with the
    // types of the kernel's C signature.
    unsafe { args.launch(cfg) }.map(drop).map_err(|e| KernelError::cuda(op, e))
}
