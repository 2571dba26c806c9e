//! Whole-pipeline cases (`pipeline/*`): a diffusers snapshot folder plus the prompt and settings in
//! `case.json`. Matched stage by stage, so a mismatch is located by the report, not guessed: token
//! ids (exactly), prompt and negative-prompt embeddings, the latent after every denoising step
//! (starting from the reference's own noise, which came from torch's generator), and the decoded
//! frames.
//!
//! A case whose `case.json` has a `strength` is video-to-video (`WanVideoToVideoPipeline`): its
//! `io.safetensors` holds the preprocessed input `video` and the `noise` drawn for it, and two more
//! stages are matched before denoising: `init_latents` (the encoded, normalised video) and
//! `latents` (that noised at the first kept step); `timesteps`, when present, must equal the kept
//! model timesteps exactly. Otherwise the case is text-to-video and `latents` is its initial noise.
//!
//! An image-to-video snapshot (`WanImageToVideoPipeline`) adds the image stages after the text:
//! the processor's `clip_pixel_values` (exact, since the resize is PIL's bit for bit), the
//! encoder's `image_embeds`, `image_condition`, `condition_mask` and `condition_latents`, then the
//! first step's two guidance branches (`noise_pred_cond[0]`, `noise_pred_uncond[0]`) from one
//! whole-tensor forward, before the steps run as for text-to-video.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Comparison, Outcome, RunOptions, Tolerance};
use crate::parallel::ParallelPlan;
use crate::pipeline::{decode_sharded, denoise_sharded, FrameCollector, GenerationParams, PipelineObserver, VideoInput, WanPipeline};
use crate::sampler::Timesteps;
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};
use tessera_kernels::Tensor;

/// The generation settings a pipeline case records beside its tolerance.
#[derive(serde::Deserialize)]
struct PipelineSettings {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    num_inference_steps: usize,
    guidance_scale: f32,
    #[serde(default)]
    flow_shift: Option<f64>,
    height: usize,
    width: usize,
    num_frames: usize,
    /// Video-to-video: the share of the schedule run on the noised input video.
    #[serde(default)]
    strength: Option<f64>,
}

/// Keeps the latent after every step.
#[derive(Default)]
struct StepRecorder {
    steps: Vec<Tensor>,
    frames: FrameCollector,
}

impl PipelineObserver for StepRecorder {
    fn on_step(&mut self, _step: usize, _total: usize, latents: &Tensor) -> Result<()> {
        self.steps.push(latents.clone());
        Ok(())
    }
    fn on_frames(&mut self, frames: &Tensor) -> Result<()> {
        self.frames.on_frames(frames)
    }
}

/// The bound of integer outputs: any difference fails, whatever the case tolerance.
const EXACT: Tolerance = Tolerance { rel_l2: 0.0, max_abs: Some(0.0), max_abs_over_max_ref: None };

/// Compares integers (token ids, timesteps) exactly.
pub(super) fn compare_ints(io: &SafetensorsFile, name: &str, got: &[i64]) -> Result<(String, Comparison)> {
    let (_, want) = io.read_i64(name)?;
    if want.len() != got.len() {
        let c = Comparison { rel_l2: f64::INFINITY, max_abs: f64::INFINITY, max_ref: 0.0, passed: false };
        return Ok((format!("{name} (length {} vs reference {})", got.len(), want.len()), c));
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(&want).map(|(&a, &b)| (a as f32, b as f32)).unzip();
    Ok((name.to_string(), Comparison::new(&g, &w, &EXACT)))
}

/// Compares token ids exactly.
fn compare_ids(io: &SafetensorsFile, name: &str, got: &[u32]) -> Result<(String, Comparison)> {
    compare_ints(io, name, &got.iter().map(|&id| i64::from(id)).collect::<Vec<_>>())
}

/// Stage 1 of every pipeline case: encodes the prompt (and, with guidance, the negative prompt)
/// and matches the token ids exactly and the embeddings at `tol`.
pub(super) fn text_stage(
    pipe: &WanPipeline,
    io: &SafetensorsFile,
    params: &GenerationParams,
    tol: &Tolerance,
    comparisons: &mut Vec<(String, Comparison)>,
) -> Result<crate::pipeline::Conditioning> {
    let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale)?;
    comparisons.push(compare_ids(io, "prompt_ids", &text.prompt_ids)?);
    comparisons.push(compare(io, "prompt_embeds", &text.prompt_embeds, tol)?);
    if let (Some(ids), Some(embeds)) = (&text.negative_ids, &text.negative_embeds) {
        comparisons.push(compare_ids(io, "negative_prompt_ids", ids)?);
        comparisons.push(compare(io, "negative_prompt_embeds", embeds, tol)?);
    }
    Ok(text)
}

/// Image-to-video's stage 1b: the processor's pixels (exactly), the image tokens, the image as the
/// VAE sees it, the mask and the image's latents (the VAE's tolerance on a bf16 backend).
fn image_stage(
    pipe: &WanPipeline,
    io: &SafetensorsFile,
    params: &GenerationParams,
    opts: &RunOptions,
    case_tol: &Tolerance,
    comparisons: &mut Vec<(String, Comparison)>,
) -> Result<crate::pipeline::ImageConditioning> {
    let (tol, vae_tol) = (opts.tolerance(case_tol), opts.vae_tolerance(case_tol));
    let image = params.image.as_ref().ok_or_else(|| WorkerError::input("image", "an image-to-video case needs its image"))?;
    let encoder = pipe.image_encoder().ok_or_else(|| WorkerError::input("image", "the snapshot has no image encoder"))?;
    // The resize is integer arithmetic and the rest one rounding: equal up to f32 rounding.
    let pixel_tol = Tolerance { rel_l2: 1e-6, max_abs: Some(1e-6), max_abs_over_max_ref: None };
    comparisons.push(compare(io, "clip_pixel_values", &encoder.pixel_values(image)?, &pixel_tol)?);
    if image.height != params.height || image.width != params.width {
        return Err(WorkerError::BadTensor {
            name: "image".into(),
            detail: format!("{}×{}, the case's size is {}×{}", image.height, image.width, params.height, params.width),
        });
    }
    comparisons.push(compare(io, "image_condition", &image.to_signed_unit()?, &EXACT_UP_TO_ROUNDING)?);
    let conditioning = pipe.encode_image(image, params)?;
    comparisons.push(compare(io, "image_embeds", &conditioning.embeds, &tol)?);
    let (mask, latents) = split_channels(&conditioning.latents, crate::pipeline::I2V_MASK_CHANNELS)?;
    comparisons.push(compare(io, "condition_mask", &mask, &EXACT)?);
    comparisons.push(compare(io, "condition_latents", &latents, &vae_tol)?);
    Ok(conditioning)
}

/// f32 values computed in another order than the reference's: one rounding apart.
const EXACT_UP_TO_ROUNDING: Tolerance = Tolerance { rel_l2: 1e-6, max_abs: Some(1e-6), max_abs_over_max_ref: None };

/// `[1, C, ...]` cut into channels `..at` and `at..`.
fn split_channels(t: &Tensor, at: usize) -> Result<(Tensor, Tensor)> {
    let s = t.shape();
    if s.len() < 2 || s[0] != 1 || s[1] < at {
        return Err(WorkerError::input("condition", format!("cannot split {s:?} at channel {at}")));
    }
    let per = t.len() / s[1];
    let shape = |c: usize| [&[1, c][..], &s[2..]].concat();
    Ok((Tensor::new(shape(at), t.data()[..at * per].to_vec())?, Tensor::new(shape(s[1] - at), t.data()[at * per..].to_vec())?))
}

/// Image-to-video: the transformer's first step on whole tensors (`[latents | mask | condition]`,
/// the image tokens, each prompt), matched against `noise_pred_cond[0]` and `noise_pred_uncond[0]`:
/// the input's channel order and the image branch, checked apart from the sharded step.
#[allow(clippy::too_many_arguments)]
fn first_forward_stage(
    pipe: &WanPipeline,
    io: &SafetensorsFile,
    latents: &Tensor,
    text: &crate::pipeline::Conditioning,
    image: &crate::pipeline::ImageConditioning,
    schedule: &crate::sampler::Schedule,
    tol: &Tolerance,
    comparisons: &mut Vec<(String, Comparison)>,
) -> Result<()> {
    let s = latents.shape();
    let input = Tensor::new([1, s[1] + image.latents.dim(1), s[2], s[3], s[4]], [latents.data(), image.latents.data()].concat())?;
    let t = schedule.timesteps().get(schedule.first_step()).ok_or_else(|| WorkerError::input("schedule", "no steps"))?;
    let branches = [("noise_pred_cond", Some(&text.prompt_embeds)), ("noise_pred_uncond", text.negative_embeds.as_ref())];
    for (name, embeds) in branches {
        let (Some(embeds), true) = (embeds, io.contains(name)) else { continue };
        let x = crate::model::DitInputs {
            hidden_states: &input,
            timesteps: &[t],
            encoder_hidden_states: embeds,
            encoder_hidden_states_image: Some(&image.embeds),
            options: Default::default(),
        };
        let got = pipe.transformer().forward(&x)?;
        let all = read_tensor(io, name)?;
        if all.len() < got.len() {
            return Err(WorkerError::BadTensor { name: name.into(), detail: format!("{} values, one step is {}", all.len(), got.len()) });
        }
        comparisons.push((format!("{name}[0]"), Comparison::new(got.data(), &all.data()[..got.len()], tol)));
    }
    Ok(())
}

/// `[B, C, F, H, W]` → `[B, F, C, H, W]` (diffusers' `output_type="pt"` frame layout).
pub(super) fn frames_major(t: &Tensor) -> Result<Tensor> {
    let s = t.shape();
    let (b, c, f, hw) = (s[0], s[1], s[2], s[3] * s[4]);
    let mut out = vec![0.0; t.len()];
    for bi in 0..b {
        for ci in 0..c {
            for fi in 0..f {
                let src = ((bi * c + ci) * f + fi) * hw;
                let dst = ((bi * f + fi) * c + ci) * hw;
                out[dst..dst + hw].copy_from_slice(&t.data()[src..src + hw]);
            }
        }
    }
    Ok(Tensor::new([b, f, c, s[3], s[4]], out)?)
}

/// Runs a pipeline case; with `opts.ranks > 1` the denoising runs sequence-parallel over that many
/// ranks of this process (the other stages are the same code either way); the transformer runs on
/// `opts.backend`.
pub(super) fn run(case: &Case, opts: &RunOptions, ran: &mut super::Ran) -> Result<Outcome> {
    if crate::pipeline::Snapshot::open(&case.dir)?.is_diffusion_forcing() {
        return super::forcing::run(case, opts, ran);
    }
    let meta = CaseMeta::read(&case.dir)?;
    let path = case.dir.join("case.json");
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    let s: PipelineSettings = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
    // The transformer runs on `opts.backend` (the text encoder and the VAE on the CPU); a bf16
    // run is held to the bf16 tolerance, integer outputs stay exact.
    let pipe = WanPipeline::load_on(&case.dir, opts.backend)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let tol = &opts.tolerance(&meta.tolerance);
    let mut comparisons = Vec::new();

    // Video-to-video cases start from the input video and the noise drawn for it; text-to-video
    // cases from their initial noise.
    let (video, noise_name) = match s.strength {
        Some(strength) => (Some(VideoInput { video: read_tensor(&io, "video")?, strength }), "noise"),
        None if io.contains("video") => {
            return Err(WorkerError::Config {
                path: path.display().to_string(),
                detail: "io.safetensors has an input `video` but case.json no `strength`".into(),
            });
        }
        None => (None, "latents"),
    };
    let params = GenerationParams {
        negative_prompt: s.negative_prompt.clone(),
        height: s.height,
        width: s.width,
        num_frames: s.num_frames,
        num_inference_steps: s.num_inference_steps,
        guidance_scale: s.guidance_scale,
        flow_shift: s.flow_shift,
        initial_noise: Some(read_tensor(&io, noise_name)?),
        video,
        ..GenerationParams::new(s.prompt.clone())
    };
    params.validate(pipe.factors(), &crate::pipeline::limits::Limits::default())?;

    // Stage 1: tokens and embeddings; for image-to-video, the image's conditioning.
    let mut text = text_stage(&pipe, &io, &params, tol, &mut comparisons)?;
    if pipe.is_image_to_video() {
        let image = super::clip::read_image(&io, "image")?;
        let params = GenerationParams { image: Some(image), ..params.clone() };
        text.image = Some(image_stage(&pipe, &io, &params, opts, &meta.tolerance, &mut comparisons)?);
    }

    // Stage 2: the schedule and the starting latent (for video-to-video: the encoded video, then
    // that noised at the first kept step).
    let schedule = pipe.schedule_for(&params)?;
    if io.contains("timesteps") {
        let first = schedule.first_step();
        comparisons.push(match schedule.timesteps() {
            Timesteps::Int(t) => compare_ints(&io, "timesteps", &t[first..])?,
            Timesteps::Float(t) => compare(&io, "timesteps", &Tensor::new([t.len() - first], t[first..].to_vec())?, &EXACT)?,
        });
    }
    let mut latents = pipe.initial_latents(&params, &schedule)?;
    if let Some(input) = &params.video {
        comparisons.push(compare(&io, "init_latents", &pipe.encode_video(&input.video)?, tol)?);
        comparisons.push(compare(&io, "latents", &latents, tol)?);
    }
    if let Some(image) = &text.image {
        first_forward_stage(&pipe, &io, &latents, &text, image, &schedule, tol, &mut comparisons)?;
    }

    // Stage 3: denoising, every step compared.
    let mut rec = StepRecorder::default();
    let sharded = if opts.ranks <= 1 && opts.ulysses <= 1 && !opts.cfg_parallel {
        pipe.denoise(&mut latents, &text, params.guidance_scale, &schedule, &mut rec)?;
        None
    } else {
        let cfg = if opts.cfg_parallel { 2 } else { 1 };
        let plan = match ParallelPlan::with_cfg(opts.ranks, opts.ulysses, cfg, pipe.transformer().config().num_attention_heads) {
            Ok(p) => p,
            Err(e) => return Ok(Outcome::Unsupported(e.to_string())),
        };
        let moved = denoise_sharded(&pipe, &mut latents, &text, params.guidance_scale, &schedule, opts.transport, plan, &mut rec)?;
        *ran = super::Ran { ranks: plan.ranks(), moved };
        Some(plan)
    };
    let after = read_tensor(&io, "latents_after_step")?;
    let per_step = after.len() / after.dim(0).max(1);
    if after.dim(0) != rec.steps.len() {
        return Err(WorkerError::BadTensor {
            name: "latents_after_step".into(),
            detail: format!("{} steps in the reference, {} run", after.dim(0), rec.steps.len()),
        });
    }
    for (i, got) in rec.steps.iter().enumerate() {
        let want = &after.data()[i * per_step..(i + 1) * per_step];
        if got.len() != want.len() {
            return Err(WorkerError::BadTensor { name: format!("latents_after_step[{i}]"), detail: format!("{} values, computed {}", want.len(), got.len()) });
        }
        comparisons.push((format!("latents_after_step[{i}]"), Comparison::new(got.data(), want, tol)));
    }

    // Stage 4: decode, split into bands of rows over the same ranks when sharded.
    match sharded {
        Some(plan) => ran.moved += decode_sharded(&pipe, &latents, opts.transport, plan, &mut rec)?,
        None => pipe.decode(&latents, &mut rec)?,
    }
    comparisons.push(compare(&io, "frames", &frames_major(&rec.frames.frames()?)?, &opts.video_tolerance(&meta.tolerance))?);
    Ok(outcome(comparisons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::CaseKind;
    use std::path::Path;

    fn project_case(name: &str) -> Case {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline").join(name);
        Case { kind: CaseKind::Pipeline, name: format!("pipeline/{name}"), dir }
    }

    /// A copy of a case folder whose `case.json` is edited by `edit`.
    fn edited_copy(case: &Case, edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, Case) {
        fn copy_dir(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let path = entry.unwrap().path();
                let dest = to.join(path.file_name().unwrap());
                if path.is_dir() {
                    copy_dir(&path, &dest);
                } else {
                    std::fs::copy(&path, &dest).unwrap();
                }
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&case.dir, tmp.path());
        let path = tmp.path().join("case.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
        let copy = Case { kind: case.kind, name: case.name.clone(), dir: tmp.path().to_path_buf() };
        (tmp, copy)
    }

    #[test]
    fn video_to_video_case_is_matched_stage_by_stage() {
        let Outcome::Pass(stages) = run(&project_case("v2v-a"), &RunOptions::default(), &mut crate::golden::Ran::default()).unwrap() else {
            panic!("pipeline/v2v-a does not pass")
        };
        for (name, c) in &stages {
            eprintln!("{name:<26} rel_l2 {:.3e} max_abs {:.3e}", c.rel_l2, c.max_abs);
        }
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        let want = [
            "prompt_ids",
            "prompt_embeds",
            "negative_prompt_ids",
            "negative_prompt_embeds",
            "timesteps",
            "init_latents",
            "latents",
            "latents_after_step[0]",
            "latents_after_step[1]",
            "latents_after_step[2]",
            "frames",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn image_to_video_case_is_matched_stage_by_stage() {
        let backend = match std::env::var("TESSERA_TEST_BACKEND").as_deref() {
            Ok("bf16-host") => tessera_kernels::backend::Backend::Bf16Host,
            _ => tessera_kernels::backend::Backend::Cpu,
        };
        let opts = RunOptions { backend, ..Default::default() };
        let outcome = run(&project_case("i2v-a"), &opts, &mut crate::golden::Ran::default()).unwrap();
        let (Outcome::Pass(stages) | Outcome::Fail(stages)) = &outcome else { panic!("{outcome:?}") };
        for (name, c) in stages {
            eprintln!("{name:<26} rel_l2 {:.3e} max_abs {:.3e} max_ref {:.3e} {}", c.rel_l2, c.max_abs, c.max_ref, c.passed);
        }
        assert!(outcome.passed());
        let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        let want = [
            "prompt_ids",
            "prompt_embeds",
            "negative_prompt_ids",
            "negative_prompt_embeds",
            "clip_pixel_values",
            "image_condition",
            "image_embeds",
            "condition_mask",
            "condition_latents",
            "timesteps",
            "noise_pred_cond[0]",
            "noise_pred_uncond[0]",
            "latents_after_step[0]",
            "latents_after_step[1]",
            "latents_after_step[2]",
            "latents_after_step[3]",
            "frames",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn video_to_video_with_another_strength_fails() {
        // 0.9 of 5 steps keeps 4 (from timestep 999), not the reference's 3.
        let (_tmp, case) = edited_copy(&project_case("v2v-a"), |j| j["strength"] = 0.9.into());
        let outcome = run(&case, &RunOptions::default(), &mut crate::golden::Ran::default());
        assert!(!matches!(outcome, Ok(Outcome::Pass(_))), "{:?}", outcome.map(|o| o.label()));
    }

    #[test]
    fn an_input_video_without_strength_is_refused() {
        let (_tmp, case) = edited_copy(&project_case("v2v-a"), |j| {
            j.as_object_mut().unwrap().remove("strength");
        });
        let err = run(&case, &RunOptions::default(), &mut crate::golden::Ran::default()).expect_err("refused").to_string();
        assert!(err.contains("strength"), "{err}");
    }
}
