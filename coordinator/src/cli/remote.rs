//! The client side of the public API, for `tessera generate --server`, `tessera watch` and
//! `tessera status`: connecting, naming status codes, writing a Generate stream's chunks to files
//! (following a job across a restart of its coordinator: [`Reattach`]).

pub use super::reattach::{Reattach, REATTACH_FOR};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{generate_event::Event, Chunk, GenerateEvent, GenerateRequest, OutputFormat, Phase, PhaseTimings, Plan, Progress};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tracing::Instrument;

/// A client mode generation.
pub struct RemoteGenerate {
    /// Server address (`HOST:PORT` or a URL).
    pub server: String,
    /// The request.
    pub request: GenerateRequest,
    /// Output file (or folder for PNG frames).
    pub output: PathBuf,
    /// The client's deadline.
    pub timeout: Option<Duration>,
    /// No progress bar.
    pub quiet: bool,
    /// How long to try to reattach when the stream breaks (zero: never).
    pub reattach_for: Duration,
}

/// The gRPC name of a status code (`INVALID_ARGUMENT`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A status as an error: `CODE: message`, after the flag behind the refused field when the
/// status names one (its `ErrorInfo`, never its message text).
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let flag = tessera_proto::reason::failure(&s).and_then(|f| f.field).and_then(|f| super::flags::flag_for_field(&f));
    match flag {
        Some(flag) => anyhow!("{flag}: {}: {}", code_name(s.code()), s.message()),
        None => anyhow!("{}: {}", code_name(s.code()), s.message()),
    }
}

/// The server's endpoint URL (`http://` added to a bare `HOST:PORT`).
pub fn endpoint(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// The environment variable holding the client's bearer token for a server that asks for one
/// (`tessera serve --auth-token-file`).
pub const TOKEN_ENV: &str = "TESSERA_TOKEN";

/// Adds `authorization: Bearer TOKEN` to every call when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The token of [`TOKEN_ENV`], if set and not empty. The error never shows the token.
    pub fn from_env() -> Result<Self> {
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => {
                let value = format!("Bearer {}", t.trim()).parse().map_err(|_| anyhow!("{TOKEN_ENV}: the token holds characters a header cannot carry"))?;
                Ok(Self(Some(value)))
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self(None)),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV}: not text"),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A connection to the public API that sends the client's token.
pub type ApiChannel = InterceptedService<Channel, Bearer>;

/// Connects to the public API (`flag` names the option in errors), with the token of
/// [`TOKEN_ENV`] on every call.
pub async fn connect(server: &str, flag: &str) -> Result<ApiChannel> {
    let bearer = Bearer::from_env()?;
    let ep = tonic::transport::Endpoint::from_shared(endpoint(server))
        .map_err(|e| anyhow!("{flag} {server}: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let channel = ep.connect().await.map_err(|e| anyhow!("{flag} {server}: cannot connect: {e}"))?;
    Ok(InterceptedService::new(channel, bearer))
}

/// The format a client-mode output path asks for by its extension.
pub fn format_of(path: &Path) -> Option<OutputFormat> {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("mp4") => Some(OutputFormat::Mp4),
        Some("gif") => Some(OutputFormat::Gif),
        Some("safetensors") => Some(OutputFormat::RawLatents),
        Some("png") | None => Some(OutputFormat::PngFrames),
        Some(_) => None,
    }
}

/// Parses `--format` in client mode.
pub fn format_named(name: &str) -> Option<OutputFormat> {
    match name {
        "mp4" => Some(OutputFormat::Mp4),
        "gif" => Some(OutputFormat::Gif),
        "png" => Some(OutputFormat::PngFrames),
        "latents" => Some(OutputFormat::RawLatents),
        _ => None,
    }
}

/// One file being received: bytes must arrive in order.
struct Incoming {
    path: PathBuf,
    part: PathBuf,
    file: File,
    written: u64,
}

/// Writes the chunks of a stream: one file, or one PNG per frame in a folder.
struct ChunkWriter {
    output: PathBuf,
    frames: bool,
    open: Option<(u32, Incoming)>,
    written: Vec<PathBuf>,
    bytes: u64,
}

impl ChunkWriter {
    fn new(output: &Path, format: OutputFormat) -> Result<Self> {
        let frames = format == OutputFormat::PngFrames;
        if frames {
            std::fs::create_dir_all(output).with_context(|| format!("--output {}", output.display()))?;
        }
        Ok(Self { output: output.into(), frames, open: None, written: Vec::new(), bytes: 0 })
    }

    fn push(&mut self, c: Chunk) -> Result<()> {
        if self.open.as_ref().is_some_and(|(i, _)| *i != c.frame_index) {
            bail!("the server started frame {} before finishing the previous file", c.frame_index);
        }
        if self.open.is_none() {
            let path = if self.frames { self.output.join(format!("frame_{:05}.png", c.frame_index)) } else { self.output.clone() };
            let mut part = path.clone().into_os_string();
            part.push(".part");
            let part = PathBuf::from(part);
            let file = File::create(&part).with_context(|| format!("--output {}", part.display()))?;
            self.open = Some((c.frame_index, Incoming { path, part, file, written: 0 }));
        }
        let (_, f) = self.open.as_mut().expect("opened above");
        if c.offset != f.written {
            bail!("chunk at offset {} of {} arrived after {} bytes", c.offset, f.path.display(), f.written);
        }
        f.file.write_all(&c.data).with_context(|| format!("writing {}", f.part.display()))?;
        f.written += c.data.len() as u64;
        self.bytes += c.data.len() as u64;
        if c.last {
            let (_, f) = self.open.take().expect("open");
            f.file.sync_all().with_context(|| format!("writing {}", f.part.display()))?;
            std::fs::rename(&f.part, &f.path).with_context(|| format!("renaming {} to {}", f.part.display(), f.path.display()))?;
            self.written.push(f.path);
        }
        Ok(())
    }

    /// Removes a file left half-written.
    fn abandon(&mut self) {
        if let Some((_, f)) = self.open.take() {
            let _ = std::fs::remove_file(&f.part);
        }
    }
}

fn plan_text(p: &Plan) -> String {
    let workers = if p.worker_ids.is_empty() { String::new() } else { format!(" on {}", p.worker_ids.join(", ")) };
    let predicted = match &p.predicted_duration {
        Some(d) => format!(", predicted {}, peak {:.1} GiB/rank", human_seconds(secs(&Some(*d))), p.predicted_peak_bytes_per_rank as f64 / (1u64 << 30) as f64),
        None => String::new(),
    };
    format!("{} ranks (ulysses {} x ring {}){workers}, {} tokens, {} forwards/step{predicted}", p.ranks, p.ulysses, p.ring, p.tokens, p.forwards_per_step)
}

/// `12.3 s`, `4.5 min`, `3.2 h`.
pub(super) fn human_seconds(s: f64) -> String {
    if s >= 5400.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 90.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The settings a job runs with, once the coordinator applied its defaults.
fn effective_text(r: &GenerateRequest) -> String {
    let v2v = r.strength.map(|s| format!(", video-to-video at strength {s}")).unwrap_or_default();
    let df = r
        .diffusion_forcing
        .as_ref()
        .map(|f| {
            format!(
                ", diffusion forcing: chunks of {} frames overlapping by {}, causal blocks of {}, ar_step {}, addnoise_condition {}",
                f.base_num_frames,
                f.overlap_history.unwrap_or_default(),
                f.causal_block_size,
                f.ar_step,
                f.addnoise_condition.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "model {}: {}x{}, {} frames at {} fps, {} steps, guidance {}{v2v}{df}",
        r.model,
        r.width,
        r.height,
        r.num_frames,
        r.fps,
        r.steps,
        r.guidance_scale.unwrap_or_default()
    )
}

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref().map_or(0.0, |d| d.seconds as f64 + d.nanos as f64 * 1e-9)
}

fn timings_text(t: &PhaseTimings) -> String {
    format!(
        "time: queued {:.2}s, preparing {:.2}s, denoise {:.2}s, decode {:.2}s, encode {:.2}s, total {:.2}s",
        secs(&t.queued),
        secs(&t.preparing),
        secs(&t.denoising),
        secs(&t.decoding),
        secs(&t.encoding),
        secs(&t.total)
    )
}

/// How often a progress line is printed while the phase stays the same.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Progress lines on stderr for a run without a terminal (logs, CI, a job runner): one at each
/// new phase, and at least every [`PROGRESS_EVERY`] (between the server's messages, the last one
/// with its elapsed time and estimate moved on by the time since it came).
#[derive(Default)]
struct ProgressLines {
    phase: i32,
    /// Chunks done at the last line (a diffusion-forcing job prints a line per chunk).
    chunks: u32,
    last: Option<std::time::Instant>,
    latest: Option<(Progress, std::time::Instant)>,
}

impl ProgressLines {
    fn show(&mut self, p: &Progress) {
        self.latest = Some((*p, std::time::Instant::now()));
        let due = self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if p.phase == self.phase && p.chunks_done == self.chunks && !due {
            return;
        }
        self.print(p);
    }

    /// Called every second: prints the latest progress, moved on to now, when a line is due
    /// (and returns it).
    fn tick(&mut self) -> Option<String> {
        let (p, at) = self.latest?;
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return None;
        }
        let since = at.elapsed();
        let shift = |d: Option<prost_types::Duration>, later: bool| {
            d.map(|d| {
                let d = Duration::try_from(d).unwrap_or_default();
                let d = if later { d + since } else { d.saturating_sub(since) };
                prost_types::Duration::try_from(d).unwrap_or_default()
            })
        };
        let moved = Progress { elapsed: shift(p.elapsed, true), estimated_remaining: shift(p.estimated_remaining, false), ..p };
        Some(self.print(&moved))
    }

    fn print(&mut self, p: &Progress) -> String {
        (self.phase, self.chunks) = (p.phase, p.chunks_done);
        self.last = Some(std::time::Instant::now());
        let line = progress_text(p);
        eprintln!("{line}");
        line
    }
}

/// One progress line: the phase, the chunks (diffusion forcing), the step, the time so far and
/// the estimate.
fn progress_text(p: &Progress) -> String {
    let chunks = if p.total_chunks > 0 { format!(" chunk {}/{} done,", p.chunks_done, p.total_chunks) } else { String::new() };
    let steps = if p.total_steps > 0 { format!("{chunks} step {}/{}", p.step, p.total_steps) } else { String::new() };
    let eta = p.estimated_remaining.as_ref().map(|d| format!(", eta {:.0}s", secs(&Some(*d)))).unwrap_or_default();
    format!("{}{steps}, {:.1}s elapsed{eta}", phase_name(p.phase), secs(&p.elapsed))
}

fn phase_name(p: i32) -> &'static str {
    match Phase::try_from(p) {
        Ok(Phase::Queued) => "queued",
        Ok(Phase::Preparing) => "preparing",
        Ok(Phase::Denoising) => "denoising",
        Ok(Phase::Decoding) => "decoding",
        Ok(Phase::Encoding) => "encoding",
        Ok(Phase::Done) => "done",
        _ => "",
    }
}

/// Sends the request, shows progress, writes the streamed file(s). The call is the root of the
/// job's trace: a `generate` span whose context travels in the request's `traceparent` (exported
/// too when OTEL_EXPORTER_OTLP_ENDPOINT is set).
pub fn generate(job: RemoteGenerate) -> Result<ExitCode> {
    let telemetry = tessera_telemetry::TelemetryArgs::from_env()
        .and_then(|t| tessera_telemetry::init_client("tessera-client", &t, &[("service.version", env!("CARGO_PKG_VERSION").to_string())]))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let span = tracing::info_span!("generate", server = %job.server, model = %job.request.model, steps = job.request.steps);
    let result = runtime.block_on(generate_async(job).instrument(span));
    drop(telemetry);
    result
}

async fn generate_async(job: RemoteGenerate) -> Result<ExitCode> {
    let format = OutputFormat::try_from(job.request.output_format).unwrap_or(OutputFormat::Mp4);
    let mut client = api_client(&job.server).await?;
    let mut request = tonic::Request::new(job.request.clone());
    if let Some(t) = job.timeout {
        request.set_timeout(t);
    }
    tessera_telemetry::inject_metadata(request.metadata_mut());
    let stream = client.generate(request).await.map_err(status_error)?.into_inner();
    let reattach = Reattach { server: job.server.clone(), within: job.reattach_for };
    receive(stream, &job.output, format, job.quiet, job.request.steps, &reattach).await
}

/// A client of the public API on `server` (`--server`), with room for large chunks and inputs.
pub async fn api_client(server: &str) -> Result<TesseraClient<ApiChannel>> {
    Ok(TesseraClient::new(connect(server, "--server").await?).max_decoding_message_size(64 << 20).max_encoding_message_size(300 << 20))
}

/// Follows a Generate or WatchJob stream to its end: shows the job and its progress, writes the
/// streamed file(s) to `output` (`format` unless the job's Accepted says another), and prints
/// what was written. A stream that breaks while the job goes on is followed again as `reattach`
/// says.
pub async fn receive(
    mut stream: tonic::Streaming<GenerateEvent>,
    output: &Path,
    format: OutputFormat,
    quiet: bool,
    steps: u32,
    reattach: &Reattach,
) -> Result<ExitCode> {
    let mut format = format;
    let mut writer: Option<ChunkWriter> = None;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(steps.max(1) as u64) };
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] step {pos}/{len}  {elapsed_precise} elapsed, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("queued");
    // Without a terminal the bar is hidden: a progress line instead, at each phase and at least
    // every PROGRESS_EVERY while denoising.
    let mut lines = (!quiet && !std::io::stderr().is_terminal()).then(ProgressLines::default);
    let mut job_id = None;
    let result: Result<_> = async {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // `next` only polls the stream, which keeps its own state: a tick between two
            // messages loses nothing
            let message = loop {
                tokio::select! {
                    m = futures_util::StreamExt::next(&mut stream) => break m.transpose(),
                    _ = ticks.tick() => if let Some(lines) = &mut lines { lines.tick(); },
                }
            };
            let event = match message {
                Ok(Some(e)) => e,
                Ok(None) => bail!("the server ended the stream without Done"),
                Err(s) => match job_id.as_deref() {
                    Some(id) if reattach.may_outlive(&s) => {
                        bar.suspend(|| eprintln!("lost the stream of job {id} ({}: {}); reattaching to {}", code_name(s.code()), s.message(), reattach.server));
                        stream = reattach.watch(id, s).await?;
                        // The whole output comes again: it is written afresh.
                        if let Some(mut w) = writer.take() {
                            w.abandon();
                        }
                        bar.suspend(|| eprintln!("reattached to job {id}"));
                        continue;
                    }
                    _ => return Err(status_error(s)),
                },
            };
            match event.event {
                Some(Event::Accepted(a)) => {
                    // What the job is, and how it will run, goes with the progress to stderr:
                    // stdout keeps the results (the file written, the timings).
                    if job_id.is_some() {
                        // (A reattached stream: the job was shown already.)
                        if writer.is_none() {
                            writer = Some(ChunkWriter::new(output, format)?);
                        }
                        continue;
                    }
                    job_id = Some(a.job_id.clone());
                    bar.suspend(|| {
                        eprintln!("job {} accepted (queue position {}, seed {})", a.job_id, a.queue_position, a.seed);
                        if let Some(trace) = tessera_telemetry::current_trace_id() {
                            eprintln!("trace {trace}");
                        }
                        if let Some(p) = &a.plan {
                            eprintln!("plan: {}", plan_text(p));
                        }
                        if let Some(r) = &a.effective_request {
                            eprintln!("{}", effective_text(r));
                            if let Some(p) = a.plan.as_ref().filter(|p| (p.generated_width, p.generated_height) != (r.width, r.height)) {
                                eprintln!(
                                    "generated at {}x{} (the model's multiple), center-cropped to {}x{}",
                                    p.generated_width, p.generated_height, r.width, r.height
                                );
                            }
                        }
                    });
                    if let Some(r) = &a.effective_request {
                        bar.set_length(r.steps as u64);
                        format = OutputFormat::try_from(r.output_format).unwrap_or(format);
                    }
                    if writer.is_none() {
                        writer = Some(ChunkWriter::new(output, format)?);
                    }
                }
                Some(Event::Progress(p)) => {
                    if let Some(lines) = &mut lines {
                        lines.show(&p);
                    }
                    if p.total_chunks > 0 && p.phase == Phase::Denoising as i32 {
                        bar.set_message(format!("chunk {}/{}", (p.chunks_done + 1).min(p.total_chunks), p.total_chunks));
                    } else {
                        bar.set_message(phase_name(p.phase));
                    }
                    if p.total_steps > 0 {
                        bar.set_length(p.total_steps as u64);
                    }
                    bar.set_position(p.step as u64);
                }
                Some(Event::Chunk(c)) => match &mut writer {
                    Some(w) => w.push(c)?,
                    None => bail!("the server sent output before the job's Accepted"),
                },
                Some(Event::Done(d)) => return Ok(d),
                None => {}
            }
        }
    }
    .await;
    bar.finish_and_clear();
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            writer.iter_mut().for_each(ChunkWriter::abandon);
            return Err(e);
        }
    };
    let Some(writer) = writer.as_mut() else { bail!("the server sent Done without the job's Accepted") };
    if writer.open.is_some() {
        writer.abandon();
        bail!("the server sent Done before the last chunk of a file");
    }
    let what = match format {
        OutputFormat::PngFrames => format!("{} PNG files", writer.written.len()),
        OutputFormat::RawLatents => "latents".into(),
        OutputFormat::Gif => "gif".into(),
        _ => "mp4".into(),
    };
    println!("wrote {} ({} frames, {}x{}, {what}, {} bytes)", output.display(), done.num_frames, done.width, done.height, writer.bytes);
    println!("job {} done; {}", done.job_id, done.timings.as_ref().map(timings_text).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("v.mp4");
        let mut w = ChunkWriter::new(&out, OutputFormat::Mp4).unwrap();
        let chunk = |offset: u64, data: &[u8], last: bool| Chunk { offset, data: data.to_vec(), content_type: "video/mp4".into(), frame_index: 0, last };
        w.push(chunk(0, b"abc", false)).unwrap();
        assert!(!out.exists(), "the file appears only when complete");
        assert!(w.push(chunk(5, b"x", false)).is_err(), "a gap is refused");
        w.push(chunk(3, b"de", true)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"abcde");

        let frames = dir.path().join("frames");
        let mut w = ChunkWriter::new(&frames, OutputFormat::PngFrames).unwrap();
        for i in 0..3 {
            w.push(Chunk { offset: 0, data: vec![i as u8], content_type: "image/png".into(), frame_index: i, last: true }).unwrap();
        }
        assert_eq!(w.written.len(), 3);
        assert_eq!(std::fs::read(frames.join("frame_00002.png")).unwrap(), [2]);
        assert_eq!(format_of(Path::new("a.safetensors")), Some(OutputFormat::RawLatents));
        assert_eq!(format_named("latents"), Some(OutputFormat::RawLatents));
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(endpoint("127.0.0.1:5"), "http://127.0.0.1:5");
    }

    #[test]
    fn progress_lines_say_the_phase_step_and_eta() {
        let d = |s: i64| Some(prost_types::Duration { seconds: s, nanos: 0 });
        let p = Progress { phase: Phase::Denoising as i32, step: 3, total_steps: 50, elapsed: d(12), estimated_remaining: d(188), ..Default::default() };
        assert_eq!(progress_text(&p), "denoising step 3/50, 12.0s elapsed, eta 188s");
        let decoding = Progress { phase: Phase::Decoding as i32, elapsed: d(200), ..Default::default() };
        assert_eq!(progress_text(&decoding), "decoding, 200.0s elapsed");
        // A line at every phase change, and within a phase no more than one per PROGRESS_EVERY.
        let mut lines = ProgressLines::default();
        lines.show(&p);
        let first = lines.last;
        lines.show(&Progress { step: 4, ..p });
        assert_eq!(lines.last, first, "the same phase within 10 s prints nothing");
        lines.show(&decoding);
        assert_eq!(lines.phase, Phase::Decoding as i32, "a new phase prints at once");
        // With no message for PROGRESS_EVERY, a tick prints the latest progress moved on to now.
        let ago = std::time::Instant::now() - Duration::from_secs(11);
        let mut lines = ProgressLines { phase: p.phase, chunks: 0, last: Some(ago), latest: Some((p, ago)) };
        assert_eq!(lines.tick().as_deref(), Some("denoising step 3/50, 23.0s elapsed, eta 177s"));
        assert_eq!(lines.tick(), None, "then not again for another PROGRESS_EVERY");
        // A diffusion-forcing job: the chunks done, and a line as each chunk finishes.
        let df = Progress { step: 20, total_steps: 120, chunks_done: 1, total_chunks: 12, ..p };
        assert_eq!(progress_text(&df), "denoising chunk 1/12 done, step 20/120, 12.0s elapsed, eta 188s");
        let mut lines = ProgressLines::default();
        lines.show(&Progress { chunks_done: 0, ..df });
        let first = lines.last;
        lines.show(&df);
        assert!(first.is_some() && lines.chunks == 1, "a finished chunk prints at once");
    }
}
