//! VAE cases (`vae/*`): decode `latent` → `video` (clamped to [−1, 1]) and encode `video_in` →
//! `latent_mean`, `latent_logvar`; a case may hold either direction or both.

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome};
use crate::vae::WanVae;
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};

/// Loads the case's VAE from its folder (as a diffusers `vae/` folder) and runs every direction
/// whose inputs the case holds, comparing every output.
pub(super) fn run(case: &Case) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let vae = WanVae::load(&case.dir)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let mut comparisons = Vec::new();
    if io.contains("latent") {
        let video = vae.decode(&read_tensor(&io, "latent")?)?;
        comparisons.push(compare(&io, "video", &video, &meta.tolerance)?);
    }
    if io.contains("video_in") {
        let (mean, logvar) = vae.encode(&read_tensor(&io, "video_in")?)?;
        comparisons.push(compare(&io, "latent_mean", &mean, &meta.tolerance)?);
        comparisons.push(compare(&io, "latent_logvar", &logvar, &meta.tolerance)?);
    }
    if comparisons.is_empty() {
        return Err(WorkerError::MissingTensor { name: "latent or video_in".into(), source_desc: case.dir.join("io.safetensors").display().to_string() });
    }
    Ok(outcome(comparisons))
}
