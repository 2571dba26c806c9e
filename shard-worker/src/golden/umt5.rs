//! Text-encoder cases (`umt5/*`): `input_ids` and `attention_mask` in, `last_hidden_state` out,
//! compared only on the rows where the mask is 1 (padding rows are not meaningful).

use super::{outcome, read_tensor, Case, CaseMeta, Comparison, Outcome, RunOptions};
use crate::text::Umt5EncoderModel;
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};

/// Loads the case's encoder from its folder (as a transformers `text_encoder/` folder) onto
/// `opts.backend`, runs transformers' forward on the padded batch with its mask, and compares the
/// unmasked rows (bf16 backends at the bf16 tolerance).
pub(super) fn run(case: &Case, opts: &RunOptions) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let model = Umt5EncoderModel::load_on(&case.dir, opts.backend)?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let (shape, ids) = io.read_i64("input_ids")?;
    let (mask_shape, mask) = io.read_i64("attention_mask")?;
    if shape.len() != 2 || mask_shape != shape {
        return Err(WorkerError::BadTensor {
            name: "attention_mask".into(),
            detail: format!("input_ids {shape:?} and attention_mask {mask_shape:?} must be the same [batch, len]"),
        });
    }
    let ids = ids
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| WorkerError::BadTensor { name: "input_ids".into(), detail: format!("token id {i} is not a valid id") }))
        .collect::<Result<Vec<_>>>()?;
    let keep: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    let got = model.forward(&ids, &keep, shape[0])?;
    let want = read_tensor(&io, "last_hidden_state")?;
    if want.shape() != got.shape() {
        return Err(WorkerError::BadTensor {
            name: "last_hidden_state".into(),
            detail: format!("reference shape {:?}, computed {:?}", want.shape(), got.shape()),
        });
    }
    let d = model.config().d_model;
    let kept_rows = |t: &[f32]| -> Vec<f32> { t.chunks_exact(d).zip(&keep).filter(|(_, &k)| k).flat_map(|(row, _)| row.iter().copied()).collect() };
    let comparison = Comparison::new(&kept_rows(got.data()), &kept_rows(want.data()), &opts.tolerance(&meta.tolerance));
    Ok(outcome(vec![("last_hidden_state[mask]".into(), comparison)]))
}
