//! The denoising loop sequence-parallel over ranks of this process (the golden runner's and the
//! tests' groups; workers run the same [`Denoiser`] one rank per process): each rank keeps its
//! share of the latent and steps it, the transformer's attention joining the shares (ring, Ulysses
//! or USP; in-process or TCP transport). After each step the latent is gathered to rank 0, which
//! reports it to the caller's observer; a stop requested by the observer is broadcast from rank 0
//! at the step boundary, so every rank stops at the same step. The decode splits the frames into
//! bands of rows over the same ranks ([`decode_sharded`]).

use super::{Conditioning, Denoiser, GenerationParams, PipelineObserver, RankGroup, Start, WanPipeline};
use crate::parallel::{run_local_group, LocalTransport, ParallelPlan, ShardContext};
use crate::sampler::Schedule;
use crate::vae::SplitLatent;
use crate::{Result, WorkerError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use tessera_kernels::Tensor;

/// A rank's observer: rank 0 forwards every step to the caller; all ranks then agree, through a
/// broadcast from rank 0, whether to go on.
struct RankObserver<'a> {
    ctx: &'a ShardContext,
    steps: Option<mpsc::Sender<(usize, usize, Tensor)>>,
    stop: &'a AtomicBool,
}

impl RankObserver<'_> {
    /// Step `step` of `total` ran; rank 0 has the gathered latent.
    fn on_step(&mut self, step: usize, total: usize, latents: Option<Tensor>) -> Result<()> {
        if let (Some(tx), Some(latents)) = (&self.steps, latents) {
            // The receiver is gone only when the caller stopped listening: treat it as a stop.
            if tx.send((step, total, latents)).is_err() {
                self.stop.store(true, Ordering::SeqCst);
            }
        }
        let flag = if self.ctx.rank() == 0 && self.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 };
        let agreed = self.ctx.world().broadcast(0, &[flag])?;
        if agreed.first().copied().unwrap_or(0.0) != 0.0 && step + 1 < total {
            return Err(WorkerError::Cancelled(format!("stopped after step {} of {total}", step + 1)));
        }
        Ok(())
    }
}

/// [`WanPipeline::denoise`] over `plan.ranks()` ranks of this process; `latents` ends as the
/// ranks' shares gathered on rank 0. Returns the bytes the ranks sent one another.
#[allow(clippy::too_many_arguments)]
pub fn denoise_sharded(
    pipe: &WanPipeline,
    latents: &mut Tensor,
    text: &Conditioning,
    guidance_scale: f32,
    schedule: &Schedule,
    transport: LocalTransport,
    plan: ParallelPlan,
    observer: &mut dyn PipelineObserver,
) -> Result<u64> {
    let stop = AtomicBool::new(false);
    let start = latents.clone();
    let (tx, rx) = mpsc::channel();
    let mut observer_error = None;
    // The ranks' spans (steps, forwards) belong to the caller's.
    let span = tracing::Span::current();
    let model = pipe.transformer();
    if matches!(model, crate::model::DitModel::Cuda(_)) {
        return Err(WorkerError::input("device", format!("the ranks of one process share one model, and this one runs on {}: NCCL needs one GPU per rank, so run one worker per GPU (embedded or cluster workers) instead", model.describe())));
    }
    let outcome = std::thread::scope(|s| {
        let ranks = s.spawn(|| {
            let tx = tx;
            let _in = span.enter();
            run_local_group(transport, plan, |ctx| {
                let group = RankGroup::Sharded(ctx);
                let mut obs = RankObserver { ctx, steps: (ctx.rank() == 0).then(|| tx.clone()), stop: &stop };
                let mut run = Denoiser::new(pipe, group, Start::Latents(&start), text.clone(), guidance_scale, schedule.clone())?;
                while !run.is_finished() {
                    let step = tracing::info_span!("step", step = run.steps_done(), steps = run.total_steps());
                    step.in_scope(|| run.step(pipe, group))?;
                    // The observer sees every step's latent: gathered to rank 0.
                    obs.on_step(run.steps_done() - 1, run.total_steps(), run.latents(pipe, group)?)?;
                }
                Ok((run.latents(pipe, group)?, ctx.world().stats().sent()))
            })
        });
        // Every sender is dropped when the ranks finish, which ends this loop.
        for (step, total, lat) in rx {
            if observer_error.is_none() {
                if let Err(e) = observer.on_step(step, total, &lat) {
                    observer_error = Some(e);
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
        ranks.join().map_err(|_| WorkerError::Collective("the rank group panicked".into()))?
    });
    if let Some(e) = observer_error {
        return Err(e);
    }
    let mut results = outcome?;
    let moved = results.iter().map(|(_, sent)| sent).sum();
    *latents = results.swap_remove(0).0.ok_or_else(|| WorkerError::Collective("rank 0 gathered no latent".into()))?;
    Ok(moved)
}

/// [`WanPipeline::decode_split`] over `plan.ranks()` ranks of this process, `transport` between
/// them: each rank decodes a band of rows of `latents`; the frames go to `observer` (on this
/// thread) as rank 0 joins them. Returns the bytes the ranks sent one another.
pub fn decode_sharded(pipe: &WanPipeline, latents: &Tensor, transport: LocalTransport, plan: ParallelPlan, observer: &mut dyn PipelineObserver) -> Result<u64> {
    /// Rank 0's observer: hands each piece of frames to the caller's thread.
    struct Forward(Option<mpsc::Sender<Tensor>>);
    impl PipelineObserver for Forward {
        fn on_frames(&mut self, frames: &Tensor) -> Result<()> {
            match &self.0 {
                Some(tx) => tx.send(frames.clone()).map_err(|_| WorkerError::Cancelled("the caller stopped taking frames".into())),
                None => Ok(()),
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    let span = tracing::Span::current();
    std::thread::scope(|s| {
        let ranks = s.spawn(|| {
            let tx = tx;
            let _in = span.enter();
            run_local_group(transport, plan, |ctx| {
                let lead = ctx.rank() == 0;
                pipe.decode_split(SplitLatent::Lead(lead.then_some(latents)), ctx.world(), &mut Forward(lead.then(|| tx.clone())))?;
                Ok(ctx.world().stats().sent())
            })
        });
        // Every sender is dropped when the ranks finish, which ends this loop. After an observer
        // error the frames are still taken (so that rank 0 is not stopped half way while the
        // other ranks wait on it in an exchange) and the error is returned once the ranks end.
        let mut observer_error = None;
        for frames in rx {
            if observer_error.is_none() {
                observer_error = observer.on_frames(&frames).err();
            }
        }
        let sent = ranks.join().map_err(|_| WorkerError::Collective("the rank group panicked".into()))?;
        match observer_error {
            Some(e) => Err(e),
            None => Ok(sent?.iter().sum()),
        }
    })
}

/// [`WanPipeline::generate`] with the denoising sequence-parallel over ranks of this process and
/// the decode split over them (text encoding runs once, here).
pub fn generate_sharded(
    pipe: &WanPipeline,
    params: &GenerationParams,
    transport: LocalTransport,
    plan: ParallelPlan,
    observer: &mut dyn PipelineObserver,
) -> Result<Tensor> {
    params.validate(pipe.factors(), &super::limits::Limits::none())?;
    let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale)?;
    observer.on_text(&text)?;
    let schedule = pipe.schedule_for(params)?;
    let mut latents = pipe.initial_latents(params, &schedule)?;
    observer.on_initial_latents(&latents)?;
    denoise_sharded(pipe, &mut latents, &text, params.guidance_scale, &schedule, transport, plan, observer)?;
    decode_sharded(pipe, &latents, transport, plan, observer)?;
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{Comparison, Tolerance};
    use crate::pipeline::{FrameCollector, PipelinePreset};

    fn params() -> GenerationParams {
        GenerationParams { height: 32, width: 48, num_frames: 9, num_inference_steps: 3, seed: 4, ..GenerationParams::new("a red ball") }
    }

    #[test]
    fn sharded_generation_equals_one_device() {
        let pipe = PipelinePreset::Tiny.build(2).unwrap();
        let mut one = FrameCollector::default();
        pipe.generate(&params(), &mut one).unwrap();
        let one = one.frames().unwrap();
        let tol = Tolerance { rel_l2: 1e-5, max_abs: Some(1e-4), max_abs_over_max_ref: None };
        let heads = pipe.transformer().config().num_attention_heads;
        for (ranks, ulysses, transport) in [(2, 1, LocalTransport::InProcess), (3, 1, LocalTransport::TcpLoopback), (2, 2, LocalTransport::InProcess)] {
            let plan = ParallelPlan::new(ranks, ulysses, heads).unwrap();
            let mut got = FrameCollector::default();
            generate_sharded(&pipe, &params(), transport, plan, &mut got).unwrap();
            let c = Comparison::new(got.frames().unwrap().data(), one.data(), &tol);
            assert!(c.passed, "P={ranks} U={ulysses}: {c:?}");
        }
    }

    /// The host emulation of the CUDA model, sharded with the device-side strategies (the code
    /// a GPU group runs, with host collectives in place of NCCL), over TCP on loopback: the
    /// frames of the one-rank emulated pipeline. Ulysses alone is bit-identical; a ring merges
    /// partial softmaxes in f32 before the bf16 rounding, held to 4e-3 rel-L2 (see
    /// `parallel::device::tests`).
    #[test]
    fn the_device_strategies_generate_the_one_rank_frames() {
        let model = crate::model::DitModel::emulated_preset(crate::TransformerPreset::Tiny, 2).unwrap();
        let pipe = PipelinePreset::Tiny.build_with(2, model).unwrap();
        let mut one = FrameCollector::default();
        pipe.generate(&params(), &mut one).unwrap();
        let one = one.frames().unwrap();
        for (ranks, ulysses, rel_l2) in [(2, 2, 0.0), (2, 1, 4e-3)] {
            let plan = ParallelPlan::new(ranks, ulysses, 2).unwrap();
            let mut got = FrameCollector::default();
            generate_sharded(&pipe, &params(), LocalTransport::TcpLoopback, plan, &mut got).unwrap();
            let got = got.frames().unwrap();
            let c = Comparison::new(got.data(), one.data(), &Tolerance { rel_l2, max_abs: None, max_abs_over_max_ref: None });
            eprintln!("emulated CUDA model, P={ranks} U={ulysses}: {c:?}");
            if rel_l2 == 0.0 {
                assert_eq!(got.data(), one.data(), "P={ranks} U={ulysses}");
            } else {
                assert!(c.passed, "P={ranks} U={ulysses}: {c:?}");
            }
        }
    }

    /// An observer that stops the run after two steps: every rank stops at the same boundary and
    /// the caller's error comes back.
    #[test]
    fn a_stop_from_the_observer_stops_every_rank() {
        struct StopAfter(usize, usize);
        impl PipelineObserver for StopAfter {
            fn on_step(&mut self, step: usize, _total: usize, _latents: &Tensor) -> Result<()> {
                self.1 += 1;
                if step + 1 == self.0 {
                    return Err(WorkerError::Cancelled("by the test".into()));
                }
                Ok(())
            }
        }
        let pipe = PipelinePreset::Tiny.build(2).unwrap();
        let plan = ParallelPlan::new(2, 1, 2).unwrap();
        let mut obs = StopAfter(2, 0);
        let p = GenerationParams { num_inference_steps: 6, ..params() };
        let err = generate_sharded(&pipe, &p, LocalTransport::InProcess, plan, &mut obs).unwrap_err();
        assert!(matches!(err, WorkerError::Cancelled(ref m) if m.contains("by the test")), "{err}");
        assert!(obs.1 <= 3, "the ranks ran on after the stop: {} steps seen", obs.1);
    }
}
