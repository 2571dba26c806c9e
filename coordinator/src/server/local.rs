//! [`LocalExecutor`]: jobs run on in-process workers. It loads one Wan pipeline (a diffusers
//! snapshot folder or a built-in preset) in the background, then runs one job at a time on a
//! blocking thread: the prompt is encoded, the denoising runs sequence-parallel over `ranks`
//! in-process ranks (one rank: on this thread), the VAE decodes, and the frames are encoded in
//! memory as the requested format. It stops between steps when the job's stop switch is set.

use super::executor::{ExecEvent, ExecFuture, ExecJob, ExecReport, JobExecutor};
use super::jobs::StopSignal;
use super::output::{latents_file, FrameEncoder};
use crate::request::{RequestDefaults, ValidRequest};
use crate::video::VideoSpec;
use crate::CoordinatorError;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tessera_kernels::Tensor;
use tessera_proto::v1::{OutputFormat, Phase, Plan, Worker, WorkerState};
use tessera_worker::parallel::{LocalTransport, ParallelPlan};
use tessera_worker::pipeline::{denoise_sharded, GenerationParams, PipelineDefaults, PipelineObserver, PipelinePreset, WanPipeline, WAN_DEFAULTS};
use tessera_worker::WorkerError;
use tokio::sync::{mpsc, watch};

/// Where the pipeline comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A diffusers snapshot folder.
    Snapshot(PathBuf),
    /// A built-in pipeline with random weights (seed 0, as `tessera generate`).
    Preset(PipelinePreset),
}

/// Settings of a [`LocalExecutor`].
#[derive(Clone, Debug)]
pub struct LocalExecutorConfig {
    /// The pipeline to load.
    pub source: ModelSource,
    /// The model name requests use.
    pub model_name: String,
    /// Sequence-parallel ranks (in-process workers).
    pub ranks: usize,
    /// Ulysses degree among them (the rest is ring); must divide ranks and the head count.
    pub ulysses: usize,
    /// How the ranks talk.
    pub transport: LocalTransport,
    /// Largest token count a job may have.
    pub max_tokens: usize,
}

enum LoadState {
    Loading,
    Ready(Arc<Loaded>),
    Failed(String),
}

struct Loaded {
    pipe: WanPipeline,
    plan: Option<ParallelPlan>,
}

struct Shared {
    load: watch::Sender<Arc<LoadState>>,
    slots: watch::Sender<usize>,
    busy_with: Mutex<Option<String>>,
    draining: AtomicBool,
}

/// Runs jobs on in-process workers (see the module docs).
pub struct LocalExecutor {
    config: LocalExecutorConfig,
    defaults: PipelineDefaults,
    shared: Arc<Shared>,
}

impl LocalExecutor {
    /// Checks the settings and starts loading the pipeline on a thread of its own; jobs can run
    /// once [`JobExecutor::wait_ready`] resolves.
    pub fn start(config: LocalExecutorConfig) -> Result<Self, CoordinatorError> {
        if config.model_name.trim().is_empty() {
            return Err(CoordinatorError::invalid_argument("model_name", "must not be empty"));
        }
        if config.ranks == 0 || config.ulysses == 0 || !config.ranks.is_multiple_of(config.ulysses) {
            return Err(CoordinatorError::invalid_argument("ulysses", format!("{} must be positive and divide ranks ({})", config.ulysses, config.ranks)));
        }
        if config.max_tokens == 0 {
            return Err(CoordinatorError::invalid_argument("max_tokens", "must be positive"));
        }
        let defaults = match &config.source {
            ModelSource::Snapshot(_) => WAN_DEFAULTS,
            ModelSource::Preset(p) => p.defaults(),
        };
        let shared = Arc::new(Shared {
            load: watch::channel(Arc::new(LoadState::Loading)).0,
            slots: watch::channel(0).0,
            busy_with: Mutex::new(None),
            draining: AtomicBool::new(false),
        });
        let (source, ranks, ulysses) = (config.source.clone(), config.ranks, config.ulysses);
        let loader = shared.clone();
        std::thread::Builder::new()
            .name("tessera-load".into())
            .spawn(move || {
                let state = match load(&source, ranks, ulysses) {
                    Ok(l) => LoadState::Ready(Arc::new(l)),
                    Err(e) => LoadState::Failed(e),
                };
                let ready = matches!(state, LoadState::Ready(_));
                loader.load.send_replace(Arc::new(state));
                if ready && !loader.draining.load(Ordering::SeqCst) {
                    loader.slots.send_replace(1);
                }
            })
            .map_err(|e| CoordinatorError::Internal(format!("cannot start the loading thread: {e}")))?;
        Ok(Self { config, defaults, shared })
    }

    fn loaded(&self) -> Option<Arc<Loaded>> {
        match &**self.shared.load.borrow() {
            LoadState::Ready(l) => Some(l.clone()),
            _ => None,
        }
    }
}

impl ModelSource {
    /// Loads (or builds) the pipeline, with its request defaults; the error says what failed.
    pub fn load(&self) -> Result<(WanPipeline, PipelineDefaults), String> {
        match self {
            ModelSource::Snapshot(dir) => WanPipeline::load(dir).map(|p| (p, WAN_DEFAULTS)).map_err(|e| format!("loading {}: {e}", dir.display())),
            ModelSource::Preset(p) => p.build(0).map(|pipe| (pipe, p.defaults())).map_err(|e| format!("building the `{}` preset: {e}", p.name())),
        }
    }
}

fn load(source: &ModelSource, ranks: usize, ulysses: usize) -> Result<Loaded, String> {
    let (pipe, _) = source.load()?;
    let plan = if ranks == 1 {
        None
    } else {
        let heads = pipe.transformer().config().num_attention_heads;
        Some(ParallelPlan::new(ranks, ulysses, heads).map_err(|e| format!("ranks {ranks}, ulysses {ulysses}: {e}"))?)
    };
    Ok(Loaded { pipe, plan })
}

impl JobExecutor for LocalExecutor {
    fn models(&self) -> Vec<String> {
        vec![self.config.model_name.clone()]
    }

    fn defaults(&self) -> RequestDefaults {
        RequestDefaults {
            model: self.config.model_name.clone(),
            width: self.defaults.width as u32,
            height: self.defaults.height as u32,
            num_frames: self.defaults.num_frames as u32,
            steps: self.defaults.num_inference_steps as u32,
            ..RequestDefaults::default()
        }
    }

    fn max_tokens(&self) -> usize {
        self.config.max_tokens
    }

    fn check(&self, _request: &ValidRequest) -> Result<(), CoordinatorError> {
        Ok(())
    }

    fn plan(&self, request: &ValidRequest) -> Plan {
        let (ranks, ulysses) = (self.config.ranks as u32, self.config.ulysses as u32);
        Plan {
            worker_ids: (0..ranks).map(|i| format!("local-{i}")).collect(),
            ranks,
            ulysses,
            ring: ranks / ulysses,
            tokens: request.tokens as u64,
            forwards_per_step: request.forwards_per_step(),
        }
    }

    fn slots(&self) -> watch::Receiver<usize> {
        self.shared.slots.subscribe()
    }

    fn workers(&self) -> Vec<Worker> {
        let busy = self.shared.busy_with.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let state = match (&**self.shared.load.borrow(), &busy, self.shared.draining.load(Ordering::SeqCst)) {
            (LoadState::Loading | LoadState::Failed(_), _, _) => WorkerState::Starting,
            (_, Some(_), _) => WorkerState::Busy,
            (_, None, true) => WorkerState::Draining,
            (_, None, false) => WorkerState::Idle,
        };
        let memory = tessera_worker::server::memory_available().unwrap_or(0) / self.config.ranks as u64;
        (0..self.config.ranks)
            .map(|i| Worker {
                worker_id: format!("local-{i}"),
                address: "in-process".into(),
                model: self.config.model_name.clone(),
                devices: vec!["cpu".into()],
                memory_bytes: memory,
                state: state as i32,
                job_id: busy.clone().unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .collect()
    }

    fn wait_ready(&self) -> Pin<Box<dyn Future<Output = Result<(), CoordinatorError>> + Send + '_>> {
        let mut rx = self.shared.load.subscribe();
        Box::pin(async move {
            let state =
                rx.wait_for(|s| !matches!(**s, LoadState::Loading)).await.map_err(|_| CoordinatorError::Internal("the loader went away".into()))?.clone();
            match &*state {
                LoadState::Failed(e) => Err(CoordinatorError::Unavailable(format!("the model did not load: {e}"))),
                _ => Ok(()),
            }
        })
    }

    fn run(&self, job: ExecJob, events: mpsc::Sender<ExecEvent>, stop: StopSignal) -> ExecFuture {
        let loaded = self.loaded();
        let shared = self.shared.clone();
        let transport = self.config.transport;
        Box::pin(async move {
            let loaded = loaded.ok_or_else(|| CoordinatorError::Unavailable("the model is not loaded yet".into()))?;
            *shared.busy_with.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.id.clone());
            let span = tracing::Span::current();
            let outcome = tokio::task::spawn_blocking(move || span.in_scope(|| run_job(&loaded, transport, &job, &events, &stop))).await;
            *shared.busy_with.lock().unwrap_or_else(|e| e.into_inner()) = None;
            outcome.map_err(|e| CoordinatorError::Internal(format!("the job's thread failed: {e}")))?
        })
    }

    fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.slots.send_replace(0);
    }
}

/// The request as pipeline parameters.
pub fn generation_params(request: &ValidRequest) -> Result<GenerationParams, CoordinatorError> {
    let r = &request.request;
    Ok(tessera_worker::server::params_from_request(r, r.seed.unwrap_or(0))?)
}

/// Sends events from the job's thread and turns a stop request into the pipeline's `Cancelled`.
struct JobObserver<'a> {
    events: &'a mpsc::Sender<ExecEvent>,
    stop: &'a StopSignal,
    encoder: Option<FrameEncoder>,
    encode_error: Option<CoordinatorError>,
}

impl JobObserver<'_> {
    fn emit(&self, event: ExecEvent) -> tessera_worker::Result<()> {
        self.events.blocking_send(event).map_err(|_| WorkerError::Cancelled("nobody listens to the job any more".into()))
    }

    fn check_stop(&self) -> tessera_worker::Result<()> {
        match self.stop.reason() {
            Some(r) => Err(WorkerError::Cancelled(format!("{r:?}"))),
            None => Ok(()),
        }
    }
}

impl PipelineObserver for JobObserver<'_> {
    fn on_step(&mut self, step: usize, total: usize, _latents: &Tensor) -> tessera_worker::Result<()> {
        self.emit(ExecEvent::Step { done: step as u32 + 1, total: total as u32 })?;
        self.check_stop()
    }

    fn on_frames(&mut self, frames: &Tensor) -> tessera_worker::Result<()> {
        self.check_stop()?;
        let Some(encoder) = self.encoder.as_mut() else { return Ok(()) };
        match encoder.push_chunk(frames) {
            Ok(files) => files.into_iter().try_for_each(|f| self.emit(ExecEvent::File(f))),
            Err(e) => {
                self.encode_error = Some(e);
                Err(WorkerError::Cancelled("the frame encoder failed".into()))
            }
        }
    }
}

/// Runs one job on the job's thread.
fn run_job(
    loaded: &Loaded,
    transport: LocalTransport,
    job: &ExecJob,
    events: &mpsc::Sender<ExecEvent>,
    stop: &StopSignal,
) -> Result<ExecReport, CoordinatorError> {
    let mut obs = JobObserver { events, stop, encoder: None, encode_error: None };
    let result = stages(loaded, transport, job, &mut obs);
    // A stop wins over whatever error it provoked; an encoder failure over the abort it caused.
    match (result, stop.reason(), obs.encode_error.take()) {
        (Err(_), Some(reason), _) => Err(reason.error()),
        (Err(_), None, Some(e)) => Err(e),
        (r, _, _) => r,
    }
}

fn stages(loaded: &Loaded, transport: LocalTransport, job: &ExecJob, obs: &mut JobObserver<'_>) -> Result<ExecReport, CoordinatorError> {
    let pipe = &loaded.pipe;
    let r = &job.request.request;
    let mut params = generation_params(&job.request)?;
    if let Some(video) = super::input::prepare_request_video(r)? {
        let strength = r.strength.ok_or_else(|| CoordinatorError::invalid_argument("strength", "required with input_video"))?;
        params.video = Some(tessera_worker::pipeline::VideoInput { video, strength: strength as f64 });
    }
    let vc = pipe.vae().config();
    params.validate(vc.spatial_factor(), vc.temporal_factor(), &tessera_worker::pipeline::limits::Limits::none())?;
    let format = OutputFormat::try_from(r.output_format).unwrap_or(OutputFormat::Mp4);

    obs.emit(ExecEvent::Phase(Phase::Preparing))?;
    let started = Instant::now();
    let (text, schedule, mut latents) = tracing::info_span!("prepare").in_scope(|| -> Result<_, CoordinatorError> {
        let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale)?;
        let schedule = pipe.schedule_for(&params)?;
        let latents = pipe.initial_latents(&params, &schedule)?;
        Ok((text, schedule, latents))
    })?;
    obs.check_stop()?;
    let preparing = started.elapsed();

    obs.emit(ExecEvent::Phase(Phase::Denoising))?;
    let started = Instant::now();
    match loaded.plan {
        None => pipe.denoise(&mut latents, &text, params.guidance_scale, &schedule, obs)?,
        Some(plan) => denoise_sharded(pipe, &mut latents, &text, params.guidance_scale, &schedule, transport, plan, obs)?,
    }
    let denoising = started.elapsed();
    let mut report = ExecReport { frames: r.num_frames, width: r.width, height: r.height, preparing, denoising, ..Default::default() };

    if format == OutputFormat::RawLatents {
        obs.emit(ExecEvent::Phase(Phase::Encoding))?;
        let started = Instant::now();
        let file = tracing::info_span!("encode", format = "latents").in_scope(|| latents_file(&latents))?;
        report.encoding = started.elapsed();
        obs.emit(ExecEvent::File(file))?;
        return Ok(report);
    }

    obs.emit(ExecEvent::Phase(Phase::Decoding))?;
    let started = Instant::now();
    obs.encoder = Some(FrameEncoder::new(format, VideoSpec::new(r.width, r.height, r.fps as f64)?)?);
    tracing::info_span!("decode", frames = r.num_frames, width = r.width, height = r.height).in_scope(|| pipe.decode(&latents, obs))?;
    let encoder = obs.encoder.take().ok_or_else(|| CoordinatorError::Internal("the frame encoder vanished".into()))?;
    let during_decode = encoder.busy();
    report.decoding = started.elapsed().saturating_sub(during_decode);
    report.frames = encoder.frames() as u32;

    obs.emit(ExecEvent::Phase(Phase::Encoding))?;
    // Frames were encoded as they were decoded (`encode_during_decode_s`); this completes the file.
    let (files, encoding) = tracing::info_span!("encode", format = ?format, frames = report.frames, encode_during_decode_s = during_decode.as_secs_f64())
        .in_scope(|| encoder.finish())?;
    report.encoding = encoding;
    for f in files {
        obs.emit(ExecEvent::File(f))?;
    }
    Ok(report)
}
