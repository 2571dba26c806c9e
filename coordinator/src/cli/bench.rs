//! `tessera bench`: repeatable benchmarks that print figures (median time, throughput, FLOP rate,
//! peak memory) for the transformer forward and for attention alone.

use super::bench_sharded;
use super::bench_timing::{time_runs, Timing};
use crate::sys;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use tessera_kernels::cpu::{attention, AttentionShape};
use tessera_kernels::random::fill_normal;
use tessera_kernels::Device;
use tessera_kernels::Tensor;
use tessera_worker::model::DitModel;
use tessera_worker::parallel::{LocalTransport, ParallelPlan};
use tessera_worker::{DitInputs, TransformerPreset};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward pass of the diffusion transformer (built-in preset, random weights, or a folder).
    Dit(DitArgs),
    /// Attention alone (tiled, with log-sum-exp) on random inputs.
    Attention(AttentionArgs),
    /// VAE decode (chunked, streaming) at several video lengths: time and peak memory per run.
    Vae(super::bench_vae::VaeArgs),
    /// The UMT5 text encoder at several prompt lengths: time and peak memory per length.
    Text(super::bench_text::TextArgs),
}

/// Arguments of `tessera bench dit`.
#[derive(Args)]
pub struct DitArgs {
    /// Built-in configuration: tiny, wan-1.3b-2l, wan-1.3b, wan-14b-2l.
    #[arg(long, env = "TESSERA_BENCH_PRESET", default_value = "wan-1.3b-2l")]
    preset: String,
    /// A diffusers transformer folder to load instead of a preset.
    #[arg(long, env = "TESSERA_BENCH_MODEL", conflicts_with = "preset")]
    model: Option<std::path::PathBuf>,
    /// Latent shape C,F,H,W (C must equal the model's in_channels).
    #[arg(long, env = "TESSERA_BENCH_LATENT", value_delimiter = ',', default_value = "16,5,30,52")]
    latent: Vec<usize>,
    /// Text rows of the context.
    #[arg(long, env = "TESSERA_BENCH_TEXT_LEN", default_value_t = 512)]
    text_len: usize,
    /// Also run the forward sequence-parallel over this many ranks (threads of this process) and
    /// compare with the one-rank forward of the same run.
    #[arg(long, env = "TESSERA_BENCH_RANKS", default_value_t = 1)]
    ranks: usize,
    /// Ulysses (all-to-all) degree among the ranks; the rest is ring.
    #[arg(long, env = "TESSERA_BENCH_ULYSSES", default_value_t = 1)]
    ulysses: usize,
    /// How the ranks talk: `inproc` (mailboxes) or `tcp` (real sockets on loopback).
    #[arg(long, env = "TESSERA_BENCH_TRANSPORT", default_value = "tcp")]
    transport: String,
    /// Compute device: auto (a usable CUDA GPU, else the CPU), cpu (f32), cuda or cuda:N (bf16).
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    device: String,
    #[command(flatten)]
    timing: Timing,
}

/// Arguments of `tessera bench attention`.
#[derive(Args)]
pub struct AttentionArgs {
    /// Sequence length (queries = keys).
    #[arg(long, env = "TESSERA_BENCH_TOKENS", default_value_t = 32760)]
    tokens: usize,
    /// Heads.
    #[arg(long, env = "TESSERA_BENCH_HEADS", default_value_t = 1)]
    heads: usize,
    /// Channels per head.
    #[arg(long, env = "TESSERA_BENCH_HEAD_DIM", default_value_t = 128)]
    head_dim: usize,
    #[command(flatten)]
    timing: Timing,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Dit(a) => bench_dit(a),
        BenchCommand::Attention(a) => bench_attention(a),
        BenchCommand::Vae(a) => super::bench_vae::run(a),
        BenchCommand::Text(a) => super::bench_text::run(a),
    }
    .map(|()| ExitCode::SUCCESS)
}

fn random_tensor(shape: &[usize], stream: u64) -> Tensor {
    let mut data = vec![0.0f32; shape.iter().product()];
    fill_normal(0, stream, 0, &mut data);
    Tensor::new(shape.to_vec(), data).expect("shape matches data")
}

fn bench_dit(a: DitArgs) -> Result<()> {
    let device = super::golden::resolve_device(&a.device)?;
    if a.ranks > 1 && device != Device::Cpu {
        bail!("--ranks {}: the sequence-parallel forward runs on the CPU only for now; use --device cpu", a.ranks);
    }
    let (model, name) = match &a.model {
        Some(dir) => (DitModel::load(dir, device).with_context(|| format!("--model {}", dir.display()))?, dir.display().to_string()),
        None => {
            let p = TransformerPreset::from_name(&a.preset).map_err(|e| anyhow::anyhow!("--preset: {e}"))?;
            (DitModel::preset(p, 0, device)?, a.preset.clone())
        }
    };
    let cfg = model.config().clone();
    let &[c, f, h, w] = a.latent.as_slice() else {
        bail!("--latent takes four sizes C,F,H,W, got {:?}", a.latent);
    };
    if c != cfg.in_channels {
        bail!("--latent: {c} channels, the model takes {}", cfg.in_channels);
    }
    let hidden = random_tensor(&[1, c, f, h, w], 1);
    let text = random_tensor(&[1, a.text_len, cfg.text_dim], 2);
    let image = cfg.image_dim.map(|d| random_tensor(&[1, 257, d], 3));
    let timesteps = [500.0f32];
    let inputs = DitInputs {
        hidden_states: &hidden,
        timesteps: &timesteps,
        encoder_hidden_states: &text,
        encoder_hidden_states_image: image.as_ref(),
        options: Default::default(),
    };
    let (_, grid) = model.check_inputs(&inputs)?;
    let tokens = grid.tokens();
    sys::reset_peak_rss();
    // GPU memory is sampled after every run (the driver has no peak counter).
    let mut device_mem: Option<(u64, u64)> = None;
    let stats = time_runs(&a.timing, || {
        model.forward(&inputs)?;
        if let Some((used, total)) = model.device_memory() {
            device_mem = Some((device_mem.map_or(used, |(u, _)| u.max(used)), total));
        }
        Ok(())
    })?;
    let peak = sys::peak_rss_bytes().unwrap_or(0);
    // the planner's count of the same forward (attention and linear layers)
    let shape = tessera_coordinator::plan::ModelShape { text_len: a.text_len as u64, ..tessera_coordinator::plan::ModelShape::wan("bench", &cfg) };
    let work = shape.forward(tokens as u64);
    let flops = work.attention_flops + work.linear_flops;
    let tok_s = tokens as f64 / (stats.median_ms / 1e3);
    let gflops = flops / (stats.median_ms / 1e3) / 1e9;
    let threads = tessera_kernels::threads::num_threads();
    let on = model.describe();
    if a.timing.json {
        println!(
            "{}",
            serde_json::json!({"bench": "dit", "model": name, "device": on, "latent": a.latent, "tokens": tokens, "text_len": a.text_len, "threads": threads,
                "median_ms": stats.median_ms, "min_ms": stats.min_ms, "tokens_per_s": tok_s, "gflop": flops / 1e9, "gflops": gflops, "peak_rss_mib": sys::mib(peak),
                "device_memory_mib": device_mem.map(|(u, _)| sys::mib(u)), "device_memory_total_mib": device_mem.map(|(_, t)| sys::mib(t))})
        );
    } else {
        println!("dit forward  model {name}  on {on}  latent {:?}  tokens {tokens}  text {}  threads {threads}", a.latent, a.text_len);
        println!(
            "  median {:.1} ms  min {:.1} ms  {:.0} tokens/s  {:.1} GFLOP/s ({:.1} GFLOP)  peak RSS {:.0} MiB",
            stats.median_ms,
            stats.min_ms,
            tok_s,
            gflops,
            flops / 1e9,
            sys::mib(peak)
        );
        if let Some((used, total)) = device_mem {
            println!("  device memory in use {:.0} MiB of {:.0} MiB (the most seen after a run)", sys::mib(used), sys::mib(total));
        }
    }
    if a.ranks > 1 {
        let plan =
            ParallelPlan::new(a.ranks, a.ulysses, cfg.num_attention_heads).map_err(|e| anyhow::anyhow!("--ranks {} --ulysses {}: {e}", a.ranks, a.ulysses))?;
        let transport = LocalTransport::from_name(&a.transport).ok_or_else(|| anyhow::anyhow!("--transport {}: expected inproc or tcp", a.transport))?;
        let figures = bench_sharded::measure(&model, &inputs, plan, transport, &a.timing)?;
        bench_sharded::report(&figures, plan, transport, stats.median_ms, tokens, a.timing.json);
    } else if a.ulysses != 1 {
        bail!("--ulysses {} needs --ranks above 1", a.ulysses);
    }
    Ok(())
}

fn bench_attention(a: AttentionArgs) -> Result<()> {
    if a.tokens == 0 || a.heads == 0 || a.head_dim == 0 {
        bail!("--tokens, --heads and --head-dim must be positive");
    }
    let n = a.tokens * a.heads * a.head_dim;
    let q = random_tensor(&[n], 1);
    let k = random_tensor(&[n], 2);
    let v = random_tensor(&[n], 3);
    let shape = AttentionShape::packed(a.heads, a.head_dim, a.tokens, a.tokens);
    let scale = 1.0 / (a.head_dim as f32).sqrt();
    let base = sys::rss_bytes().unwrap_or(0);
    sys::reset_peak_rss();
    let stats = time_runs(&a.timing, || attention(q.data(), k.data(), v.data(), shape, scale).map(|_| ()).map_err(Into::into))?;
    let peak = sys::peak_rss_bytes().unwrap_or(0);
    let flops = 4.0 * (a.tokens as f64).powi(2) * (a.heads * a.head_dim) as f64;
    let gflops = flops / (stats.median_ms / 1e3) / 1e9;
    let full_matrix = (a.tokens as f64).powi(2) * 4.0;
    let threads = tessera_kernels::threads::num_threads();
    if a.timing.json {
        println!(
            "{}",
            serde_json::json!({"bench": "attention", "tokens": a.tokens, "heads": a.heads, "head_dim": a.head_dim, "threads": threads,
                "median_ms": stats.median_ms, "min_ms": stats.min_ms, "gflops": gflops, "rss_before_mib": sys::mib(base),
                "peak_rss_mib": sys::mib(peak), "score_matrix_mib": full_matrix / 1048576.0})
        );
    } else {
        println!("attention  tokens {}  heads {}  head_dim {}  threads {threads}", a.tokens, a.heads, a.head_dim);
        println!(
            "  median {:.1} ms  min {:.1} ms  {:.1} GFLOP/s  RSS before {:.0} MiB, peak {:.0} MiB (a full score matrix would be {:.0} MiB)",
            stats.median_ms,
            stats.min_ms,
            gflops,
            sys::mib(base),
            sys::mib(peak),
            full_matrix / 1048576.0
        );
    }
    Ok(())
}
