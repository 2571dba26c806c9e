//! Image-encoder cases (`clip/*`): the processor from `image` to `pixel_values` (held to the
//! case's `tolerance_pixel_values`), then the vision tower from the stored `pixel_values` to every
//! layer's `hidden_states` and the `image_embeds` Wan uses (held to the case's tolerance, or the
//! bf16 one on a bf16 backend).

use super::{compare, outcome, read_tensor, Case, CaseMeta, Outcome, RunOptions, Tolerance};
use crate::image::{ImageEncoder, RgbImage};
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};

/// `case.json`'s second tolerance: the processor's output, which PIL's 8-bit resize makes exact
/// only to a level or two of 255 where another resize is used.
#[derive(serde::Deserialize)]
struct PixelTolerance {
    tolerance_pixel_values: Tolerance,
}

/// Reads the case's `image` `[H, W, 3]` uint8.
pub(crate) fn read_image(io: &SafetensorsFile, name: &str) -> Result<RgbImage> {
    let (shape, data) = io.read_u8(name)?;
    match shape[..] {
        [h, w, 3] => RgbImage::new(h, w, data),
        _ => Err(WorkerError::BadTensor { name: name.into(), detail: format!("expected [H, W, 3] uint8, got {shape:?}") }),
    }
}

/// Loads the case folder as an `image_encoder/` (config, weights) with its processor config on
/// `opts.backend`, and compares the processor's output and the tower's.
pub(super) fn run(case: &Case, opts: &RunOptions) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let path = case.dir.join("case.json");
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    let pixel_tol: PixelTolerance = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
    let encoder = ImageEncoder::load_on(&case.dir, &case.dir, opts.backend)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let image = read_image(&io, "image")?;
    let tol = opts.tolerance(&meta.tolerance);
    let mut comparisons = vec![compare(&io, "pixel_values", &encoder.pixel_values(&image)?, &pixel_tol.tolerance_pixel_values)?];
    let pixel_values = read_tensor(&io, "pixel_values")?;
    comparisons.push(compare(&io, "hidden_states", &encoder.model().hidden_states(&pixel_values)?, &tol)?);
    comparisons.push(compare(&io, "image_embeds", &encoder.model().image_embeds(&pixel_values)?, &tol)?);
    Ok(outcome(comparisons))
}
