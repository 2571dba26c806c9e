//! Transformer cases (`dit/*`): `hidden_states`, `timestep`, `encoder_hidden_states` and, for
//! image-to-video, `encoder_hidden_states_image` in; `output` out. Diffusion-forcing cases
//! (`df-*`, SkyReels-V2) also give `fps` and a timestep per latent frame.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome, RunOptions, Tolerance};
use crate::model::DitModel;
use crate::model::ForwardOptions;
use crate::parallel::{run_local_group, ParallelPlan};
use crate::weights::SafetensorsFile;
use crate::{DitInputs, Result};

/// The tolerance of transformer (and text-encoder) cases run in bf16 (`cuda`, `bf16-host`), as
/// diffusers runs the model there (wan2.1.md §1.4), instead of the case's own f32 tolerance.
///
/// The error analysis. A value stored in bf16 (8 significant bits, round to nearest) carries a
/// relative error uniform in ±2⁻⁹, of standard deviation 2⁻⁸/√12 ≈ 1.1e-3; sums are accumulated in
/// f32 (2⁻²⁴ per addition: negligible beside it), so the error is set by the stores. Along the
/// residual stream a transformer block stores about 8 values per token that feed the next layer
/// (the normalised input, q|k|v, the attention output, its projection, the rounded residual after
/// each of the three adds, the FFN hidden layer); independent roundings add in quadrature, so after
/// L layers rel_l2 ≈ 1.1e-3·√(8·L), amplified by how strongly the layers mix (near 1 for these
/// normalised blocks). For the 2-layer cases: 1.1e-3·√16 ≈ 4.5e-3 predicted, and measured:
/// diffusers itself in bf16 (`_keep_in_fp32_modules` in f32) lands at rel_l2 4.9e-3 to 6.2e-3
/// (max_abs / max|ref| 4.8e-3 to 7.3e-3) from the f32 references of the project's dit cases
/// (diffusers 0.42.1 / torch 2.15 on the CPU), Tessera's bf16 data flow (`bf16-host`) at 4.9e-3
/// to 6.2e-3 (max_abs / max|ref| 4.6e-3 to 8.7e-3), UMT5 (2 layers) at 7.3e-3. The bound, 2e-2,
/// is four times the prediction (a 4σ margin for the sum of roundings) and two orders of
/// magnitude below what a wrong layout, head split or modulation chunk gives (rel_l2 of order 1).
/// (A 30-layer model would predict 1.7e-2: real-size checks need their own bound, √L-scaled.)
pub const CUDA_BF16_TOLERANCE: Tolerance = Tolerance { rel_l2: 2e-2, max_abs: None, max_abs_over_max_ref: Some(2e-2) };

/// The tolerance of a pipeline's decoded frames when every model (text encoder, transformer,
/// VAE) runs in bf16. The latent after each step carries the bf16 error of every step before it
/// (rel_l2 grows from 5e-3 after the first step to 1.0e-2–1.1e-2 after the last on the project's
/// pipeline cases, `bf16-host`), and the decoder adds its own (see
/// [`super::vae::BF16_VAE_TOLERANCE`]): frames land at rel_l2 1.1e-2–1.3e-2, with single pixels
/// off by up to 4.7e-2 of the largest (the VAE in f32 gave 6.8e-3–8.4e-3 and 3.2e-2). rel_l2 5e-2
/// is the budget of 2–4 steps and a decoder.
///
/// The largest pixel error is bounded by upstream's own in bf16, which depends on the content:
/// diffusers 0.42.1 / torch 2.15 with every component in bf16, from the f32 references
/// (`tests/golden/measure_bf16.py`), gives on `pipeline/t2v-a` frames at rel_l2 1.5e-2 with a
/// pixel off by 7.6e-2 of the largest, and on `pipeline/i2v-a` (a photo-like first frame with
/// sharp edges) 2.9e-2 and 1.11e-1; its bf16 decoder alone, on the reference's own final
/// latents, is already off by 8.3e-2 there. Tessera's `bf16-host` lands at 1.1e-2 / 4.7e-2 and
/// 2.2e-2 / 1.06e-1. The bound is upstream's worst rounded up: 1.2e-1. A wrong step or layout
/// gives rel_l2 of order 1.
pub const BF16_VIDEO_TOLERANCE: Tolerance = Tolerance { rel_l2: 5e-2, max_abs: None, max_abs_over_max_ref: Some(1.2e-1) };

/// A case's forward options. Diffusion-forcing cases (`df-*`) give `fps` (one fps index) and a
/// `timestep` per frame; the causal block size is the config's `num_frame_per_block`.
pub fn forward_options(io: &SafetensorsFile) -> Result<ForwardOptions> {
    let fps_index = if io.contains("fps") { io.read_f32("fps")?.1.first().map(|&v| v as usize) } else { None };
    Ok(ForwardOptions { fps_index, causal_block: None })
}

/// Loads the case's transformer from its folder (as a diffusers `transformer/` folder) onto
/// `opts.backend` and runs it, on one device or sharded over `opts.ranks` ranks of this process,
/// connected in-process or by TCP on loopback (every rank's output is compared; on CUDA the ranks
/// share the GPU and stage their collectives through the transport). The bf16
/// backends are held to [`CUDA_BF16_TOLERANCE`], the f32 CPU to the case's own tolerance.
pub(super) fn run(case: &Case, opts: &RunOptions, ran: &mut super::Ran) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let hidden = read_tensor(&io, "hidden_states")?;
    // int64 in upstream's cases; the model casts timesteps to float.
    let (_, timesteps) = io.read_f32("timestep")?;
    let text = read_tensor(&io, "encoder_hidden_states")?;
    let image = if io.contains("encoder_hidden_states_image") { Some(read_tensor(&io, "encoder_hidden_states_image")?) } else { None };
    let options = forward_options(&io)?;
    let inputs =
        DitInputs { hidden_states: &hidden, timesteps: &timesteps, encoder_hidden_states: &text, encoder_hidden_states_image: image.as_ref(), options };
    let sharded = opts.ranks > 1 || opts.ulysses > 1 || opts.cfg_parallel;
    if opts.cfg_parallel && !hidden.dim(0).is_multiple_of(2) {
        return Ok(Outcome::Unsupported(format!("CFG-parallel splits a batch into halves; this case's batch is {}", hidden.dim(0))));
    }
    let tolerance = opts.tolerance(&meta.tolerance);
    let model = DitModel::load_backend(&case.dir, opts.backend)?;
    if !sharded {
        let out = model.forward(&inputs)?;
        return Ok(outcome(vec![compare(&io, "output", &out, &tolerance)?]));
    }
    let cfg = if opts.cfg_parallel { 2 } else { 1 };
    let plan = match ParallelPlan::with_cfg(opts.ranks, opts.ulysses, cfg, model.config().num_attention_heads) {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Unsupported(e.to_string())),
    };
    let outs = run_local_group(opts.transport, plan, |ctx| Ok((ctx.forward(&model, &inputs)?, ctx.world().stats().sent())))?;
    *ran = super::Ran { ranks: outs.len(), moved: outs.iter().map(|(_, sent)| sent).sum() };
    let comparisons = outs
        .iter()
        .enumerate()
        .map(|(rank, (out, _))| compare(&io, "output", out, &tolerance).map(|(n, c)| (format!("{n}@rank{rank}"), c)))
        .collect::<Result<Vec<_>>>()?;
    Ok(outcome(comparisons))
}
