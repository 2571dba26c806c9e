//! VAE cases (`vae/*`): decode `latent` → `video` (clamped to [−1, 1]) and encode `video_in` →
//! `latent_mean`, `latent_logvar`; a case may hold either direction or both. With `--ranks`, both
//! run split by rows over that many ranks of this process (`WanVae::decode_split`,
//! `encode_split`).

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome, Ran, RunOptions, Tolerance};
use crate::parallel::{run_local_group, ParallelPlan};
use crate::vae::{SplitLatent, WanVae};
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};

/// The tolerance of VAE cases run in bf16 (`cuda`, `bf16-host`).
///
/// The error analysis. Each bf16 store adds a relative error of standard deviation 1.1e-3
/// (see [`super::CUDA_BF16_TOLERANCE`]); the decoder stores about 5 values per residual block
/// (two norms, two convolutions, the sum) and a few per resampler and attention block: about 90
/// stores along the path of the golden case's decoder, so rel_l2 ≈ 1.1e-3·√90 ≈ 1.0e-2 before
/// amplification. The channel norms amplify it (each divides by the RMS over few channels, and
/// SiLU and the clamp at ±1 shape the rest): measured, diffusers' own bf16 decoder lands at
/// rel_l2 2.7e-2 and max_abs / max|ref| 7.6e-2 from its f32 reference on `vae/decode-a`
/// (encoder: 1.3e-2 and 1.5e-2 on mean and log-variance), Tessera's bf16 data flow
/// (`bf16-host`) at 2.0e-2 and 5.9e-2. The bound is diffusers' bf16 error rounded up (3e-2,
/// 8e-2): a bf16 VAE at least as accurate as upstream's in the same precision, two orders of
/// magnitude below what a wrong layout or cache gives.
pub const BF16_VAE_TOLERANCE: Tolerance = Tolerance { rel_l2: 3e-2, max_abs: None, max_abs_over_max_ref: Some(8e-2) };

/// Loads the case's VAE from its folder (as a diffusers `vae/` folder) onto `opts.backend` and
/// runs every direction whose inputs the case holds, comparing every output (bf16 backends at
/// [`BF16_VAE_TOLERANCE`]); split over `opts.ranks` ranks when that is more than one.
pub(super) fn run(case: &Case, opts: &RunOptions, ran: &mut Ran) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let tolerance = opts.vae_tolerance(&meta.tolerance);
    let vae = WanVae::load_on(&case.dir, opts.backend)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let latent = io.contains("latent").then(|| read_tensor(&io, "latent")).transpose()?;
    let video_in = io.contains("video_in").then(|| read_tensor(&io, "video_in")).transpose()?;
    let (video, encoded) = if opts.ranks > 1 {
        let plan = ParallelPlan::new(opts.ranks, 1, 1)?;
        let mut outs = run_local_group(opts.transport, plan, |ctx| {
            let lead = ctx.rank() == 0;
            let mut pieces = Vec::new();
            if let Some(latent) = &latent {
                vae.decode_split(SplitLatent::Lead(lead.then_some(latent)), ctx.world(), &Ok, &mut |p| {
                    pieces.push(p);
                    Ok(())
                })?;
            }
            let encoded = match &video_in {
                Some(v) => vae.encode_split(lead.then_some(v), ctx.world())?,
                None => None,
            };
            Ok((pieces, encoded, ctx.world().stats().sent()))
        })?;
        *ran = Ran { ranks: plan.ranks(), moved: outs.iter().map(|o| o.2).sum() };
        let (pieces, encoded, _) = outs.swap_remove(0);
        (latent.is_some().then(|| crate::pipeline::concat_time(&pieces)).transpose()?, encoded)
    } else {
        (latent.as_ref().map(|l| vae.decode(l)).transpose()?, video_in.as_ref().map(|v| vae.encode(v)).transpose()?)
    };
    let mut comparisons = Vec::new();
    if let Some(video) = video {
        comparisons.push(compare(&io, "video", &video, &tolerance)?);
    }
    if let Some((mean, logvar)) = encoded {
        comparisons.push(compare(&io, "latent_mean", &mean, &tolerance)?);
        comparisons.push(compare(&io, "latent_logvar", &logvar, &tolerance)?);
    }
    if comparisons.is_empty() {
        return Err(WorkerError::MissingTensor { name: "latent or video_in".into(), source_desc: case.dir.join("io.safetensors").display().to_string() });
    }
    Ok(outcome(comparisons))
}
