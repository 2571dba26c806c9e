//! `tessera bench vae`: decode time and peak memory of the Wan 2.1 VAE at several video lengths,
//! on a chosen backend (`cpu`, `bf16-host`, `cuda[:N]`). The decoder runs one latent frame per
//! step with causal caches, so peak memory should stay flat as frames are added; this prints the
//! figures that show it (host RSS, and device memory on a GPU).

use crate::sys;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use tessera_kernels::backend::Backend;
use tessera_kernels::random::fill_normal;
use tessera_kernels::Tensor;
use tessera_worker::weights::RandomWeights;
use tessera_worker::{VaePreset, WanVae};

/// Arguments of `tessera bench vae`.
#[derive(Args)]
pub struct VaeArgs {
    /// Built-in configuration with random weights: tiny, wan2.1-vae.
    #[arg(long, env = "TESSERA_BENCH_VAE_PRESET", default_value = "wan2.1-vae")]
    preset: String,
    /// A diffusers `vae/` folder to load instead of a preset.
    #[arg(long, env = "TESSERA_BENCH_VAE_MODEL", conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Latent frame counts to decode, one run each (video frames = 1 + 4·(T − 1)).
    #[arg(long, env = "TESSERA_BENCH_LATENT_FRAMES", value_delimiter = ',', default_value = "3,5,9")]
    latent_frames: Vec<usize>,
    /// Video height in pixels (a multiple of the VAE's spatial factor, 8).
    #[arg(long, env = "TESSERA_BENCH_HEIGHT", default_value_t = 240)]
    height: usize,
    /// Video width in pixels (a multiple of 8).
    #[arg(long, env = "TESSERA_BENCH_WIDTH", default_value_t = 416)]
    width: usize,
    /// Where the VAE runs: cpu (f32), bf16-host (the GPU path's bf16 twin) or cuda[:N].
    #[arg(long, env = "TESSERA_BENCH_BACKEND", default_value = "cpu")]
    backend: String,
    /// Print one JSON object per run instead of a table.
    #[arg(long, env = "TESSERA_BENCH_JSON")]
    json: bool,
}

/// Figures of one decode.
struct Run {
    latent_frames: usize,
    video_frames: usize,
    seconds: f64,
    first_frames_s: f64,
    peak_rss: u64,
    /// Device memory in use after the run and in total (bytes), on a GPU.
    device_memory: Option<(u64, u64)>,
}

/// Decodes a random latent at every requested length and prints time and peak memory per run.
pub fn run(a: VaeArgs) -> Result<()> {
    let backend = Backend::parse(&a.backend).ok_or_else(|| anyhow::anyhow!("--backend {}: expected {}", a.backend, Backend::NAMES))?;
    let (vae, name) = match &a.model {
        Some(dir) => (WanVae::load_on(dir, backend).with_context(|| format!("--model {}", dir.display()))?, dir.display().to_string()),
        None => {
            let p = VaePreset::from_name(&a.preset).map_err(|e| anyhow::anyhow!("--preset: {e}"))?;
            (WanVae::from_source_on(p.config(), &RandomWeights::new(0), backend).with_context(|| format!("--backend {}", a.backend))?, a.preset.clone())
        }
    };
    let cfg = vae.config().clone();
    let sf = cfg.spatial_factor();
    if a.height == 0 || a.width == 0 || !a.height.is_multiple_of(sf) || !a.width.is_multiple_of(sf) {
        bail!("--height {} --width {}: both must be positive multiples of {sf}", a.height, a.width);
    }
    if a.latent_frames.is_empty() || a.latent_frames.contains(&0) {
        bail!("--latent-frames {:?}: give one or more positive counts", a.latent_frames);
    }
    let (h, w) = (a.height / sf, a.width / sf);
    let threads = tessera_kernels::threads::num_threads();
    let weights_rss = sys::rss_bytes().unwrap_or(0);
    if !a.json {
        println!(
            "vae decode  model {name}  on {}  {}x{} px (latent {h}x{w})  threads {threads}  RSS with weights {:.0} MiB",
            backend.name(),
            a.height,
            a.width,
            sys::mib(weights_rss)
        );
        println!("{:>13} {:>12} {:>10} {:>14} {:>14} {:>14}", "latent frames", "video frames", "time s", "s/video frame", "first frame s", "peak RSS MiB");
    }
    for (i, &t) in a.latent_frames.iter().enumerate() {
        let mut data = vec![0.0f32; cfg.z_dim * t * h * w];
        fill_normal(0, i as u64, 0, &mut data);
        let latent = vae.denormalize_latent(&Tensor::new([1, cfg.z_dim, t, h, w], data)?)?;
        sys::reset_peak_rss();
        let start = Instant::now();
        let (mut frames, mut first) = (0usize, None);
        vae.decode_with(&latent, &mut |piece| {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            frames += piece.dim(2);
            Ok(())
        })?;
        let run = Run {
            latent_frames: t,
            video_frames: frames,
            seconds: start.elapsed().as_secs_f64(),
            first_frames_s: first.unwrap_or(0.0),
            peak_rss: sys::peak_rss_bytes().unwrap_or(0),
            device_memory: vae.device_memory(),
        };
        report(&run, &name, &backend, &a, threads);
    }
    Ok(())
}

fn report(r: &Run, name: &str, backend: &Backend, a: &VaeArgs, threads: usize) {
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bench": "vae-decode", "model": name, "backend": backend.name(), "height": a.height, "width": a.width, "threads": threads,
                "latent_frames": r.latent_frames, "video_frames": r.video_frames, "seconds": r.seconds,
                "seconds_per_video_frame": r.seconds / r.video_frames as f64, "first_frames_seconds": r.first_frames_s,
                "peak_rss_mib": sys::mib(r.peak_rss), "device_memory_mib": r.device_memory.map(|(u, _)| sys::mib(u))})
        );
    } else {
        let gpu = r.device_memory.map_or(String::new(), |(u, t)| format!("  (device memory in use {:.0} of {:.0} MiB)", sys::mib(u), sys::mib(t)));
        println!(
            "{:>13} {:>12} {:>10.1} {:>14.2} {:>14.1} {:>14.0}{gpu}",
            r.latent_frames,
            r.video_frames,
            r.seconds,
            r.seconds / r.video_frames as f64,
            r.first_frames_s,
            sys::mib(r.peak_rss),
        );
    }
}
