//! One job on a group of workers, over the internal API: for a GPU group of several ranks,
//! CreateNcclId on rank 0 first (the NCCL unique id every rank gets); PrepareJob on every rank at
//! once (they meet on their collective addresses, or through NCCL), each Step on every rank at
//! once, then Decode streamed from rank 0 (or its latents fetched), and ReleaseJob on every rank
//! however the job ends, except one that this coordinator's shutdown stops when a state store
//! keeps the job: its run is checkpointed at the step boundary and left on its workers, for the
//! next coordinator to adopt (`adopt`). The first failing call ends the job with the worker named;
//! a worker leaving membership mid-step ends it too, without waiting for the step. Each job has a
//! random secret, given to the workers in PrepareJob and carried by every later call
//! (`tessera_proto::capability`), with this coordinator's epoch: a worker that answers SUPERSEDED
//! ends the job with [`CoordinatorError::Superseded`], and its workers are left to the store's new
//! owner.

use super::super::executor::{ExecEvent, ExecJob, ExecReport};
use super::super::jobs::{StopReason, StopSignal};
use super::super::output::{latents_file, FrameEncoder};
use super::adopt::Adopted;
use super::table::Group;
use crate::video::VideoSpec;
use crate::CoordinatorError;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_cluster::codec;
use tessera_cluster::membership::WorkerRecord;
use tessera_cluster::tls::InternalTls;
use tessera_proto::capability::JobSecret;
use tessera_proto::reason::{failure, has_reason, Reason};
use tessera_proto::v1::{OutputFormat, Phase};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::shard_worker_client::ShardWorkerClient;
use tokio::sync::{mpsc, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// Largest internal message (decoded frames, latents, video-to-video inputs).
pub const MAX_MESSAGE: usize = 256 << 20;

/// Time limits of a job driven over the internal API.
#[derive(Clone, Copy, Debug)]
pub struct DriveLimits {
    /// Connecting to a worker's internal API.
    pub connect: Duration,
    /// PrepareJob (the ranks meet, encode the prompt, draw noise; v2v: encode the video).
    pub prepare: Duration,
    /// One denoising step on every rank.
    pub step: Duration,
    /// The whole decode.
    pub decode: Duration,
}

/// The live worker ids, as the executor publishes them.
pub type LiveWorkers = watch::Receiver<BTreeSet<String>>;

/// What a job needs besides its group.
pub struct DriveContext<'a> {
    /// The job.
    pub job: &'a ExecJob,
    /// Mutual TLS to the workers, when the cluster runs it.
    pub tls: Option<&'a InternalTls>,
    /// The input video as decoded at admission (8-bit, the generated size): Wan's video-to-video
    /// input, or the video a diffusion-forcing job extends (served before its continuation).
    pub input_frames: Option<std::sync::Arc<pb::InputFrames>>,
    /// Where progress goes.
    pub events: &'a mpsc::Sender<ExecEvent>,
    /// The job's stop switch.
    pub stop: &'a StopSignal,
    /// Membership's live workers.
    pub live: LiveWorkers,
    /// The workers that drain (their records say so): a group with one moves at a checkpoint.
    pub draining: LiveWorkers,
    /// Time limits.
    pub limits: DriveLimits,
    /// Resume from this checkpoint (of an earlier group) instead of starting the run.
    pub resume: Option<Arc<pb::CheckpointResponse>>,
    /// Go on with the run the group's workers still hold (adopted from a coordinator that died)
    /// instead of preparing one: no PrepareJob, the next step is where it stands.
    pub adopted: Option<Adopted>,
    /// Copy the run out of rank 0 every this many steps (0: never).
    pub checkpoint_every: u32,
    /// Where the latest checkpoint goes.
    pub last_checkpoint: &'a std::sync::Mutex<Option<Arc<pb::CheckpointResponse>>>,
}

/// A client of one worker for one job: every call carries the job's secret.
type WorkerClient = ShardWorkerClient<InterceptedService<Channel, JobSecret>>;

/// A connected rank.
pub(super) struct Rank {
    pub(super) record: WorkerRecord,
    pub(super) client: WorkerClient,
}

impl Rank {
    fn failed(&self, during: impl Into<String>, status: tonic::Status) -> CoordinatorError {
        if has_reason(&status, Reason::Superseded) {
            return CoordinatorError::Superseded(format!("worker {} during {}: {}", self.record.worker_id, during.into(), status.message()));
        }
        CoordinatorError::WorkerFailed {
            worker: format!("{} ({})", self.record.worker_id, self.record.address),
            during: during.into(),
            refused_field: refused_field(&status),
            detail: format!("{} ({:?})", status.message(), status.code()),
        }
    }
}

/// The field a worker refused, if it refused the request: a refused `spec.FIELD` is the public
/// request's FIELD (the spec names its fields so).
fn refused_field(status: &tonic::Status) -> Option<String> {
    let field = failure(status).filter(|f| f.reason == Reason::InvalidField).map(|f| f.field.unwrap_or_default())?;
    Some(field.strip_prefix("spec.").map(str::to_string).unwrap_or(field))
}

pub(super) async fn connect(record: &WorkerRecord, timeout: Duration, secret: &JobSecret, tls: Option<&InternalTls>) -> Result<Rank, CoordinatorError> {
    let fail = |detail: String| CoordinatorError::WorkerFailed {
        worker: format!("{} ({})", record.worker_id, record.address),
        during: "connect".into(),
        refused_field: None,
        detail,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", record.address))
        .map_err(|e| fail(format!("bad address: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        // The certificates as they are now: a renewal on disk applies from the next connection.
        endpoint = endpoint.tls_config(tls.client()).map_err(|e| fail(format!("TLS settings: {e}")))?;
    }
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| fail(format!("no connection within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let client =
        ShardWorkerClient::new(InterceptedService::new(channel, secret.clone())).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    Ok(Rank { record: record.clone(), client })
}

/// How long after a rank's failure the others may still report theirs: a dead worker's own call
/// fails at once (connection lost), its peers' a moment later (collective broken); the report
/// should name the one that died, not a survivor that noticed.
const SETTLE: Duration = Duration::from_millis(250);

/// Runs `call` on every rank at once; a failure (or the limit, or a rank leaving membership)
/// ends the wait with an error naming the failed rank (a rank that could not be reached comes
/// before ranks that lost a peer).
async fn on_every_rank<T, F, Fut>(ranks: &[Rank], during: &str, limit: Duration, live: &mut LiveWorkers, call: F) -> Result<Vec<T>, CoordinatorError>
where
    F: Fn(usize, WorkerClient) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    use futures_util::StreamExt;
    let mut calls: futures_util::stream::FuturesUnordered<_> = ranks
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let fut = call(i, r.client.clone());
            async move { (i, fut.await.map(tonic::Response::into_inner)) }
        })
        .collect();
    let ids: Vec<String> = ranks.iter().map(|r| r.record.worker_id.clone()).collect();
    let gone = live.wait_for(|live| ids.iter().any(|id| !live.contains(id)));
    tokio::pin!(gone);
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let mut answers: Vec<Option<T>> = (0..ranks.len()).map(|_| None).collect();
    let mut failures: Vec<(usize, tonic::Status)> = Vec::new();
    let mut settle: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let settled = async {
            match settle.as_mut() {
                Some(s) => s.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = calls.next() => match next {
                Some((i, Ok(answer))) => answers[i] = Some(answer),
                Some((i, Err(status))) => {
                    failures.push((i, status));
                    settle.get_or_insert_with(|| Box::pin(tokio::time::sleep(SETTLE)));
                }
                None => break,
            },
            _ = settled => break,
            _ = &mut deadline => {
                if failures.is_empty() {
                    return Err(CoordinatorError::WorkerFailed {
                        worker: ids.join(", "),
                        during: during.into(),
                        refused_field: None,
                        detail: format!("not every rank answered within {limit:?}"),
                    });
                }
                break;
            }
            set = &mut gone, if failures.is_empty() => {
                let detail = match set {
                    Ok(live) => format!("left the cluster (lease lapsed or revoked): {}", ids.iter().filter(|id| !live.contains(*id)).cloned().collect::<Vec<_>>().join(", ")),
                    Err(_) => "membership stopped".into(),
                };
                return Err(CoordinatorError::WorkerFailed { worker: ids.join(", "), during: during.into(), refused_field: None, detail });
            }
        }
    }
    if failures.is_empty() {
        return Ok(answers.into_iter().map(|a| a.expect("every rank answered")).collect());
    }
    // A later owner of the state store drives these workers: nothing else matters.
    if let Some((i, status)) = failures.iter().find(|(_, s)| has_reason(s, Reason::Superseded)) {
        return Err(ranks[*i].failed(during, status.clone()));
    }
    // Refusals because a worker already runs a job (another coordinator's): the caller may try
    // another group.
    let busy: Vec<String> = failures.iter().filter(|(_, s)| has_reason(s, Reason::WorkerBusy)).map(|(i, _)| ranks[*i].record.worker_id.clone()).collect();
    if !busy.is_empty() {
        return Err(CoordinatorError::WorkersBusy { workers: busy });
    }
    // A rank that failed by itself (unreachable, dead) is the cause; ranks whose collective broke
    // (PEER_LOST: their group broke) report its absence, so they come after.
    failures.sort_by_key(|(i, s)| (has_reason(s, Reason::PeerLost), *i));
    let (first, status) = &failures[0];
    let mut error = ranks[*first].failed(during, status.clone());
    if let CoordinatorError::WorkerFailed { detail, .. } = &mut error {
        let others: Vec<String> = failures[1..].iter().map(|(i, s)| format!("{}: {}", ranks[*i].record.worker_id, s.message())).collect();
        if !others.is_empty() {
            detail.push_str(&format!("; then {}", others.join("; ")));
        }
    }
    Err(error)
}

/// Whether a group's ranks talk through NCCL, so that rank 0 must make the group's unique id before
/// PrepareJob: more than one rank, and a rank whose model runs on a CUDA GPU (its record lists a
/// `cuda...` device). CPU groups and single ranks need none.
fn group_needs_nccl(workers: &[WorkerRecord]) -> bool {
    workers.len() > 1 && workers.iter().any(super::table::on_gpu)
}

/// Has rank 0 make the group's NCCL unique id (its process then hosts NCCL's rendezvous). A
/// failure ends the job naming the worker, with the worker's status code (FAILED_PRECONDITION when
/// it lacks libnccl.so); the call gets the connect limit, as it only asks NCCL for an id.
async fn nccl_id_from_rank0(rank0: &Rank, job_id: &str, limit: Duration) -> Result<Vec<u8>, CoordinatorError> {
    const DURING: &str = "create the NCCL id";
    let mut client = rank0.client.clone();
    let call = client.create_nccl_id(pb::CreateNcclIdRequest { job_id: job_id.to_string() });
    let answer = tokio::time::timeout(limit, call).await.map_err(|_| CoordinatorError::WorkerFailed {
        worker: format!("{} ({})", rank0.record.worker_id, rank0.record.address),
        during: DURING.into(),
        refused_field: None,
        detail: format!("no NCCL id within {limit:?}"),
    })?;
    let id = answer.map_err(|s| rank0.failed(DURING, s))?.into_inner().nccl_unique_id;
    if id.len() != tessera_cluster::codec::NCCL_ID_BYTES {
        return Err(
            rank0.failed(DURING, tonic::Status::data_loss(format!("the NCCL id has {} bytes, not {}", id.len(), tessera_cluster::codec::NCCL_ID_BYTES)))
        );
    }
    Ok(id)
}

async fn send(events: &mpsc::Sender<ExecEvent>, event: ExecEvent) -> Result<(), CoordinatorError> {
    events.send(event).await.map_err(|_| CoordinatorError::Cancelled("nobody listens to the job any more".into()))
}

fn check_stop(stop: &StopSignal) -> Result<(), CoordinatorError> {
    match stop.reason() {
        Some(r) => Err(r.error()),
        None => Ok(()),
    }
}

/// Runs the job on `group` (see the module docs). ReleaseJob is sent to every rank at the end,
/// whatever the outcome, unless the run is handed over to the next coordinator.
pub async fn run_on_group(group: &Group, cx: DriveContext<'_>) -> Result<ExecReport, CoordinatorError> {
    // The job's capability on its workers: sent in PrepareJob, then with every call.
    let secret = cx.job.secret;
    let interceptor = JobSecret::new(&secret).with_epoch(cx.job.epoch);
    let mut ranks = Vec::with_capacity(group.workers.len());
    for w in &group.workers {
        ranks.push(connect(w, cx.limits.connect, &interceptor, cx.tls).await?);
    }
    let mut run = None;
    let result = stages(group, &ranks, &cx, &secret, &mut run).await;
    if let (Some(steps_done), true) = (run, hands_over(&cx)) {
        let ids: Vec<&str> = ranks.iter().map(|r| r.record.worker_id.as_str()).collect();
        tracing::info!(job = %cx.job.id, workers = ?ids, steps_done, "shutting down: the job's run is left on its workers for the next coordinator");
    } else if let Err(CoordinatorError::Superseded(why)) = &result {
        tracing::warn!(job = %cx.job.id, why, "a later coordinator drives the job's workers: left to it");
    } else {
        release(&ranks, &cx.job.id).await;
    }
    // A stop wins over the error it provoked.
    match (result, cx.stop.reason()) {
        (Err(_), Some(reason)) => Err(reason.error()),
        (r, _) => r,
    }
}

/// Whether the job's run goes to the next coordinator instead of being released: this one shuts
/// down, and the job's record is in a state store, from which the next one adopts the run its
/// workers hold (they keep it for their `--job-idle-timeout`) or else resumes it from the
/// checkpoint taken at the step boundary where it stopped.
fn hands_over(cx: &DriveContext<'_>) -> bool {
    cx.job.stored && cx.stop.reason() == Some(StopReason::Shutdown)
}

/// ReleaseJob on every rank (best effort, briefly: a dead worker must not hold the job up).
pub(super) async fn release(ranks: &[Rank], job_id: &str) {
    let releases = ranks.iter().map(|r| {
        let mut c = r.client.clone();
        let job_id = job_id.to_string();
        async move { tokio::time::timeout(RELEASE_LIMIT, c.release_job(pb::ReleaseJobRequest { job_id })).await }
    });
    for (r, outcome) in ranks.iter().zip(futures_util::future::join_all(releases).await) {
        if !matches!(outcome, Ok(Ok(_))) {
            tracing::debug!(worker = %r.record.worker_id, job = %job_id, "ReleaseJob did not go through (the worker may be gone)");
        }
    }
}

/// How long one ReleaseJob (and the connection before it) may take.
pub(super) const RELEASE_LIMIT: Duration = Duration::from_secs(5);

/// The job's stages on `ranks`; `run` holds the steps done once every rank holds the run
/// (prepared or adopted).
async fn stages(group: &Group, ranks: &[Rank], cx: &DriveContext<'_>, secret: &[u8], run: &mut Option<u32>) -> Result<ExecReport, CoordinatorError> {
    let r = &cx.job.request.request;
    let mut live = cx.live.clone();
    let format = OutputFormat::try_from(r.output_format).unwrap_or(OutputFormat::Mp4);
    let ranks_n = ranks.len() as u32;
    let records: Vec<&WorkerRecord> = group.workers.iter().collect();
    let (predicted_duration, predicted_peak_bytes_per_rank) =
        super::predicted_fields(super::evaluate_group(&r.model, &cx.job.request.spec, &records, group.ulysses, group.cfg_parallel).as_ref());
    send(
        cx.events,
        ExecEvent::Plan(tessera_proto::v1::Plan {
            worker_ids: group.workers.iter().map(|w| w.worker_id.clone()).collect(),
            ranks: ranks_n,
            ulysses: group.ulysses as u32,
            ring: group.plan().ring(),
            cfg_parallel: group.cfg_parallel,
            tokens: cx.job.request.spec.tokens() as u64,
            forwards_per_step: cx.job.request.spec.forwards_per_step(),
            generated_width: cx.job.request.spec.generated_size().1,
            generated_height: cx.job.request.spec.generated_size().0,
            predicted_duration,
            predicted_peak_bytes_per_rank,
        }),
    )
    .await?;
    // An adopted run goes on where it stands; another is prepared on every rank first.
    let (total, first, preparing) = match cx.adopted {
        Some(a) => (a.total_steps, a.steps_done.min(a.total_steps), Duration::ZERO),
        None => {
            send(cx.events, ExecEvent::Phase(Phase::Preparing)).await?;
            let started = Instant::now();
            let total = prepare(group, ranks, cx, secret, &mut live).await?;
            (total, cx.resume.as_ref().map_or(0, |c| c.steps_done).min(total), started.elapsed())
        }
    };
    *run = Some(first);
    check_stop(cx.stop)?;

    send(cx.events, ExecEvent::Phase(Phase::Denoising)).await?;
    let started = Instant::now();
    // A diffusion-forcing job's frames are final chunk by chunk: each finished chunk is decoded
    // and its frames encoded (PNG frames sent) before the next chunk starts.
    let total_chunks = cx.job.request.spec.chunks().map_or(0, |c| c.chunks.len() as u32);
    let streaming = total_chunks > 0 && format != OutputFormat::RawLatents;
    let mut encoder = match format {
        OutputFormat::RawLatents => None,
        _ => Some(FrameEncoder::new(format, VideoSpec::new(r.width, r.height, r.fps as f64)?)?),
    };
    // A video extension serves the input first, then what continues it.
    let extended = cx.input_frames.as_deref().filter(|_| cx.job.request.spec.extension_history().is_some());
    if let Some(input) = extended {
        // (Raw latents are the run's alone.)
        encoder = match encoder {
            Some(enc) => Some(serve_input(cx, enc, input).await?),
            None => None,
        };
    }
    let served_frames = cx.job.request.spec.served_frames(extended.map_or(0, |f| f.frames));
    let (mut chunks_done, mut decoding) = (0, Duration::ZERO);
    for step in first..total {
        let during = format!("step {}", step + 1);
        // The coordinator's step span is the parent of every rank's step span.
        let span = tracing::info_span!("step", step, total);
        let trace_context = span.in_scope(tessera_telemetry::current_context_map);
        let answers = on_every_rank(ranks, &during, cx.limits.step, &mut live, |_, mut c| {
            let req = pb::StepRequest { job_id: cx.job.id.clone(), step, trace_context: trace_context.clone() };
            async move { c.step(req).await }
        })
        .instrument(span)
        .await?;
        *run = Some(step + 1);
        let chunk_finished = answers[0].chunks_done > chunks_done;
        chunks_done = answers[0].chunks_done;
        // A diffusion-forcing run is checkpointed at its chunk boundaries, another every
        // `checkpoint_every` steps.
        let due = if total_chunks > 0 { chunk_finished } else { cx.checkpoint_every > 0 && (step + 1) % cx.checkpoint_every == 0 };
        // A worker of the group drains (a rolling update replaces it): with checkpoints on, the
        // job moves to another group from a checkpoint of this boundary (a diffusion-forcing
        // job's, at its chunk's end) instead of holding the worker until the job's end.
        let draining: Vec<String> = {
            let d = cx.draining.borrow();
            ranks.iter().map(|r| r.record.worker_id.clone()).filter(|id| d.contains(id)).collect()
        };
        let moving = !draining.is_empty() && cx.checkpoint_every > 0 && (total_chunks == 0 || chunk_finished) && step + 1 < total;
        // Handed over at shutdown: checkpointed here too (a diffusion-forcing run only at its
        // chunks' ends, as always), so that the next coordinator loses no step even if it cannot
        // adopt the run.
        let handing_over = hands_over(cx) && total_chunks == 0;
        if cx.checkpoint_every > 0 && (due || moving || handing_over) && step + 1 < total {
            // Every rank takes part (the ranks' shares are gathered to rank 0, which answers with
            // the whole state).
            let during = format!("checkpoint after step {}", step + 1);
            let mut cps = on_every_rank(ranks, &during, cx.limits.step, &mut live, |_, mut c| {
                let req = pb::CheckpointRequest { job_id: cx.job.id.clone() };
                async move { c.checkpoint(req).await }
            })
            .await?;
            let checkpoint = Arc::new(cps.swap_remove(0));
            *cx.last_checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(checkpoint.clone());
            send(cx.events, ExecEvent::Checkpoint(checkpoint)).await?;
        }
        // Reported once the step is also in the checkpoint (when one is due): a recovery goes on
        // from at least the step a client last saw.
        send(cx.events, ExecEvent::Step { done: step + 1, total, chunks: (chunks_done, total_chunks) }).await?;
        check_stop(cx.stop)?;
        if moving {
            return Err(CoordinatorError::WorkersDraining { workers: draining });
        }
        if streaming && chunk_finished {
            let started = Instant::now();
            let enc = encoder.take().ok_or_else(|| CoordinatorError::Internal("no frame encoder".into()))?;
            let busy = enc.busy();
            let enc = decode_round(ranks, cx, enc, &format!("chunk {chunks_done}")).await?;
            decoding += started.elapsed().saturating_sub(enc.busy().saturating_sub(busy));
            encoder = Some(enc);
            check_stop(cx.stop)?;
        }
    }
    // (the chunks' decodes ran in between)
    let denoising = started.elapsed().saturating_sub(decoding);
    let mut report = ExecReport { frames: r.num_frames, width: r.width, height: r.height, preparing, denoising, ..Default::default() };

    let rank0 = &ranks[0];
    let Some(encoder) = encoder else {
        send(cx.events, ExecEvent::Phase(Phase::Encoding)).await?;
        let started = Instant::now();
        // Every rank takes part: the shares are gathered to rank 0, which answers with the whole.
        let whole = on_every_rank(ranks, "fetch latents", cx.limits.decode, &mut live, |_, mut c| {
            let req = pb::FetchLatentsRequest { job_id: cx.job.id.clone() };
            async move { c.fetch_latents(req).await }
        })
        .await?
        .swap_remove(0);
        let latents = codec::latents_from_message(&whole).map_err(|e| CoordinatorError::Internal(format!("latents from rank 0: {e}")))?;
        let file = latents_file(&latents)?;
        report.encoding = started.elapsed();
        send(cx.events, ExecEvent::File(file)).await?;
        return Ok(report);
    };

    send(cx.events, ExecEvent::Phase(Phase::Decoding)).await?;
    let started = Instant::now();
    // What is not decoded yet: the whole video, or what a diffusion-forcing run has left (nothing,
    // unless it resumed after its last chunk).
    let busy = encoder.busy();
    let encoder = decode_round(ranks, cx, encoder, "decode").await?;
    report.decoding = decoding + started.elapsed().saturating_sub(encoder.busy().saturating_sub(busy));
    report.frames = encoder.frames() as u32;
    if u64::from(report.frames) != served_frames {
        return Err(CoordinatorError::WorkerFailed {
            worker: rank0.record.worker_id.clone(),
            during: "decode".into(),
            refused_field: None,
            detail: format!("{} of {served_frames} frames arrived", report.frames),
        });
    }

    send(cx.events, ExecEvent::Phase(Phase::Encoding)).await?;
    let encode_span = tracing::info_span!("encode");
    let (files, encoding) = tokio::task::spawn_blocking(move || encode_span.in_scope(|| encoder.finish()))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("the encoder thread failed: {e}")))??;
    report.encoding = encoding;
    for f in files {
        send(cx.events, ExecEvent::File(f)).await?;
    }
    Ok(report)
}

/// PrepareJob on every rank (for a GPU group, after rank 0 made the NCCL id): the ranks meet, and
/// each prepares the run, from the start or from the job's checkpoint. Returns the run's steps.
async fn prepare(group: &Group, ranks: &[Rank], cx: &DriveContext<'_>, secret: &[u8], live: &mut LiveWorkers) -> Result<u32, CoordinatorError> {
    let peers: Vec<String> = group.workers.iter().map(|w| w.collective_address.clone()).collect();
    let session = u64::from_le_bytes(random_bytes::<8>()?);
    // Image-to-video: the image as decoded at admission, sent to every rank.
    let input_image = cx.job.request.image.as_ref().map(|i| codec::input_image_message(i.size, i.rgb.clone())).transpose()?;
    let spec = cx.job.request.spec.clone().planned(group.plan())?.to_message();
    let worker_frames = cx.input_frames.as_deref().map(|f| super::super::input::frames_for_workers(&cx.job.request.spec, f));
    let span = tracing::info_span!("prepare", ranks = ranks.len(), ulysses = group.ulysses);
    let trace_context = span.in_scope(tessera_telemetry::current_context_map);
    let nccl_unique_id = if group_needs_nccl(&group.workers) {
        nccl_id_from_rank0(&ranks[0], &cx.job.id, cx.limits.connect).instrument(span.clone()).await?
    } else {
        Vec::new()
    };
    let prepared = on_every_rank(ranks, "prepare", cx.limits.prepare, live, |rank, mut c| {
        let req = pb::PrepareJobRequest {
            job_id: cx.job.id.clone(),
            rank: rank as u32,
            peers: peers.clone(),
            session,
            spec: Some(spec.clone()),
            input_frames: worker_frames.clone(),
            input_image: input_image.clone(),
            trace_context: trace_context.clone(),
            resume: cx.resume.as_deref().cloned(),
            nccl_unique_id: nccl_unique_id.clone(),
            job_secret: secret.to_vec(),
            ..Default::default()
        };
        async move { c.prepare_job(req).await }
    })
    .instrument(span)
    .await?;
    Ok(prepared.first().map_or(0, |p| p.total_steps))
}

/// One Decode on every rank: the frames that are final and not decoded yet go into `encoder`
/// (every rank decodes a band of rows of them; rank 0 joins the bands and streams the frames).
async fn decode_round(ranks: &[Rank], cx: &DriveContext<'_>, encoder: FrameEncoder, name: &str) -> Result<FrameEncoder, CoordinatorError> {
    let span = tracing::info_span!("decode", round = name);
    let (encoder, ()) =
        tokio::try_join!(decode_on_rank0(&ranks[0], cx, encoder, &span).instrument(span.clone()), decode_on_other_ranks(&ranks[1..], cx, &span))?;
    Ok(encoder)
}

/// Streams the decoded frames from rank 0 into `encoder` (PNG frames are handed out as they
/// come); returns the encoder with every frame in.
async fn decode_on_rank0(rank0: &Rank, cx: &DriveContext<'_>, mut encoder: FrameEncoder, span: &tracing::Span) -> Result<FrameEncoder, CoordinatorError> {
    let trace_context = span.in_scope(tessera_telemetry::current_context_map);
    let mut stream =
        rank0.client.clone().decode(pb::DecodeRequest { job_id: cx.job.id.clone(), trace_context }).await.map_err(|s| rank0.failed("decode", s))?.into_inner();
    let deadline = tokio::time::Instant::now() + cx.limits.decode;
    loop {
        let next = tokio::select! {
            m = tokio::time::timeout_at(deadline, stream.message()) => m.map_err(|_| CoordinatorError::WorkerFailed {
                worker: rank0.record.worker_id.clone(),
                during: "decode".into(),
                refused_field: None,
                detail: format!("the decode took longer than {:?}", cx.limits.decode),
            })?,
            reason = cx.stop.stopped() => return Err(reason.error()),
        };
        let Some(chunk) = next.map_err(|s| rank0.failed("decode", s))? else { return Ok(encoder) };
        let frames = codec::decoded_frames(&chunk).map_err(|e| CoordinatorError::Internal(format!("frames from rank 0: {e}")))?;
        encoder = encode(cx, encoder, frames).await?;
    }
}

/// Frames at the generated size `[1, 3, n, H, W]` in [0, 1] into `encoder`, cropped back to the
/// size asked (on a blocking thread); the files they complete (PNG frames) go out at once.
async fn encode(cx: &DriveContext<'_>, mut encoder: FrameEncoder, frames: tessera_cluster::Tensor) -> Result<FrameEncoder, CoordinatorError> {
    let asked = &cx.job.request.request;
    let frames = crate::video::crop_center(frames, asked.height, asked.width)?;
    let (back, files) = tokio::task::spawn_blocking(move || {
        let files = encoder.push_chunk(&frames);
        (encoder, files)
    })
    .await
    .map_err(|e| CoordinatorError::Internal(format!("the encoder thread failed: {e}")))?;
    for f in files? {
        send(cx.events, ExecEvent::File(f)).await?;
    }
    Ok(back)
}

/// Frames of an extended input converted at a time (a bound on the f32 copy's size).
const INPUT_FRAMES_PER_PIECE: u32 = 16;

/// A video extension's input video, served before its continuation: its frames go into
/// `encoder` a few at a time, as decoded at admission.
async fn serve_input(cx: &DriveContext<'_>, mut encoder: FrameEncoder, input: &pb::InputFrames) -> Result<FrameEncoder, CoordinatorError> {
    let frame = 3 * input.width as usize * input.height as usize;
    for first in (0..input.frames).step_by(INPUT_FRAMES_PER_PIECE as usize) {
        let count = INPUT_FRAMES_PER_PIECE.min(input.frames - first);
        let rgb = input.rgb.get(first as usize * frame..(first + count) as usize * frame).unwrap_or_default().to_vec();
        let piece = pb::DecodedFrames { first_frame: first, count, width: input.width, height: input.height, rgb };
        let frames = codec::decoded_frames(&piece).map_err(|e| CoordinatorError::Internal(format!("the input video: {e}")))?;
        encoder = encode(cx, encoder, frames).await?;
        check_stop(cx.stop)?;
    }
    Ok(encoder)
}

/// Sends Decode to the ranks other than 0, which decode their bands, hand them to rank 0 and
/// answer with an empty stream (frames from them would be a protocol error).
async fn decode_on_other_ranks(others: &[Rank], cx: &DriveContext<'_>, span: &tracing::Span) -> Result<(), CoordinatorError> {
    let trace_context = span.in_scope(tessera_telemetry::current_context_map);
    let calls = others.iter().map(|rank| {
        let req = pb::DecodeRequest { job_id: cx.job.id.clone(), trace_context: trace_context.clone() };
        async move {
            let mut stream = rank.client.clone().decode(req).await.map_err(|s| rank.failed("decode", s))?.into_inner();
            while let Some(chunk) = stream.message().await.map_err(|s| rank.failed("decode", s))? {
                if chunk.count > 0 {
                    return Err(rank.failed("decode", tonic::Status::internal("frames from a rank other than 0")));
                }
            }
            Ok(())
        }
    });
    futures_util::future::try_join_all(calls).await.map(drop)
}

/// `N` bytes from the operating system's random source (job secrets, group sessions).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], CoordinatorError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| CoordinatorError::Internal(format!("the system's random source failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_refusal_of_the_spec_names_the_public_field() {
        use tessera_proto::reason::{invalid_field, status};
        assert_eq!(refused_field(&invalid_field("spec.num_frames", "too many tokens")).as_deref(), Some("num_frames"));
        assert_eq!(refused_field(&invalid_field("peers", "3 for 2 ranks")).as_deref(), Some("peers"));
        assert_eq!(refused_field(&status(Reason::WorkerBusy, None, "busy")), None, "a busy worker refused nothing of the request");
    }

    #[test]
    fn only_gpu_groups_of_several_ranks_need_an_nccl_id() {
        let worker = |id: &str, device: &str| WorkerRecord::starting(id, "h:1", "h:2", "m", vec![device.to_string()], 0);
        let (cpu, gpu) = (worker("a", "cpu"), worker("b", "cuda:0 NVIDIA H100 80GB HBM3"));
        assert!(!group_needs_nccl(std::slice::from_ref(&cpu)));
        assert!(!group_needs_nccl(&[cpu.clone(), cpu.clone(), cpu.clone()]), "CPU groups talk over TCP");
        assert!(!group_needs_nccl(std::slice::from_ref(&gpu)), "one GPU rank has nobody to talk to");
        assert!(group_needs_nccl(&[gpu.clone(), worker("c", "cuda:1")]));
        assert!(group_needs_nccl(&[cpu, gpu]), "any rank on a GPU");
        assert!(!group_needs_nccl(&[]));
    }
}
