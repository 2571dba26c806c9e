//! This CPU's achieved rates, measured in a fraction of a second: f32 GEMM FLOP/s through this
//! crate's GEMM on all threads, and memory copy bandwidth. The planner predicts CPU jobs with
//! them (GPU kinds it knows from datasheets).

use super::activation::Activation;
use super::matmul::linear;
use crate::Result;
use std::time::Instant;
use tessera_cluster::membership::ComputeFigures;

/// Side of the square GEMM timed (2·1024³ FLOPs: large enough to reach the GEMM's rate).
const GEMM_SIDE: usize = 1024;
/// Bytes copied to time memory bandwidth (far past every cache).
const COPY_BYTES: usize = 256 << 20;
/// Runs of each; the fastest counts.
const RUNS: usize = 3;

/// Measures this CPU's GEMM rate and memory bandwidth.
pub fn measure() -> Result<ComputeFigures> {
    let n = GEMM_SIDE;
    let (x, w) = (vec![0.5f32; n * n], vec![0.25f32; n * n]);
    let mut gemm = f64::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        std::hint::black_box(linear(&x, n, n, &w, n, None, Activation::None)?);
        gemm = gemm.min(t.elapsed().as_secs_f64());
    }
    let src = vec![1u8; COPY_BYTES];
    let mut dst = vec![0u8; COPY_BYTES];
    let mut copy = f64::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        copy = copy.min(t.elapsed().as_secs_f64());
    }
    Ok(ComputeFigures { flops: 2.0 * (n * n * n) as f64 / gemm.max(1e-9), bytes_per_s: 2.0 * COPY_BYTES as f64 / copy.max(1e-9) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_positive_and_plausible() {
        let f = super::measure().unwrap();
        // any CPU that runs the tests does more than 0.1 GFLOP/s and copies more than 0.1 GB/s,
        // and none does a PFLOP/s
        assert!(f.flops > 1e8 && f.flops < 1e15, "{f:?}");
        assert!(f.bytes_per_s > 1e8 && f.bytes_per_s < 1e14, "{f:?}");
    }
}
