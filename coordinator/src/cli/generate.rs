//! `tessera generate`: text (and, for video-to-video, an input video) in, a video file out. The
//! flags become one public `GenerateRequest`, and every run goes through a coordinator: with
//! `--server`, a running `tessera serve`; without it, an embedded coordinator with in-process
//! workers on this machine (`--device`, `--workers`), driven over the internal API exactly as a
//! cluster is. So a local run is validated, planned, refused and timed by the same code as a
//! server's; the streamed file is written and the command says where it went and how long each
//! phase took.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tessera_coordinator::request::MAX_INPUT_VIDEO_BYTES;
use tessera_coordinator::video::input::{InputInfo, InputLimits};

/// Arguments of `tessera generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// What the video shows. Required with --model or --server; without them (a built-in model)
    /// it defaults to the demo's example, "a red ball moving right", and says so.
    #[arg(long, env = "TESSERA_PROMPT")]
    prompt: Option<String>,
    /// What it should not show (guidance's unconditional branch).
    #[arg(long, env = "TESSERA_NEGATIVE_PROMPT", default_value = "")]
    negative_prompt: String,
    /// A diffusers snapshot folder (model_index.json, transformer/, vae/, text_encoder/,
    /// tokenizer/, scheduler/). Without it, the built-in model of --preset runs. Not with --server.
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// Built-in model, used when --model is not given: demo (a small trained model: "a {red,
    /// green, blue, yellow, white} {ball, square, triangle} moving {left, right, up, down}"), or
    /// one with random weights (tiny, tiny-df, tiny-i2v).
    #[arg(long, env = "TESSERA_PRESET", default_value = "demo")]
    preset: String,
    /// Output file: `.mp4`, `.gif`, `.safetensors` (the raw latents), or a folder for PNG frames.
    #[arg(short, long, env = "TESSERA_OUTPUT", default_value = "tessera.mp4")]
    output: PathBuf,
    /// Output format (mp4, gif, png, latents); by default from the output's extension.
    #[arg(long, env = "TESSERA_FORMAT")]
    format: Option<String>,
    /// Frame height in pixels, up to 4096 (default: the model's, 480 for Wan 2.1). Not a multiple
    /// of the model's factor (16 for Wan and for the demo): generated at the next multiple and
    /// center-cropped back (`--height 1080` gives 1080 rows).
    #[arg(long, env = "TESSERA_HEIGHT")]
    height: Option<u32>,
    /// Frame width in pixels, up to 4096 (default: the model's, 832 for Wan 2.1); cropped back as
    /// the height.
    #[arg(long, env = "TESSERA_WIDTH")]
    width: Option<u32>,
    /// Number of frames, 4k+1 (default: the model's, 81 for Wan 2.1; with --input-video, as
    /// many as the input has, cut to the largest 4k+1).
    #[arg(long, env = "TESSERA_FRAMES")]
    frames: Option<u32>,
    /// Video-to-video: the input video (MP4 with H.264, GIF, PNG or APNG, recognised by its
    /// contents). Its frames are resized to --width x --height (Lanczos, stretched). A Wan model
    /// transforms it (--strength): the first --frames of them, or all of them cut to the largest
    /// 4k+1. A diffusion-forcing model (tiny-df, SkyReels-V2 DF) extends it: the output is the
    /// whole input, then the frames that continue it from its last --overlap-frames; --frames
    /// counts the frames generated from those on (default: the input's largest 4k+1).
    #[arg(long, env = "TESSERA_INPUT_VIDEO")]
    input_video: Option<PathBuf>,
    /// Image-to-video: the image the video starts from (PNG, JPEG or WebP, recognised by its
    /// contents, up to 4096x4096). An image-to-video model (the tiny-i2v preset, a Wan 2.1 I2V
    /// snapshot) requires it; a diffusion-forcing model (tiny-df, SkyReels-V2 DF) takes it as the
    /// video's first frame (with causal blocks of 1 frame); the others refuse it.
    #[arg(long, env = "TESSERA_IMAGE")]
    image: Option<PathBuf>,
    /// Video-to-video: the share of the denoising schedule run from the noised input, in (0, 1];
    /// lower keeps more of the input (default: 0.8); only with --input-video.
    #[arg(long, env = "TESSERA_STRENGTH")]
    strength: Option<f64>,
    /// Denoising steps (default: the model's, 50 for Wan 2.1).
    #[arg(long, env = "TESSERA_STEPS")]
    steps: Option<u32>,
    /// Classifier-free guidance scale; at most 1 turns guidance off (default: 5).
    #[arg(long, env = "TESSERA_GUIDANCE", allow_negative_numbers = true)]
    guidance: Option<f32>,
    /// Flow-matching σ shift (default: the scheduler config's).
    #[arg(long, env = "TESSERA_SHIFT")]
    shift: Option<f64>,
    /// Sampler: unipc or euler (default: the scheduler config's).
    #[arg(long, env = "TESSERA_SAMPLER")]
    sampler: Option<String>,
    /// Seed of the initial noise (default: a random one, printed).
    #[arg(long, env = "TESSERA_SEED")]
    seed: Option<u64>,
    /// Frames per second of the file, a whole number from 1 to 120 (default: 16).
    #[arg(long, env = "TESSERA_FPS")]
    fps: Option<u32>,
    /// Compute device of the in-process workers' models: auto, cpu, cuda or cuda:N. Not with
    /// --server.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: String,
    /// Largest job in video tokens (latent frames x patch rows x patch columns), as `tessera
    /// serve --max-tokens`: 0 = no budget, the job is planned by memory; the same limits apply
    /// here as on a server.
    #[arg(long, env = "TESSERA_MAX_TOKENS", default_value_t = 0)]
    max_tokens: u64,
    /// In-process workers of the embedded coordinator, sharing the denoising sequence-parallel
    /// (internal gRPC and TCP collectives on loopback, in-memory membership); 0 = as many as the
    /// plan gives the device (one).
    #[arg(long, env = "TESSERA_WORKERS", default_value_t = 0, conflicts_with = "server")]
    workers: usize,
    /// No progress bar.
    #[arg(long, env = "TESSERA_QUIET")]
    quiet: bool,
    /// Send the request to this coordinator (`HOST:PORT` or a URL) instead of an embedded one.
    #[arg(long, env = "TESSERA_SERVER")]
    server: Option<String>,
    /// The model to use, as the server names it (default: the server's; without --server, the
    /// name the embedded coordinator gives --model or --preset).
    #[arg(long, env = "TESSERA_MODEL_NAME")]
    model_name: Option<String>,
    /// Queue priority, -100 to 100 (higher runs first; a server with tenants lets only its groups
    /// `priority` and `admin` go above its --max-tenant-priority).
    #[arg(long, env = "TESSERA_PRIORITY", default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// The deadline of the whole generation (e.g. 90s, 10m); past it the coordinator stops the job.
    #[arg(long, env = "TESSERA_TIMEOUT")]
    timeout: Option<String>,
    /// With --server: when the stream breaks (the coordinator restarted, a rolling update) while
    /// the job goes on, how long to wait for the coordinator to serve again and reattach
    /// (WatchJob); 0 never reattaches.
    #[arg(long, env = "TESSERA_REATTACH_FOR", default_value = super::remote::REATTACH_FOR)]
    reattach_for: String,
    /// Diffusion forcing (a SkyReels-V2 DF model, e.g. `--preset tiny-df`): frames per chunk,
    /// 4k+1 (default: the model's; 97 for the 540P models). Each chunk's frames are decoded and
    /// sent as soon as it is done.
    #[arg(long, env = "TESSERA_BASE_FRAMES")]
    base_frames: Option<u32>,
    /// Diffusion forcing: frames each chunk repeats from the video so far, 4k+1 (default: the
    /// model's, 17).
    #[arg(long, env = "TESSERA_OVERLAP_FRAMES")]
    overlap_frames: Option<u32>,
    /// Diffusion forcing: iterations each causal block lags the one before (default 0:
    /// synchronous).
    #[arg(long, env = "TESSERA_AR_STEP")]
    ar_step: Option<u32>,
    /// Diffusion forcing: latent frames per causal block (default: the model's).
    #[arg(long, env = "TESSERA_CAUSAL_BLOCK")]
    causal_block: Option<u32>,
    /// Diffusion forcing: noise mixed into each chunk's repeated frames, in thousandths
    /// (default: the model's, 20).
    #[arg(long, env = "TESSERA_ADDNOISE_CONDITION")]
    addnoise_condition: Option<f32>,
}

/// The public API request that the flags describe: the one thing a run is made from, with or
/// without `--server`. Only what needs this machine is checked here (the output path, the input
/// file, the flag spellings); every limit is the coordinator's one validation, whose refusal
/// names the field, shown as its flag.
fn request(args: &GenerateArgs) -> Result<super::remote::RemoteGenerate> {
    use super::remote::{format_named, format_of, RemoteGenerate};
    use tessera_proto::v1::{GenerateRequest, Sampler};
    let format = match &args.format {
        Some(f) => format_named(f).ok_or_else(|| anyhow!("--format {f}: expected mp4, gif, png or latents"))?,
        None => format_of(&args.output).ok_or_else(|| {
            anyhow!("--output {}: unknown extension (use .mp4, .gif, .safetensors or a folder for PNG frames, or --format)", args.output.display())
        })?,
    };
    let sampler = match args.sampler.as_deref() {
        None => Sampler::Unspecified,
        Some("unipc") => Sampler::Unipc,
        Some("euler") => Sampler::Euler,
        Some(s) => bail!("--sampler {s}: expected unipc or euler"),
    };
    // 0 on the wire means "the default"; as a flag it is a mistake.
    for (flag, value) in [("--width", args.width), ("--height", args.height), ("--frames", args.frames), ("--steps", args.steps), ("--fps", args.fps)] {
        if value == Some(0) {
            bail!("{flag} 0: must be at least 1 (leave the flag out for the model's default)");
        }
    }
    let timeout = match &args.timeout {
        Some(t) => Some(tessera_cluster::duration::parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?),
        None => None,
    };
    let reattach_for = tessera_cluster::duration::parse_duration(&args.reattach_for).map_err(|e| anyhow!("--reattach-for: {e}"))?;
    if args.server.is_some() {
        if args.model.is_some() {
            bail!("--model is a local snapshot folder; with --server, name the server's model with --model-name");
        }
        if args.device != "auto" {
            bail!("--device {}: the server's workers have their own devices; not with --server", args.device);
        }
    }
    let (input_video, frames) = match &args.input_video {
        None => (Vec::new(), args.frames.unwrap_or(0)),
        Some(path) => {
            let bytes = read_input_video(path)?;
            let (info, usable) = input_video_info(&bytes).map_err(|e| anyhow!("--input-video {}: {e}", path.display()))?;
            // Without --frames, the longest 4k+1 prefix of the input.
            let frames = args.frames.unwrap_or(usable);
            let fps = info.fps.map(|f| format!(" at {f:.2} fps")).unwrap_or_default();
            let total = info.declared_frames.map(|n| format!(", {n} frames")).unwrap_or_default();
            eprintln!("input {}: {} {}x{}{fps}{total}; --frames {frames}", path.display(), info.format.name(), info.width, info.height);
            (bytes, frames)
        }
    };
    // The image's header is checked here, before anything starts: a corrupt file or a
    // decompression bomb is refused at once, naming the flag.
    let input_image = match &args.image {
        None => Vec::new(),
        Some(path) => {
            let bytes = read_bounded(path, "--image", tessera_coordinator::input_image::MAX_INPUT_IMAGE_BYTES)?;
            let size = tessera_coordinator::input_image::probe(&bytes).map_err(|e| anyhow!("--image {}: {}", path.display(), refusal_detail(e)))?;
            eprintln!("input {}: {}x{}", path.display(), size.width, size.height);
            bytes
        }
    };
    // Diffusion forcing: what the flags set, the model's defaults for the rest (a model that is
    // not a diffusion-forcing one refuses any of them, naming --base-frames).
    let forcing = [args.base_frames, args.overlap_frames, args.ar_step, args.causal_block].iter().any(Option::is_some) || args.addnoise_condition.is_some();
    if args.causal_block == Some(0) || args.base_frames == Some(0) {
        bail!("--base-frames and --causal-block must be at least 1 (leave the flag out for the model's default)");
    }
    let diffusion_forcing = forcing.then(|| tessera_proto::v1::DiffusionForcing {
        base_num_frames: args.base_frames.unwrap_or(0),
        overlap_history: args.overlap_frames,
        ar_step: args.ar_step.unwrap_or(0),
        causal_block_size: args.causal_block.unwrap_or(0),
        addnoise_condition: args.addnoise_condition,
    });
    let request = GenerateRequest {
        prompt: prompt(args)?,
        negative_prompt: args.negative_prompt.clone(),
        width: args.width.unwrap_or(0),
        height: args.height.unwrap_or(0),
        num_frames: frames,
        fps: args.fps.unwrap_or(0),
        steps: args.steps.unwrap_or(0),
        guidance_scale: args.guidance,
        flow_shift: args.shift.map(|s| s as f32),
        sampler: sampler as i32,
        seed: args.seed,
        output_format: format as i32,
        priority: args.priority,
        model: args.model_name.clone().unwrap_or_default(),
        input_video,
        input_image,
        strength: args.strength.map(|s| s as f32),
        diffusion_forcing,
        ..Default::default()
    };
    Ok(RemoteGenerate { server: args.server.clone().unwrap_or_default(), request, output: args.output.clone(), timeout, quiet: args.quiet, reattach_for })
}

/// The prompt: `--prompt`, or for a built-in model (no `--model`, no `--server`) its example.
fn prompt(args: &GenerateArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    if let Some(flag) = [(args.server.is_some(), "--server"), (args.model.is_some(), "--model")].iter().find_map(|&(set, flag)| set.then_some(flag)) {
        bail!("--prompt is required with {flag}: what the video shows");
    }
    built_in_example_prompt()
}

/// The built-in models' example prompt, announced.
#[cfg(feature = "embedded")]
fn built_in_example_prompt() -> Result<String> {
    let p = tessera_worker::pipeline::demo::EXAMPLE_PROMPT;
    eprintln!("no --prompt: the built-in model's example prompt, \"{p}\"");
    Ok(p.to_string())
}

/// Without in-process workers there is no built-in model to default for.
#[cfg(not(feature = "embedded"))]
fn built_in_example_prompt() -> Result<String> {
    bail!("--prompt is required: what the video shows")
}

/// What an input video is, and the longest 4k+1 prefix of its frames (decoding it to count when
/// the container does not say).
fn input_video_info(bytes: &[u8]) -> Result<(InputInfo, u32)> {
    let limits = InputLimits::default();
    let mut reader = tessera_coordinator::video::input::VideoReader::open(bytes, limits)?;
    let info = *reader.info();
    let count = match info.declared_frames {
        Some(n) => n.min(limits.max_frames),
        None => {
            while reader.next_frame()?.is_some() {}
            reader.frames_read()
        }
    };
    let usable = tessera_coordinator::video::input::frames_for(count).ok_or_else(|| anyhow!("the video has no frame"))?;
    Ok((info, u32::try_from(usable)?))
}

/// Reads an input video file, refusing one larger than a request may carry.
fn read_input_video(path: &Path) -> Result<Vec<u8>> {
    read_bounded(path, "--input-video", MAX_INPUT_VIDEO_BYTES)
}

/// Reads the file `flag` names, refusing one larger than `max` bytes before reading it.
fn read_bounded(path: &Path, flag: &str, max: usize) -> Result<Vec<u8>> {
    let flag = || format!("{flag} {}", path.display());
    let len = std::fs::metadata(path).with_context(flag)?.len();
    if len > max as u64 {
        bail!("{}: {len} bytes; at most {max} are accepted", flag());
    }
    std::fs::read(path).with_context(flag)
}

/// A refused field's explanation, without the field's name (the flag replaces it).
fn refusal_detail(e: tessera_coordinator::error::CoordinatorError) -> String {
    match e {
        tessera_coordinator::error::CoordinatorError::InvalidArgument { detail, .. } => detail,
        other => other.to_string(),
    }
}

/// Without `--server`: an embedded coordinator and its in-process workers on `--device`, then
/// the client path against it.
#[cfg(feature = "embedded")]
fn generate_embedded(args: &GenerateArgs, mut job: super::remote::RemoteGenerate) -> Result<ExitCode> {
    use tessera_coordinator::server::{check_workers, default_workers, ModelSource};
    use tessera_kernels::cuda::DeviceChoice;
    use tessera_worker::pipeline::PipelinePreset;
    let (source, desc) = match &args.model {
        Some(dir) => (ModelSource::Snapshot(dir.clone()), dir.display().to_string()),
        None => {
            let preset = PipelinePreset::from_name(&args.preset).map_err(|e| anyhow!("--preset {}: {e}", args.preset))?;
            let weights = if preset.transformer_preset().is_some() { "random weights" } else { "trained" };
            (ModelSource::Preset(preset), format!("built-in `{}` ({weights})", preset.name()))
        }
    };
    let choice: DeviceChoice = args.device.parse().map_err(|e| anyhow!("--device {}: {e}", args.device))?;
    // Before anything loads: several workers cannot share a GPU asked for by name.
    if args.workers > 0 {
        check_workers(matches!(choice, DeviceChoice::Cuda(_)), args.workers)
            .map_err(|e| anyhow!("--device {} with --workers {}: {e}", args.device, args.workers))?;
    }
    let device = choice.resolve().map_err(|e| anyhow!("--device {}: {e}", args.device))?;
    let workers = if args.workers == 0 { default_workers(device) } else { args.workers };
    let model_name = args.model_name.clone().unwrap_or_else(|| source.default_name());
    let source_flag = if args.model.is_some() { "--model" } else { "--preset" };
    let started = std::time::Instant::now();
    if !args.quiet {
        let plural = if workers == 1 { "" } else { "s" };
        eprintln!("loading model {desc} on {device} for {workers} in-process worker{plural}");
    }
    let server = super::embedded::EmbeddedServer::start(source, device, model_name, workers, usize::try_from(args.max_tokens).unwrap_or(usize::MAX))
        .map_err(|e| anyhow!("{source_flag} {desc} on --device {device} with --workers {workers}: {e:#}"))?;
    if !args.quiet {
        eprintln!("loaded in {:.2}s; embedded coordinator on {}", started.elapsed().as_secs_f64(), server.addr);
    }
    job.server = server.addr.to_string();
    // (The embedded coordinator lives as long as this command: nothing to reattach to.)
    job.reattach_for = std::time::Duration::ZERO;
    let code = super::remote::generate(job);
    drop(server);
    code
}

/// Runs one generation and writes the file.
pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let job = request(&args)?;
    if args.server.is_some() {
        return super::remote::generate(job);
    }
    #[cfg(feature = "embedded")]
    return generate_embedded(&args, job);
    #[cfg(not(feature = "embedded"))]
    {
        drop(job);
        bail!("--server: this build of tessera has no in-process workers (built without the `embedded` feature); give the coordinator to send the request to")
    }
}
