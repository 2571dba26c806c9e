//! `tessera generate`: text (and, for video-to-video, an input video) in, a video file out, on
//! this machine. Runs the Wan pipeline in-process on the chosen device (`--device`: the CPU, or
//! every model on a CUDA GPU) — a diffusers snapshot folder given with `--model`, or a built-in
//! model with random weights — held to the server's limits (`pipeline::limits`), shows a
//! progress bar, writes MP4, GIF or PNG frames, and
//! says where the file went and how long each phase took. With `--server`, the same request goes
//! to a coordinator (`tessera serve`) instead, and the streamed file is written.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tessera_coordinator::request::MAX_INPUT_VIDEO_BYTES;
use tessera_coordinator::server::ModelSource;
use tessera_coordinator::video::input::{prepare_video, FrameSelection, InputLimits, PreparedVideo};
use tessera_coordinator::video::{push_channel_major, VideoFile, VideoSpec};
use tessera_coordinator::{CoordinatorError, InputVideoProblem};
use tessera_kernels::{Device, Tensor};
use tessera_worker::parallel::ParallelPlan;
use tessera_worker::pipeline::limits::{Limits, DEFAULT_MAX_TOKENS};
use tessera_worker::pipeline::{
    generate_sharded, GenerationParams, PipelineDefaults, PipelineObserver, PipelinePreset, TextConditions, VideoInput, WanPipeline, WAN_DEFAULTS,
};
use tessera_worker::sampler::SamplerKind;

/// Arguments of `tessera generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// What the video shows.
    #[arg(long, env = "TESSERA_PROMPT")]
    prompt: String,
    /// What it should not show (guidance's unconditional branch).
    #[arg(long, env = "TESSERA_NEGATIVE_PROMPT", default_value = "")]
    negative_prompt: String,
    /// A diffusers snapshot folder (model_index.json, transformer/, vae/, text_encoder/,
    /// tokenizer/, scheduler/). Without it, the built-in model of --preset runs. Local mode only.
    #[arg(long, env = "TESSERA_MODEL")]
    model: Option<PathBuf>,
    /// Built-in model with random weights, used when --model is not given.
    #[arg(long, env = "TESSERA_PRESET", default_value = "tiny")]
    preset: String,
    /// Output file: `.mp4`, `.gif`, or a folder for PNG frames (with --server also
    /// `.safetensors` for the raw latents).
    #[arg(short, long, env = "TESSERA_OUTPUT", default_value = "tessera.mp4")]
    output: PathBuf,
    /// Output format (mp4, gif, png; with --server also latents); by default from the output's extension.
    #[arg(long, env = "TESSERA_FORMAT")]
    format: Option<String>,
    /// Frame height in pixels, a multiple of 16 (default: the model's, 480 for Wan 2.1).
    #[arg(long, env = "TESSERA_HEIGHT")]
    height: Option<usize>,
    /// Frame width in pixels, a multiple of 16 (default: the model's, 832 for Wan 2.1).
    #[arg(long, env = "TESSERA_WIDTH")]
    width: Option<usize>,
    /// Number of frames, 4k+1 (default: the model's, 81 for Wan 2.1; with --input-video, as
    /// many as the input has, cut to the largest 4k+1).
    #[arg(long, env = "TESSERA_FRAMES")]
    frames: Option<usize>,
    /// Video-to-video: the input video (MP4 with H.264, GIF, PNG or APNG, recognised by its
    /// contents). Its frames are resized to --width x --height (Lanczos, stretched) and taken in
    /// order: the first --frames of them, or all of them cut to the largest 4k+1.
    #[arg(long, env = "TESSERA_INPUT_VIDEO")]
    input_video: Option<PathBuf>,
    /// Video-to-video: the share of the denoising schedule run from the noised input, in (0, 1];
    /// lower keeps more of the input. Default 0.8; only with --input-video.
    #[arg(long, env = "TESSERA_STRENGTH")]
    strength: Option<f64>,
    /// Denoising steps (default: the model's, 50 for Wan 2.1).
    #[arg(long, env = "TESSERA_STEPS")]
    steps: Option<usize>,
    /// Classifier-free guidance scale; at most 1 turns guidance off.
    #[arg(long, env = "TESSERA_GUIDANCE", default_value_t = 5.0, allow_negative_numbers = true)]
    guidance: f32,
    /// Flow-matching σ shift (default: the scheduler config's).
    #[arg(long, env = "TESSERA_SHIFT")]
    shift: Option<f64>,
    /// Sampler: unipc or euler (default: the scheduler config's).
    #[arg(long, env = "TESSERA_SAMPLER")]
    sampler: Option<String>,
    /// Seed of the initial noise (default: a random one, printed).
    #[arg(long, env = "TESSERA_SEED")]
    seed: Option<u64>,
    /// Frames per second of the file.
    #[arg(long, env = "TESSERA_FPS", default_value_t = 16.0)]
    fps: f64,
    /// Compute device of the transformer: auto, cpu, cuda or cuda:N (`--workers` runs its
    /// in-process workers on the CPU).
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: String,
    /// How the denoising is spread over in-process ranks.
    #[command(flatten)]
    ranks: super::RankArgs,
    /// Largest job in video tokens (latent frames x patch rows x patch columns), as `tessera
    /// serve --max-tokens`: the same limits apply here as on a server.
    #[arg(long, env = "TESSERA_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: u64,
    /// Run through an embedded coordinator with this many in-process workers (internal gRPC and
    /// TCP collectives on loopback, in-memory membership: the cluster's code path); 0 = run the
    /// pipeline in this process directly.
    #[arg(long, env = "TESSERA_WORKERS", default_value_t = 0, conflicts_with = "server")]
    workers: usize,
    /// No progress bar.
    #[arg(long, env = "TESSERA_QUIET")]
    quiet: bool,
    /// Send the request to this coordinator (`HOST:PORT` or a URL) instead of running it here.
    #[arg(long, env = "TESSERA_SERVER")]
    server: Option<String>,
    /// With --server: the model to use, as the server names it (default: the server's).
    #[arg(long, env = "TESSERA_MODEL_NAME")]
    model_name: Option<String>,
    /// With --server: queue priority, -100 to 100 (higher runs first).
    #[arg(long, env = "TESSERA_PRIORITY", default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// With --server: the deadline of the whole generation (e.g. 90s, 10m); past it the server
    /// stops the job.
    #[arg(long, env = "TESSERA_TIMEOUT")]
    timeout: Option<String>,
}

/// The public API request that the flags describe (client mode).
fn remote_request(args: &GenerateArgs) -> Result<super::remote::RemoteGenerate> {
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
    if !(args.fps.fract() == 0.0 && (1.0..=120.0).contains(&args.fps)) {
        bail!("--fps {}: with --server, a whole number from 1 to 120", args.fps);
    }
    let size = |v: Option<usize>, flag: &str| -> Result<u32> { v.map_or(Ok(0), |v| u32::try_from(v).map_err(|_| anyhow!("{flag} {v}: too large"))) };
    let timeout = match &args.timeout {
        Some(t) => Some(tessera_worker::duration::parse_duration(t).map_err(|e| anyhow!("--timeout: {e}"))?),
        None => None,
    };
    if args.model.is_some() && args.server.is_some() {
        bail!("--model is a local snapshot folder; with --server, name the server's model with --model-name");
    }
    let (input_video, strength, frames) = match (&args.input_video, args.strength) {
        (None, Some(s)) => bail!("--strength {s}: applies only to video-to-video; give --input-video too"),
        (_, Some(s)) if !(s > 0.0 && s <= 1.0) => bail!("--strength {s}: must be greater than 0 and at most 1"),
        (None, None) => (Vec::new(), None, size(args.frames, "--frames")?),
        (Some(path), s) => {
            let bytes = read_input_video(path)?;
            // Without --frames, the longest 4k+1 prefix of the input (as in local mode).
            let frames = match args.frames {
                Some(_) => size(args.frames, "--frames")?,
                None => input_frame_count(&bytes).map_err(|e| anyhow!("--input-video {}: {e}", path.display()))?,
            };
            (bytes, Some(s.unwrap_or(DEFAULT_STRENGTH) as f32), frames)
        }
    };
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: size(args.width, "--width")?,
        height: size(args.height, "--height")?,
        num_frames: frames,
        fps: args.fps as u32,
        steps: size(args.steps, "--steps")?,
        guidance_scale: Some(args.guidance),
        flow_shift: args.shift.map(|s| s as f32),
        sampler: sampler as i32,
        seed: args.seed,
        output_format: format as i32,
        priority: args.priority,
        model: args.model_name.clone().unwrap_or_default(),
        input_video,
        strength,
        ..Default::default()
    };
    Ok(RemoteGenerate { server: args.server.clone().unwrap_or_default(), request, output: args.output.clone(), timeout, quiet: args.quiet })
}

/// The longest 4k+1 prefix of an input video's frames (decoding it to count when the container
/// does not say).
fn input_frame_count(bytes: &[u8]) -> Result<u32> {
    let limits = InputLimits::default();
    let mut reader = tessera_coordinator::video::input::VideoReader::open(bytes, limits)?;
    let count = match reader.info().declared_frames {
        Some(n) => n.min(limits.max_frames),
        None => {
            while reader.next_frame()?.is_some() {}
            reader.frames_read()
        }
    };
    let usable = tessera_coordinator::video::input::frames_for(count).ok_or_else(|| anyhow!("the video has no frame"))?;
    Ok(u32::try_from(usable)?)
}

/// `--workers N`: an embedded coordinator and N in-process workers, then the `--server` client
/// path against it.
fn generate_embedded(args: &GenerateArgs) -> Result<ExitCode> {
    let (source, name) = match &args.model {
        Some(dir) => (ModelSource::Snapshot(dir.clone()), "wan2.1-t2v-1.3b".to_string()),
        None => {
            let preset = PipelinePreset::from_name(&args.preset).map_err(|e| anyhow!("--preset {}: {e}", args.preset))?;
            (ModelSource::Preset(preset), preset.name().to_string())
        }
    };
    if args.ranks.ranks != 1 || args.ranks.ulysses != 1 {
        bail!("--workers {} and --ranks/--ulysses: give one of them", args.workers);
    }
    if args.device.starts_with("cuda") {
        bail!("--device {} with --workers {}: in-process workers share one model on the CPU; for GPUs run one worker process per GPU (TESSERA_DEVICE=cuda bash deploy/local-cluster.sh {} starts them, then use --server)", args.device, args.workers, args.workers);
    }
    let model_name = args.model_name.clone().unwrap_or(name);
    let started = Instant::now();
    let server = super::embedded::EmbeddedServer::start(source, model_name, args.workers, usize::try_from(args.max_tokens).unwrap_or(usize::MAX))
        .with_context(|| format!("--workers {}", args.workers))?;
    if !args.quiet {
        eprintln!("embedded coordinator on {} with {} in-process workers (loaded in {:.2}s)", server.addr, args.workers, started.elapsed().as_secs_f64());
    }
    let mut job = remote_request(args)?;
    job.server = server.addr.to_string();
    let code = super::remote::generate(job);
    drop(server);
    code
}

/// Streams decoded frames into the file and drives the progress bar.
struct CliObserver {
    bar: ProgressBar,
    file: Option<VideoFile>,
    decode_started: Option<Instant>,
    encode_time: Duration,
    denoise_started: Option<Instant>,
    denoise_time: Duration,
}

impl PipelineObserver for CliObserver {
    fn on_text(&mut self, _text: &TextConditions) -> tessera_worker::Result<()> {
        self.bar.set_message("denoising");
        self.denoise_started = Some(Instant::now());
        Ok(())
    }

    fn on_step(&mut self, step: usize, total: usize, _latents: &Tensor) -> tessera_worker::Result<()> {
        self.bar.set_length(total as u64);
        self.bar.set_position(step as u64 + 1);
        if step + 1 == total {
            self.denoise_time = self.denoise_started.map(|t| t.elapsed()).unwrap_or_default();
            self.bar.set_message("decoding");
            self.decode_started = Some(Instant::now());
        }
        Ok(())
    }

    fn on_frames(&mut self, frames: &Tensor) -> tessera_worker::Result<()> {
        let t = Instant::now();
        let file = self.file.as_mut().expect("the file is open until the run ends");
        push_channel_major(file, frames.data(), frames.dim(2))
            .map_err(|e| tessera_worker::WorkerError::InvalidInput { field: "output", detail: e.to_string() })?;
        self.encode_time += t.elapsed();
        Ok(())
    }
}

fn pick_defaults(args: &GenerateArgs, device: Device) -> Result<(WanPipeline, PipelineDefaults, String)> {
    match &args.model {
        Some(dir) => {
            let pipe = WanPipeline::load_on(dir, device).with_context(|| format!("--model {}", dir.display()))?;
            Ok((pipe, WAN_DEFAULTS, dir.display().to_string()))
        }
        None => {
            let preset = PipelinePreset::from_name(&args.preset).map_err(|e| anyhow!("--preset {}: {e}", args.preset))?;
            let pipe = preset.build_on(0, device).with_context(|| format!("--device {}", args.device))?;
            Ok((pipe, preset.defaults(), format!("built-in `{}` (random weights)", preset.name())))
        }
    }
}

/// Upstream's default video-to-video strength.
const DEFAULT_STRENGTH: f64 = 0.8;

/// Reads an input video file, refusing one larger than a request may carry.
fn read_input_video(path: &Path) -> Result<Vec<u8>> {
    let flag = || format!("--input-video {}", path.display());
    let len = std::fs::metadata(path).with_context(flag)?.len();
    if len > MAX_INPUT_VIDEO_BYTES as u64 {
        bail!("{}: {len} bytes; at most {MAX_INPUT_VIDEO_BYTES} are accepted", flag());
    }
    std::fs::read(path).with_context(flag)
}

/// Decodes and prepares the input video for `params`' size: the first `frames` frames, or the
/// longest 4k+1 prefix. Errors name the flag at fault.
fn prepare_input_video(bytes: &[u8], path: &Path, params: &GenerationParams, frames: Option<usize>) -> Result<PreparedVideo> {
    let selection = frames.map_or(FrameSelection::Longest, FrameSelection::First);
    prepare_video(bytes, params.width, params.height, selection, &InputLimits::default()).map_err(|e| match (&e, frames) {
        (CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::TooFewFrames, .. }, Some(n)) => {
            anyhow!("--frames {n}: the input video {} is too short: {e}", path.display())
        }
        _ => anyhow!("--input-video {}: {e}", path.display()),
    })
}

/// Runs one generation and writes the file.
pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    if args.server.is_some() {
        return super::remote::generate(remote_request(&args)?);
    }
    if args.workers > 0 {
        return generate_embedded(&args);
    }
    let started = Instant::now();
    let device = tessera_worker::pipeline::resolve_pipeline_device(&args.device).map_err(|e| anyhow!("--device {}: {e}", args.device))?;
    if device != Device::Cpu && (args.ranks.ranks > 1 || args.ranks.ulysses > 1) {
        bail!("--ranks {} with --device {}: the ranks of one process share one model on one GPU, and NCCL needs a GPU per rank; run a `tessera-worker serve --device cuda:N` per GPU (`tessera serve --etcd`), or use --device cpu or one rank", args.ranks.ranks, args.device);
    }
    let format = match &args.format {
        Some(f) => tessera_coordinator::video::VideoFormat::from_name(f).ok_or_else(|| anyhow!("--format {f}: expected mp4, gif or png"))?,
        None => VideoFile::format_of(&args.output)
            .ok_or_else(|| anyhow!("--output {}: unknown extension (use .mp4, .gif or a folder for PNG frames, or --format)", args.output.display()))?,
    };
    let sampler = match &args.sampler {
        Some(s) => Some(SamplerKind::from_name(s).ok_or_else(|| anyhow!("--sampler {s}: expected unipc or euler"))?),
        None => None,
    };
    if !(args.fps.is_finite() && args.fps > 0.0 && args.fps <= 120.0) {
        bail!("--fps {}: must be greater than 0 and at most 120", args.fps);
    }
    let transport = args.ranks.transport()?;
    let strength = match (&args.input_video, args.strength) {
        (None, Some(s)) => bail!("--strength {s}: applies only to video-to-video; give --input-video too"),
        (_, Some(s)) if !(s > 0.0 && s <= 1.0) => bail!("--strength {s}: must be greater than 0 and at most 1"),
        (_, s) => s.unwrap_or(DEFAULT_STRENGTH),
    };
    let input_bytes = args.input_video.as_deref().map(read_input_video).transpose()?;
    let (pipe, defaults, model_desc) = pick_defaults(&args, device)?;
    let plan = if args.ranks.ranks == 1 && args.ranks.ulysses == 1 {
        None
    } else {
        let heads = pipe.transformer().config().num_attention_heads;
        Some(
            ParallelPlan::new(args.ranks.ranks, args.ranks.ulysses, heads)
                .map_err(|e| anyhow!("--ranks {} --ulysses {}: {e}", args.ranks.ranks, args.ranks.ulysses))?,
        )
    };
    let load_time = started.elapsed();
    let seed = args.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    let mut params = GenerationParams {
        negative_prompt: args.negative_prompt.clone(),
        height: args.height.unwrap_or(defaults.height),
        width: args.width.unwrap_or(defaults.width),
        // With an input video and no --frames, the count comes from the video (set below).
        num_frames: args.frames.unwrap_or(if input_bytes.is_some() { 1 } else { defaults.num_frames }),
        num_inference_steps: args.steps.unwrap_or(defaults.num_inference_steps),
        guidance_scale: args.guidance,
        flow_shift: args.shift,
        sampler,
        seed,
        ..GenerationParams::new(args.prompt.clone())
    };
    let vc = pipe.vae().config();
    // Name the flag, not the library's field: the error's field, typed, through the one table.
    let validate = |params: &GenerationParams| {
        params.validate(vc.spatial_factor(), vc.temporal_factor(), &Limits { max_tokens: args.max_tokens, ..Limits::default() }).map_err(|e| {
            // The server's words: `FLAG: invalid FIELD: DETAIL`.
            match &e {
                tessera_worker::WorkerError::InvalidInput { field, detail } => {
                    anyhow!("{}: invalid {field}: {detail}", super::flags::flag_for_field(field).unwrap_or("input"))
                }
                _ => anyhow!("input: {e}"),
            }
        })
    };
    validate(&params)?;
    if let (Some(bytes), Some(path)) = (&input_bytes, &args.input_video) {
        let prepare_started = Instant::now();
        let prepared = prepare_input_video(bytes, path, &params, args.frames)?;
        let src = &prepared.source;
        let used = match src.declared_frames {
            Some(total) => format!("{} of its {total} frames", prepared.frames),
            None => format!("{} of the first {} frames", prepared.frames, prepared.frames_read),
        };
        println!(
            "input {}: {} {}x{}{}, {used} resized to {}x{} in {:.2}s, strength {strength}",
            path.display(),
            src.format.name(),
            src.width,
            src.height,
            src.fps.map(|f| format!(" at {f:.2} fps")).unwrap_or_default(),
            params.width,
            params.height,
            prepare_started.elapsed().as_secs_f64(),
        );
        params.num_frames = prepared.frames;
        params.video = Some(VideoInput { video: prepared.video, strength });
        validate(&params)?;
    }
    let spec = VideoSpec::new(params.width as u32, params.height as u32, args.fps)?;
    let file = VideoFile::create(format, &args.output, spec).with_context(|| format!("--output {}", args.output.display()))?;
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(params.num_inference_steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] step {pos}/{len}  {elapsed_precise} elapsed, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("encoding prompt");
    let mut obs = CliObserver { bar, file: Some(file), decode_started: None, encode_time: Duration::ZERO, denoise_started: None, denoise_time: Duration::ZERO };
    let text_started = Instant::now();
    let run = match plan {
        None => pipe.generate(&params, &mut obs),
        Some(plan) => generate_sharded(&pipe, &params, transport, plan, &mut obs),
    };
    obs.bar.finish_and_clear();
    run.with_context(|| format!("generating with {model_desc}"))?;
    let decode_and_encode = obs.decode_started.map(|t| t.elapsed()).unwrap_or_default();
    let frames = {
        use tessera_coordinator::video::FrameSink;
        obs.file.as_ref().map(|f| f.frames_written()).unwrap_or(0)
    };
    let written = obs.file.take().expect("the file is still open").finish()?;
    let text_time = text_started.elapsed().saturating_sub(obs.denoise_time + decode_and_encode);
    println!(
        "wrote {} ({} frames, {}x{} at {} fps, {})",
        args.output.display(),
        frames,
        spec.width,
        spec.height,
        args.fps,
        if written.len() > 1 { format!("{} PNG files", written.len()) } else { format.name().to_string() }
    );
    let ranks = plan.map(|p| format!(", {} ranks (ulysses {} x ring {}, {})", p.ranks(), p.ulysses, p.ring, args.ranks.transport)).unwrap_or_default();
    println!(
        "model {model_desc}, transformer on {}, seed {seed}, {} steps, guidance {}{ranks}",
        pipe.transformer().describe(),
        params.num_inference_steps,
        params.guidance_scale
    );
    println!(
        "time: load {:.2}s, text {:.2}s, denoise {:.2}s, decode {:.2}s, encode {:.2}s, total {:.2}s",
        load_time.as_secs_f64(),
        text_time.as_secs_f64(),
        obs.denoise_time.as_secs_f64(),
        decode_and_encode.saturating_sub(obs.encode_time).as_secs_f64(),
        obs.encode_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
