//! Whole-pipeline cases (`pipeline/*`): a diffusers snapshot folder plus the prompt and settings in
//! `case.json`. Matched stage by stage, so a mismatch is located by the report, not guessed: token
//! ids (exactly), prompt and negative-prompt embeddings, the latent after every denoising step
//! (starting from the reference's own initial noise, which came from torch's generator), and the
//! decoded frames.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Comparison, Outcome, Tolerance};
use crate::pipeline::{FrameCollector, GenerationParams, PipelineObserver, WanPipeline};
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

/// Compares token ids exactly (any difference fails, whatever the case tolerance).
fn compare_ids(io: &SafetensorsFile, name: &str, got: &[u32]) -> Result<(String, Comparison)> {
    let (_, want) = io.read_i64(name)?;
    let exact = Tolerance { rel_l2: 0.0, max_abs: Some(0.0), max_abs_over_max_ref: None };
    if want.len() != got.len() {
        let c = Comparison { rel_l2: f64::INFINITY, max_abs: f64::INFINITY, max_ref: 0.0, passed: false };
        return Ok((format!("{name} (length {} vs reference {})", got.len(), want.len()), c));
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(&want).map(|(&a, &b)| (a as f32, b as f32)).unzip();
    Ok((name.to_string(), Comparison::new(&g, &w, &exact)))
}

/// `[B, C, F, H, W]` → `[B, F, C, H, W]` (diffusers' `output_type="pt"` frame layout).
fn frames_major(t: &Tensor) -> Result<Tensor> {
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

pub(super) fn run(case: &Case) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let path = case.dir.join("case.json");
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    let s: PipelineSettings = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
    let pipe = WanPipeline::load(&case.dir)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let tol = &meta.tolerance;
    let mut comparisons = Vec::new();

    let params = GenerationParams {
        negative_prompt: s.negative_prompt.clone(),
        height: s.height,
        width: s.width,
        num_frames: s.num_frames,
        num_inference_steps: s.num_inference_steps,
        guidance_scale: s.guidance_scale,
        flow_shift: s.flow_shift,
        initial_noise: Some(read_tensor(&io, "latents")?),
        ..GenerationParams::new(s.prompt.clone())
    };
    let vc = pipe.vae().config();
    params.validate(vc.spatial_factor(), vc.temporal_factor())?;

    // Stage 1: tokens and embeddings.
    let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale)?;
    comparisons.push(compare_ids(&io, "prompt_ids", &text.prompt_ids)?);
    comparisons.push(compare(&io, "prompt_embeds", &text.prompt_embeds, tol)?);
    if let (Some(ids), Some(embeds)) = (&text.negative_ids, &text.negative_embeds) {
        comparisons.push(compare_ids(&io, "negative_prompt_ids", ids)?);
        comparisons.push(compare(&io, "negative_prompt_embeds", embeds, tol)?);
    }

    // Stage 2–3: denoising from the reference noise, every step compared.
    let schedule = pipe.schedule_for(&params)?;
    let mut latents = pipe.initial_latents(&params, &schedule)?;
    let mut rec = StepRecorder::default();
    pipe.denoise(&mut latents, &text, params.guidance_scale, &schedule, &mut rec)?;
    let after = read_tensor(&io, "latents_after_step")?;
    let per_step = after.len() / after.dim(0).max(1);
    if after.dim(0) != rec.steps.len() {
        return Err(WorkerError::BadTensor { name: "latents_after_step".into(), detail: format!("{} steps in the reference, {} run", after.dim(0), rec.steps.len()) });
    }
    for (i, got) in rec.steps.iter().enumerate() {
        let want = &after.data()[i * per_step..(i + 1) * per_step];
        if got.len() != want.len() {
            return Err(WorkerError::BadTensor { name: format!("latents_after_step[{i}]"), detail: format!("{} values, computed {}", want.len(), got.len()) });
        }
        comparisons.push((format!("latents_after_step[{i}]"), Comparison::new(got.data(), want, tol)));
    }

    // Stage 4: decode.
    pipe.decode(&latents, &mut rec)?;
    comparisons.push(compare(&io, "frames", &frames_major(&rec.frames.frames()?)?, tol)?);
    Ok(outcome(comparisons))
}
