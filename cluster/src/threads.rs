//! Process-wide CPU thread pool used by every parallel kernel (and the coordinator's encoders).

/// Configures the global pool with `threads` workers (0 = one per core). Must be called before
/// the first parallel kernel; calling it again with the same count is harmless.
pub fn init_threads(threads: usize) -> Result<(), String> {
    let n = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(e) => Err(format!("cannot set {n} threads, the pool already has {}: {e}", rayon::current_num_threads())),
    }
}

/// Number of threads kernels will use.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}
