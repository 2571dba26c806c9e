//! Where the time of sequence-parallel attention goes, summed over calls: what a rank's host
//! thread spent in attention compute, blocked on ring blocks, and in all-to-alls. On a GPU the
//! kernels and NCCL calls are queued, so these are the host's waits, not the device's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Time spent in sharded attention, summed over calls (nanoseconds).
#[derive(Debug, Default)]
pub struct AttentionTimings {
    compute_ns: AtomicU64,
    ring_wait_ns: AtomicU64,
    all_to_all_ns: AtomicU64,
}

/// Which part of sharded attention a span of time belongs to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Phase {
    /// Attention kernels and merges.
    Compute,
    /// Waiting for the next ring block.
    RingWait,
    /// Ulysses all-to-alls (both directions).
    AllToAll,
}

impl AttentionTimings {
    /// (attention compute, waiting for ring blocks, all-to-all), in seconds.
    pub fn seconds(&self) -> (f64, f64, f64) {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        (s(&self.compute_ns), s(&self.ring_wait_ns), s(&self.all_to_all_ns))
    }

    /// Runs `f`, adding its duration to `phase`.
    pub(crate) fn time<T>(&self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        let into = match phase {
            Phase::Compute => &self.compute_ns,
            Phase::RingWait => &self.ring_wait_ns,
            Phase::AllToAll => &self.all_to_all_ns,
        };
        into.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}
