use std::time::Instant;
use tessera_kernels::cpu::{conv3d, Conv3dParams, gemm_into, MatRef, Threads};
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (c, co, t, h, w) = (args[0], args[1], args[2], args[3], args[4]);
    let x: Vec<f32> = (0..c * t * h * w).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let wt: Vec<f32> = (0..co * c * 27).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let p = Conv3dParams::new([3, 3, 3]).with_padding([[0, 0], [1, 1], [1, 1]]);
    for _ in 0..3 {
        let s = Instant::now();
        let (y, shape) = conv3d(&x, [c, t, h, w], &wt, None, co, &p).unwrap();
        let dt = s.elapsed().as_secs_f64();
        let flops = 2.0 * (co * c * 27) as f64 * (shape[1] * shape[2] * shape[3]) as f64;
        println!("conv {c}->{co} {t}x{h}x{w}: {:.3}s {:.1} GFLOP/s {}", dt, flops / dt / 1e9, y[0]);
    }
    // raw gemm of the same size for reference
    let n = (t - 2) * h * w;
    let k = c * 27;
    let b: Vec<f32> = (0..k * n.min(20000)).map(|i| (i % 13) as f32).collect();
    let nn = n.min(20000);
    let mut d = vec![0.0f32; co * nn];
    let s = Instant::now();
    gemm_into(&mut d, nn, false, MatRef::row_major(&wt, co, k, k).unwrap(), MatRef::row_major(&b, k, nn, nn).unwrap(), Threads::Pool).unwrap();
    let dt = s.elapsed().as_secs_f64();
    println!("gemm {co}x{k}x{nn}: {:.1} GFLOP/s", 2.0 * (co * k * nn) as f64 / dt / 1e9);
}
