//! Transformer cases (`dit/*`): `hidden_states`, `timestep`, `encoder_hidden_states` and, for
//! image-to-video, `encoder_hidden_states_image` in; `output` out.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome, RunOptions, Tolerance};
use crate::model::DitModel;
use crate::parallel::{run_local_group, ParallelPlan};
use crate::weights::SafetensorsFile;
use crate::{DitInputs, Result};

/// The tolerance of transformer cases run on CUDA, in bf16 as diffusers runs the model there
/// (wan2.1.md §1.4), instead of the case's own f32 tolerance. Why these numbers: diffusers itself,
/// loaded in bf16 (`_keep_in_fp32_modules` in f32), lands at rel_l2 4.9e-3 to 6.2e-3 and
/// max_abs / max|ref| 4.8e-3 to 7.3e-3 from the f32 references of the project's dit cases
/// (t2v-a, t2v-b, t2v-bf16, i2v-a; measured with diffusers 0.42.1 / torch 2.15 on the CPU), and
/// Tessera's bf16 data flow (the `bf16-host` backend, `tessera_kernels::backend::HostOps`) at rel_l2 4.9e-3 to
/// 6.2e-3 and max_abs / max|ref| 4.6e-3 to 8.7e-3.
/// bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per stored value) and every
/// layer stores several values, so errors of that size are the precision, not a bug; the bound
/// allows about three times diffusers' own error and stays two orders of magnitude below what a
/// wrong layout, head split or modulation chunk gives (rel_l2 of order 1). Applied to the bf16
/// backends (`cuda`, `bf16-host`).
pub const CUDA_BF16_TOLERANCE: Tolerance = Tolerance { rel_l2: 2e-2, max_abs: None, max_abs_over_max_ref: Some(2e-2) };

/// The tolerance of a pipeline's decoded frames when its text encoder and transformer run in
/// bf16. The latent after each step carries the bf16 error of every step before it (rel_l2 grows
/// from 5e-3 after the first step to 1.0e-2–1.1e-2 after the last on the project's pipeline cases,
/// `bf16-host`), and the f32 VAE maps it onto pixels: frames land at rel_l2 6.8e-3–8.4e-3 with
/// single pixels off by up to 0.032 (8 levels of 255). The per-tensor bound of
/// [`CUDA_BF16_TOLERANCE`] (2e-2) is for one forward; after 2–3 steps and a decoder, 5e-2 on
/// both rel_l2 and max_abs / max|ref| is the budget, still far below what a wrong step or layout
/// gives (rel_l2 of order 1).
pub const BF16_VIDEO_TOLERANCE: Tolerance = Tolerance { rel_l2: 5e-2, max_abs: None, max_abs_over_max_ref: Some(5e-2) };

/// Loads the case's transformer from its folder (as a diffusers `transformer/` folder) onto
/// `opts.backend` and runs it, on one device or sharded over `opts.ranks` ranks of this process,
/// connected in-process or by TCP on loopback (every rank's output is compared; on CUDA the ranks
/// share the GPU and stage their collectives through the transport). The bf16
/// backends are held to [`CUDA_BF16_TOLERANCE`], the f32 CPU to the case's own tolerance.
pub(super) fn run(case: &Case, opts: &RunOptions) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let hidden = read_tensor(&io, "hidden_states")?;
    // int64 in upstream's cases; the model casts timesteps to float.
    let (_, timesteps) = io.read_f32("timestep")?;
    let text = read_tensor(&io, "encoder_hidden_states")?;
    let image = if io.contains("encoder_hidden_states_image") { Some(read_tensor(&io, "encoder_hidden_states_image")?) } else { None };
    let inputs = DitInputs { hidden_states: &hidden, timesteps: &timesteps, encoder_hidden_states: &text, encoder_hidden_states_image: image.as_ref() };
    let sharded = opts.ranks > 1 || opts.ulysses > 1;
    let tolerance = opts.tolerance(&meta.tolerance);
    let model = DitModel::load_backend(&case.dir, opts.backend)?;
    if !sharded {
        let out = model.forward(&inputs)?;
        return Ok(outcome(vec![compare(&io, "output", &out, &tolerance)?]));
    }
    let plan = match ParallelPlan::new(opts.ranks, opts.ulysses, model.config().num_attention_heads) {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Unsupported(e.to_string())),
    };
    let outs = run_local_group(opts.transport, plan, |ctx| ctx.forward(&model, &inputs))?;
    let comparisons = outs
        .iter()
        .enumerate()
        .map(|(rank, out)| compare(&io, "output", out, &tolerance).map(|(n, c)| (format!("{n}@rank{rank}"), c)))
        .collect::<Result<Vec<_>>>()?;
    Ok(outcome(comparisons))
}
