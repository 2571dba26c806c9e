//! Diffusion forcing (SkyReels-V2, diffusers' `SkyReelsV2DiffusionForcingPipeline`): a long video
//! made chunk by chunk. Each latent frame carries its own noise level and its own sampler; the
//! [`StepMatrix`] says which frames each iteration steps, and each chunk after the first starts
//! from the last frames of the video so far ([`ChunkPlan`]), carried as latents. The transformer
//! forward is the caller's (one device, or a sequence-parallel group: every chunk is one sharded
//! generation); the per-frame samplers run on the host in f32, as on every backend.

mod step_matrix;

pub use step_matrix::StepMatrix;
pub use tessera_cluster::forcing::{iterations, Chunk, ChunkPlan};

use super::{concat_time, noise_slice, FrameStream, PipelineObserver, TextConditions, WanPipeline};
use crate::model::{DitInputs, ForwardOptions};
use crate::sampler::{apply_guidance, guidance_enabled, SamplerState, Schedule};
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
/// everything else goes on to `inner`.
pub struct StreamingDecode<'a> {
    pipe: &'a WanPipeline,
    stream: FrameStream,
    frames: &'a mut dyn PipelineObserver,
    inner: &'a mut dyn ForcingObserver,
}

impl<'a> StreamingDecode<'a> {
    /// Streams `pipe`'s decode of the video to `frames`, watching the run with `inner` too.
    pub fn new(pipe: &'a WanPipeline, frames: &'a mut dyn PipelineObserver, inner: &'a mut dyn ForcingObserver) -> Self {
        Self { pipe, stream: pipe.start_decode(), frames, inner }
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
        tracing::info_span!("decode", chunk = k).in_scope(|| self.pipe.decode_more(&mut self.stream, frames, self.frames))
    }
}

/// What a diffusion-forcing run needs besides the model: the chunks, the settings, the sampler's
/// template schedule, and the prompt.
pub struct ForcingRun<'a> {
    /// The chunks.
    pub plan: &'a ChunkPlan,
    /// The request's settings.
    pub params: &'a ForcingParams,
    /// The schedule every frame's sampler runs (S steps).
    pub schedule: &'a Schedule,
    /// The prompt (and negative prompt) embeddings.
    pub text: &'a TextConditions,
    /// Classifier-free guidance scale (> 1: on).
    pub guidance_scale: f32,
    /// Latent channels and grid `[C, h, w]`.
    pub latent: [usize; 3],
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

impl ForcingRun<'_> {
    /// Runs every chunk; `forward` is the transformer (a batch of the conditional and, with
    /// guidance, unconditional pass, a timestep per frame). Returns the video's latents
    /// `[1, C, N, h, w]` (normalised, as the transformer sees them).
    pub fn run(
        &self,
        block: usize,
        noise: &mut dyn ForcingNoise,
        forward: &mut dyn FnMut(&DitInputs<'_>) -> Result<Tensor>,
        observer: &mut dyn ForcingObserver,
    ) -> Result<Tensor> {
        let [c, h, w] = self.latent;
        let steps = self.schedule.num_steps();
        let template = self.schedule.timesteps().to_f32();
        let guided = guidance_enabled(self.guidance_scale);
        let context = match (&self.text.negative_embeds, guided) {
            (Some(neg), true) => {
                let p = &self.text.prompt_embeds;
                Tensor::new([2, p.dim(1), p.dim(2)], [p.data(), neg.data()].concat())?
            }
            (None, true) => return Err(WorkerError::input("negative_prompt", "guidance is on but the negative prompt was not encoded")),
            (_, false) => self.text.prompt_embeds.clone(),
        };
        let batch = context.dim(0);
        let options = ForwardOptions { fps_index: Some(self.params.fps_index()), causal_block: Some(block) };
        let a = self.params.addnoise_condition;
        let (keep, mix) = (1.0 - 0.001 * f64::from(a), 0.001 * f64::from(a));
        let (keep, mix) = (keep as f32, mix as f32);
        let count = self.plan.chunks.len();
        let mut video: Option<Tensor> = None;
        for (k, chunk) in self.plan.chunks.iter().enumerate() {
            let (f, pf) = (chunk.frames, chunk.prefix);
            let mut latents = noise.chunk(k, [1, c, f, h, w])?;
            latents.expect_shape("chunk noise", &[1, c, f, h, w])?;
            if let (Some(acc), true) = (&video, pf > 0) {
                let end = acc.dim(2) - chunk.overlap;
                put_frames(&mut latents, 0, &frames_of(acc, end..end + pf));
            }
            let matrix = StepMatrix::new(steps, f, pf, block, self.params.ar_step)?;
            observer.on_chunk_start(k, chunk, &matrix, &latents)?;
            let mut states = (0..f).map(|_| SamplerState::new(&CpuOps, self.schedule.kind(), c * h * w)).collect::<Result<Vec<_>>>()?;
            for i in 0..matrix.iterations() {
                let mut t = matrix.timesteps(i, &template);
                let mut input = latents.clone();
                if a > 0.0 && pf > 0 {
                    let extra = noise.prefix(k, i, [1, c, pf, h, w])?;
                    extra.expect_shape("prefix noise", &[1, c, pf, h, w])?;
                    let mixed: Vec<f32> = frames_of(&latents, 0..pf).iter().zip(extra.data()).map(|(x, n)| x * keep + n * mix).collect();
                    put_frames(&mut input, 0, &mixed);
                    t[..pf].iter_mut().for_each(|v| *v = a);
                }
                let hidden = Tensor::new([batch, c, f, h, w], input.data().repeat(batch))?;
                let timesteps = t.repeat(batch);
                let x =
                    DitInputs { hidden_states: &hidden, timesteps: &timesteps, encoder_hidden_states: &context, encoder_hidden_states_image: None, options };
                let out = tracing::info_span!("forward", chunk = k, iteration = i).in_scope(|| forward(&x))?;
                let n = latents.len();
                if out.len() != batch * n {
                    return Err(WorkerError::Collective(format!("the transformer gave {} values for a batch of {batch} × {n}", out.len())));
                }
                let (cond, uncond) = out.data().split_at(n);
                observer.on_forward(k, i, &input, &t, cond, guided.then_some(uncond))?;
                let mut v = Tensor::new(latents.shape().to_vec(), cond.to_vec())?;
                if guided {
                    apply_guidance(v.data_mut(), uncond, self.guidance_scale)?;
                }
                for (fi, state) in states.iter_mut().enumerate().filter(|(fi, _)| matrix.update[i][*fi]) {
                    let step = matrix.step_index[i][fi] - 1;
                    let mut x = frames_of(&latents, fi..fi + 1);
                    state.step(&CpuOps, self.schedule, step, &frames_of(&v, fi..fi + 1), &mut x)?;
                    if step == 0 {
                        state.alias_last_sample(&CpuOps, &x)?;
                    }
                    put_frames(&mut latents, fi, &x);
                }
                observer.on_iteration(k, i, matrix.iterations(), &latents)?;
            }
            let added = Tensor::new([1, c, f - chunk.overlap, h, w], frames_of(&latents, chunk.overlap..f))?;
            observer.on_chunk_done(k, count, &added)?;
            video = Some(match video {
                None => latents,
                Some(acc) => concat_time(&[acc, added])?,
            });
        }
        video.ok_or_else(|| WorkerError::input("num_frames", "no chunks"))
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
    /// (synchronous, blocks of 1) add up to the video, the same seed gives the same bits, and the
    /// step-by-step Wan loop refuses the model.
    #[test]
    fn seeded_runs_repeat_and_cover_the_video() {
        let pipe = WanPipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/df-a")).unwrap();
        let gen = GenerationParams { num_inference_steps: 2, height: 16, width: 16, num_frames: 53, ..GenerationParams::new("a boat") };
        let text = pipe.encode_text(&gen.prompt, "", 3.0).unwrap();
        let schedule = pipe.schedule_for(&gen).unwrap();
        let params = ForcingParams { base_num_frames: 17, overlap_history: Some(5), ar_step: 0, causal_block_size: Some(1), addnoise_condition: 20.0, fps: 24 };
        let plan = ChunkPlan::new(gen.num_frames, params.base_num_frames, params.overlap_history, 1).unwrap();
        assert_eq!(plan.chunks.len(), 4);
        let run = ForcingRun { plan: &plan, params: &params, schedule: &schedule, text: &text, guidance_scale: 3.0, latent: [4, 2, 2] };
        let go = |seed: u64, counts: &mut Counts| run.run(1, &mut SeededNoise(seed), &mut |x| pipe.transformer().forward(x), counts).unwrap();
        let (mut a, mut b) = (Counts::default(), Counts::default());
        let (first, again) = (go(7, &mut a), go(7, &mut b));
        assert_eq!(first.shape(), &[1, 4, 14, 2, 2]);
        assert!(first.data() == again.data() && first.data().iter().all(|v| v.is_finite()));
        assert_eq!(a.chunks, vec![(0, 5), (1, 3), (2, 3), (3, 3)]);
        assert_eq!(a.iterations, 4 * 2, "synchronous: one iteration per step");
        assert!(go(8, &mut Counts::default()).data() != first.data());
        let start = crate::pipeline::Start::Latents(&first);
        let err =
            crate::pipeline::Denoiser::new(&pipe, crate::pipeline::RankGroup::Alone, start, text.clone(), 3.0, schedule.clone()).err().unwrap().to_string();
        assert!(err.contains("SkyReels-V2"), "{err}");
    }
}
