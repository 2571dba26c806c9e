//! One job on one worker: a thread that owns the rank's state (its place in the job's collective
//! group, the pipeline run) and executes the coordinator's commands in order. Collectives block, so
//! the state lives on a plain thread, not on the gRPC runtime; handlers talk to it by messages.

use super::run::JobRun;
pub use super::run::{JobCheckpoint, Resume};
use crate::parallel::{ParallelPlan, ShardContext, TcpOptions, TcpTransport};
use crate::pipeline::{Conditioning, GenerationParams, RankGroup, WanPipeline};
use crate::{Result, WorkerError};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_kernels::Tensor;

/// What a rank needs to join a job.
pub struct JobSetup {
    /// The job.
    pub job_id: String,
    /// This worker's rank.
    pub rank: usize,
    /// The collective address of every rank, in rank order.
    pub peers: Vec<SocketAddr>,
    /// Ulysses degree (ranks = cfg × ulysses × ring).
    pub ulysses: usize,
    /// CFG-parallel degree: 1, or 2 (half the ranks run the conditional pass, half the
    /// unconditional one).
    pub cfg: usize,
    /// Identifies the group on the wire.
    pub session: u64,
    /// The job's secret: the ranks prove they hold it when they connect.
    pub secret: Vec<u8>,
    /// How long to wait for the other ranks.
    pub connect_timeout: Duration,
    /// The job ends when no command comes for this long (its coordinator is gone).
    pub idle_timeout: Duration,
    /// Cancelled when the job is released while its group is still connecting.
    pub cancel: tokio_util::sync::CancellationToken,
    /// The generation.
    pub params: GenerationParams,
    /// Resume from a checkpoint of the run (another group's) instead of starting it.
    pub resume: Option<Resume>,
    /// The NCCL id of the group's GPUs (made by rank 0's worker, carried by the coordinator);
    /// needed when the transformer runs on a GPU in a group of more than one rank.
    pub nccl_id: Option<tessera_kernels::cuda::nccl::NcclId>,
}

/// What one step cost this rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepReport {
    /// Wall time of the step.
    pub seconds: f64,
    /// Of which waiting on collectives (ring blocks and all-to-alls).
    pub communication_seconds: f64,
    /// Bytes this rank sent during the step.
    pub bytes_sent: u64,
    /// Chunks a diffusion-forcing run has finished after the step (0 for other runs).
    pub chunks_done: usize,
}

/// Commands to a job thread; each carries its reply channel.
pub enum Command {
    /// Runs step `index` (must be the next one; the step just run is answered again with its
    /// report: a retry, or a new coordinator's first step after one that its predecessor sent).
    Step(usize, mpsc::Sender<Result<StepReport>>),
    /// Gathers the state to rank 0 and copies it out (every rank is sent this).
    Checkpoint(mpsc::Sender<Result<JobCheckpoint>>),
    /// Gathers the latent now to rank 0 (`None` on the others; every rank is sent this).
    Latents(mpsc::Sender<Result<Option<Tensor>>>),
    /// Decodes the frames that are final and not decoded yet (the whole video once every step
    /// has run; a diffusion-forcing run's finished chunks): rank 0 sends frame chunks
    /// `[1, 3, n, H, W]` in [0, 1] with the index of their first frame as they come; the other
    /// ranks send nothing (every rank is sent this).
    Decode(tokio::sync::mpsc::Sender<Result<(usize, Tensor)>>),
    /// A new coordinator takes the job over (it read where the run stands from [`RunState`]):
    /// the decode restarts, so that the next Decode sends every final frame again (rank-local; no
    /// collective).
    Adopt,
}

/// Where a run stands (between commands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Steps run (the next Step is this one).
    pub steps_done: usize,
    /// Chunks a diffusion-forcing run has finished (0 for other runs).
    pub chunks_done: usize,
}

/// What the job thread is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// Waiting for a command.
    Idle,
    /// Running a step: the one after the steps done.
    Step,
    /// Running another command (a checkpoint, a decode, the latents).
    Other,
}

/// Where a run stands, as its thread publishes it, read without waiting for the thread: a new
/// coordinator learns it while a step its predecessor sent still runs.
#[derive(Debug, Default)]
pub struct RunState {
    steps_done: AtomicUsize,
    chunks_done: AtomicUsize,
    busy: AtomicU8,
}

impl RunState {
    fn publish(&self, run: &JobRun, busy: Busy) {
        self.steps_done.store(run.steps_done(), Ordering::SeqCst);
        self.chunks_done.store(run.chunks_done(), Ordering::SeqCst);
        self.busy.store(busy as u8, Ordering::SeqCst);
    }

    /// Steps and chunks done, and what the thread is doing.
    pub fn now(&self) -> (Progress, Busy) {
        let busy = match self.busy.load(Ordering::SeqCst) {
            0 => Busy::Idle,
            1 => Busy::Step,
            _ => Busy::Other,
        };
        (Progress { steps_done: self.steps_done.load(Ordering::SeqCst), chunks_done: self.chunks_done.load(Ordering::SeqCst) }, busy)
    }
}

/// The handle the service keeps for a running job.
pub struct JobHandle {
    /// This rank's token range of the flattened sequence.
    pub tokens: std::ops::Range<usize>,
    /// The rank.
    pub rank: usize,
    /// Ranks of the job's group.
    pub ranks: usize,
    /// Denoising steps of the run.
    pub total_steps: usize,
    /// Where the run stands now.
    pub state: Arc<RunState>,
    commands: mpsc::Sender<(tracing::Span, Command)>,
    ended: tokio::sync::watch::Receiver<bool>,
    /// Aborts the job's NCCL communicators (GPU groups only).
    aborts: Vec<tessera_kernels::cuda::nccl::NcclAbort>,
}

/// Tells watchers that the job thread ended, however it ends (return or panic).
struct EndedGuard(tokio::sync::watch::Sender<bool>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl JobHandle {
    /// Ends the job's collectives now: a GPU rank blocked on a peer that will never answer (the
    /// group failed, the job was released) gets an error instead of waiting forever. The TCP
    /// transport needs nothing: its connections fail by themselves.
    pub fn abort_collectives(&self) {
        self.aborts.iter().for_each(|a| a.abort());
    }

    /// Turns true when the job's thread has ended (the group failed, the job idled out, or it
    /// was released).
    pub fn ended(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ended.clone()
    }

    /// Sends a command; fails if the job thread has ended. The command runs in the current span
    /// (the request's), which stays open until the command is done.
    pub fn send(&self, c: Command) -> Result<()> {
        self.commands.send((tracing::Span::current(), c)).map_err(|_| WorkerError::Collective("the job's thread has ended (a peer failed earlier)".into()))
    }
}

/// Joins the job's group (blocking until every rank is connected), prepares the run and starts
/// the job thread. `listener` is this worker's collective socket.
pub fn start(pipe: Arc<WanPipeline>, setup: JobSetup, listener: TcpListener) -> Result<JobHandle> {
    let world = setup.peers.len();
    if world > 1 && setup.nccl_id.is_none() && matches!(pipe.transformer(), crate::model::DitModel::Cuda(_)) {
        return Err(crate::parallel::missing_nccl_id(pipe.transformer(), world));
    }
    let heads = pipe.transformer().config().num_attention_heads;
    let plan = ParallelPlan::with_cfg(world, setup.ulysses, setup.cfg, heads)?;
    if setup.rank >= world {
        return Err(WorkerError::input("rank", format!("{} is outside a group of {world}", setup.rank)));
    }
    // The params were checked by PrepareJob (`GenerationParams::validate`, the worker's limits).
    let (ready_tx, ready_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel::<(tracing::Span, Command)>();
    let (ended_tx, ended) = tokio::sync::watch::channel(false);
    let rank = setup.rank;
    let state = Arc::new(RunState::default());
    let published = state.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(format!("job-{}-r{rank}", setup.job_id))
        .spawn(move || {
            let _ended = EndedGuard(ended_tx);
            let prepared = span.in_scope(|| prepare(&pipe, &setup, plan, listener));
            drop(span);
            let (ctx, run) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            published.publish(&run, Busy::Idle);
            // The run's own share of the tokens (one formula: `ShardRun`'s layout).
            let _ = ready_tx.send(Ok((run.tokens(), run.total_steps(), ctx.collective_aborts())));
            serve(&pipe, &ctx, run, rx, &published, setup.idle_timeout, &setup.job_id);
        })
        .map_err(|e| WorkerError::Collective(format!("cannot start the job thread: {e}")))?;
    let (tokens, total_steps, aborts) = ready_rx.recv().map_err(|_| WorkerError::Collective("the job thread ended while preparing".into()))??;
    Ok(JobHandle { tokens, rank, ranks: world, total_steps, state, commands: tx, ended, aborts })
}

/// The largest collective frame a job may receive: room for every token's activations several
/// times over (what an all-to-all or a gather of the whole sequence moves, in f32, K and V
/// together) plus 64 MiB for the text, image and latent messages; at most the transport's
/// default. A peer claiming more is broken or hostile.
fn frame_limit(tokens: usize, cfg: &crate::transformer_config::TransformerConfig) -> u64 {
    let inner = cfg.inner_dim().max(cfg.in_channels * 64) as u64;
    let activations = (tokens as u64).saturating_mul(inner).saturating_mul(16);
    activations.saturating_add(64 << 20).min(TcpOptions::default().max_frame_bytes)
}

fn prepare(pipe: &WanPipeline, setup: &JobSetup, plan: ParallelPlan, listener: TcpListener) -> Result<(ShardContext, JobRun)> {
    let opts = TcpOptions {
        session: setup.session,
        secret: setup.secret.clone(),
        connect_timeout: setup.connect_timeout,
        cancel: setup.cancel.clone(),
        max_frame_bytes: frame_limit(setup.params.tokens(pipe.factors()).unwrap_or(0), pipe.transformer().config()),
        ..TcpOptions::default()
    };
    let transport = TcpTransport::establish_with_listener(setup.rank, &setup.peers, listener, opts)?;
    let ctx = ShardContext::new(Arc::new(transport), plan)?;
    if plan.ranks() > 1 {
        ctx.join_device_group(pipe.transformer(), setup.nccl_id.as_ref())?;
    }
    let p = &setup.params;
    // Rank 0 encodes the prompt once and sends the embeddings; every rank draws the same seeded
    // noise (an input video or image is VAE-encoded in bands by the group, below and in the run).
    let mut text = encode_once(pipe, &ctx, p)?;
    // One rank runs alone (the model's local attention); a group shards the sequence: each rank
    // keeps its share of the latent on its device from here to the decode (a diffusion-forcing
    // run: every rank holds the chunk, each forward is sharded).
    let group = if plan.ranks() == 1 { RankGroup::Alone } else { RankGroup::Sharded(&ctx) };
    // Image-to-video (Wan 2.1 I2V): every rank runs the image encoder (deterministic, so the ranks
    // agree; its tokens are small beside the transformer's work), and the VAE encodes the
    // condition video split by rows across the group, every rank getting the whole latent. A
    // diffusion-forcing run encodes its image as the first chunk's prefix instead (`JobRun::new`).
    if pipe.is_image_to_video() {
        text.image = p.image.as_ref().map(|image| pipe.encode_image_in(image, p, group.world())).transpose()?;
    }
    let run = JobRun::new(pipe, group, p, text, setup.resume.as_ref())?;
    Ok((ctx, run))
}

/// The job's text conditions on every rank, encoded once: rank 0 runs the text encoder and
/// broadcasts the token ids and embeddings (`[n_ids, n_negative_ids or -1, rows, width]`, the ids,
/// then the embeddings); the others check the message's sizes and rebuild them. One rank encodes
/// locally.
pub(crate) fn encode_once(pipe: &WanPipeline, ctx: &ShardContext, p: &GenerationParams) -> Result<Conditioning> {
    let world = ctx.world();
    if world.size() <= 1 {
        return pipe.encode_text(&p.prompt, &p.negative_prompt, p.guidance_scale);
    }
    if world.rank() == 0 {
        let text = pipe.encode_text(&p.prompt, &p.negative_prompt, p.guidance_scale)?;
        let shape = text.prompt_embeds.shape();
        let (rows, width) = (shape.get(1).copied().unwrap_or(0), shape.get(2).copied().unwrap_or(0));
        let negative_len = text.negative_ids.as_ref().map_or(-1.0, |ids| ids.len() as f32);
        let mut message = vec![text.prompt_ids.len() as f32, negative_len, rows as f32, width as f32];
        message.extend(text.prompt_ids.iter().chain(text.negative_ids.iter().flatten()).map(|&id| id as f32));
        message.extend_from_slice(text.prompt_embeds.data());
        if let Some(n) = &text.negative_embeds {
            message.extend_from_slice(n.data());
        }
        world.broadcast(0, &message)?;
        return Ok(text);
    }
    let message = world.broadcast(0, &[])?;
    text_from_message(&message)
}

/// Rebuilds rank 0's text conditions from its broadcast, refusing a message whose sizes do not
/// add up (ids are exact in f32: vocabularies are far below 2^24).
fn text_from_message(m: &[f32]) -> Result<Conditioning> {
    let bad = |why: &str| WorkerError::Collective(format!("rank 0's text embeddings: {why}"));
    let [n_ids, n_negative, rows, width] = m.get(..4).and_then(|h| <[f32; 4]>::try_from(h).ok()).ok_or_else(|| bad("a header of fewer than 4 values"))?;
    let count = |v: f32| (v >= 0.0 && v.fract() == 0.0 && v < 16_777_216.0).then_some(v as usize);
    let (n_ids, rows, width) =
        (count(n_ids).ok_or_else(|| bad("bad id count"))?, count(rows).ok_or_else(|| bad("bad rows"))?, count(width).ok_or_else(|| bad("bad width"))?);
    let n_negative = if n_negative == -1.0 { None } else { Some(count(n_negative).ok_or_else(|| bad("bad negative id count"))?) };
    let embeds = rows.checked_mul(width).ok_or_else(|| bad("embedding size overflows"))?;
    let ids = n_ids + n_negative.unwrap_or(0);
    let want = 4 + ids + embeds * if n_negative.is_some() { 2 } else { 1 };
    if m.len() != want {
        return Err(bad(&format!("{} values where the header says {want}", m.len())));
    }
    let id = |v: &f32| count(*v).map(|v| v as u32).ok_or_else(|| bad("an id is not a whole number"));
    let prompt_ids = m[4..4 + n_ids].iter().map(id).collect::<Result<Vec<u32>>>()?;
    let negative_ids = n_negative.map(|n| m[4 + n_ids..4 + n_ids + n].iter().map(id).collect::<Result<Vec<u32>>>()).transpose()?;
    let at = 4 + ids;
    let prompt_embeds = Tensor::new([1, rows, width], m[at..at + embeds].to_vec())?;
    let negative_embeds = n_negative.map(|_| Tensor::new([1, rows, width], m[at + embeds..at + 2 * embeds].to_vec())).transpose()?;
    Ok(Conditioning { prompt_ids, negative_ids, prompt_embeds, negative_embeds, image: None })
}

fn serve(
    pipe: &WanPipeline,
    ctx: &ShardContext,
    mut run: JobRun,
    commands: mpsc::Receiver<(tracing::Span, Command)>,
    state: &RunState,
    idle_timeout: Duration,
    job_id: &str,
) {
    let group = if ctx.plan().ranks() == 1 { RankGroup::Alone } else { RankGroup::Sharded(ctx) };
    // The last step run and its report, answered again when that step is asked for again.
    let mut last: Option<(usize, StepReport)> = None;
    loop {
        state.publish(&run, Busy::Idle);
        let (span, command) = match commands.recv_timeout(idle_timeout) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(job_id, idle_s = idle_timeout.as_secs_f64(), "no command for the job: dropping it (its coordinator is gone?)");
                return;
            }
        };
        let _in = span.enter();
        state.publish(&run, if matches!(command, Command::Step(..)) { Busy::Step } else { Busy::Other });
        // A failed collective leaves the group unusable: a group's job ends with the command that
        // hit it.
        let ok = match command {
            Command::Step(index, reply) => {
                if let Some((_, report)) = last.filter(|(done, _)| *done == index) {
                    let _ = reply.send(Ok(report));
                    continue;
                }
                if index != run.steps_done() {
                    let _ = reply.send(Err(WorkerError::input("step", format!("step {index} asked, step {} is next", run.steps_done()))));
                    continue;
                }
                let (sent0, timings0) = (ctx.world().stats().sent(), ctx.timings().seconds());
                let t = Instant::now();
                let result = run.step(pipe, group).map(|_| {
                    let timings = ctx.timings().seconds();
                    StepReport {
                        seconds: t.elapsed().as_secs_f64(),
                        communication_seconds: (timings.1 - timings0.1) + (timings.2 - timings0.2),
                        bytes_sent: ctx.world().stats().sent() - sent0,
                        chunks_done: run.chunks_done(),
                    }
                });
                let failed = result.is_err();
                last = result.as_ref().ok().map(|r| (index, *r));
                if !failed {
                    // Done before it is answered: AdoptJob right after the answer reads the step done.
                    state.publish(&run, Busy::Idle);
                }
                let _ = reply.send(result);
                if failed {
                    // The step may have stopped half way (a collective or a kernel failed).
                    return;
                }
                true
            }
            Command::Checkpoint(reply) => {
                let cp = run.checkpoint(pipe, group);
                let ok = survives(&cp);
                let _ = reply.send(cp);
                ok
            }
            Command::Latents(reply) => {
                let latents = run.latents(pipe, group);
                let ok = latents.is_ok();
                let _ = reply.send(latents);
                ok
            }
            Command::Adopt => {
                run.restart_decode(pipe);
                true
            }
            Command::Decode(frames) => {
                let mut sink = |first: usize, t: &Tensor| {
                    frames.blocking_send(Ok((first, t.clone()))).map_err(|_| WorkerError::Cancelled("the decode stream was closed".into()))
                };
                let decoded = run.decode(pipe, group, &mut sink);
                let ok = survives(&decoded);
                if let Err(e) = decoded {
                    let _ = frames.blocking_send(Err(e));
                }
                ok
            }
        };
        if !ok && ctx.plan().ranks() > 1 {
            return;
        }
    }
}

/// Whether the group is still usable after a command's `result`: a refused command (bad input,
/// a closed stream) leaves it as it was; a failed collective or kernel does not.
fn survives<T>(result: &Result<T>) -> bool {
    !matches!(result, Err(WorkerError::Collective(_) | WorkerError::Kernel(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::run_in_process;
    use crate::pipeline::PipelinePreset;

    /// Two ranks: rank 0 encodes and sends; rank 1 gets exactly its conditions, guided or not.
    #[test]
    fn the_text_is_encoded_once_and_sent_to_the_ranks() {
        let pipe = PipelinePreset::Tiny.build(1).unwrap();
        for guidance in [5.0, 1.0] {
            let p = GenerationParams { guidance_scale: guidance, negative_prompt: "blurry".into(), ..GenerationParams::new("a red boat") };
            let local = pipe.encode_text(&p.prompt, &p.negative_prompt, p.guidance_scale).unwrap();
            let plan = ParallelPlan::new(2, 1, pipe.transformer().config().num_attention_heads).unwrap();
            let got = run_in_process(plan, |ctx| Ok((encode_once(&pipe, ctx, &p)?, ctx.world().stats()))).unwrap();
            for (text, _) in &got {
                assert_eq!((&text.prompt_ids, &text.negative_ids), (&local.prompt_ids, &local.negative_ids), "guidance {guidance}");
                assert_eq!(text.prompt_embeds, local.prompt_embeds);
                assert_eq!(text.negative_embeds, local.negative_embeds);
            }
            assert!(got[0].1.broadcast > 0 && got[1].1.broadcast == 0, "rank 0 sends, rank 1 only receives");
        }
    }

    #[test]
    fn a_malformed_text_message_is_refused() {
        assert!(text_from_message(&[1.0]).is_err());
        // one id, no negative, 2 x 3 embeddings: 4 + 1 + 6 values
        let ok = [1.0, -1.0, 2.0, 3.0, 7.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let t = text_from_message(&ok).unwrap();
        assert_eq!((t.prompt_ids, t.prompt_embeds.shape().to_vec()), (vec![7], vec![1, 2, 3]));
        assert!(text_from_message(&ok[..10]).is_err(), "one value short");
        let mut fractional = ok;
        fractional[4] = 7.5;
        assert!(text_from_message(&fractional).is_err());
        let huge = [1.0, -1.0, 1e7, 1e7, 7.0];
        assert!(text_from_message(&huge).is_err());
    }
}
