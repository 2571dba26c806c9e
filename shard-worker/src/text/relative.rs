//! UMT5's relative positions: bidirectional relative-position buckets and the per-layer learned
//! bias they index (the attention itself is the backend's `biased_attention`).

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
}
