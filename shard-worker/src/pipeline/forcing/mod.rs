//! Diffusion forcing (SkyReels-V2, diffusers' `SkyReelsV2DiffusionForcingPipeline`): a long video
//! made chunk by chunk. Each latent frame carries its own noise level and its own sampler; the
//! [`StepMatrix`] says which frames each iteration steps, and each chunk after the first starts
//! from the last frames of the video so far ([`ChunkPlan`]), carried as latents. A
//! [`ForcingRun`] advances one iteration per step (a job's step) and can resume between chunks
//! from the video so far. The transformer forward is the caller's (one device, or a
//! sequence-parallel group: every chunk is one sharded generation); the per-frame samplers run on
//! the host in f32, as on every backend.

mod step_matrix;

pub use step_matrix::StepMatrix;
pub use tessera_cluster::forcing::{iterations, Chunk, ChunkPlan};

use super::{concat_time, noise_slice, Conditioning, FrameStream, PipelineObserver, WanPipeline};
use crate::model::{DitInputs, ForwardOptions};
use crate::parallel::Communicator;
use crate::sampler::{apply_guidance, guidance_enabled, SamplerState, Schedule};
use crate::vae::SplitLatent;
use crate::{Result, WorkerError};
use tessera_kernels::backend::CpuOps;
use tessera_kernels::Tensor;

/// The long-video settings of a diffusion-forcing request (diffusers' call parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct ForcingParams {
    /// Frames per chunk (video frames; 97 for the 540P models).
    pub base_num_frames: usize,
    /// Frames each chunk repeats from the video so far (`None`: one chunk of every frame).
    pub overlap_history: Option<usize>,
    /// Iterations block b lags block b−1 (0: synchronous).
    pub ar_step: usize,
    /// Latent frames per causal block (`None`: the transformer's `num_frame_per_block`).
    pub causal_block_size: Option<usize>,
    /// Noise mixed into the prefix frames of the model's input, in thousandths (0: none); the
    /// prefix is then shown to the model at this timestep.
    pub addnoise_condition: f32,
    /// Frames per second of the video (the fps embedding tells 16 from any other rate).
    pub fps: u32,
}

impl ForcingParams {
    /// The fps embedding's index: 0 for 16 fps, 1 otherwise.
    pub fn fps_index(&self) -> usize {
        usize::from(self.fps != 16)
    }
}

/// Where a diffusion-forcing run's random draws come from.
pub trait ForcingNoise {
    /// Chunk `k`'s starting noise, `shape` = `[1, C, F_k, h, w]`.
    fn chunk(&mut self, k: usize, shape: [usize; 5]) -> Result<Tensor>;
    /// The noise mixed into chunk `k`'s prefix at iteration `i`, `shape` = `[1, C, prefix, h, w]`.
    fn prefix(&mut self, k: usize, i: usize, shape: [usize; 5]) -> Result<Tensor>;
}

/// Draws from the counter-based generator: the same seed gives the same video on any group.
pub struct SeededNoise(pub u64);

/// The generator streams of a diffusion-forcing run (apart from the text-to-video noise stream).
const FORCING_STREAM: u64 = 0xdf00_0000_0000;

impl ForcingNoise for SeededNoise {
    fn chunk(&mut self, k: usize, shape: [usize; 5]) -> Result<Tensor> {
        Ok(Tensor::new(shape, noise_slice(self.0, FORCING_STREAM + ((k as u64) << 20), 0..shape.iter().product()))?)
    }
    fn prefix(&mut self, k: usize, i: usize, shape: [usize; 5]) -> Result<Tensor> {
        Ok(Tensor::new(shape, noise_slice(self.0, FORCING_STREAM + ((k as u64) << 20) + 1 + i as u64, 0..shape.iter().product()))?)
    }
}

/// Watches a diffusion-forcing run; every method may stop it with an error.
pub trait ForcingObserver {
    /// Chunk `k` starts from `latents` (noise with its prefix written in) and runs `matrix`.
    fn on_chunk_start(&mut self, _k: usize, _chunk: &Chunk, _matrix: &StepMatrix, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Iteration `i` of chunk `k` ran the model on `input` (prefix noised) at `timesteps`:
    /// `cond` and, with guidance, `uncond`.
    fn on_forward(&mut self, _k: usize, _i: usize, _input: &Tensor, _timesteps: &[f32], _cond: &[f32], _uncond: Option<&[f32]>) -> Result<()> {
        Ok(())
    }
    /// Iteration `i` of chunk `k` finished with `latents`.
    fn on_iteration(&mut self, _k: usize, _i: usize, _iterations: usize, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Chunk `k` of `chunks` is done and adds `frames` `[1, C, n, h, w]` to the video.
    fn on_chunk_done(&mut self, _k: usize, _chunks: usize, _frames: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// An observer that watches nothing.
impl ForcingObserver for () {}

/// Decodes each chunk's new frames as soon as the chunk is done (continuing the VAE's causal
/// caches, so the streamed video is the decode of the whole latent) and hands them to `frames`;
/// everything else goes on to `inner`. In a group, every rank decodes a band of rows and member 0's
/// `frames` get the joined frames ([`WanPipeline::decode_more_split`]).
pub struct StreamingDecode<'a> {
    pipe: &'a WanPipeline,
    stream: FrameStream,
    world: Option<&'a Communicator>,
    frames: &'a mut dyn PipelineObserver,
    inner: &'a mut dyn ForcingObserver,
}

impl<'a> StreamingDecode<'a> {
    /// Streams `pipe`'s decode of the video to `frames`, watching the run with `inner` too.
    pub fn new(pipe: &'a WanPipeline, frames: &'a mut dyn PipelineObserver, inner: &'a mut dyn ForcingObserver) -> Self {
        Self { pipe, stream: pipe.start_decode(), world: None, frames, inner }
    }

    /// [`new`](Self::new) on every member of `world`, the decode split across them.
    pub fn split(pipe: &'a WanPipeline, world: &'a Communicator, frames: &'a mut dyn PipelineObserver, inner: &'a mut dyn ForcingObserver) -> Self {
        Self { world: Some(world), ..Self::new(pipe, frames, inner) }
    }
}

impl ForcingObserver for StreamingDecode<'_> {
    fn on_chunk_start(&mut self, k: usize, chunk: &Chunk, matrix: &StepMatrix, latents: &Tensor) -> Result<()> {
        self.inner.on_chunk_start(k, chunk, matrix, latents)
    }
    fn on_forward(&mut self, k: usize, i: usize, input: &Tensor, timesteps: &[f32], cond: &[f32], uncond: Option<&[f32]>) -> Result<()> {
        self.inner.on_forward(k, i, input, timesteps, cond, uncond)
    }
    fn on_iteration(&mut self, k: usize, i: usize, iterations: usize, latents: &Tensor) -> Result<()> {
        self.inner.on_iteration(k, i, iterations, latents)
    }
    fn on_chunk_done(&mut self, k: usize, chunks: usize, frames: &Tensor) -> Result<()> {
        self.inner.on_chunk_done(k, chunks, frames)?;
        tracing::info_span!("decode", chunk = k).in_scope(|| match self.world {
            Some(world) => self.pipe.decode_more_split(&mut self.stream, SplitLatent::Held(frames), world, self.frames),
            None => self.pipe.decode_more(&mut self.stream, frames, self.frames),
        })
    }
}

/// What a diffusion-forcing run is made of besides the model: the chunks, the settings, the
/// sampler's template schedule, the prompt, the latent's size and the causal block size.
pub struct ForcingSetup {
    /// The chunks.
    pub plan: ChunkPlan,
    /// The request's settings.
    pub params: ForcingParams,
    /// The schedule every frame's sampler runs (S steps).
    pub schedule: Schedule,
    /// The prompt (and negative prompt) embeddings.
    pub text: Conditioning,
    /// Classifier-free guidance scale (> 1: on).
    pub guidance_scale: f32,
    /// Latent channels and grid `[C, h, w]`.
    pub latent: [usize; 3],
    /// Latent frames per causal block (the chunk plan's).
    pub block: usize,
    /// The first chunk's prefix from an input `[1, C, p, h, w]`: an image's latent frame
    /// ([`WanPipeline::image_prefix_in`], a plan [`ChunkPlan::with_image`]) or a video
    /// extension's re-encoded history ([`WanPipeline::encode_video_in`], a plan
    /// [`ChunkPlan::extending`]).
    pub prefix: Option<Tensor>,
}

/// The chunk being denoised: its latents, step matrix, per-frame samplers and next iteration.
struct Current {
    k: usize,
    latents: Tensor,
    matrix: StepMatrix,
    states: Vec<SamplerState<CpuOps>>,
    next: usize,
}

/// A diffusion-forcing run, one iteration per [`step`](Self::step) (what a job's `Step` is),
/// resumable between chunks from the video so far ([`checkpoint`](Self::checkpoint),
/// [`resume`](Self::resume)). The transformer forward is the caller's at every step: one
/// device, or a sequence-parallel group.
pub struct ForcingRun {
    setup: ForcingSetup,
    /// The guidance batch's text: `[B, L, D]` (prompt, then negative prompt with guidance).
    context: Tensor,
    /// The schedule's S model timesteps.
    template: Vec<f32>,
    /// Per chunk, the iterations of its step matrix.
    iterations: Vec<usize>,
    current: Option<Current>,
    /// Chunks finished.
    chunks_done: usize,
    /// The video's latents so far (the finished chunks' new frames).
    video: Option<Tensor>,
}

impl ForcingRun {
    /// A run from its first chunk.
    pub fn new(setup: ForcingSetup) -> Result<Self> {
        let guided = guidance_enabled(setup.guidance_scale);
        let context = match (&setup.text.negative_embeds, guided) {
            (Some(neg), true) => {
                let p = &setup.text.prompt_embeds;
                Tensor::new([2, p.dim(1), p.dim(2)], [p.data(), neg.data()].concat())?
            }
            (None, true) => return Err(WorkerError::input("negative_prompt", "guidance is on but the negative prompt was not encoded")),
            (_, false) => setup.text.prompt_embeds.clone(),
        };
        if setup.plan.chunks.is_empty() || setup.block != setup.plan.block {
            return Err(WorkerError::input("causal_block_size", format!("{} frames per block for a plan cut in blocks of {}", setup.block, setup.plan.block)));
        }
        let p = setup.plan.input_prefix();
        if (p > 0) != setup.prefix.is_some() {
            return Err(WorkerError::input("prefix", "a run from an input needs both its latent frames and a plan that starts from them"));
        }
        if let Some(prefix) = &setup.prefix {
            let [c, h, w] = setup.latent;
            prefix.expect_shape("prefix latent", &[1, c, p, h, w])?;
        }
        let steps = setup.schedule.num_steps();
        let iterations = setup.plan.chunks.iter().map(|c| iterations(steps, c.frames, c.prefix, setup.block, setup.params.ar_step)).collect();
        let template = setup.schedule.timesteps().to_f32();
        Ok(Self { setup, context, template, iterations, current: None, chunks_done: 0, video: None })
    }

    /// A run resumed after `chunks_done` chunks, whose new frames are `video` `[1, C, n, h, w]`
    /// (what [`checkpoint`](Self::checkpoint) gave, from any group).
    pub fn resume(setup: ForcingSetup, chunks_done: usize, video: Tensor) -> Result<Self> {
        let mut run = Self::new(setup)?;
        let [c, h, w] = run.setup.latent;
        let chunks = &run.setup.plan.chunks;
        if chunks_done == 0 || chunks_done > chunks.len() {
            return Err(WorkerError::input("checkpoint", format!("{chunks_done} chunks done of {}", chunks.len())));
        }
        let frames: usize = chunks[..chunks_done].iter().map(Chunk::new_frames).sum();
        video.expect_shape("checkpoint latents", &[1, c, frames, h, w])?;
        (run.chunks_done, run.video) = (chunks_done, Some(video));
        Ok(run)
    }

    /// Iterations of the whole run (every chunk's).
    pub fn total_iterations(&self) -> usize {
        self.iterations.iter().sum()
    }

    /// Iterations run so far.
    pub fn iterations_done(&self) -> usize {
        self.iterations_of(self.chunks_done) + self.current.as_ref().map_or(0, |c| c.next)
    }

    /// Whether every chunk is done.
    pub fn is_finished(&self) -> bool {
        self.chunks_done == self.setup.plan.chunks.len()
    }

    /// Chunks finished.
    pub fn chunks_done(&self) -> usize {
        self.chunks_done
    }

    /// The last chunk boundary: the chunks done and the video's latents then, all a resume
    /// needs (it starts the next chunk afresh; the iterations run of the current chunk, whose
    /// samplers' histories are not kept, are run again). `None` before the first chunk is done.
    pub fn checkpoint(&self) -> Option<(usize, &Tensor)> {
        self.video.as_ref().map(|video| (self.chunks_done, video))
    }

    /// Iterations of the first `chunks` chunks (where a run resumed after them goes on).
    pub fn iterations_of(&self, chunks: usize) -> usize {
        self.iterations[..chunks.min(self.iterations.len())].iter().sum()
    }

    /// The video's latents so far `[1, C, n, h, w]`: the finished chunks' new frames.
    pub fn video_so_far(&self) -> Option<&Tensor> {
        self.video.as_ref()
    }

    /// The video's latents `[1, C, n, h, w]` (normalised, as the transformer sees them), once every
    /// chunk is done.
    pub fn video(&self) -> Option<&Tensor> {
        self.video.as_ref().filter(|_| self.is_finished())
    }

    /// Runs the next iteration (starting its chunk first, finishing it after its last).
    pub fn step(
        &mut self,
        noise: &mut dyn ForcingNoise,
        forward: &mut dyn FnMut(&DitInputs<'_>) -> Result<Tensor>,
        observer: &mut dyn ForcingObserver,
    ) -> Result<()> {
        if self.is_finished() {
            return Err(WorkerError::input("step", format!("all {} iterations have run", self.total_iterations())));
        }
        let [c, h, w] = self.setup.latent;
        let k = self.chunks_done;
        let chunk = self.setup.plan.chunks[k];
        let (f, pf) = (chunk.frames, chunk.prefix);
        if self.current.is_none() {
            let mut latents = noise.chunk(k, [1, c, f, h, w])?;
            latents.expect_shape("chunk noise", &[1, c, f, h, w])?;
            match (&self.video, &self.setup.prefix) {
                (Some(acc), _) if pf > 0 => {
                    let end = acc.dim(2) - chunk.overlap;
                    put_frames(&mut latents, 0, &frames_of(acc, end..end + pf));
                }
                // The first chunk of a run from an input starts from its latent frames.
                (None, Some(prefix)) => put_frames(&mut latents, 0, prefix.data()),
                _ => {}
            }
            let matrix = StepMatrix::new(self.setup.schedule.num_steps(), f, pf, self.setup.block, self.setup.params.ar_step)?;
            observer.on_chunk_start(k, &chunk, &matrix, &latents)?;
            let states = (0..f).map(|_| SamplerState::new(&CpuOps, self.setup.schedule.kind(), c * h * w)).collect::<Result<Vec<_>>>()?;
            self.current = Some(Current { k, latents, matrix, states, next: 0 });
        }
        let Some(cur) = self.current.as_mut() else { return Err(WorkerError::input("step", "no chunk is running")) };
        let i = cur.next;
        let (batch, guided) = (self.context.dim(0), guidance_enabled(self.setup.guidance_scale));
        let options = ForwardOptions { fps_index: Some(self.setup.params.fps_index()), causal_block: Some(self.setup.block) };
        let a = self.setup.params.addnoise_condition;
        let (keep, mix) = ((1.0 - 0.001 * f64::from(a)) as f32, (0.001 * f64::from(a)) as f32);
        let mut t = cur.matrix.timesteps(i, &self.template);
        let mut input = cur.latents.clone();
        if a > 0.0 && pf > 0 {
            let extra = noise.prefix(k, i, [1, c, pf, h, w])?;
            extra.expect_shape("prefix noise", &[1, c, pf, h, w])?;
            let mixed: Vec<f32> = frames_of(&cur.latents, 0..pf).iter().zip(extra.data()).map(|(x, n)| x * keep + n * mix).collect();
            put_frames(&mut input, 0, &mixed);
            t[..pf].iter_mut().for_each(|v| *v = a);
        }
        let hidden = Tensor::new([batch, c, f, h, w], input.data().repeat(batch))?;
        let timesteps = t.repeat(batch);
        let x = DitInputs { hidden_states: &hidden, timesteps: &timesteps, encoder_hidden_states: &self.context, encoder_hidden_states_image: None, options };
        let out = tracing::info_span!("forward", chunk = k, iteration = i).in_scope(|| forward(&x))?;
        let n = cur.latents.len();
        if out.len() != batch * n {
            return Err(WorkerError::Collective(format!("the transformer gave {} values for a batch of {batch} × {n}", out.len())));
        }
        let (cond, uncond) = out.data().split_at(n);
        observer.on_forward(k, i, &input, &t, cond, guided.then_some(uncond))?;
        let mut v = Tensor::new(cur.latents.shape().to_vec(), cond.to_vec())?;
        if guided {
            apply_guidance(v.data_mut(), uncond, self.setup.guidance_scale)?;
        }
        for (fi, state) in cur.states.iter_mut().enumerate().filter(|(fi, _)| cur.matrix.update[i][*fi]) {
            let step = cur.matrix.step_index[i][fi] - 1;
            let mut xf = frames_of(&cur.latents, fi..fi + 1);
            state.step(&CpuOps, &self.setup.schedule, step, &frames_of(&v, fi..fi + 1), &mut xf)?;
            if step == 0 {
                state.alias_last_sample(&CpuOps, &xf)?;
            }
            put_frames(&mut cur.latents, fi, &xf);
        }
        cur.next += 1;
        observer.on_iteration(k, i, cur.matrix.iterations(), &cur.latents)?;
        if cur.next < cur.matrix.iterations() {
            return Ok(());
        }
        // The chunk is done: its new frames join the video.
        let Some(done) = self.current.take() else { return Ok(()) };
        let added = latent_frames(&done.latents, chunk.overlap..f)?;
        debug_assert_eq!(done.k, k);
        self.video = Some(match self.video.take() {
            None => done.latents,
            Some(acc) => concat_time(&[acc, added.clone()])?,
        });
        self.chunks_done += 1;
        observer.on_chunk_done(k, self.setup.plan.chunks.len(), &added)
    }

    /// Runs every remaining iteration; returns the video's latents `[1, C, N, h, w]`.
    pub fn run(
        &mut self,
        noise: &mut dyn ForcingNoise,
        forward: &mut dyn FnMut(&DitInputs<'_>) -> Result<Tensor>,
        observer: &mut dyn ForcingObserver,
    ) -> Result<Tensor> {
        while !self.is_finished() {
            self.step(noise, forward, observer)?;
        }
        self.video().cloned().ok_or_else(|| WorkerError::input("num_frames", "no chunks"))
    }
}

/// Frames `frames` of a `[1, C, F, h, w]` latent, as a latent of their own.
pub fn latent_frames(t: &Tensor, frames: std::ops::Range<usize>) -> Result<Tensor> {
    if frames.start > frames.end || frames.end > t.dim(2) {
        return Err(WorkerError::input("frames", format!("{frames:?} of a latent of {} frames", t.dim(2))));
    }
    Ok(Tensor::new([1, t.dim(1), frames.len(), t.dim(3), t.dim(4)], frames_of(t, frames))?)
}

/// The values of frames `frames` of a `[1, C, F, h, w]` latent, channel by channel.
fn frames_of(t: &Tensor, frames: std::ops::Range<usize>) -> Vec<f32> {
    let (c, f, hw) = (t.dim(1), t.dim(2), t.dim(3) * t.dim(4));
    (0..c).flat_map(|ch| t.data()[(ch * f + frames.start) * hw..(ch * f + frames.end) * hw].iter().copied()).collect()
}

/// Writes `values` (as [`frames_of`] lays them out) into frames from `first` of a latent.
fn put_frames(t: &mut Tensor, first: usize, values: &[f32]) {
    let (c, f, hw) = (t.dim(1), t.dim(2), t.dim(3) * t.dim(4));
    let n = values.len() / c;
    for ch in 0..c {
        t.data_mut()[(ch * f + first) * hw..(ch * f + first) * hw + n].copy_from_slice(&values[ch * n..(ch + 1) * n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{GenerationParams, WanPipeline};
    use std::path::Path;

    /// Counts the chunks and the frames they add.
    #[derive(Default)]
    struct Counts {
        chunks: Vec<(usize, usize)>,
        iterations: usize,
    }

    /// A 53-frame run of the golden case's snapshot (SkyReels-V2 structure, random weights), 2
    /// steps at 16 × 16: 4 chunks of 17 frames overlapping by 5, blocks of 1, `ar_step` as given.
    struct Case {
        pipe: WanPipeline,
        gen: GenerationParams,
        setup: ForcingSetup,
    }

    impl Case {
        fn new(ar_step: usize) -> Self {
            let pipe = WanPipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/df-a")).unwrap();
            let gen = GenerationParams { num_inference_steps: 2, height: 16, width: 16, num_frames: 53, ..GenerationParams::new("a boat") };
            let params =
                ForcingParams { base_num_frames: 17, overlap_history: Some(5), ar_step, causal_block_size: Some(1), addnoise_condition: 20.0, fps: 24 };
            let setup = ForcingSetup {
                plan: ChunkPlan::new(gen.num_frames, params.base_num_frames, params.overlap_history, 1).unwrap(),
                params,
                schedule: pipe.schedule_for(&gen).unwrap(),
                text: pipe.encode_text(&gen.prompt, "", 3.0).unwrap(),
                guidance_scale: 3.0,
                latent: [4, 2, 2],
                block: 1,
                prefix: None,
            };
            Self { pipe, gen, setup }
        }

        /// The run's setup with `plan` and the first chunk's `prefix`.
        fn setup(&self, plan: &ChunkPlan, prefix: Option<&Tensor>) -> ForcingSetup {
            let s = &self.setup;
            let (params, schedule, text) = (s.params.clone(), s.schedule.clone(), s.text.clone());
            ForcingSetup { plan: plan.clone(), params, schedule, text, prefix: prefix.cloned(), ..*s }
        }
    }

    impl ForcingObserver for Counts {
        fn on_iteration(&mut self, _k: usize, _i: usize, _n: usize, _latents: &Tensor) -> Result<()> {
            self.iterations += 1;
            Ok(())
        }
        fn on_chunk_done(&mut self, k: usize, chunks: usize, frames: &Tensor) -> Result<()> {
            assert!(k < chunks);
            self.chunks.push((k, frames.dim(2)));
            Ok(())
        }
    }

    /// The golden case's snapshot (SkyReels-V2 structure, random weights), seeded: 4 chunks
    /// (synchronous, blocks of 1) add up to the video, the same seed gives the same bits, a run
    /// resumed after chunk 2 from its checkpoint ends with the same bits, and the step-by-step
    /// Wan loop refuses the model.
    #[test]
    fn seeded_runs_repeat_resume_and_cover_the_video() {
        let case = Case::new(0);
        let (pipe, plan) = (&case.pipe, &case.setup.plan);
        let (text, schedule) = (&case.setup.text, &case.setup.schedule);
        assert_eq!(plan.chunks.len(), 4);
        let setup = || case.setup(plan, None);
        let mut forward = |x: &DitInputs<'_>| pipe.transformer().forward(x);
        let go = |seed: u64, counts: &mut Counts, forward: &mut dyn FnMut(&DitInputs<'_>) -> Result<Tensor>| {
            ForcingRun::new(setup()).unwrap().run(&mut SeededNoise(seed), forward, counts).unwrap()
        };
        let (mut a, mut b) = (Counts::default(), Counts::default());
        let (first, again) = (go(7, &mut a, &mut forward), go(7, &mut b, &mut forward));
        assert_eq!(first.shape(), &[1, 4, 14, 2, 2]);
        assert!(first.data() == again.data() && first.data().iter().all(|v| v.is_finite()));
        assert_eq!(a.chunks, vec![(0, 5), (1, 3), (2, 3), (3, 3)]);
        assert_eq!(a.iterations, 4 * 2, "synchronous: one iteration per step");
        assert!(go(8, &mut Counts::default(), &mut forward).data() != first.data());
        // Step by step: a checkpoint is the last chunk boundary; resumed, the same video.
        let mut run = ForcingRun::new(setup()).unwrap();
        assert_eq!(run.total_iterations(), 8);
        let mut noise = SeededNoise(7);
        run.step(&mut noise, &mut forward, &mut ()).unwrap();
        assert!(run.checkpoint().is_none() && run.iterations_done() == 1);
        while run.chunks_done() < 2 {
            run.step(&mut noise, &mut forward, &mut ()).unwrap();
        }
        // Mid-chunk, the checkpoint is still the boundary before it.
        run.step(&mut noise, &mut forward, &mut ()).unwrap();
        assert_eq!((run.checkpoint().map(|(k, v)| (k, v.dim(2))), run.iterations_done(), run.iterations_of(2)), (Some((2, 8)), 5, 4));
        let (done, video) = run.checkpoint().map(|(k, v)| (k, v.clone())).unwrap();
        assert_eq!((done, video.dim(2), run.iterations_of(done)), (2, 8, 4), "a resume restarts at the boundary's iteration");
        let mut resumed = ForcingRun::resume(setup(), done, video.clone()).unwrap();
        let end = resumed.run(&mut SeededNoise(7), &mut forward, &mut ()).unwrap();
        assert!(end.data() == first.data(), "a resumed run ends with the uninterrupted run's video");
        assert!(ForcingRun::resume(setup(), 3, video).is_err(), "3 chunks make 11 frames, not 8");
        let start = crate::pipeline::Start::Latents(&first);
        let err =
            crate::pipeline::Denoiser::new(pipe, crate::pipeline::RankGroup::Alone, start, text.clone(), 3.0, schedule.clone()).err().unwrap().to_string();
        assert!(err.contains("SkyReels-V2"), "{err}");
    }

    /// Image-to-video: the image's latent frame starts the first chunk and is never stepped, so
    /// the video's first latent frame is the image's, bit for bit, and its first decoded frame is
    /// the image's VAE round trip (the decode is causal: frame 0 depends on latent frame 0 alone).
    /// The video goes on from the image: its next frames differ from a run without it. A run
    /// given the image without a plan that starts from it, or the reverse, is refused.
    #[test]
    fn an_image_starts_the_first_chunk_and_stays_the_first_frame() {
        let case = Case::new(1);
        let (pipe, gen, plan) = (&case.pipe, &case.gen, case.setup.plan.clone());
        let pixels = (0..20 * 24 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let image = crate::image::RgbImage::new(20, 24, pixels).unwrap();
        let latent = pipe.image_prefix_in(&image, gen, None).unwrap();
        assert_eq!(latent.shape(), &[1, 4, 1, 2, 2]);
        let setup = |plan: ChunkPlan, image: Option<Tensor>| case.setup(&plan, image.as_ref());
        let mut forward = |x: &DitInputs<'_>| pipe.transformer().forward(x);
        let from_image = plan.clone().with_image().unwrap();
        let mut run = ForcingRun::new(setup(from_image.clone(), Some(latent.clone()))).unwrap();
        assert_eq!(run.total_iterations(), from_image.total_iterations(2, 1));
        let video = run.run(&mut SeededNoise(7), &mut forward, &mut ()).unwrap();
        let plain = ForcingRun::new(setup(plan.clone(), None)).unwrap().run(&mut SeededNoise(7), &mut forward, &mut ()).unwrap();
        assert_eq!(video.shape(), plain.shape());
        assert!(latent_frames(&video, 0..1).unwrap().data() == latent.data(), "the image's frame is never stepped");
        assert!(latent_frames(&video, 1..5).unwrap().data() != latent_frames(&plain, 1..5).unwrap().data());
        let decoded = |latents: &Tensor| {
            let mut frames = crate::pipeline::FrameCollector::default();
            pipe.decode(latents, &mut frames).unwrap();
            frames.frames().unwrap()
        };
        let first = latent_frames(&decoded(&video), 0..1).unwrap();
        assert!(first.data() == decoded(&latent).data(), "the first frame is the image's VAE round trip");
        assert!(ForcingRun::new(setup(from_image, None)).is_err());
        assert!(ForcingRun::new(setup(plan, Some(latent))).is_err());
    }
}
