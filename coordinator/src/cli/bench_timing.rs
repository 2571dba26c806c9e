//! What every benchmark shares: the timing options (warm-up runs, timed runs, JSON output) and the
//! loop that times a run and reports its median and minimum.

use anyhow::{bail, Result};
use clap::Args;
use std::time::Instant;

/// Shared timing options.
#[derive(Args, Clone)]
pub struct Timing {
    /// Untimed runs before measuring.
    #[arg(long, env = "TESSERA_BENCH_WARMUP", default_value_t = 1)]
    pub(super) warmup: usize,
    /// Timed runs.
    #[arg(long, env = "TESSERA_BENCH_ITERS", default_value_t = 5)]
    pub(super) iters: usize,
    /// Print one JSON object instead of text.
    #[arg(long, env = "TESSERA_BENCH_JSON")]
    pub(super) json: bool,
}

/// Median and minimum of the timed runs.
pub struct Stats {
    /// Median, ms.
    pub median_ms: f64,
    /// Fastest run, ms.
    pub min_ms: f64,
}

/// Runs `f` `t.warmup` times untimed, then `t.iters` times timed.
pub fn time_runs(t: &Timing, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    if t.iters == 0 {
        bail!("--iters must be at least 1");
    }
    for _ in 0..t.warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(t.iters);
    for _ in 0..t.iters {
        let start = Instant::now();
        f()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Stats { median_ms: ms[ms.len() / 2], min_ms: ms[0] })
}
