//! A denoising run that advances one step at a time on the backend the pipeline's transformer was
//! loaded on: what a rank keeps between two of the coordinator's step commands (its share of the
//! latent and the sampler's history, on its device: [`ShardRun`]), what a checkpoint gathers to
//! rank 0, and what the split decode takes from each rank.

use super::shard_run::{RankGroup, ShardRun, Start};
use super::{Conditioning, WanPipeline};
use crate::model::DitModel;
use crate::sampler::{SamplerHistory, Schedule};
use crate::vae::PatchShard;
use crate::{Result, WorkerError};
use tessera_kernels::backend::{CpuOps, CudaOps, HostOps};
use tessera_kernels::Tensor;

/// One rank's run of the denoising loop, on the backend of the pipeline it was made for.
pub enum Denoiser {
    /// f32 on the CPU.
    Cpu(Box<ShardRun<CpuOps>>),
    /// bf16 model under the host twin of the GPU path.
    Bf16Host(Box<ShardRun<HostOps>>),
    /// On a CUDA GPU.
    Cuda(Box<ShardRun<CudaOps>>),
}

/// Runs `$body` with `$r` bound to the run and `$m` to the matching model of `$pipe`, or fails
/// when they are on different backends.
macro_rules! with_model {
    ($self:expr, $pipe:expr, ($r:ident, $m:ident) => $body:expr) => {
        match ($self, $pipe.transformer()) {
            (Denoiser::Cpu($r), DitModel::Cpu($m)) => $body,
            (Denoiser::Bf16Host($r), DitModel::Bf16Host($m)) => $body,
            (Denoiser::Cuda($r), DitModel::Cuda($m)) => $body,
            _ => Err(WorkerError::input("device", "the run was made for a pipeline on another backend")),
        }
    };
}

/// Runs `$body` with `$r` bound to the run, whatever its backend.
macro_rules! on_run {
    ($self:expr, $r:ident => $body:expr) => {
        match $self {
            Denoiser::Cpu($r) => $body,
            Denoiser::Bf16Host($r) => $body,
            Denoiser::Cuda($r) => $body,
        }
    };
}

impl Denoiser {
    /// A run from `start` over every step of `schedule`; this rank of `group` keeps its share.
    pub fn new(pipe: &WanPipeline, group: RankGroup<'_>, start: Start<'_>, text: Conditioning, guidance_scale: f32, schedule: Schedule) -> Result<Self> {
        Ok(match pipe.transformer() {
            DitModel::Cpu(m) => Self::Cpu(Box::new(ShardRun::new(m, group, start, text, guidance_scale, schedule)?)),
            DitModel::Bf16Host(m) => Self::Bf16Host(Box::new(ShardRun::new(m, group, start, text, guidance_scale, schedule)?)),
            DitModel::Cuda(m) => Self::Cuda(Box::new(ShardRun::new(m, group, start, text, guidance_scale, schedule)?)),
        })
    }

    /// Resumes a run from a checkpoint: the whole latent after `steps_done` steps and the whole
    /// sampler history at that point (whatever group wrote them).
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        pipe: &WanPipeline,
        group: RankGroup<'_>,
        latents: &Tensor,
        history: &SamplerHistory,
        steps_done: usize,
        text: Conditioning,
        guidance_scale: f32,
        schedule: Schedule,
    ) -> Result<Self> {
        let (l, h, g) = (latents, history, guidance_scale);
        Ok(match pipe.transformer() {
            DitModel::Cpu(m) => Self::Cpu(Box::new(ShardRun::resume(m, group, l, h, steps_done, text, g, schedule)?)),
            DitModel::Bf16Host(m) => Self::Bf16Host(Box::new(ShardRun::resume(m, group, l, h, steps_done, text, g, schedule)?)),
            DitModel::Cuda(m) => Self::Cuda(Box::new(ShardRun::resume(m, group, l, h, steps_done, text, g, schedule)?)),
        })
    }

    /// Steps in the run.
    pub fn total_steps(&self) -> usize {
        on_run!(self, r => r.total_steps())
    }

    /// Steps completed.
    pub fn steps_done(&self) -> usize {
        on_run!(self, r => r.steps_done())
    }

    /// True when every step has run.
    pub fn is_finished(&self) -> bool {
        self.steps_done() == self.total_steps()
    }

    /// This rank's token range of the flattened sequence.
    pub fn tokens(&self) -> std::ops::Range<usize> {
        on_run!(self, r => r.tokens())
    }

    /// Runs the next step with `pipe`'s transformer (sharded over `group`).
    pub fn step(&mut self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<()> {
        with_model!(self, pipe, (r, m) => r.step(m, group))
    }

    /// The whole latent now, on rank 0 (`None` on the others): every rank of `group` calls it.
    pub fn latents(&self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<Option<Tensor>> {
        with_model!(self, pipe, (r, m) => r.gather(m, group))
    }

    /// This rank's share of the latent now, as patch rows on the host, and where every rank's
    /// lies: what the split decode takes ([`ShardRun::patch_shard`]).
    pub fn patch_shard(&self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<PatchShard> {
        with_model!(self, pipe, (r, m) => r.patch_shard(m, group))
    }

    /// The whole latent and sampler history now, on rank 0 (`None` on the others): every rank
    /// of `group` calls it.
    pub fn checkpoint(&self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<Option<(Tensor, SamplerHistory)>> {
        with_model!(self, pipe, (r, m) => r.checkpoint(m, group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DitInputs;
    use crate::parallel::{run_in_process, ParallelPlan};
    use crate::pipeline::{FrameCollector, GenerationParams, PipelinePreset};
    use crate::sampler::{apply_guidance, SamplerState};
    use crate::vae::SplitLatent;

    /// The tiny pipeline, the run's settings, its one-device latent ([`whole_latent_loop`]), text
    /// conditions, schedule and starting latent.
    struct Fixture {
        pipe: WanPipeline,
        p: GenerationParams,
        want: Tensor,
        text: Conditioning,
        schedule: Schedule,
        start: Tensor,
    }

    fn fixture() -> Fixture {
        let pipe = PipelinePreset::Tiny.build(3).unwrap();
        let p = params();
        let want = whole_latent_loop(&pipe, &p);
        let text = pipe.encode_text(&p.prompt, &p.negative_prompt, p.guidance_scale).unwrap();
        let schedule = pipe.schedule_for(&p).unwrap();
        let start = pipe.initial_latents(&p, &schedule).unwrap();
        Fixture { pipe, p, want, text, schedule, start }
    }

    fn params() -> GenerationParams {
        GenerationParams { height: 32, width: 32, num_frames: 5, num_inference_steps: 4, seed: 9, ..GenerationParams::new("a boat") }
    }

    /// The denoising loop as it ran before the latent stayed on the device: the whole velocity
    /// on the host (the model's full forward, unpatchified), guidance and the sampler on the whole
    /// latent in its own layout. The rows path must give it bit for bit.
    fn whole_latent_loop(pipe: &WanPipeline, p: &GenerationParams) -> Tensor {
        let text = pipe.encode_text(&p.prompt, &p.negative_prompt, p.guidance_scale).unwrap();
        let schedule = pipe.schedule_for(p).unwrap();
        let mut x = pipe.initial_latents(p, &schedule).unwrap();
        let mut state = SamplerState::new(&CpuOps, schedule.kind(), x.len()).unwrap();
        let negative = text.negative_embeds.as_ref().unwrap();
        let context = Tensor::new([2, negative.dim(1), negative.dim(2)], [text.prompt_embeds.data(), negative.data()].concat()).unwrap();
        for i in schedule.steps() {
            let t = schedule.timesteps().get(i).unwrap();
            let mut s = x.shape().to_vec();
            s[0] = 2;
            let hidden = Tensor::new(s, [x.data(), x.data()].concat()).unwrap();
            let inputs = DitInputs {
                hidden_states: &hidden,
                timesteps: &[t, t],
                encoder_hidden_states: &context,
                encoder_hidden_states_image: None,
                options: Default::default(),
            };
            let out = pipe.transformer().forward(&inputs).unwrap().into_data();
            let (cond, uncond) = out.split_at(x.len());
            let mut v = cond.to_vec();
            apply_guidance(&mut v, uncond, p.guidance_scale).unwrap();
            let mut data = x.data().to_vec();
            state.step(&CpuOps, &schedule, i, &v, &mut data).unwrap();
            x = Tensor::new(x.shape().to_vec(), data).unwrap();
        }
        x
    }

    #[test]
    fn the_rows_path_equals_the_whole_latent_loop_bit_for_bit_and_resumes() {
        let Fixture { pipe, p, want, text, schedule, start } = fixture();
        let mut d = Denoiser::new(&pipe, RankGroup::Alone, Start::Latents(&start), text.clone(), p.guidance_scale, schedule.clone()).unwrap();
        d.step(&pipe, RankGroup::Alone).unwrap();
        d.step(&pipe, RankGroup::Alone).unwrap();
        let (latents, history) = d.checkpoint(&pipe, RankGroup::Alone).unwrap().unwrap();
        let mut resumed = Denoiser::resume(&pipe, RankGroup::Alone, &latents, &history, d.steps_done(), text, p.guidance_scale, schedule).unwrap();
        while !resumed.is_finished() {
            resumed.step(&pipe, RankGroup::Alone).unwrap();
        }
        let got = resumed.latents(&pipe, RankGroup::Alone).unwrap().unwrap();
        assert_eq!(got.shape(), want.shape());
        assert!(got.data().iter().zip(want.data()).all(|(a, b)| a.to_bits() == b.to_bits()), "rows path vs whole latent");
        assert!(resumed.step(&pipe, RankGroup::Alone).is_err(), "past the last step");
    }

    /// Two Ulysses ranks keep half the latent each and step it there; the gathered latent is the
    /// one-device one. A checkpoint taken by the pair resumes on three ranks (ring attention) and
    /// on one. The ranks' matrix products run on fewer rows and the ring merges partial softmaxes,
    /// so the sums are ordered differently: held to [`tolerance`], the bound the one-device vs
    /// sharded generation test uses.
    #[test]
    fn sharded_runs_gather_the_one_device_latent_and_resume_on_another_group() {
        let Fixture { pipe, p, want, text, schedule, start } = fixture();
        let heads = pipe.transformer().config().num_attention_heads;
        let pair = run_in_process(ParallelPlan::new(2, 2, heads).unwrap(), |ctx| {
            let g = RankGroup::Sharded(ctx);
            let mut d = Denoiser::new(&pipe, g, Start::Latents(&start), text.clone(), p.guidance_scale, schedule.clone())?;
            d.step(&pipe, g)?;
            let cp = d.checkpoint(&pipe, g)?;
            while !d.is_finished() {
                d.step(&pipe, g)?;
            }
            Ok((d.tokens(), cp, d.latents(&pipe, g)?, ctx.world().stats()))
        })
        .unwrap();
        let tokens: Vec<_> = pair.iter().map(|r| r.0.clone()).collect();
        assert_eq!(tokens, shard_ranges_of(&want, &pipe, 2), "each rank keeps its share");
        assert!(pair[1].1.is_none() && pair[1].2.is_none(), "only rank 0 gets the whole");
        let got = pair[0].2.as_ref().unwrap();
        let close = |got: &Tensor, what: &str| {
            let c = crate::golden::Comparison::new(got.data(), want.data(), &tolerance());
            eprintln!("{what}: {c:?}");
            assert!(c.passed, "{what}: {c:?}");
        };
        close(got, "2 Ulysses ranks");
        assert!(pair[1].3.gather > 0 && pair[0].3.gather == 0, "rank 1 sends its rows to rank 0");
        assert_eq!(pair[0].3.all_gather, 0, "nothing is all-gathered: each rank steps its own rows");

        let (latents, history) = pair[0].1.clone().unwrap();
        for ranks in [3, 1] {
            let resumed = run_in_process(ParallelPlan::new(ranks, 1, heads).unwrap(), |ctx| {
                let g = if ranks == 1 { RankGroup::Alone } else { RankGroup::Sharded(ctx) };
                let mut d = Denoiser::resume(&pipe, g, &latents, &history, 1, text.clone(), p.guidance_scale, schedule.clone())?;
                while !d.is_finished() {
                    d.step(&pipe, g)?;
                }
                d.latents(&pipe, g)
            })
            .unwrap();
            close(resumed[0].as_ref().unwrap(), &format!("resumed on {ranks} ranks"));
        }
    }

    /// The split decode of a run's shares, where they are (one all-to-all into bands), gives
    /// the frames of gathering the latent to rank 0 and splitting it from there, bit for bit:
    /// over a ring, and over CFG halves whose second half holds copies of the first's shares.
    /// It moves less: what one rank holds of another's band, not the whole latent twice through
    /// rank 0.
    #[test]
    fn decoding_the_shares_in_place_gives_the_frames_of_the_gathered_latent() {
        let Fixture { pipe, p, text, schedule, start, .. } = fixture();
        let heads = pipe.transformer().config().num_attention_heads;
        for plan in [ParallelPlan::new(3, 1, heads).unwrap(), ParallelPlan::with_cfg(4, 2, 2, heads).unwrap()] {
            let got = run_in_process(plan, |ctx| {
                let g = RankGroup::Sharded(ctx);
                let mut d = Denoiser::new(&pipe, g, Start::Latents(&start), text.clone(), p.guidance_scale, schedule.clone())?;
                d.step(&pipe, g)?;
                let (mut gathered, mut in_place) = (FrameCollector::default(), FrameCollector::default());
                let before = ctx.world().stats().sent();
                let whole = d.latents(&pipe, g)?;
                pipe.decode_split(SplitLatent::Lead(whole.as_ref()), ctx.world(), &mut gathered)?;
                let middle = ctx.world().stats().sent();
                pipe.decode_split(SplitLatent::Patches(&d.patch_shard(&pipe, g)?), ctx.world(), &mut in_place)?;
                let after = ctx.world().stats().sent();
                let frames = (ctx.rank() == 0).then(|| (gathered.frames(), in_place.frames()));
                Ok((frames, middle - before, after - middle))
            })
            .unwrap();
            let (gathered, in_place) = got[0].0.as_ref().unwrap();
            let (gathered, in_place) = (gathered.as_ref().unwrap(), in_place.as_ref().unwrap());
            assert_eq!(gathered.shape(), in_place.shape(), "{plan:?}");
            assert!(gathered.data() == in_place.data(), "{plan:?}: the frames differ");
            let (through_rank0, direct): (u64, u64) = (got.iter().map(|r| r.1).sum(), got.iter().map(|r| r.2).sum());
            eprintln!("{plan:?}: gathered and split {through_rank0} bytes, in place {direct}");
            assert!(direct < through_rank0, "{plan:?}: {direct} bytes in place, {through_rank0} through rank 0");
        }
    }

    /// Seeded noise drawn rank by rank (no rank ever holds the whole) starts the run exactly
    /// where the whole noise does, sharded or not.
    #[test]
    fn noise_drawn_per_rank_equals_the_whole_noise() {
        let Fixture { pipe, p, text, schedule, start, .. } = fixture();
        let mut shape = [0usize; 5];
        shape.copy_from_slice(start.shape());
        let heads = pipe.transformer().config().num_attention_heads;
        for ranks in [1, 3] {
            let run = |from_noise: bool| {
                run_in_process(ParallelPlan::new(ranks, 1, heads).unwrap(), |ctx| {
                    let g = if ranks == 1 { RankGroup::Alone } else { RankGroup::Sharded(ctx) };
                    let origin = if from_noise { Start::Noise { seed: p.seed, stream: crate::pipeline::NOISE_STREAM, shape } } else { Start::Latents(&start) };
                    let mut d = Denoiser::new(&pipe, g, origin, text.clone(), p.guidance_scale, schedule.clone())?;
                    d.step(&pipe, g)?;
                    d.latents(&pipe, g)
                })
                .unwrap()
                .swap_remove(0)
                .unwrap()
            };
            assert_eq!(run(true), run(false), "{ranks} ranks");
        }
    }

    /// CFG-parallel: half the ranks run the conditional pass, half the unconditional one, and
    /// partners swap velocity rows. Two ranks (one each), and four (two halves of two ring
    /// ranks), gather the one-device latent; the pairs move only velocity rows (no all-gather),
    /// the second half never gathers, and a job without guidance is refused.
    #[test]
    fn cfg_parallel_halves_give_the_one_device_latent() {
        let Fixture { pipe, p, want, text, schedule, start } = fixture();
        let heads = pipe.transformer().config().num_attention_heads;
        for (ranks, ulysses) in [(2, 1), (4, 1), (4, 2)] {
            let plan = ParallelPlan::with_cfg(ranks, ulysses, 2, heads).unwrap();
            let out = run_in_process(plan, |ctx| {
                let g = RankGroup::Sharded(ctx);
                let mut d = Denoiser::new(&pipe, g, Start::Latents(&start), text.clone(), p.guidance_scale, schedule.clone())?;
                while !d.is_finished() {
                    d.step(&pipe, g)?;
                }
                Ok((d.latents(&pipe, g)?, ctx.world().stats()))
            })
            .unwrap();
            let c = crate::golden::Comparison::new(out[0].0.as_ref().unwrap().data(), want.data(), &tolerance());
            eprintln!("cfg-parallel over {ranks} ranks, ulysses {ulysses}: {c:?}");
            assert!(c.passed, "cfg-parallel over {ranks} ranks: {c:?}");
            assert!(out[ranks / 2..].iter().all(|(l, s)| l.is_none() && s.gather == 0), "the second half holds copies and gathers nothing");
            // each rank sends its velocity rows once per step: its tokens × 64 features × 4 bytes
            let rows_bytes = |r: usize| (shard_ranges_of(&want, &pipe, ranks / 2)[r % (ranks / 2)].len() * 64 * 4) as u64;
            for (r, (_, s)) in out.iter().enumerate() {
                assert_eq!(s.cfg, rows_bytes(r) * 4, "rank {r}: one swap per step, 4 steps");
                assert_eq!(s.all_gather, 0);
            }
        }
        let unguided = GenerationParams { guidance_scale: 1.0, ..params() };
        let text = pipe.encode_text(&unguided.prompt, &unguided.negative_prompt, unguided.guidance_scale).unwrap();
        let err = run_in_process(ParallelPlan::with_cfg(2, 1, 2, heads).unwrap(), |ctx| {
            Denoiser::new(&pipe, RankGroup::Sharded(ctx), Start::Latents(&start), text.clone(), unguided.guidance_scale, schedule.clone()).map(drop)
        })
        .unwrap_err();
        assert!(err.to_string().contains("cfg_parallel"), "{err}");
    }

    /// f32 sums in another order over 4 steps of the tiny model: 1e-5 rel-L2 (measured 1e-7 to
    /// 1e-6; see `pipeline::sharded::tests`).
    fn tolerance() -> crate::golden::Tolerance {
        crate::golden::Tolerance { rel_l2: 1e-5, max_abs: Some(1e-4), max_abs_over_max_ref: None }
    }

    fn shard_ranges_of(latents: &Tensor, pipe: &WanPipeline, ranks: usize) -> Vec<std::ops::Range<usize>> {
        let [pt, ph, pw] = pipe.transformer().config().patch_size;
        let s = latents.shape();
        crate::parallel::shard_ranges((s[2] / pt) * (s[3] / ph) * (s[4] / pw), ranks)
    }
}
