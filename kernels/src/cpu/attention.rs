//! Scaled dot-product attention in tiles with an online softmax (flash-attention style): memory
//! stays O(tile) however long the sequence. Returns the output and the per-row log-sum-exp, and
//! merges partial results over disjoint key sets by their log-sum-exp (what ring attention needs).

use super::matmul::{gemm_into, MatRef, Threads};
use crate::multiversion;
use crate::simd::exp;
use crate::{KernelError, Result};
use rayon::prelude::*;

/// Query rows per tile (every tile packs the key and value blocks again, so fewer, taller tiles
/// pack less; 512 rows of f32 scores per key block stay within L2).
const BLOCK_Q: usize = 512;
/// Key rows per tile.
const BLOCK_K: usize = 512;

/// Geometry of one attention call. Queries, keys and values are token-major: row `i` of `q`
/// starts at `i·q_stride`, and head `h` occupies the `head_dim` elements from `h·head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Number of query rows.
    pub q_len: usize,
    /// Number of key/value rows.
    pub kv_len: usize,
    /// Elements between consecutive query rows (usually `heads·head_dim`).
    pub q_stride: usize,
    /// Elements between consecutive key rows and value rows.
    pub kv_stride: usize,
}

impl AttentionShape {
    /// Packed rows: both strides are `heads·head_dim`.
    pub fn packed(heads: usize, head_dim: usize, q_len: usize, kv_len: usize) -> Self {
        let d = heads * head_dim;
        Self { heads, head_dim, q_len, kv_len, q_stride: d, kv_stride: d }
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
        let hd = self.heads * self.head_dim;
        if self.head_dim == 0 || self.heads == 0 {
            return Err(KernelError::invalid("attention", "heads and head_dim must be positive"));
        }
        if self.q_stride < hd || self.kv_stride < hd {
            return Err(KernelError::shape("attention", format!("strides ({}, {}) shorter than heads·head_dim = {hd}", self.q_stride, self.kv_stride)));
        }
        let need = |rows: usize, stride: usize| if rows == 0 { 0 } else { (rows - 1) * stride + hd };
        for (name, buf, rows, stride) in [("q", q, self.q_len, self.q_stride), ("k", k, self.kv_len, self.kv_stride), ("v", v, self.kv_len, self.kv_stride)] {
            if buf.len() < need(rows, stride) {
                return Err(KernelError::shape("attention", format!("{name} has {} elements, needs {}", buf.len(), need(rows, stride))));
            }
        }
        Ok(())
    }
}

/// Output and log-sum-exp of an attention call.
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `[q_len, heads·head_dim]`, token-major.
    pub out: Vec<f32>,
    /// `[heads, q_len]`: ln Σ_j exp(scale·q·k_j) per head and query (−∞ when there are no keys).
    pub lse: Vec<f32>,
}

/// softmax(scale·q·kᵀ)·v for every head, computed tile by tile.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, scale: f32) -> Result<AttentionOutput> {
    shape.check(q, k, v)?;
    let AttentionShape { heads, head_dim: d, q_len, .. } = shape;
    let q_blocks = q_len.div_ceil(BLOCK_Q);
    let tiles: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..heads * q_blocks)
        .into_par_iter()
        .map(|task| {
            let (h, qb) = (task / q_blocks, task % q_blocks);
            let q0 = qb * BLOCK_Q;
            let rows = BLOCK_Q.min(q_len - q0);
            let (o, l) = attend_tile(q, k, v, &shape, scale, h, q0, rows);
            (h, q0, o, l)
        })
        .collect();
    let hd = heads * d;
    let mut out = vec![0.0f32; q_len * hd];
    let mut lse = vec![0.0f32; heads * q_len];
    for (h, q0, o, l) in tiles {
        for (r, orow) in o.chunks_exact(d).enumerate() {
            let base = (q0 + r) * hd + h * d;
            out[base..base + d].copy_from_slice(orow);
        }
        lse[h * q_len + q0..h * q_len + q0 + l.len()].copy_from_slice(&l);
    }
    Ok(AttentionOutput { out, lse })
}

/// One (head, query block) tile: loops over key blocks with the online softmax.
#[allow(clippy::too_many_arguments)]
fn attend_tile(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape, scale: f32, h: usize, q0: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let d = s.head_dim;
    let mut qt = vec![0.0f32; rows * d];
    for r in 0..rows {
        let src = &q[(q0 + r) * s.q_stride + h * d..][..d];
        for (dst, &x) in qt[r * d..(r + 1) * d].iter_mut().zip(src) {
            *dst = x * scale;
        }
    }
    let mut acc = vec![0.0f32; rows * d];
    let mut scores = vec![0.0f32; rows * BLOCK_K];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0.0f32; rows];
    let qm = MatRef::row_major(&qt, rows, d, d).expect("tile view");
    let mut k0 = 0;
    while k0 < s.kv_len {
        let nk = BLOCK_K.min(s.kv_len - k0);
        let kbase = k0 * s.kv_stride + h * d;
        // scores[rows, nk] = qt · K_blockᵀ
        let kt = MatRef::transposed(&k[kbase..], d, nk, s.kv_stride).expect("checked extent");
        gemm_into(&mut scores, BLOCK_K, false, qm, kt, Threads::One).expect("tile shapes");
        online_softmax_block(&mut scores, BLOCK_K, rows, nk, &mut row_max, &mut row_sum, &mut acc, d);
        // acc[rows, d] += P · V_block
        let pm = MatRef::row_major(&scores, rows, nk, BLOCK_K).expect("tile view");
        let vm = MatRef::row_major(&v[kbase..], nk, d, s.kv_stride).expect("checked extent");
        gemm_into(&mut acc, d, true, pm, vm, Threads::One).expect("tile shapes");
        k0 += nk;
    }
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for r in 0..rows {
        if row_sum[r] > 0.0 {
            let inv = 1.0 / row_sum[r];
            acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[r] = row_max[r] + row_sum[r].ln();
        }
    }
    (acc, lse)
}

multiversion! {
    /// Turns a block of scores into probabilities relative to the running row maximum, and
    /// rescales the running sums and accumulators when the maximum moves.
    #[allow(clippy::too_many_arguments)]
    fn online_softmax_block(scores: &mut [f32], ld: usize, rows: usize, nk: usize, row_max: &mut [f32], row_sum: &mut [f32], acc: &mut [f32], d: usize) {
        for r in 0..rows {
            let row = &mut scores[r * ld..r * ld + nk];
            let new_max = row_max[r].max(lanes_max(row));
            if new_max == f32::NEG_INFINITY {
                row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let sum = exp_sub_in_place(row, new_max);
            let corr = exp(row_max[r] - new_max);
            if corr != 1.0 {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
            }
            row_sum[r] = row_sum[r] * corr + sum;
            row_max[r] = new_max;
        }
    }
}

/// Lanes for reductions: independent accumulators let the compiler keep them in one vector
/// register (a single running f32 sum or max cannot be reordered, so it would stay scalar).
const LANES: usize = 16;

#[inline(always)]
fn lanes_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m.iter().fold(tail, |a, &b| a.max(b))
}

/// `x ← exp(x − m)` for the whole row; returns the sum of the new values.
#[inline(always)]
fn exp_sub_in_place(row: &mut [f32], m: f32) -> f32 {
    let mut s = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let p = exp(c[i] - m);
            c[i] = p;
            s[i] += p;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        tail += *x;
    }
    s.iter().sum::<f32>() + tail
}

/// Merges the partial result `(out_b, lse_b)` of attention over one key set into `(out_a, lse_a)`
/// over a disjoint key set, so that `a` becomes attention over their union. Layouts as returned by
/// [`attention`]: out `[q_len, heads·head_dim]`, lse `[heads, q_len]`.
pub fn merge_partials(out_a: &mut [f32], lse_a: &mut [f32], out_b: &[f32], lse_b: &[f32], heads: usize, head_dim: usize) -> Result<()> {
    let hd = heads * head_dim;
    if hd == 0 || out_a.len() != out_b.len() || lse_a.len() != lse_b.len() || !out_a.len().is_multiple_of(hd) || lse_a.len() * head_dim != out_a.len() {
        return Err(KernelError::shape(
            "merge_partials",
            format!("out {} / {}, lse {} / {}, heads {heads} x {head_dim}", out_a.len(), out_b.len(), lse_a.len(), lse_b.len()),
        ));
    }
    let q_len = out_a.len() / hd;
    out_a.par_chunks_mut(hd).enumerate().for_each(|(i, row_a)| {
        let row_b = &out_b[i * hd..(i + 1) * hd];
        for h in 0..heads {
            let (la, lb) = (lse_a[h * q_len + i], lse_b[h * q_len + i]);
            let m = la.max(lb);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (wa, wb) = (exp(la - m), exp(lb - m));
            let inv = 1.0 / (wa + wb);
            let (wa, wb) = (wa * inv, wb * inv);
            for c in h * head_dim..(h + 1) * head_dim {
                row_a[c] = row_a[c] * wa + row_b[c] * wb;
            }
        }
    });
    for (la, &lb) in lse_a.iter_mut().zip(lse_b) {
        let m = la.max(lb);
        if m != f32::NEG_INFINITY {
            *la = m + (exp(*la - m) + exp(lb - m)).ln();
        }
    }
    Ok(())
}

/// Plain attention with the full score matrix in f64: the test oracle.
#[cfg(test)]
pub(crate) fn attention_naive(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let d = s.head_dim;
    let mut out = vec![0.0f32; s.q_len * s.heads * d];
    let mut lse = vec![0.0f32; s.heads * s.q_len];
    for h in 0..s.heads {
        for i in 0..s.q_len {
            let qi = &q[i * s.q_stride + h * d..][..d];
            let logits: Vec<f64> = (0..s.kv_len)
                .map(|j| qi.iter().zip(&k[j * s.kv_stride + h * d..][..d]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|&x| (x - m).exp()).sum();
            lse[h * s.q_len + i] = (m + z.ln()) as f32;
            for c in 0..d {
                let acc: f64 = (0..s.kv_len).map(|j| (logits[j] - m).exp() / z * v[j * s.kv_stride + h * d + c] as f64).sum();
                out[i * s.heads * d + h * d + c] = acc as f32;
            }
        }
    }
    (out, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-amp..amp)).collect()
    }

    #[test]
    fn tiled_matches_naive_with_tails() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(heads, d, ql, kl) in &[(1, 8, 1, 1), (2, 16, 65, 300), (3, 24, 130, 513), (1, 128, 70, 257), (2, 16, 600, 70)] {
            let s = AttentionShape::packed(heads, d, ql, kl);
            let q = rand_vec(&mut rng, ql * heads * d, 2.0);
            let k = rand_vec(&mut rng, kl * heads * d, 2.0);
            let v = rand_vec(&mut rng, kl * heads * d, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            let got = attention(&q, &k, &v, s, scale).unwrap();
            let (out, lse) = attention_naive(&q, &k, &v, s, scale);
            for (a, b) in got.out.iter().zip(&out) {
                assert!((a - b).abs() < 2e-5, "{heads}x{d} {ql}/{kl}: {a} vs {b}");
            }
            for (a, b) in got.lse.iter().zip(&lse) {
                assert!((a - b).abs() < 2e-5 * (1.0 + b.abs()), "lse {a} vs {b}");
            }
        }
    }

    #[test]
    fn strided_rows_are_respected() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (heads, d, n) = (2, 16, 40);
        // q, k, v interleaved in one buffer of stride 3·heads·d, as a fused QKV projection gives.
        let hd = heads * d;
        let qkv = rand_vec(&mut rng, n * 3 * hd, 1.0);
        let s = AttentionShape { heads, head_dim: d, q_len: n, kv_len: n, q_stride: 3 * hd, kv_stride: 3 * hd };
        let got = attention(&qkv, &qkv[hd..], &qkv[2 * hd..], s, 0.25).unwrap();
        let (out, _) = attention_naive(&qkv, &qkv[hd..], &qkv[2 * hd..], s, 0.25);
        for (a, b) in got.out.iter().zip(&out) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn merging_two_halves_equals_attention_over_all_keys() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (heads, d, ql, kl) = (2, 16, 33, 91);
        let q = rand_vec(&mut rng, ql * heads * d, 2.0);
        let k = rand_vec(&mut rng, kl * heads * d, 2.0);
        let v = rand_vec(&mut rng, kl * heads * d, 1.0);
        let full = attention(&q, &k, &v, AttentionShape::packed(heads, d, ql, kl), 0.3).unwrap();
        let split = 40 * heads * d;
        let mut a = attention(&q, &k[..split], &v[..split], AttentionShape::packed(heads, d, ql, 40), 0.3).unwrap();
        let b = attention(&q, &k[split..], &v[split..], AttentionShape::packed(heads, d, ql, kl - 40), 0.3).unwrap();
        merge_partials(&mut a.out, &mut a.lse, &b.out, &b.lse, heads, d).unwrap();
        for (x, y) in a.out.iter().zip(&full.out) {
            assert!((x - y).abs() < 1e-5);
        }
        for (x, y) in a.lse.iter().zip(&full.lse) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()));
        }
    }

    #[test]
    fn no_keys_gives_zero_output_and_neg_inf_lse() {
        let s = AttentionShape::packed(1, 4, 2, 0);
        let got = attention(&[1.0; 8], &[], &[], s, 1.0).unwrap();
        assert!(got.out.iter().all(|&x| x == 0.0));
        assert!(got.lse.iter().all(|&x| x == f32::NEG_INFINITY));
        // merging an empty partial leaves the other unchanged
        let mut a = got.clone();
        let b = attention(&[1.0; 8], &[0.5; 4], &[2.0; 4], AttentionShape::packed(1, 4, 2, 1), 1.0).unwrap();
        merge_partials(&mut a.out, &mut a.lse, &b.out, &b.lse, 1, 4).unwrap();
        assert_eq!(a.out, b.out);
        assert_eq!(a.lse, b.lse);
    }

    #[test]
    fn rejects_short_buffers() {
        let s = AttentionShape::packed(2, 8, 4, 4);
        assert!(attention(&[0.0; 63], &[0.0; 64], &[0.0; 64], s, 1.0).is_err());
        assert!(attention(&[0.0; 64], &[0.0; 64], &[0.0; 10], s, 1.0).is_err());
    }
}
