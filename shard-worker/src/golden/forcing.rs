//! Diffusion-forcing pipeline cases (`pipeline/df-*`, SkyReels-V2, `README-df.md`): the long-video
//! loop matched stage by stage. Token ids, embeddings and the template schedule; per chunk the
//! starting latents, the step matrix (exactly), the transformer's input, timesteps and outputs at
//! the first iteration, the latents after every iteration; then the accumulated latents and the
//! frames, decoded chunk by chunk as the run streams them (against diffusers' one decode of the
//! whole latent). The random draws come from the case (`chunk{k}_noise`, `chunk{k}_addnoise`).
//! With `--ranks` every transformer forward is sharded over ranks of this process. A video
//! extension case (`input_frames`, diffusers' video-to-video class) starts its first chunk from
//! the case's `video`'s last `overlap_history` frames, encoded (split over the ranks with
//! `--ranks`); its reference frames are the input's, then the decode matched here.

use super::pipeline::{compare_ints, frames_major, text_stage};
use super::{compare, outcome, read_tensor, Case, CaseMeta, Comparison, Outcome, RunOptions, Tolerance};
use crate::parallel::{run_local_group, ParallelPlan};
use crate::pipeline::forcing::{Chunk, ChunkPlan, ForcingNoise, ForcingObserver, ForcingParams, ForcingRun, ForcingSetup, StepMatrix, StreamingDecode};
use crate::pipeline::{FrameCollector, GenerationParams, WanPipeline};
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};
use tessera_kernels::Tensor;

/// The call a diffusion-forcing case records.
#[derive(serde::Deserialize)]
struct ForcingSettings {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    num_inference_steps: usize,
    guidance_scale: f32,
    flow_shift: Option<f64>,
    height: usize,
    width: usize,
    num_frames: usize,
    base_num_frames: usize,
    overlap_history: Option<usize>,
    ar_step: usize,
    causal_block_size: Option<usize>,
    addnoise_condition: f32,
    fps: u32,
    /// Frames of the input video a video extension continues (absent: text-to-video).
    #[serde(default)]
    input_frames: Option<usize>,
}

/// The case's stored draws.
struct StoredNoise<'a>(&'a SafetensorsFile);

impl ForcingNoise for StoredNoise<'_> {
    fn chunk(&mut self, k: usize, _shape: [usize; 5]) -> Result<Tensor> {
        read_tensor(self.0, &format!("chunk{k}_noise"))
    }
    fn prefix(&mut self, k: usize, i: usize, shape: [usize; 5]) -> Result<Tensor> {
        let all = read_tensor(self.0, &format!("chunk{k}_addnoise"))?;
        let n: usize = shape.iter().product();
        let part =
            all.data().get(i * n..(i + 1) * n).ok_or_else(|| WorkerError::BadTensor { name: format!("chunk{k}_addnoise"), detail: format!("no draw {i}") })?;
        Ok(Tensor::new(shape, part.to_vec())?)
    }
}

/// A chunk's first forward: the model input, its timesteps, the conditional and unconditional outputs.
struct FirstForward {
    input: Tensor,
    timesteps: Vec<f32>,
    cond: Vec<f32>,
    uncond: Option<Vec<f32>>,
}

/// What one run produced, per chunk.
#[derive(Default)]
struct Recorded {
    init: Vec<Tensor>,
    matrices: Vec<StepMatrix>,
    first_forward: Vec<FirstForward>,
    iterations: Vec<Vec<Tensor>>,
}

impl ForcingObserver for Recorded {
    fn on_chunk_start(&mut self, _k: usize, _chunk: &Chunk, matrix: &StepMatrix, latents: &Tensor) -> Result<()> {
        self.init.push(latents.clone());
        self.matrices.push(matrix.clone());
        self.iterations.push(Vec::new());
        Ok(())
    }
    fn on_forward(&mut self, _k: usize, i: usize, input: &Tensor, timesteps: &[f32], cond: &[f32], uncond: Option<&[f32]>) -> Result<()> {
        if i == 0 {
            self.first_forward.push(FirstForward {
                input: input.clone(),
                timesteps: timesteps.to_vec(),
                cond: cond.to_vec(),
                uncond: uncond.map(<[f32]>::to_vec),
            });
        }
        Ok(())
    }
    fn on_iteration(&mut self, _k: usize, _i: usize, _iterations: usize, latents: &Tensor) -> Result<()> {
        if let Some(chunk) = self.iterations.last_mut() {
            chunk.push(latents.clone());
        }
        Ok(())
    }
}

/// The bound of a stage that depends on `chain` chunks, on this backend. f32 runs keep the case's
/// own tolerance. In bf16 the one-chunk bounds ([`super::CUDA_BF16_TOLERANCE`] for latents,
/// [`super::BF16_VIDEO_TOLERANCE`] for frames: a few sequential forwards of a Wan pipeline) grow
/// as √chain: chunk k starts from chunk k−1's frames and attends to them at every iteration, so
/// its latents carry the independent bf16 roundings of k+1 chunks' forwards, which add in
/// quadrature (the rule the transformer bound gives for more layers). Measured on `df-a` (3
/// chunks, `bf16-host`): latents rel_l2 1.2e-2 and max_abs / max|ref| 2.15e-2 (bound 3.5e-2: one
/// element, off by 6.5e-2 at the end of chunk 0, lands in chunk 1's prefix, whose largest value
/// is smaller), frames 1.6e-2 and 9.6e-2 (bounds 8.7e-2, 1.4e-1). A wrong step matrix, mask or
/// layout moves results by 1e-1 and more; upstream's `last_sample` aliasing (2.7e-2) is within
/// this bound, and is checked by the f32 run (1e-3).
fn chained(opts: &RunOptions, t: Tolerance, chain: usize) -> Tolerance {
    if !opts.backend.is_bf16() {
        return t;
    }
    let k = (chain.max(1) as f64).sqrt();
    Tolerance { rel_l2: t.rel_l2 * k, max_abs: t.max_abs.map(|m| m * k), max_abs_over_max_ref: t.max_abs_over_max_ref.map(|m| m * k) }
}

/// Compares a matrix of the case exactly (`[I, F]` int64).
fn compare_matrix(io: &SafetensorsFile, name: &str, rows: impl Iterator<Item = Vec<i64>>) -> Result<(String, Comparison)> {
    compare_ints(io, name, &rows.flatten().collect::<Vec<_>>())
}

/// Runs a diffusion-forcing pipeline case.
pub(super) fn run(case: &Case, opts: &RunOptions, ran: &mut super::Ran) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let path = case.dir.join("case.json");
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    let s: ForcingSettings = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
    let pipe = WanPipeline::load_on(&case.dir, opts.backend)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let tol = &opts.tolerance(&meta.tolerance);
    let mut comparisons = Vec::new();

    let params = GenerationParams {
        negative_prompt: s.negative_prompt.clone(),
        height: s.height,
        width: s.width,
        num_frames: s.num_frames,
        num_inference_steps: s.num_inference_steps,
        guidance_scale: s.guidance_scale,
        flow_shift: s.flow_shift,
        ..GenerationParams::new(s.prompt.clone())
    };
    let forcing = ForcingParams {
        base_num_frames: s.base_num_frames,
        overlap_history: s.overlap_history,
        ar_step: s.ar_step,
        causal_block_size: s.causal_block_size,
        addnoise_condition: s.addnoise_condition,
        fps: s.fps,
    };

    // Text and the template schedule.
    let text = text_stage(&pipe, &io, &params, tol, &mut comparisons)?;
    let schedule = pipe.schedule_for(&params)?;
    let template: Vec<i64> = schedule.timesteps().to_f32().iter().map(|&t| t as i64).collect();
    comparisons.push(compare_ints(&io, "timesteps", &template)?);
    comparisons.push(compare(&io, "sigmas", &Tensor::new([schedule.sigmas().len()], schedule.sigmas().to_vec())?, tol)?);

    // The chunks, each denoised on one device or sharded.
    let block = forcing.causal_block_size.unwrap_or(pipe.transformer().config().num_frame_per_block);
    let plan = ChunkPlan::new(s.num_frames, s.base_num_frames, s.overlap_history, block)?;
    // A video extension: the input's last overlap_history frames, encoded by every rank.
    let (plan, history) = match (s.input_frames, s.overlap_history) {
        (Some(n), Some(overlap)) => {
            let video = read_tensor(&io, "video")?;
            video.expect_shape("video", &[1, 3, n, s.height, s.width])?;
            (plan.extending(overlap)?, Some(crate::pipeline::forcing::latent_frames(&video, n.saturating_sub(overlap)..n)?))
        }
        (Some(_), None) => return Err(WorkerError::input("overlap_history", "a video extension case needs one")),
        (None, _) => (plan, None),
    };
    let encode = |world: Option<&crate::parallel::Communicator>| history.as_ref().map(|h| pipe.encode_video_in(h, world)).transpose();
    let factor = pipe.factors().spatial as usize;
    let latent = [pipe.vae().config().z_dim, s.height / factor, s.width / factor];
    let setup = |prefix| ForcingSetup {
        plan: plan.clone(),
        params: forcing.clone(),
        schedule: schedule.clone(),
        text: text.clone(),
        guidance_scale: s.guidance_scale,
        latent,
        block,
        prefix,
    };
    let model = pipe.transformer();
    let (video, rec, frames) = if opts.ranks <= 1 && opts.ulysses <= 1 && !opts.cfg_parallel {
        let (mut rec, mut frames) = (Recorded::default(), FrameCollector::default());
        let mut run = ForcingRun::new(setup(encode(None)?))?;
        let video = run.run(&mut StoredNoise(&io), &mut |x| model.forward(x), &mut StreamingDecode::new(&pipe, &mut frames, &mut rec))?;
        (video, rec, frames)
    } else {
        let cfg = if opts.cfg_parallel { 2 } else { 1 };
        let group = match ParallelPlan::with_cfg(opts.ranks, opts.ulysses, cfg, model.config().num_attention_heads) {
            Ok(p) => p,
            Err(e) => return Ok(Outcome::Unsupported(e.to_string())),
        };
        let mut outs = run_local_group(opts.transport, group, |ctx| {
            // Every rank records its run and decodes a band of each chunk's frames; rank 0's
            // collector gets the frames.
            let (mut rec, mut frames) = (Recorded::default(), FrameCollector::default());
            let mut forward = |x: &crate::DitInputs<'_>| ctx.forward(model, x);
            let mut decode = StreamingDecode::split(&pipe, ctx.world(), &mut frames, &mut rec);
            let video = ForcingRun::new(setup(encode(Some(ctx.world()))?))?.run(&mut StoredNoise(&io), &mut forward, &mut decode)?;
            Ok((video, rec, frames, ctx.world().stats().sent()))
        })?;
        *ran = super::Ran { ranks: group.ranks(), moved: outs.iter().map(|o| o.3).sum() };
        if outs.windows(2).any(|w| w[0].0 != w[1].0) {
            return Err(WorkerError::Collective("the ranks ended with different videos".into()));
        }
        let (video, rec, frames, _) = outs.swap_remove(0);
        (video, rec, frames)
    };

    for (k, matrix) in rec.matrices.iter().enumerate() {
        let tol = &chained(opts, tol.clone(), k + 1);
        let as_i64 = |rows: &[Vec<usize>]| rows.iter().map(|r| r.iter().map(|&v| v as i64).collect()).collect::<Vec<Vec<i64>>>();
        comparisons.push(compare(&io, &format!("chunk{k}_latents_init"), &rec.init[k], tol)?);
        comparisons.push(compare_matrix(&io, &format!("chunk{k}_step_index"), as_i64(&matrix.step_index).into_iter())?);
        let ext: Vec<f32> = template.iter().map(|&t| t as f32).collect();
        comparisons.push(compare_matrix(
            &io,
            &format!("chunk{k}_step_matrix"),
            (0..matrix.iterations()).map(|i| matrix.timesteps(i, &ext).iter().map(|&t| t as i64).collect()),
        )?);
        comparisons.push(compare_matrix(&io, &format!("chunk{k}_update_mask"), matrix.update.iter().map(|r| r.iter().map(|&u| i64::from(u)).collect()))?);
        let FirstForward { input, timesteps: t, cond, uncond } = &rec.first_forward[k];
        comparisons.push(compare(&io, &format!("chunk{k}_dit_input_0"), input, tol)?);
        comparisons.push(compare_ints(&io, &format!("chunk{k}_dit_timestep_0"), &t.iter().map(|&v| v as i64).collect::<Vec<_>>())?);
        comparisons.push(compare(&io, &format!("chunk{k}_noise_pred_cond_0"), &Tensor::new(input.shape().to_vec(), cond.clone())?, tol)?);
        if let Some(u) = uncond {
            comparisons.push(compare(&io, &format!("chunk{k}_noise_pred_uncond_0"), &Tensor::new(input.shape().to_vec(), u.clone())?, tol)?);
        }
        let after = read_tensor(&io, &format!("chunk{k}_latents_after_step"))?;
        let steps = &rec.iterations[k];
        if after.dim(0) != steps.len() {
            return Err(WorkerError::BadTensor {
                name: format!("chunk{k}_latents_after_step"),
                detail: format!("{} iterations in the reference, {} run", after.dim(0), steps.len()),
            });
        }
        let per = after.len() / after.dim(0).max(1);
        for (i, got) in steps.iter().enumerate() {
            comparisons.push((format!("chunk{k}_latents_after_step[{i}]"), Comparison::new(got.data(), &after.data()[i * per..(i + 1) * per], tol)));
        }
    }
    let chunks = plan.chunks.len();
    comparisons.push(compare(&io, "latents", &video, &chained(opts, tol.clone(), chunks))?);
    let frames_tol = chained(opts, opts.video_tolerance(&meta.tolerance), chunks);
    let decoded = frames_major(&frames.frames()?)?;
    match s.input_frames {
        // Upstream's output is the input video, then the decode of the latents.
        Some(n) => {
            let reference = read_tensor(&io, "frames")?;
            let skip = n * decoded.len() / decoded.dim(1).max(1);
            let tail = reference.data().get(skip..).filter(|t| t.len() == decoded.len()).ok_or_else(|| WorkerError::BadTensor {
                name: "frames".into(),
                detail: format!("{:?} is not the {n} input frames then {:?}", reference.shape(), decoded.shape()),
            })?;
            comparisons.push((format!("frames[{n}..]"), Comparison::new(decoded.data(), tail, &frames_tol)));
        }
        None => comparisons.push(compare(&io, "frames", &decoded, &frames_tol)?),
    }
    Ok(outcome(comparisons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::CaseKind;
    use std::path::Path;

    fn df_case() -> Case {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/df-a");
        Case { kind: CaseKind::Pipeline, name: "pipeline/df-a".into(), dir }
    }

    /// Every stage README-df.md lists is compared, per chunk and per iteration (7, 5 and 3).
    #[test]
    fn the_case_is_matched_stage_by_stage() {
        let Outcome::Pass(stages) = run(&df_case(), &RunOptions::default(), &mut crate::golden::Ran::default()).unwrap() else {
            panic!("pipeline/df-a does not pass on the CPU")
        };
        for (name, c) in &stages {
            eprintln!("{name:<34} rel_l2 {:.3e} max_abs {:.3e}", c.rel_l2, c.max_abs);
        }
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        for k in 0..3 {
            for stage in
                ["latents_init", "step_index", "step_matrix", "update_mask", "dit_input_0", "dit_timestep_0", "noise_pred_cond_0", "noise_pred_uncond_0"]
            {
                assert!(names.contains(&format!("chunk{k}_{stage}").as_str()), "chunk{k}_{stage} missing");
            }
        }
        let iterations = |k: usize| names.iter().filter(|n| n.starts_with(&format!("chunk{k}_latents_after_step["))).count();
        assert_eq!([iterations(0), iterations(1), iterations(2)], [7, 5, 3]);
        assert_eq!(names[names.len() - 2..], ["latents", "frames"]);
    }

    /// The frames streamed chunk by chunk (4, then 6 and 3 new latent frames) are the decode of
    /// the whole latent, bit for bit: the VAE's causal caches carry over between chunks.
    #[test]
    fn streamed_frames_are_the_decode_of_the_whole() {
        let case = df_case();
        let pipe = WanPipeline::load(&case.dir).unwrap();
        let io = SafetensorsFile::open(&case.dir.join("io.safetensors")).unwrap();
        let latents = read_tensor(&io, "latents").unwrap();
        let mut once = FrameCollector::default();
        pipe.decode(&latents, &mut once).unwrap();
        let mut streamed = FrameCollector::default();
        let mut stream = pipe.start_decode();
        for (start, end) in [(0, 6), (6, 10), (10, 12)] {
            let piece = Tensor::new(
                [1, 4, end - start, 4, 4],
                (0..4).flat_map(|c| latents.data()[(c * 12 + start) * 16..(c * 12 + end) * 16].to_vec()).collect::<Vec<_>>(),
            )
            .unwrap();
            pipe.decode_more(&mut stream, &piece, &mut streamed).unwrap();
        }
        let (a, b) = (once.frames().unwrap(), streamed.frames().unwrap());
        assert_eq!(a.shape(), &[1, 3, 45, 32, 32]);
        assert!(a.data() == b.data(), "streamed frames differ from one decode");
        // A fresh stream restarts the video: its first piece differs from the continuation's.
        let mut fresh = FrameCollector::default();
        let tail =
            Tensor::new([1, 4, 2, 4, 4], (0..4).flat_map(|c| latents.data()[(c * 12 + 10) * 16..(c * 12 + 12) * 16].to_vec()).collect::<Vec<_>>()).unwrap();
        pipe.decode_more(&mut pipe.start_decode(), &tail, &mut fresh).unwrap();
        assert_eq!(fresh.frames().unwrap().dim(2), 5, "a fresh stream's first latent frame is one video frame");
    }

    /// The bf16 bound grows as the square root of the chunks a stage depends on.
    #[test]
    fn bf16_bounds_grow_with_the_chain() {
        let bf16 = RunOptions { backend: tessera_kernels::backend::Backend::Bf16Host, ..RunOptions::default() };
        let t = chained(&bf16, super::super::CUDA_BF16_TOLERANCE, 4);
        assert_eq!((t.rel_l2, t.max_abs_over_max_ref), (4e-2, Some(4e-2)));
        let own = Tolerance { rel_l2: 1e-3, max_abs: Some(1e-2), max_abs_over_max_ref: None };
        assert_eq!(chained(&RunOptions::default(), own.clone(), 4), own);
    }
}
