//! `tessera plan`: whether a job fits a group of devices, and how long it will take: tokens,
//! FLOPs per step by part, per-rank peak memory by part, bytes moved, predicted seconds with the
//! terms, the best layout for each group size; `--calibration` puts the predictions beside the
//! published figures. A table for people, `--json` for machines. A diffusion-forcing model's
//! long video is planned chunk by chunk, as it runs (upstream's chunking unless `--base-frames`
//! and the other forcing flags say otherwise): time to the first chunk and in total.

use super::flags::flag_for_field;
use super::remote::human_seconds;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;
use tessera_cluster::defaults;
use tessera_cluster::forcing::{ForcingDefaults, ForcingSettings};
use tessera_cluster::limits::Limits;
use tessera_cluster::transformer_config::TransformerConfig;
use tessera_cluster::{ClusterError, JobRequest, JobSpec};
use tessera_coordinator::plan::calibration::{compare, Comparison, PUBLISHED};
use tessera_coordinator::plan::cost::gib;
use tessera_coordinator::plan::gpu::{gpu_kind, EfficiencySource, GPU_NAMES};
use tessera_coordinator::plan::{
    best, efficiency, evaluate, evaluate_forcing, model, Capabilities, Evaluation, ForcingEvaluation, ForcingJob, GpuKind, JobShape, ModelShape,
};
use tessera_proto::v1::Sampler;

/// Arguments of `tessera plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// The model: a preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b, skyreels-v2-df-1.3b,
    /// skyreels-v2-df-14b, hunyuanvideo) or a diffusers `transformer/config.json` (or its folder).
    #[arg(long, env = "TESSERA_PLAN_MODEL", default_value = "wan2.1-t2v-1.3b")]
    model: String,
    /// Frame width in pixels (generated at the next multiple of the model's, 16 for Wan, center-cropped back).
    #[arg(long, env = "TESSERA_WIDTH", default_value_t = defaults::WIDTH)]
    width: u32,
    /// Frame height in pixels.
    #[arg(long, env = "TESSERA_HEIGHT", default_value_t = defaults::HEIGHT)]
    height: u32,
    /// Frames (4k+1).
    #[arg(long, env = "TESSERA_FRAMES", default_value_t = defaults::NUM_FRAMES)]
    frames: u32,
    /// Frames per second of the video (its duration only; the work does not depend on it).
    #[arg(long, env = "TESSERA_FPS", default_value_t = defaults::FPS)]
    fps: u32,
    /// Denoising steps.
    #[arg(long, env = "TESSERA_STEPS", default_value_t = defaults::STEPS)]
    steps: u32,
    /// Classifier-free guidance scale (above 1: two forwards per step).
    #[arg(long, env = "TESSERA_GUIDANCE", default_value_t = defaults::GUIDANCE_SCALE)]
    guidance: f32,
    /// Device kind: h100-80gb, h200, h20, a100-80gb, l40s, or cpu (this machine, measured).
    #[arg(long, env = "TESSERA_PLAN_GPU", default_value = "h100-80gb")]
    gpu: String,
    /// Group sizes to plan, comma-separated (`1,8,16,64`).
    #[arg(long, env = "TESSERA_PLAN_GPUS", value_delimiter = ',', default_value = "1")]
    gpus: Vec<u32>,
    /// Ulysses degree of the plan (with --gpus, fixes the plan instead of searching).
    #[arg(long, env = "TESSERA_PLAN_ULYSSES")]
    ulysses: Option<u32>,
    /// Split the devices into conditional and unconditional halves (CFG-parallel).
    #[arg(long, env = "TESSERA_PLAN_CFG_PARALLEL")]
    cfg_parallel: bool,
    /// Print JSON instead of a table.
    #[arg(long, env = "TESSERA_PLAN_JSON")]
    json: bool,
    /// Print the published figures beside the predictions instead of planning a job.
    #[arg(long, env = "TESSERA_PLAN_CALIBRATION")]
    calibration: bool,
    /// Diffusion forcing (a skyreels-v2-df model): video frames per chunk [default: upstream's
    /// 97; its 720P models' examples use 121].
    #[arg(long, env = "TESSERA_BASE_FRAMES")]
    base_frames: Option<u32>,
    /// Diffusion forcing: frames each chunk repeats from the video so far [default: upstream's 17].
    #[arg(long, env = "TESSERA_OVERLAP_FRAMES")]
    overlap_frames: Option<u32>,
    /// Diffusion forcing: iterations each causal block lags the one before (0: synchronous).
    #[arg(long, env = "TESSERA_AR_STEP", default_value_t = 0)]
    ar_step: u32,
    /// Diffusion forcing: latent frames per causal block [default: 1, upstream's].
    #[arg(long, env = "TESSERA_CAUSAL_BLOCK")]
    causal_block: Option<u32>,
}

/// Plans the job, or prints the calibration; exit status 1 when a planned group cannot run it.
pub fn run(args: PlanArgs) -> Result<ExitCode> {
    if args.calibration {
        let rows = compare();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&json!({ "calibration": rows.iter().map(comparison_json).collect::<Vec<_>>() }))?);
        } else {
            print_calibration(&rows);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let model = model_shape(&args.model)?;
    let gpu = device_kind(&args.gpu)?;
    let eff = efficiency(&gpu);
    let spec = job_spec(&args, &model)?;
    let job = JobShape::of(&spec);
    if args.gpus.is_empty() || args.gpus.contains(&0) {
        bail!("--gpus {:?}: every group size must be at least 1", args.gpus);
    }
    let caps = Capabilities::TESSERA;
    if let (Some(forcing), Some(settings)) = (ForcingJob::of(&spec), spec.request().forcing) {
        return run_forcing(&args, &model, &gpu, eff, (forcing, settings), caps);
    }
    let mut plans = Vec::new();
    for &n in &args.gpus {
        plans.push(plan_for(&args, &model, &job, &gpu, n, eff, caps)?);
    }
    if args.json {
        let out = json!({
            "model": model.name,
            "job": job_json(&args, &spec, &job),
            "gpu": gpu_json(&gpu, eff),
            "plans": plans.iter().map(evaluation_json).collect::<Vec<_>>(),
            "feasible": plans.iter().all(|e| e.infeasible.is_none()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_human(&args, &model, &gpu, eff, &spec, &job, &plans);
    }
    Ok(if plans.iter().all(|e| e.infeasible.is_none()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The plan of `job` on `n` devices: the one `--ulysses` (and `--cfg-parallel`) fix, or the best.
fn plan_for(args: &PlanArgs, model: &ModelShape, job: &JobShape, gpu: &GpuKind, n: u32, eff: f64, caps: Capabilities) -> Result<Evaluation> {
    Ok(match args.ulysses {
        Some(u) => {
            let halves = if args.cfg_parallel { 2 } else { 1 };
            if u == 0 || !n.is_multiple_of(halves) || !(n / halves).is_multiple_of(u) {
                bail!(
                    "--ulysses {u} must divide the {} ranks of each group (--gpus {n}{})",
                    n / halves,
                    if args.cfg_parallel { " --cfg-parallel" } else { "" }
                );
            }
            evaluate(model, job, gpu, caps.layout(n, u, args.cfg_parallel), eff)
        }
        None => best(model, job, gpu, n, eff, caps),
    })
}

/// A diffusion-forcing model's video in chunks, each on the layout chosen for the largest chunk.
fn run_forcing(args: &PlanArgs, model: &ModelShape, gpu: &GpuKind, eff: f64, job: (ForcingJob, ForcingSettings), caps: Capabilities) -> Result<ExitCode> {
    let (forcing, s) = job;
    let mut plans = Vec::new();
    for &n in &args.gpus {
        let layout = plan_for(args, model, &forcing.largest(), gpu, n, eff, caps)?.layout;
        plans.push(evaluate_forcing(model, &forcing, gpu, layout, eff));
    }
    let feasible = plans.iter().all(|e| e.infeasible.is_none());
    if args.json {
        let out = json!({
            "model": model.name,
            "diffusion_forcing": {
                "frames": args.frames, "fps": args.fps, "base_frames": s.base_num_frames, "overlap_frames": s.overlap_history,
                "ar_step": s.ar_step, "causal_block": s.causal_block_size, "steps": forcing.steps,
                "latent_frames": forcing.plan.latent_frames, "chunks": forcing.plan.chunks.len(),
            },
            "gpu": gpu_json(gpu, eff),
            "plans": plans.iter().map(forcing_json).collect::<Vec<_>>(),
            "feasible": feasible,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_forcing(args, model, gpu, eff, (&forcing, &s), &plans);
    }
    Ok(if feasible { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn forcing_json(e: &ForcingEvaluation) -> Value {
    json!({
        "gpus": e.layout.gpus, "ulysses": e.layout.ulysses, "ring": e.layout.ring, "cfg_parallel": e.layout.cfg_parallel,
        "feasible": e.infeasible.is_none(), "reason": e.infeasible,
        "predicted_seconds": { "text": e.text, "first_chunk": e.first_chunk, "total": e.total },
        "chunks": e.chunks.iter().map(|c| json!({
            "latent_frames": c.chunk.frames, "prefix_frames": c.chunk.prefix, "iterations": c.iterations,
            "tokens": c.evaluation.tokens, "seconds_per_iteration": c.evaluation.timing.step,
            "denoise_seconds": c.denoise, "decode_seconds": c.decode, "per_rank_peak_bytes": c.evaluation.memory.peak,
        })).collect::<Vec<_>>(),
    })
}

fn print_forcing(args: &PlanArgs, model: &ModelShape, gpu: &GpuKind, eff: f64, job: (&ForcingJob, &ForcingSettings), plans: &[ForcingEvaluation]) {
    let (job, settings) = job;
    let p = &job.plan;
    println!("model   {}: {:.2} B parameters, {} layers, {} heads (diffusion forcing)", model.name, model.params as f64 / 1e9, model.layers, model.heads);
    println!(
        "job     {}x{} x {} frames ({:.1} s at {} fps), {} steps per frame, guidance {}",
        args.width,
        args.height,
        args.frames,
        f64::from(args.frames) / f64::from(args.fps),
        args.fps,
        job.steps,
        args.guidance
    );
    println!(
        "chunks  {} of up to {} frames ({} latent), overlapping by {} ({} latent); causal blocks of {} latent frames, ar_step {} ({})",
        p.chunks.len(),
        settings.base_num_frames,
        p.chunks.first().map_or(0, |c| c.frames),
        settings.overlap_history,
        p.chunks.get(1).map_or(0, |c| c.overlap),
        p.block,
        job.ar_step,
        if job.ar_step == 0 { "synchronous" } else { "asynchronous" }
    );
    println!("device  {} ({}), efficiency {eff:.3} ({})", gpu.name, gpu.label, efficiency_source(gpu));
    for e in plans {
        println!();
        let verdict = match &e.infeasible {
            None => "feasible: true".to_string(),
            Some(why) => format!("feasible: false ({why})"),
        };
        println!("{} GPU{}  {}  {verdict}", e.layout.gpus, if e.layout.gpus == 1 { "" } else { "s" }, e.layout.describe());
        // Runs of chunks of the same shape, one line each.
        let mut k = 0;
        while k < e.chunks.len() {
            let c = &e.chunks[k];
            let same = e.chunks[k..].iter().take_while(|d| d.chunk == c.chunk && d.iterations == c.iterations).count();
            let which = if same == 1 { format!("chunk {k}") } else { format!("chunks {k}-{}", k + same - 1) };
            println!(
                "  {which:<13} {} latent frames ({} prefix), {} tokens, {} iterations x {:.3} s + decode {} = {} each; peak/rank {}",
                c.chunk.frames,
                c.chunk.prefix,
                c.evaluation.tokens,
                c.iterations,
                c.evaluation.timing.step,
                human_seconds(c.decode),
                human_seconds(c.denoise + c.decode),
                bytes(c.evaluation.memory.peak as f64)
            );
            k += same;
        }
        println!("  first chunk   {} (text {} + chunk 0 and its frames)", human_seconds(e.first_chunk), human_seconds(e.text));
        println!("  predicted     {}", human_seconds(e.total));
    }
}

/// A preset, or a Wan `config.json` (the file or its folder).
fn model_shape(name: &str) -> Result<ModelShape> {
    if let Some(m) = model::preset(name) {
        return Ok(m);
    }
    let path = Path::new(name);
    let file = if path.is_dir() {
        [path.join("config.json"), path.join("transformer/config.json")].into_iter().find(|p| p.is_file()).unwrap_or_else(|| path.join("config.json"))
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        bail!("--model {name}: neither a preset ({}) nor a config.json", model::PRESETS.join(", "));
    }
    let text = std::fs::read_to_string(&file).with_context(|| format!("--model {name}: reading {}", file.display()))?;
    let cfg = TransformerConfig::from_json(&text).map_err(|e| anyhow!("--model {name}: {}: {e}", file.display()))?;
    Ok(ModelShape::wan(name, &cfg))
}

/// A named GPU kind, or this machine's CPU measured now.
fn device_kind(name: &str) -> Result<GpuKind> {
    if name == "cpu" {
        return measure_cpu();
    }
    gpu_kind(name).ok_or_else(|| anyhow!("--gpu {name}: unknown device kind; known: {}", GPU_NAMES.join(", ")))
}

/// The job through the one check (the documented limits, without the token budget that
/// planning replaces); a refused field names its flag.
fn job_spec(args: &PlanArgs, model: &ModelShape) -> Result<JobSpec> {
    let request = JobRequest {
        prompt: "plan".into(),
        negative_prompt: String::new(),
        width: args.width,
        height: args.height,
        num_frames: args.frames,
        steps: args.steps,
        guidance_scale: args.guidance,
        flow_shift: None,
        sampler: Sampler::Unspecified,
        seed: 0,
        strength: None,
        extend: false,
        forcing: forcing_settings(args, model)?,
        // An image-to-video model plans with an image of the video's size (its cost is the
        // encoders', whatever the image's).
        image: (model.image_len > 0).then(|| {
            let side = |v: u32| v.clamp(1, tessera_cluster::job::MAX_IMAGE_SIDE);
            tessera_cluster::ImageSize { width: side(args.width), height: side(args.height) }
        }),
    };
    if args.fps == 0 {
        bail!("--fps must be positive");
    }
    JobSpec::new(request, model.factors, &Limits { max_tokens: u64::MAX, ..Limits::default() }).map_err(|e| match e {
        ClusterError::InvalidInput { field, detail } => anyhow!("{}: {detail}", flag_for_field(field).unwrap_or(field)),
        other => anyhow!("{other}"),
    })
}

/// A diffusion-forcing model's chunking: upstream's settings where the flags leave them out, as a
/// served model's requests get them. Another model refuses the forcing flags, naming the first.
fn forcing_settings(args: &PlanArgs, model: &ModelShape) -> Result<Option<ForcingSettings>> {
    if !model.diffusion_forcing {
        let given = [
            ("--base-frames", args.base_frames.is_some()),
            ("--overlap-frames", args.overlap_frames.is_some()),
            ("--ar-step", args.ar_step != 0),
            ("--causal-block", args.causal_block.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
            bail!("{flag}: {} is not a diffusion-forcing model (skyreels-v2-df-1.3b, skyreels-v2-df-14b, or a SkyReels-V2 config.json)", model.name)
        }
        return Ok(None);
    }
    Ok(Some(ForcingSettings::with_defaults(
        ForcingDefaults::SKYREELS_V2,
        args.base_frames.unwrap_or(0),
        args.overlap_frames,
        args.ar_step,
        args.causal_block.unwrap_or(0),
        Some(0.0),
        args.fps,
    )))
}

#[cfg(feature = "embedded")]
fn measure_cpu() -> Result<GpuKind> {
    let f = tessera_kernels::cpu::measure::measure()?;
    let memory = tessera_worker::server::memory_available().ok_or_else(|| anyhow!("--gpu cpu: /proc/meminfo does not say how much memory is available"))?;
    Ok(GpuKind::cpu(f.flops, f.bytes_per_s, memory))
}

#[cfg(not(feature = "embedded"))]
fn measure_cpu() -> Result<GpuKind> {
    bail!("--gpu cpu measures this machine with the CPU kernels, which this build (without the `embedded` feature) leaves out")
}

fn efficiency_source(gpu: &GpuKind) -> String {
    match gpu.efficiency {
        EfficiencySource::Published(i) => {
            let p = &PUBLISHED[i];
            format!("fitted to {} {} on 1 GPU: {} s", p.system, p.model, p.seconds)
        }
        EfficiencySource::SameAs(kind) => format!("assumed {kind}'s: no published single-GPU figure"),
        EfficiencySource::Measured => "measured rates".into(),
    }
}

fn job_json(args: &PlanArgs, spec: &JobSpec, job: &JobShape) -> Value {
    json!({
        "width": args.width, "height": args.height,
        "generated_width": job.width, "generated_height": job.height,
        "frames": args.frames, "fps": args.fps, "video_seconds": f64::from(args.frames) / f64::from(args.fps),
        "steps": job.steps, "guidance_scale": args.guidance,
        "latent_fhw": job.latent_fhw, "tokens": spec.tokens(),
    })
}

fn gpu_json(gpu: &GpuKind, eff: f64) -> Value {
    json!({
        "kind": gpu.name, "label": gpu.label,
        "peak_flops": gpu.peak_flops, "memory_bytes": gpu.memory_bytes, "usable_bytes": gpu.usable_bytes(),
        "hbm_bytes_per_s": gpu.hbm_bytes_per_s, "intra_node_bytes_per_s": gpu.intra_bytes_per_s,
        "network_bytes_per_s": gpu.network_bytes_per_s, "per_node": gpu.per_node,
        "efficiency": eff, "efficiency_source": efficiency_source(gpu),
    })
}

fn evaluation_json(e: &Evaluation) -> Value {
    let (m, t, b, f) = (&e.memory, &e.timing, &e.traffic, &e.flops);
    json!({
        "gpus": e.layout.gpus, "ulysses": e.layout.ulysses, "ring": e.layout.ring,
        "cfg_parallel": e.layout.cfg_parallel, "vae_ranks": e.layout.vae_ranks,
        "feasible": e.infeasible.is_none(), "reason": e.infeasible,
        "tokens": e.tokens,
        "flops_per_step": { "attention": f.attention, "linear": f.linear, "rest": f.rest },
        "per_rank_peak_bytes": m.peak,
        "per_rank_memory_bytes": {
            "weights": m.weights, "text_encoder": m.text_encoder, "image_encoder": m.image_encoder, "activations": m.activations,
            "attention_workspace": m.attention_workspace, "ring_buffers": m.ring_buffers,
            "text_states": m.text_states, "latent_shard": m.latent_shard,
            "vae_weights": m.vae_weights, "vae_tiles": m.vae_tiles,
        },
        "bytes_per_step_per_rank": {
            "ulysses": b.ulysses, "ring": b.ring, "cfg": b.cfg, "gather": b.gather, "total": b.total(),
            "intra_node": b.intra_node, "network": b.network,
        },
        "links": { "ulysses": e.links.0, "ring": e.links.1, "cfg": e.links.2 },
        "predicted_seconds": {
            "text": t.text, "image": t.image, "step": t.step, "denoise": t.denoise, "vae": t.vae, "total": t.total,
            "step_terms": {
                "attention": t.attention, "linear": t.linear, "rest": t.rest,
                "ulysses": t.ulysses, "ring_exposed": t.ring_exposed, "ring_merge": t.ring_merge, "cfg": t.cfg, "gather": t.gather,
            },
        },
    })
}

fn comparison_json(c: &Comparison) -> Value {
    let p = &c.published;
    json!({
        "system": p.system, "model": p.model, "gpu": p.gpu, "gpus": p.gpus,
        "width": p.width, "height": p.height, "frames": p.frames, "steps": p.steps,
        "dit_only": p.dit_only, "source": p.source,
        "published_seconds": p.seconds, "predicted_seconds": c.predicted_seconds,
        "efficiency": c.efficiency,
        "published_speedup": c.published_speedup, "predicted_speedup": c.predicted_speedup,
        "error": c.error, "fitted": c.published_speedup.is_none(),
        "published_serial_seconds": c.published_serial_seconds,
    })
}

fn bytes(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

fn print_human(args: &PlanArgs, model: &ModelShape, gpu: &GpuKind, eff: f64, spec: &JobSpec, job: &JobShape, plans: &[Evaluation]) {
    let cropped = if (job.width, job.height) != (u64::from(args.width), u64::from(args.height)) {
        format!(" (generated at {}x{}, the model's multiple, center-cropped back)", job.width, job.height)
    } else {
        String::new()
    };
    println!("model   {}: {:.2} B parameters, {} layers, {} heads", model.name, model.params as f64 / 1e9, model.layers, model.heads);
    println!(
        "job     {}x{}{cropped} x {} frames ({:.1} s at {} fps), {} steps, guidance {} ({} forward{} per step)",
        args.width,
        args.height,
        args.frames,
        f64::from(args.frames) / f64::from(args.fps),
        args.fps,
        job.steps,
        args.guidance,
        model.forwards_per_step(job.guidance),
        if model.forwards_per_step(job.guidance) == 1 { "" } else { "s" }
    );
    let [f, h, w] = job.latent_fhw;
    println!("tokens  {} (latent {f}x{h}x{w}, patches 1x2x2)", spec.tokens());
    println!(
        "device  {} ({}): {:.0} TFLOP/s bf16, {:.1} GiB ({:.1} usable), efficiency {eff:.3} ({})",
        gpu.name,
        gpu.label,
        gpu.peak_flops / 1e12,
        gib(gpu.memory_bytes),
        gib(gpu.usable_bytes()),
        efficiency_source(gpu)
    );
    println!("plans   what Tessera runs (sequence parallelism, CFG-parallel, the VAE split by rows over every rank)");
    println!("        every stage on the device, the text encoder loaded from host memory per job");
    for e in plans {
        let (m, t, b, fl) = (&e.memory, &e.timing, &e.traffic, &e.flops);
        println!();
        let verdict = match &e.infeasible {
            None => "feasible: true".to_string(),
            Some(why) => format!("feasible: false ({why})"),
        };
        println!("{} GPU{}  {}  vae_ranks={}  {verdict}", e.layout.gpus, if e.layout.gpus == 1 { "" } else { "s" }, e.layout.describe(), e.layout.vae_ranks);
        println!("  FLOPs/step      attention {:.3e}  linear {:.3e}  rest {:.3e}", fl.attention, fl.linear, fl.rest);
        println!(
            "  peak/rank       {} = weights {} + max(encode: text encoder {} | image encoder and VAE {}, denoise: activations {} + attention {} + ring {} + text states {} + latent {}, decode: VAE {} + tiles {})",
            bytes(m.peak as f64),
            bytes(m.weights as f64),
            bytes(m.text_encoder as f64),
            bytes(m.image_encoder as f64),
            bytes(m.activations as f64),
            bytes(m.attention_workspace as f64),
            bytes(m.ring_buffers as f64),
            bytes(m.text_states as f64),
            bytes(m.latent_shard as f64),
            bytes(m.vae_weights as f64),
            bytes(m.vae_tiles as f64)
        );
        println!(
            "  bytes/step/rank {} (ulysses {} over {}, ring {} over {}, cfg {} over {}, output gather {}); inside nodes {}, network {}",
            bytes(b.total()),
            bytes(b.ulysses),
            e.links.0,
            bytes(b.ring),
            e.links.1,
            bytes(b.cfg),
            e.links.2,
            bytes(b.gather),
            bytes(b.intra_node),
            bytes(b.network)
        );
        println!(
            "  seconds/step    {:.3} = attention {:.3} + linear {:.3} + rest {:.3} + ulysses {:.3} + ring exposed {:.3} + ring merge {:.3} + cfg {:.3} + gather {:.3}",
            t.step, t.attention, t.linear, t.rest, t.ulysses, t.ring_exposed, t.ring_merge, t.cfg, t.gather
        );
        println!(
            "  predicted       {} = text {} + image {} + {} steps x {:.3} s + VAE {}",
            human_seconds(t.total),
            human_seconds(t.text),
            human_seconds(t.image),
            job.steps,
            t.step,
            human_seconds(t.vae)
        );
    }
}

fn print_calibration(rows: &[Comparison]) {
    println!(
        "{:<10} {:<16} {:<10} {:>4}  {:>10}  {:>10}  {:>9}  {:>9}  {:>8}  {:>11}",
        "system", "model", "gpu", "gpus", "published", "predicted", "pub. x", "pred. x", "error", "pub. serial"
    );
    for c in rows {
        let p = &c.published;
        let (ps, qs) = match (c.published_speedup, c.predicted_speedup) {
            (Some(a), Some(b)) => (format!("{a:.2}x"), format!("{b:.2}x")),
            _ => ("fit".to_string(), "fit".to_string()),
        };
        let serial = c.published_serial_seconds.map_or(String::new(), |s| format!("{s:.0} s"));
        println!(
            "{:<10} {:<16} {:<10} {:>4}  {:>8.1} s  {:>8.1} s  {:>9}  {:>9}  {:>+7.1}%  {:>11}",
            p.system,
            p.model,
            p.gpu,
            p.gpus,
            p.seconds,
            c.predicted_seconds,
            ps,
            qs,
            100.0 * c.error,
            serial
        );
    }
    println!("error: predicted/published speedup - 1 (seconds for single-GPU figures, which fix each kind's efficiency factor)");
    println!("pub. serial: seconds that did not shrink with the GPUs in the published runs (Amdahl, from the 1- and n-GPU figures)");
}
