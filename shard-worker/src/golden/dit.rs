//! Transformer cases (`dit/*`): `hidden_states`, `timestep`, `encoder_hidden_states` and, for
//! image-to-video, `encoder_hidden_states_image` in; `output` out.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome, RunOptions};
use crate::model::WanTransformer;
use crate::parallel::{run_local_group, ParallelPlan};
use crate::weights::SafetensorsFile;
use crate::{DitInputs, Result};

/// Loads the case's transformer from its folder (as a diffusers `transformer/` folder) and runs it,
/// on one device or sharded over `opts.ranks` ranks of this process, connected in-process or by
/// TCP on loopback (every rank's output is compared).
pub(super) fn run(case: &Case, opts: &RunOptions) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let model = WanTransformer::load(&case.dir)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let hidden = read_tensor(&io, "hidden_states")?;
    // int64 in upstream's cases; the model casts timesteps to float.
    let (_, timesteps) = io.read_f32("timestep")?;
    let text = read_tensor(&io, "encoder_hidden_states")?;
    let image = if io.contains("encoder_hidden_states_image") { Some(read_tensor(&io, "encoder_hidden_states_image")?) } else { None };
    let inputs = DitInputs { hidden_states: &hidden, timesteps: &timesteps, encoder_hidden_states: &text, encoder_hidden_states_image: image.as_ref() };
    if opts.ranks <= 1 && opts.ulysses <= 1 {
        let out = model.forward(&inputs)?;
        return Ok(outcome(vec![compare(&io, "output", &out, &meta.tolerance)?]));
    }
    let plan = match ParallelPlan::new(opts.ranks, opts.ulysses, model.config().num_attention_heads) {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Unsupported(e.to_string())),
    };
    let outs = run_local_group(opts.transport, plan, |ctx| ctx.forward(&model, &inputs))?;
    let comparisons = outs
        .iter()
        .enumerate()
        .map(|(rank, out)| compare(&io, "output", out, &meta.tolerance).map(|(n, c)| (format!("{n}@rank{rank}"), c)))
        .collect::<Result<Vec<_>>>()?;
    Ok(outcome(comparisons))
}
