//! Attention with an additive bias that depends on the distance between query and key, and an
//! additive per-key mask: `softmax(scale·q·kᵀ + rel[h, j − i + q_len − 1] + key_add[j])·v`. T5's
//! relative-position attention (UMT5 uses scale 1). One (head) task per thread, each two GEMMs
//! around a row softmax; the score matrix of a head is `q_len × kv_len`, which is small for text
//! encoders (≤ 512 tokens). The CPU twin of the CUDA `biased_attention` kernel.

use super::attention::AttentionShape;
use super::matmul::{gemm_into, MatRef, Threads};
use crate::simd::exp;
use crate::{multiversion, KernelError, Result};
use rayon::prelude::*;

/// The bias of one call: head `h`'s biases start at `h·pitch` in `table`, and the bias of query
/// `i` and key `j` is `table[h·pitch + j + q_len − 1 − i]` (so a head's row spans
/// `q_len + kv_len − 1` values).
#[derive(Clone, Copy, Debug)]
pub struct RelativeBias<'a> {
    /// The biases.
    pub table: &'a [f32],
    /// Values between heads.
    pub pitch: usize,
}

/// `softmax(scale·q·kᵀ + bias + key_add)·v` for every head: returns `[q_len, heads·head_dim]`
/// packed. `key_add` (one value per key row: 0 to attend, a large negative value to mask) is
/// added to every query's scores. q, k and v rows lie `shape`'s strides apart.
pub fn biased_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    bias: RelativeBias<'_>,
    key_add: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let AttentionShape { heads, head_dim: dk, q_len, kv_len, q_stride, kv_stride } = shape;
    let hd = heads * dk;
    let need = |rows: usize, stride: usize| if rows == 0 { 0 } else { (rows - 1) * stride + hd };
    let span = (q_len + kv_len).saturating_sub(1);
    if q.len() < need(q_len, q_stride) || k.len() < need(kv_len, kv_stride) || v.len() < need(kv_len, kv_stride) || q_stride < hd || kv_stride < hd {
        return Err(KernelError::shape("biased_attention", format!("q/k/v of {}/{}/{} values for {shape:?}", q.len(), k.len(), v.len())));
    }
    if heads > 0 && span > 0 && bias.table.len() < (heads - 1) * bias.pitch + span {
        return Err(KernelError::shape(
            "biased_attention",
            format!("bias table of {} values, {heads} heads {} apart spanning {span}", bias.table.len(), bias.pitch),
        ));
    }
    if key_add.is_some_and(|m| m.len() != kv_len) {
        return Err(KernelError::shape("biased_attention", format!("key mask of {} values for {kv_len} keys", key_add.map_or(0, <[f32]>::len))));
    }
    let mut out = vec![0.0f32; q_len * hd];
    if q_len == 0 || heads == 0 {
        return Ok(out);
    }
    let tiles: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| -> Result<Vec<f32>> {
            let mut scores = vec![0.0f32; q_len * kv_len];
            let mut tile = vec![0.0f32; q_len * dk];
            if kv_len == 0 {
                return Ok(tile);
            }
            let qh = MatRef::row_major(&q[h * dk..], q_len, dk, q_stride)?;
            let kt = MatRef::transposed(&k[h * dk..], dk, kv_len, kv_stride)?;
            gemm_into(&mut scores, kv_len, false, qh, kt, Threads::One)?;
            let row_bias = &bias.table[h * bias.pitch..h * bias.pitch + span];
            for (i, row) in scores.chunks_exact_mut(kv_len).enumerate() {
                let start = q_len - 1 - i;
                softmax_row(row, scale, &row_bias[start..start + kv_len], key_add);
            }
            let p = MatRef::row_major(&scores, q_len, kv_len, kv_len)?;
            let vh = MatRef::row_major(&v[h * dk..], kv_len, dk, kv_stride)?;
            gemm_into(&mut tile, dk, false, p, vh, Threads::One)?;
            Ok(tile)
        })
        .collect::<Result<_>>()?;
    for (h, tile) in tiles.iter().enumerate() {
        for (row, src) in out.chunks_exact_mut(hd).zip(tile.chunks_exact(dk)) {
            row[h * dk..(h + 1) * dk].copy_from_slice(src);
        }
    }
    Ok(out)
}

/// `row ← softmax(scale·row + bias + key_add)` in place (f32 throughout).
fn softmax_row(row: &mut [f32], scale: f32, bias: &[f32], key_add: Option<&[f32]>) {
    match key_add {
        Some(m) => softmax_masked(row, scale, bias, m),
        None => softmax_plain(row, scale, bias),
    }
}

multiversion! {
    fn softmax_masked(row: &mut [f32], scale: f32, bias: &[f32], key_add: &[f32]) {
        let mut max = f32::NEG_INFINITY;
        for ((x, &b), &m) in row.iter_mut().zip(bias).zip(key_add) {
            *x = (*x * scale + b) + m;
            max = if *x > max { *x } else { max };
        }
        normalise(row, max);
    }
}

multiversion! {
    fn softmax_plain(row: &mut [f32], scale: f32, bias: &[f32]) {
        let mut max = f32::NEG_INFINITY;
        for (x, &b) in row.iter_mut().zip(bias) {
            *x = *x * scale + b;
            max = if *x > max { *x } else { max };
        }
        normalise(row, max);
    }
}

/// `row ← exp(row − max) / Σ exp(row − max)`.
#[inline(always)]
fn normalise(row: &mut [f32], max: f32) {
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight from the definition, in f64.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32, bias: RelativeBias<'_>, key_add: Option<&[f32]>) -> Vec<f64> {
        let hd = s.heads * s.head_dim;
        let mut out = vec![0.0f64; s.q_len * hd];
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let logits: Vec<f64> = (0..s.kv_len)
                    .map(|j| {
                        let dot: f64 =
                            (0..s.head_dim).map(|c| q[i * s.q_stride + h * s.head_dim + c] as f64 * k[j * s.kv_stride + h * s.head_dim + c] as f64).sum();
                        dot * scale as f64 + bias.table[h * bias.pitch + j + s.q_len - 1 - i] as f64 + key_add.map_or(0.0, |m| m[j] as f64)
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = w.iter().sum();
                for c in 0..s.head_dim {
                    out[i * hd + h * s.head_dim + c] = (0..s.kv_len).map(|j| w[j] / sum * v[j * s.kv_stride + h * s.head_dim + c] as f64).sum();
                }
            }
        }
        out
    }

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104729) % 1000) as f32 / 500.0) - 1.0).collect()
    }

    #[test]
    fn matches_the_definition_with_strides_pitch_and_mask() {
        // 3 heads of 8 in a fused [q | k | v] buffer; 5 queries over 7 keys; bias rows 4 apart
        // wider than their 11-value span; the last two keys masked.
        let (heads, dk, nq, nk) = (3, 8, 5, 7);
        let hd = heads * dk;
        let qkv = values(nk * 3 * hd, 1);
        let shape = AttentionShape { heads, head_dim: dk, q_len: nq, kv_len: nk, q_stride: 3 * hd, kv_stride: 3 * hd };
        let table = values(heads * 15, 2);
        let bias = RelativeBias { table: &table, pitch: 15 };
        let mask: Vec<f32> = (0..nk).map(|j| if j >= 5 { f32::MIN } else { 0.0 }).collect();
        for (scale, key_add) in [(1.0, None), (0.3, Some(&mask[..]))] {
            let got = biased_attention(&qkv, &qkv[hd..], &qkv[2 * hd..], shape, scale, bias, key_add).unwrap();
            let want = naive(&qkv, &qkv[hd..], &qkv[2 * hd..], shape, scale, bias, key_add);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn short_operands_are_errors() {
        let shape = AttentionShape::packed(2, 4, 3, 3);
        let x = values(24, 3);
        let table = values(10, 4);
        assert!(biased_attention(&x, &x, &x, shape, 1.0, RelativeBias { table: &table, pitch: 5 }, None).is_ok());
        assert!(biased_attention(&x[1..], &x, &x, shape, 1.0, RelativeBias { table: &table, pitch: 5 }, None).is_err());
        assert!(biased_attention(&x, &x, &x, shape, 1.0, RelativeBias { table: &table, pitch: 6 }, None).is_err());
        assert!(biased_attention(&x, &x, &x, shape, 1.0, RelativeBias { table: &table, pitch: 5 }, Some(&[0.0; 2])).is_err());
    }
}
