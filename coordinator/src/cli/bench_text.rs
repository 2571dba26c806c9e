//! `tessera bench text`: the UMT5 text encoder's time and peak memory at several prompt lengths,
//! on a chosen backend, with random weights at UMT5-XXL width (a few layers by default: the whole
//! encoder needs ~23 GB in f32) or a transformers folder.

use super::bench_timing::{time_runs, Timing};
use crate::sys;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use tessera_kernels::backend::Backend;
use tessera_worker::text::{Umt5Config, Umt5EncoderModel};
use tessera_worker::weights::RandomWeights;

/// Arguments of `tessera bench text`.
#[derive(Args)]
pub struct TextArgs {
    /// Encoder layers at UMT5-XXL width with random weights (the real encoder has 24); ignored
    /// with --model.
    #[arg(long, env = "TESSERA_BENCH_TEXT_LAYERS", default_value_t = 2)]
    layers: usize,
    /// A transformers `text_encoder/` folder to load instead.
    #[arg(long, env = "TESSERA_BENCH_TEXT_MODEL")]
    model: Option<PathBuf>,
    /// Prompt lengths in tokens, one measurement each (Wan pads prompts to 512).
    #[arg(long, env = "TESSERA_BENCH_TEXT_TOKENS", value_delimiter = ',', default_value = "25,100,512")]
    tokens: Vec<usize>,
    /// Backend: cpu (f32), bf16-host (the GPU path's bf16 contract on the CPU), cuda or cuda:N.
    #[arg(long, env = "TESSERA_BENCH_BACKEND", default_value = "cpu")]
    backend: String,
    #[command(flatten)]
    timing: Timing,
}

/// Encodes prompts of every requested length and prints time and peak memory per length.
pub fn run(a: TextArgs) -> Result<()> {
    let backend = Backend::parse(&a.backend).ok_or_else(|| anyhow::anyhow!("--backend {}: expected {}", a.backend, Backend::NAMES))?;
    if a.tokens.is_empty() || a.tokens.contains(&0) {
        bail!("--tokens {:?}: give one or more positive lengths", a.tokens);
    }
    sys::reset_peak_rss();
    let load = Instant::now();
    let (model, name) = match &a.model {
        Some(dir) => (Umt5EncoderModel::load_on(dir, backend).with_context(|| format!("--model {}", dir.display()))?, dir.display().to_string()),
        None => {
            if a.layers == 0 {
                bail!("--layers must be at least 1");
            }
            let cfg = Umt5Config { num_layers: a.layers, ..Umt5Config::umt5_xxl() };
            (Umt5EncoderModel::from_source_on(cfg, &RandomWeights::new(7), backend)?, format!("umt5-xxl width, {} layers", a.layers))
        }
    };
    let (load_s, weights_rss) = (load.elapsed().as_secs_f64(), sys::peak_rss_bytes().unwrap_or(0));
    let cfg = model.config().clone();
    let threads = tessera_kernels::threads::num_threads();
    if !a.timing.json {
        println!("text encoder  {name}  on {}  threads {threads}  loaded in {load_s:.1} s, peak RSS {:.0} MiB", backend.name(), sys::mib(weights_rss));
        println!("{:>7} {:>11} {:>11} {:>13} {:>13}", "tokens", "median ms", "min ms", "ms per layer", "peak RSS MiB");
    }
    for &n in &a.tokens {
        let ids: Vec<u32> = (0..n as u64).map(|i| ((i * 7919 + 13) % cfg.vocab_size as u64) as u32).collect();
        sys::reset_peak_rss();
        let stats = time_runs(&a.timing, || {
            let out = model.encode_unpadded(&[&ids])?;
            if !out[0].data().iter().all(|v| v.is_finite()) {
                bail!("{n} tokens: the encoder gave non-finite values");
            }
            Ok(())
        })?;
        let (median, min, peak) = (stats.median_ms, stats.min_ms, sys::peak_rss_bytes().unwrap_or(0));
        let device_mem = model.device_memory();
        if a.timing.json {
            println!(
                "{}",
                serde_json::json!({"bench": "text-encoder", "model": name, "backend": backend.name(), "threads": threads, "tokens": n,
                    "layers": cfg.num_layers, "median_ms": median, "min_ms": min, "ms_per_layer": median / cfg.num_layers as f64,
                    "peak_rss_mib": sys::mib(peak), "device_memory_mib": device_mem.map(|(u, _)| sys::mib(u))})
            );
        } else {
            let gpu = device_mem.map_or(String::new(), |(u, t)| format!("  (device memory in use {:.0} of {:.0} MiB)", sys::mib(u), sys::mib(t)));
            println!("{n:>7} {median:>11.1} {min:>11.1} {:>13.1} {:>13.0}{gpu}", median / cfg.num_layers as f64, sys::mib(peak));
        }
    }
    Ok(())
}
