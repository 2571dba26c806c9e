//! UMT5 self-attention: bidirectional relative-position buckets, the per-layer learned bias they
//! index, and attention `softmax(q·kᵀ + bias + mask)·v` without the 1/√d scaling.

use rayon::prelude::*;
use tessera_kernels::cpu::{gemm_into, MatRef, Threads};
use tessera_kernels::multiversion;
use tessera_kernels::simd::exp;

/// The bucket of relative position `rel = key_position − query_position` in a bidirectional
/// (encoder) T5 bias: half of the buckets for keys after the query, half for the rest; within a
/// half, distances below a quarter of `num_buckets` get a bucket each, and larger ones share
/// logarithmically wider buckets up to `max_distance`, past which everything is in the last one.
///
/// The logarithm is evaluated in f32 in upstream's order of operations, so that the distances
/// where it lands exactly on an integer (16, 32, 64 for the usual 32 buckets and 128) fall in
/// the same bucket as in transformers' `UMT5Attention._relative_position_bucket`. `num_buckets`
/// must be a multiple of 4 and `max_distance` above a quarter of it ([`super::Umt5Config`] checks).
pub(crate) fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let distance = rel.unsigned_abs();
    let max_exact = (half / 2) as u64;
    if distance < max_exact {
        return base + distance as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
    let scaled = log_ratio * (half as u64 - max_exact) as f32;
    // `scaled` ≥ 0 here; the float-to-int cast truncates like torch's `.to(torch.long)`.
    let large = (max_exact as usize + scaled as usize).min(half - 1);
    base + large
}

/// Buckets of every relative position `−(max_len−1) ..= max_len−1`, at index `rel + max_len − 1`.
pub(crate) fn bucket_table(max_len: usize, num_buckets: usize, max_distance: usize) -> Vec<usize> {
    let span = max_len as i64;
    (-(span - 1)..span).map(|rel| relative_position_bucket(rel, num_buckets, max_distance)).collect()
}

/// One layer's position bias per head over every relative position: `[heads, 2·max_len − 1]`,
/// from the learned table `relative_attention_bias.weight` `[num_buckets, heads]`.
pub(crate) fn bias_by_head(table: &[f32], heads: usize, buckets: &[usize]) -> Vec<f32> {
    let span = buckets.len();
    let mut out = vec![0.0f32; heads * span];
    for (h, row) in out.chunks_exact_mut(span).enumerate() {
        for (o, &b) in row.iter_mut().zip(buckets) {
            *o = table[b * heads + h];
        }
    }
    out
}

/// A run of consecutive token rows that attend to each other (one sequence of a batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
}

/// Geometry of [`biased_attention`]: `qkv` rows hold `[q | k | v]`, each `heads·d_kv` wide.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QkvLayout {
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub d_kv: usize,
}

impl QkvLayout {
    fn inner(&self) -> usize {
        self.heads * self.d_kv
    }
}

/// UMT5 attention over each segment separately: for head `h`, query `i` and key `j` of a
/// segment, the score is `q_i·k_j + bias[h][(j − i) + max_len − 1] + mask_add[j]` (no scaling),
/// softmax over `j` in f32, times `v`. `bias` is [`bias_by_head`]'s layout for `max_len`;
/// `mask_add` (per row of `qkv`) is 0 for keys to attend to and `f32::MIN` for masked keys, as
/// upstream adds `finfo.min`. Returns `[rows, heads·d_kv]`, token-major.
pub(crate) fn biased_attention(qkv: &[f32], layout: QkvLayout, segments: &[Segment], bias: &[f32], max_len: usize, mask_add: Option<&[f32]>) -> Vec<f32> {
    let (heads, dk, inner) = (layout.heads, layout.d_kv, layout.inner());
    let ld = 3 * inner;
    let rows: usize = segments.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    let span = 2 * max_len - 1;
    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..segments.len() * heads)
        .into_par_iter()
        .map(|task| {
            let (seg, h) = (segments[task / heads], task % heads);
            let n = seg.len;
            let mut scores = vec![0.0f32; n * n];
            let mut out = vec![0.0f32; n * dk];
            if n == 0 {
                return (seg.start, h, out);
            }
            let base = seg.start * ld + h * dk;
            let q = MatRef::row_major(&qkv[base..], n, dk, ld).expect("segment inside qkv");
            let kt = MatRef::transposed(&qkv[base + inner..], dk, n, ld).expect("segment inside qkv");
            gemm_into(&mut scores, n, false, q, kt, Threads::One).expect("tile shapes");
            let head_bias = &bias[h * span..(h + 1) * span];
            let zeros;
            let keys_add = match mask_add {
                Some(m) => &m[seg.start..seg.start + n],
                None => {
                    zeros = vec![0.0f32; n];
                    &zeros[..]
                }
            };
            for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                // Key j sits at relative position j − i: index j − i + max_len − 1.
                let offset = max_len - 1 - i;
                softmax_row(row, &head_bias[offset..offset + n], keys_add);
            }
            let p = MatRef::row_major(&scores, n, n, n).expect("tile view");
            let v = MatRef::row_major(&qkv[base + 2 * inner..], n, dk, ld).expect("segment inside qkv");
            gemm_into(&mut out, dk, false, p, v, Threads::One).expect("tile shapes");
            (seg.start, h, out)
        })
        .collect();
    let mut out = vec![0.0f32; rows * inner];
    for (start, h, tile) in tiles {
        for (r, src) in tile.chunks_exact(dk).enumerate() {
            let dst = (start + r) * inner + h * dk;
            out[dst..dst + dk].copy_from_slice(src);
        }
    }
    out
}

multiversion! {
    /// `row ← softmax(row + bias + mask_add)` (the additions in upstream's order).
    fn softmax_row(row: &mut [f32], bias: &[f32], mask_add: &[f32]) {
        let mut max = f32::NEG_INFINITY;
        for ((x, &b), &m) in row.iter_mut().zip(bias).zip(mask_add) {
            *x = (*x + b) + m;
            max = if *x > max { *x } else { max };
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the bucket changes, for 32 buckets and max distance 128, as computed by hand from
    /// the definition (and as transformers 5.24 gives): `(first relative position, bucket)`.
    const CHANGES: &[(i64, usize)] = &[
        (-600, 15),
        (-90, 14),
        (-63, 13),
        (-45, 12),
        (-31, 11),
        (-22, 10),
        (-15, 9),
        (-11, 8),
        (-7, 7),
        (-6, 6),
        (-5, 5),
        (-4, 4),
        (-3, 3),
        (-2, 2),
        (-1, 1),
        (0, 0),
        (1, 17),
        (2, 18),
        (3, 19),
        (4, 20),
        (5, 21),
        (6, 22),
        (7, 23),
        (8, 24),
        (12, 25),
        (16, 26),
        (23, 27),
        (32, 28),
        (46, 29),
        (64, 30),
        (91, 31),
    ];

    #[test]
    fn buckets_match_hand_computed_values() {
        // e.g. rel = 16: 8 + ⌊ln(16/8) / ln(128/8) · 8⌋ = 8 + ⌊2⌋ = 10, plus 16 for a later key.
        for rel in -600i64..=600 {
            let want = CHANGES.iter().rev().find(|(start, _)| *start <= rel).map(|c| c.1).unwrap();
            assert_eq!(relative_position_bucket(rel, 32, 128), want, "relative position {rel}");
        }
        // other geometries: 8 buckets (2 exact per side) and max distance 16
        assert_eq!(relative_position_bucket(1, 8, 16), 5);
        assert_eq!(relative_position_bucket(-3, 8, 16), 2); // 2 + ⌊ln(1.5)/ln(8)·2⌋ = 2
        assert_eq!(relative_position_bucket(-4, 8, 16), 2); // 2 + ⌊ln 2 / ln 8 · 2⌋ = 2 + ⌊0.67⌋
        assert_eq!(relative_position_bucket(-6, 8, 16), 3); // 2 + ⌊ln 3 / ln 8 · 2⌋ = 2 + ⌊1.06⌋
        assert_eq!(relative_position_bucket(100, 8, 16), 7);
    }

    #[test]
    fn bias_table_follows_relative_positions() {
        let heads = 2;
        let table: Vec<f32> = (0..32 * heads).map(|i| i as f32).collect();
        let buckets = bucket_table(3, 32, 128);
        assert_eq!(buckets, vec![2, 1, 0, 17, 18]);
        let bias = bias_by_head(&table, heads, &buckets);
        assert_eq!(&bias[..5], &[4.0, 2.0, 0.0, 34.0, 36.0]);
        assert_eq!(&bias[5..], &[5.0, 3.0, 1.0, 35.0, 37.0]);
    }

    /// Straightforward f64 reference of `biased_attention` for one segment.
    fn naive(qkv: &[f32], heads: usize, dk: usize, n: usize, bias: &[f32], max_len: usize, mask: &[bool]) -> Vec<f32> {
        let inner = heads * dk;
        let span = 2 * max_len - 1;
        let mut out = vec![0.0f32; n * inner];
        for h in 0..heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..dk).map(|c| qkv[i * 3 * inner + h * dk + c] as f64 * qkv[j * 3 * inner + inner + h * dk + c] as f64).sum();
                        let b = bias[h * span + (j + max_len - 1 - i)] as f64;
                        if mask[j] {
                            dot + b
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dk {
                    let v: f64 = (0..n).map(|j| e[j] / z * qkv[j * 3 * inner + 2 * inner + h * dk + c] as f64).sum();
                    out[i * inner + h * dk + c] = v as f32;
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_a_naive_reference_with_bias_and_mask() {
        let (heads, dk, n) = (3, 5, 13);
        let inner = heads * dk;
        let qkv: Vec<f32> = (0..n * 3 * inner).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0).collect();
        let table: Vec<f32> = (0..32 * heads).map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0).collect();
        let max_len = 16; // longer than the segment: the table is indexed from its middle
        let bias = bias_by_head(&table, heads, &bucket_table(max_len, 32, 128));
        let mask: Vec<bool> = (0..n).map(|j| j % 4 != 3).collect();
        let mask_add: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { f32::MIN }).collect();
        let layout = QkvLayout { heads, d_kv: dk };
        let got = biased_attention(&qkv, layout, &[Segment { start: 0, len: n }], &bias, max_len, Some(&mask_add));
        let want = naive(&qkv, heads, dk, n, &bias, max_len, &mask);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // two segments in one call equal each run alone
        let (a, b) = (6, n - 6);
        let both = biased_attention(&qkv, layout, &[Segment { start: 0, len: a }, Segment { start: a, len: b }], &bias, max_len, None);
        let first = biased_attention(&qkv[..a * 3 * inner], layout, &[Segment { start: 0, len: a }], &bias, max_len, None);
        let second = biased_attention(&qkv[a * 3 * inner..], layout, &[Segment { start: 0, len: b }], &bias, max_len, None);
        assert_eq!(&both[..a * inner], &first[..]);
        assert_eq!(&both[a * inner..], &second[..]);
    }
}
