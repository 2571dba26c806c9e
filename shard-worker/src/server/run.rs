//! What a job thread runs behind its commands: Wan's step-by-step denoising of the whole latent
//! ([`Denoiser`], each rank holding its share), or a diffusion-forcing run, chunk by chunk
//! ([`ForcingRun`], every rank holding the chunk, each forward sharded over the group), whose
//! finished chunks the group decodes as they come (a band of rows per rank, rank 0 joining them),
//! continuing the VAE's causal caches.

use crate::model::DitInputs;
use crate::pipeline::forcing::{latent_frames, ChunkPlan, ForcingRun, ForcingSetup, SeededNoise};
use crate::pipeline::{Conditioning, Denoiser, FrameStream, GenerationParams, PipelineObserver, RankGroup, Start, WanPipeline, NOISE_STREAM};
use crate::sampler::SamplerHistory;
use crate::vae::SplitLatent;
use crate::{Result, WorkerError};
use tessera_cluster::limits::grid_tokens;
use tessera_kernels::Tensor;

/// Where a resumed run starts: a checkpoint of an earlier group's run.
pub struct Resume {
    /// Steps already run (a diffusion-forcing run's iterations of its finished chunks).
    pub steps_done: usize,
    /// The latent `[1, C, T, h, w]` (a diffusion-forcing run's video so far).
    pub latents: Tensor,
    /// The rest of the run's state.
    pub state: ResumeState,
}

/// The run's state in a checkpoint besides the latent.
pub enum ResumeState {
    /// The whole sampler history of a Wan run.
    Sampler(SamplerHistory),
    /// The chunks a diffusion-forcing run had finished.
    Forcing(ForcingCheckpoint),
}

/// A diffusion-forcing checkpoint's state (the CheckpointResponse's `sampler_state`, JSON).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForcingCheckpoint {
    /// Chunks finished: the latent holds their new frames.
    pub chunks_done: usize,
}

impl Resume {
    /// A checkpoint's state as a run of either kind reads it: a diffusion-forcing run's when
    /// `forcing`, a sampler history otherwise (a malformed one is refused naming the field).
    pub fn parse(steps_done: usize, latents: Tensor, state: &[u8], forcing: bool) -> Result<Self> {
        let bad = |e: serde_json::Error| WorkerError::input("resume.sampler_state", e.to_string());
        let state = if forcing {
            ResumeState::Forcing(serde_json::from_slice(state).map_err(bad)?)
        } else {
            ResumeState::Sampler(serde_json::from_slice(state).map_err(bad)?)
        };
        Ok(Self { steps_done, latents, state })
    }
}

/// A checkpoint of the run, gathered to rank 0.
pub struct JobCheckpoint {
    /// Steps completed (a diffusion-forcing run: the iterations of its finished chunks).
    pub steps_done: usize,
    /// The whole latent `[1, C, T, h, w]` and the rest of the state (JSON) on rank 0; `None`
    /// on the other ranks.
    pub state: Option<(Tensor, Vec<u8>)>,
}

/// A diffusion-forcing job: the run, its seed, and rank 0's decode of the video so far.
pub struct ForcingJob {
    run: ForcingRun,
    seed: u64,
    /// Latent frames decoded so far, and the VAE's causal caches after them.
    decoded: usize,
    stream: FrameStream,
    /// Video frames decoded so far.
    frames_out: usize,
    /// Leading decoded frames not sent (a video extension's re-decoded history).
    repeated: usize,
    /// Tokens of the largest chunk (every rank holds them all).
    tokens: usize,
}

/// A job's run.
pub enum JobRun {
    /// Wan: one sampler over the whole latent, sharded.
    Wan(Denoiser),
    /// Diffusion forcing: chunk by chunk.
    Forcing(Box<ForcingJob>),
}

/// The group's transformer forward: alone, or sharded over the group's ranks.
fn forward(pipe: &WanPipeline, group: RankGroup<'_>, x: &DitInputs<'_>) -> Result<Tensor> {
    match group {
        RankGroup::Alone => pipe.transformer().forward(x),
        RankGroup::Sharded(ctx) => ctx.forward(pipe.transformer(), x),
    }
}

/// Whether this rank of `group` is rank 0 (which decodes and answers with the whole).
fn is_rank0(group: RankGroup<'_>) -> bool {
    match group {
        RankGroup::Alone => true,
        RankGroup::Sharded(ctx) => ctx.rank() == 0,
    }
}

impl JobRun {
    /// The run of `p` on `group` with the job's `text` (encoded once for the group), from the
    /// start or from `resume`.
    pub fn new(pipe: &WanPipeline, group: RankGroup<'_>, p: &GenerationParams, text: Conditioning, resume: Option<&Resume>) -> Result<Self> {
        let schedule = pipe.schedule_for(p)?;
        if pipe.is_diffusion_forcing() != p.forcing.is_some() {
            let detail =
                if p.forcing.is_some() { "this worker's model is not a diffusion-forcing model" } else { "this worker's model needs diffusion forcing" };
            return Err(WorkerError::input("spec.forcing", detail));
        }
        if let Some(f) = &p.forcing {
            let block = f.causal_block_size.unwrap_or(pipe.transformer().config().num_frame_per_block);
            let plan = ChunkPlan::new(p.num_frames, f.base_num_frames, f.overlap_history, block)?;
            // Image-to-video: the image's latent frame starts the first chunk; a video extension:
            // the input's last frames re-encoded (each encoded split by rows across the group, as
            // every VAE stage).
            let (plan, prefix) = match (&p.image, &p.history, f.overlap_history) {
                (Some(image), None, _) => (plan.with_image()?, Some(pipe.image_prefix_in(image, p, group.world())?)),
                (None, Some(history), Some(overlap)) => (plan.extending(overlap)?, Some(pipe.encode_video_in(history, group.world())?)),
                (None, None, _) => (plan, None),
                _ => return Err(WorkerError::input("video", "one input at most: an image, or a video to extend with an overlap_history")),
            };
            let [_, h, w] = p.latent_fhw(pipe.factors());
            let latent = [pipe.vae().config().z_dim, h, w];
            let largest = plan.chunks.iter().map(|c| c.frames).max().unwrap_or(0);
            let tokens = grid_tokens([largest as u64, h as u64, w as u64], pipe.factors()).and_then(|t| usize::try_from(t).ok()).unwrap_or(0);
            // The decode of a video extension's history repeats the input's last frames: not sent.
            let repeated = plan.repeated_frames();
            let setup = ForcingSetup { plan, params: f.clone(), schedule, text, guidance_scale: p.guidance_scale, latent, block, prefix };
            let run = match resume {
                None => ForcingRun::new(setup)?,
                Some(Resume { state: ResumeState::Forcing(cp), latents, .. }) => ForcingRun::resume(setup, cp.chunks_done, latents.clone())?,
                Some(_) => return Err(WorkerError::input("resume.sampler_state", "a sampler history, for a diffusion-forcing job")),
            };
            // A resumed run decodes the video so far again at its next decode, rebuilding the
            // VAE's caches (the frames are sent again).
            return Ok(Self::Forcing(Box::new(ForcingJob { run, seed: p.seed, decoded: 0, stream: pipe.start_decode(), frames_out: 0, repeated, tokens })));
        }
        Ok(Self::Wan(match resume {
            // Seeded text-to-video: each rank draws only its rows of the noise.
            None if p.video.is_none() && p.initial_noise.is_none() => {
                let [f, h, w] = p.latent_fhw(pipe.factors());
                let shape = [1, pipe.vae().config().z_dim, f, h, w];
                Denoiser::new(pipe, group, Start::Noise { seed: p.seed, stream: NOISE_STREAM, shape }, text, p.guidance_scale, schedule)?
            }
            // Video-to-video: the input video encoded split by rows across the group.
            None => Denoiser::new(pipe, group, Start::Latents(&pipe.initial_latents_in(p, &schedule, group.world())?), text, p.guidance_scale, schedule)?,
            Some(Resume { state: ResumeState::Sampler(history), latents, steps_done }) => {
                // The checkpoint's latent must be this run's shape.
                latents.expect_shape("checkpoint latents", pipe.noise_for(p)?.shape())?;
                Denoiser::resume(pipe, group, latents, history, *steps_done, text, p.guidance_scale, schedule)?
            }
            Some(_) => return Err(WorkerError::input("resume.sampler_state", "a diffusion-forcing state, for a Wan job")),
        }))
    }

    /// This rank's token range (a diffusion-forcing run's ranks hold every token of the chunk).
    pub fn tokens(&self) -> std::ops::Range<usize> {
        match self {
            Self::Wan(d) => d.tokens(),
            Self::Forcing(f) => 0..f.tokens,
        }
    }

    /// Steps of the whole run (a diffusion-forcing run's iterations over every chunk).
    pub fn total_steps(&self) -> usize {
        match self {
            Self::Wan(d) => d.total_steps(),
            Self::Forcing(f) => f.run.total_iterations(),
        }
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        match self {
            Self::Wan(d) => d.steps_done(),
            Self::Forcing(f) => f.run.iterations_done(),
        }
    }

    /// Chunks finished (0 for a Wan run, whose frames are final only at its end).
    pub fn chunks_done(&self) -> usize {
        match self {
            Self::Wan(_) => 0,
            Self::Forcing(f) => f.run.chunks_done(),
        }
    }

    /// Restarts the decode: the next [`decode`](Self::decode) sends every final frame again, from
    /// the video's first (a diffusion-forcing run rebuilds its VAE caches from the video so far;
    /// a Wan run decodes its whole latent at every decode anyway).
    pub fn restart_decode(&mut self, pipe: &WanPipeline) {
        if let Self::Forcing(f) = self {
            (f.decoded, f.frames_out, f.stream) = (0, 0, pipe.start_decode());
        }
    }

    /// Runs the next step on every rank of `group`.
    pub fn step(&mut self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<()> {
        match self {
            Self::Wan(d) => d.step(pipe, group),
            Self::Forcing(f) => f.run.step(&mut SeededNoise(f.seed), &mut |x| forward(pipe, group, x), &mut ()),
        }
    }

    /// The whole latent on rank 0 (`None` on the others): every rank calls it. A
    /// diffusion-forcing run's once every chunk is done.
    pub fn latents(&self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<Option<Tensor>> {
        match self {
            Self::Wan(d) => d.latents(pipe, group),
            Self::Forcing(f) => {
                let video = f.run.video().ok_or_else(|| unfinished(&f.run))?;
                Ok(is_rank0(group).then(|| video.clone()))
            }
        }
    }

    /// The run's checkpoint (every rank calls it): a Wan run's latent and sampler history now, a
    /// diffusion-forcing run's video at its last chunk boundary.
    pub fn checkpoint(&self, pipe: &WanPipeline, group: RankGroup<'_>) -> Result<JobCheckpoint> {
        match self {
            Self::Wan(d) => {
                let state = d.checkpoint(pipe, group)?.map(|(latents, history)| Ok::<_, WorkerError>((latents, to_json(&history)?))).transpose()?;
                Ok(JobCheckpoint { steps_done: d.steps_done(), state })
            }
            Self::Forcing(f) => {
                let (chunks_done, video) = f.run.checkpoint().ok_or_else(|| WorkerError::input("checkpoint", "no chunk has finished yet"))?;
                let state = if is_rank0(group) { Some((video.clone(), to_json(&ForcingCheckpoint { chunks_done })?)) } else { None };
                Ok(JobCheckpoint { steps_done: f.run.iterations_of(chunks_done), state })
            }
        }
    }

    /// Decodes the frames that are final and not decoded yet, handing rank 0's to `sink` with the
    /// index of their first frame; every rank calls it. A Wan run's frames are final once every
    /// step has run, a diffusion-forcing run's chunk by chunk. In a group, every rank decodes a
    /// band of rows and rank 0 joins them ([`WanPipeline::decode_split`]): the frames of a
    /// one-device decode. A Wan run's bands come from the ranks' shares of the latent in one
    /// all-to-all (no rank gathers the latent); every rank of a diffusion-forcing run holds the
    /// chunks' latents and cuts its own band.
    pub fn decode(&mut self, pipe: &WanPipeline, group: RankGroup<'_>, sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>) -> Result<()> {
        match self {
            Self::Wan(d) => {
                if !d.is_finished() {
                    return Err(WorkerError::input("decode", format!("{} of {} steps have run", d.steps_done(), d.total_steps())));
                }
                let mut out = Sink { sink, next: 0, skip: 0 };
                match group {
                    RankGroup::Sharded(ctx) => pipe.decode_split(SplitLatent::Patches(&d.patch_shard(pipe, group)?), ctx.world(), &mut out),
                    RankGroup::Alone => match d.latents(pipe, group)? {
                        Some(latents) => pipe.decode(&latents, &mut out),
                        None => Ok(()),
                    },
                }
            }
            Self::Forcing(f) => {
                // Every rank holds the chunks' latents, and agrees how many are decoded.
                let Some(video) = f.run.video_so_far() else { return Ok(()) };
                let n = video.dim(2);
                if n == f.decoded {
                    return Ok(());
                }
                let new = latent_frames(video, f.decoded..n)?;
                let mut out = Sink { sink, next: f.frames_out, skip: f.repeated };
                match group {
                    RankGroup::Sharded(ctx) => pipe.decode_more_split(&mut f.stream, SplitLatent::Held(&new), ctx.world(), &mut out)?,
                    RankGroup::Alone => pipe.decode_more(&mut f.stream, &new, &mut out)?,
                }
                (f.decoded, f.frames_out) = (n, out.next);
                Ok(())
            }
        }
    }
}

fn unfinished(run: &ForcingRun) -> WorkerError {
    WorkerError::input("latents", format!("{} of {} iterations have run", run.iterations_done(), run.total_iterations()))
}

/// Numbers decoded frames as they go to a sink, the first `skip` of the video left out (and the
/// rest numbered from 0).
struct Sink<'a> {
    sink: &'a mut dyn FnMut(usize, &Tensor) -> Result<()>,
    /// Frames decoded before these.
    next: usize,
    skip: usize,
}

impl PipelineObserver for Sink<'_> {
    fn on_frames(&mut self, frames: &Tensor) -> Result<()> {
        let (start, n) = (self.next, frames.dim(2));
        self.next += n;
        match self.skip.saturating_sub(start) {
            0 => (self.sink)(start - self.skip, frames),
            from if from < n => (self.sink)(0, &latent_frames(frames, from..n)?),
            _ => Ok(()),
        }
    }
}

/// A checkpoint's state as JSON.
fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| WorkerError::Collective(format!("the checkpoint's state: {e}")))
}
