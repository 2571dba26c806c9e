//! GPU benchmark of the CUDA kernels at Wan 2.1 1.3B's 480p shape (32,760 tokens, hidden 1536):
//! flash attention TFLOP/s (12 heads of 128, and 24 heads of 64) with a check of a slice of query
//! rows against the CPU twin, cuBLASLt GEMM TFLOP/s for the block's projections, the bandwidth of
//! the fused norm and element-wise kernels, and last, on compute capability 9.0, the warpgroup-MMA
//! attention (`TESSERA_CUDA_ATTENTION=wgmma`) at the same shapes. `bench/sdpa_attention.py` measures
//! PyTorch SDPA the same way; `bench/gpu_suite.sh` runs both.
//!
//! Usage: `tessera-gpu-bench [--tokens N] [--iters N] [--device N]`

use half::bf16;
use std::error::Error;
use std::sync::Arc;
use tessera_kernels::cpu::{self, Activation, AttentionShape, Rope3d};
use tessera_kernels::cuda::attention::AttentionKernel;
use tessera_kernels::cuda::norm::{DeviceRopeTable, LayerNormDevParams};
use tessera_kernels::cuda::{self, CudaDevice, CudaSlice};
use tessera_kernels::random::fill_uniform;

type Res<T> = Result<T, Box<dyn Error>>;

struct Args {
    tokens: usize,
    iters: usize,
    device: usize,
}

fn parse_args() -> Res<Args> {
    let mut a = Args { tokens: 32_760, iters: 10, device: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value")).and_then(|v| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}")));
        match flag.as_str() {
            "--tokens" => a.tokens = value()?,
            "--iters" => a.iters = value()?.max(1),
            "--device" => a.device = value()?,
            "-h" | "--help" => {
                println!("tessera-gpu-bench [--tokens N (32760)] [--iters N (10)] [--device N (0)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// Mean milliseconds of `f` over `iters` runs after two warm-up runs, timed with CUDA events.
fn time_ms(dev: &CudaDevice, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    f()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (dev.context().new_event(flags)?, dev.context().new_event(flags)?);
    start.record(dev.stream())?;
    for _ in 0..iters {
        f()?;
    }
    end.record(dev.stream())?;
    Ok(start.elapsed_ms(&end)? as f64 / iters as f64)
}

fn random(n: usize, stream: u64, amp: f32) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    fill_uniform(7, stream, 0, &mut v);
    v.iter_mut().for_each(|x| *x *= amp);
    v
}

fn random_bf16(dev: &CudaDevice, n: usize, stream: u64, amp: f32) -> Res<(Vec<f32>, CudaSlice<bf16>)> {
    let host: Vec<bf16> = random(n, stream, amp).into_iter().map(bf16::from_f32).collect();
    Ok((host.iter().map(|x| x.to_f32()).collect(), dev.upload(&host)?))
}

fn bench_attention(dev: &CudaDevice, kernel: AttentionKernel, tokens: usize, heads: usize, head_dim: usize, iters: usize) -> Res<()> {
    let hd = heads * head_dim;
    let (qh, q) = random_bf16(dev, tokens * hd, 1, 2.0)?;
    let (kh, k) = random_bf16(dev, tokens * hd, 2, 2.0)?;
    let (vh, v) = random_bf16(dev, tokens * hd, 3, 1.0)?;
    let shape = AttentionShape::packed(heads, head_dim, tokens, tokens);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = dev.zeros::<bf16>(tokens * hd)?;
    let mut lse = dev.zeros::<f32>(heads * tokens)?;
    let ms = time_ms(dev, iters, || Ok(cuda::attention::flash_attention_with(dev, kernel, &q, &k, &v, shape, scale, &mut out, hd, &mut lse)?))?;
    let tflops = cuda::attention::attention_flops(&shape) / (ms * 1e-3) / 1e12;
    println!("attention ({kernel:?}) d={head_dim} heads={heads} tokens={tokens}: {ms:.3} ms, {tflops:.1} TFLOP/s (bf16 in, f32 accumulate, bf16 out + lse)");

    // Check the first and last 64 query rows against the CPU twin over all keys.
    let rows = 64.min(tokens);
    let got = dev.download(&out)?;
    let got_lse = dev.download(&lse)?;
    let mut worst = 0.0f32;
    let mut worst_lse = 0.0f32;
    for r0 in [0, tokens - rows] {
        let s = AttentionShape::packed(heads, head_dim, rows, tokens);
        let want = cpu::attention(&qh[r0 * hd..(r0 + rows) * hd], &kh, &vh, s, scale)?;
        for (g, w) in got[r0 * hd..(r0 + rows) * hd].iter().zip(&want.out) {
            worst = worst.max((g.to_f32() - w).abs() - 1.5e-2 * w.abs());
        }
        for h in 0..heads {
            for i in 0..rows {
                let (g, w) = (got_lse[h * tokens + r0 + i], want.lse[h * rows + i]);
                worst_lse = worst_lse.max((g - w).abs() - 1e-4 * w.abs());
            }
        }
    }
    println!("  check vs CPU on {} rows: max(|diff| - 1.5e-2|ref|) = {worst:.2e} (out, tolerance 6e-3), {worst_lse:.2e} (lse, tolerance 1e-4)", 2 * rows);
    if worst > 6e-3 || worst_lse > 1e-4 {
        return Err(format!("attention ({kernel:?}) d={head_dim} differs from the CPU twin").into());
    }
    Ok(())
}

fn bench_linear(dev: &CudaDevice, m: usize, k: usize, n: usize, act: Activation, iters: usize, what: &str) -> Res<()> {
    let (_, x) = random_bf16(dev, m * k, 4, 1.0)?;
    let (_, w) = random_bf16(dev, n * k, 5, 0.05)?;
    let (_, b) = random_bf16(dev, n, 6, 0.5)?;
    let mut y = dev.zeros::<bf16>(m * n)?;
    let ms = time_ms(dev, iters, || Ok(cuda::gemm::linear(dev, &x, m, k, &w, n, Some(&b), act, &mut y)?))?;
    let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    println!("linear {what} {m}x{k} -> {n} ({act:?}): {ms:.3} ms, {tflops:.1} TFLOP/s");
    Ok(())
}

fn bench_elementwise(dev: &CudaDevice, tokens: usize, iters: usize) -> Res<()> {
    let (heads, head_dim) = (12, 128);
    let dim = heads * head_dim;
    let n = tokens * dim;
    let x = dev.upload(&random(n, 8, 3.0))?;
    let mods: Vec<CudaSlice<f32>> = (0..2).map(|i| dev.upload(&random(dim, 9 + i, 0.5))).collect::<Result<_, _>>()?;
    let mut y = dev.zeros::<bf16>(n)?;
    let p = LayerNormDevParams { eps: 1e-6, scale: Some(mods[0].as_view()), shift: Some(mods[1].as_view()), ..Default::default() };
    let ms = time_ms(dev, iters, || Ok(cuda::norm::layer_norm_modulated(dev, &x, tokens, dim, &p, &mut y)?))?;
    println!("layer_norm_modulated {tokens}x{dim}: {ms:.3} ms, {:.0} GB/s (f32 in, bf16 out)", (n * 6) as f64 / (ms * 1e-3) / 1e9);

    let side = (tokens as f64).cbrt().ceil() as usize + 1;
    let table = Rope3d::wan(head_dim, 1024, 10000.0)?.table([side, side, side], 0..tokens)?;
    let t = DeviceRopeTable::upload(dev, &table)?;
    let w = dev.upload(&random(dim, 11, 1.0))?;
    let ms = time_ms(dev, iters, || Ok(cuda::norm::qk_norm_rope(dev, &mut y, tokens, dim, heads, head_dim, &w, 1e-6, Some(&t))?))?;
    println!("qk_norm_rope {tokens}x{dim}: {ms:.3} ms, {:.0} GB/s (bf16 in place + f32 table)", (n * 4 + tokens * head_dim * 4) as f64 / (ms * 1e-3) / 1e9);

    let mut xr = dev.upload(&random(n, 12, 1.0))?;
    let ms = time_ms(dev, iters, || Ok(cuda::elementwise::gated_residual_add(dev, &mut xr, &y, Some(&mods[0]), n, dim)?))?;
    println!("gated_residual_add {tokens}x{dim}: {ms:.3} ms, {:.0} GB/s (f32 += bf16 · gate)", (n * 10) as f64 / (ms * 1e-3) / 1e9);
    Ok(())
}

fn main() -> Res<()> {
    let a = parse_args()?;
    let dev: Arc<CudaDevice> = CudaDevice::open(a.device)?;
    println!("device {}: {} ({}), {} SMs; tokens {}, {} timed iterations", a.device, dev.name(), dev.arch(), dev.multiprocessors(), a.tokens, a.iters);
    let t0 = std::time::Instant::now();
    dev.warm_up()?;
    println!("NVRTC compile + load of all kernels: {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    bench_attention(&dev, AttentionKernel::Mma, a.tokens, 12, 128, a.iters)?;
    bench_attention(&dev, AttentionKernel::Mma, a.tokens, 24, 64, a.iters)?;
    let (m, d, ffn) = (a.tokens, 1536, 8960);
    bench_linear(&dev, m, d, d, Activation::None, a.iters, "q/k/v/out projection")?;
    bench_linear(&dev, m, d, ffn, Activation::GeluTanh, a.iters, "ffn up")?;
    bench_linear(&dev, m, ffn, d, Activation::None, a.iters, "ffn down")?;
    bench_elementwise(&dev, a.tokens, a.iters)?;
    // Last, so that the figures above are printed whatever they do: the warpgroup-MMA attention,
    // both schedules, on the GPUs that have it.
    let hopper: Vec<AttentionKernel> = AttentionKernel::available(dev.arch()).into_iter().filter(|&k| k != AttentionKernel::Mma).collect();
    if hopper.is_empty() {
        println!("attention (wgmma): {} has no warpgroup MMAs", dev.arch());
    }
    for kernel in hopper {
        bench_attention(&dev, kernel, a.tokens, 12, 128, a.iters)?;
        bench_attention(&dev, kernel, a.tokens, 24, 64, a.iters)?;
    }
    Ok(())
}
