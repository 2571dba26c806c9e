//! 3-D rotary position embedding (Wan 2.1): the head dimension is split into a frame, a row and
//! a column part, each rotated by its own axis position; channel pairs (2i, 2i+1) are interleaved.

use crate::multiversion;
use crate::{KernelError, Result};
use rayon::prelude::*;
use std::ops::Range;

/// The frequencies of a 3-D RoPE: for axis `a` of size `d_a`, ω_j = θ^(−2j/d_a).
#[derive(Clone, Debug)]
pub struct Rope3d {
    head_dim: usize,
    max_positions: usize,
    /// Per axis (frame, row, column): the frequency of each channel pair, in f64.
    freqs: [Vec<f64>; 3],
}

impl Rope3d {
    /// Wan's split: rows and columns get 2·⌊d/6⌋ channels each, frames the rest.
    /// Positions must stay below `max_positions` (the model's `rope_max_seq_len`).
    pub fn wan(head_dim: usize, max_positions: usize, theta: f64) -> Result<Self> {
        if !head_dim.is_multiple_of(2) || head_dim < 6 {
            return Err(KernelError::invalid("Rope3d", format!("head_dim {head_dim} must be even and at least 6")));
        }
        let hw = 2 * (head_dim / 6);
        let dims = [head_dim - 2 * hw, hw, hw];
        let freqs = dims.map(|d| (0..d / 2).map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64)).collect());
        Ok(Self { head_dim, max_positions, freqs })
    }

    /// Channel pairs per head.
    pub fn pairs(&self) -> usize {
        self.head_dim / 2
    }

    /// Cos/sin of every pair for the tokens `tokens` of the row-major (frames, rows, columns)
    /// `grid`; token `s` sits at (s / (H·W), (s / W) mod H, s mod W), its global position.
    pub fn table(&self, grid: [usize; 3], tokens: Range<usize>) -> Result<RopeTable> {
        let [f, h, w] = grid;
        let total = f * h * w;
        if tokens.end > total || tokens.start > tokens.end {
            return Err(KernelError::shape("Rope3d::table", format!("tokens {tokens:?} outside a grid of {total}")));
        }
        if let Some(&too_big) = grid.iter().find(|&&n| n > self.max_positions) {
            return Err(KernelError::invalid(
                "Rope3d::table",
                format!("grid {grid:?} has an axis of {too_big} positions; the model's rope_max_seq_len is {}", self.max_positions),
            ));
        }
        let pairs = self.pairs();
        let n = tokens.len();
        let mut cos = vec![0.0f32; n * pairs];
        let mut sin = vec![0.0f32; n * pairs];
        cos.par_chunks_mut(pairs).zip(sin.par_chunks_mut(pairs)).enumerate().for_each(|(i, (c, s))| {
            let t = tokens.start + i;
            let pos = [t / (h * w), (t / w) % h, t % w];
            let mut j = 0;
            for (axis, freqs) in self.freqs.iter().enumerate() {
                for &fr in freqs {
                    let angle = pos[axis] as f64 * fr;
                    c[j] = angle.cos() as f32;
                    s[j] = angle.sin() as f32;
                    j += 1;
                }
            }
        });
        Ok(RopeTable { cos, sin, pairs })
    }
}

/// Precomputed rotations for a run of tokens: `[tokens, pairs]` cosines and sines.
#[derive(Clone, Debug)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

multiversion! {
    fn rotate_row(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        for ((p, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (p[0], p[1]);
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

impl RopeTable {
    /// Cosines `[tokens, pairs]`, row-major.
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// Sines `[tokens, pairs]`, row-major.
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }

    /// Channel pairs per head (`head_dim / 2`).
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Number of tokens covered.
    pub fn tokens(&self) -> usize {
        self.cos.len() / self.pairs.max(1)
    }

    /// Rotates every head of every row of `x` (`[tokens, heads·2·pairs]`, rows `stride` apart) in place.
    pub fn apply(&self, x: &mut [f32], heads: usize, stride: usize) -> Result<()> {
        let d = 2 * self.pairs;
        let n = self.tokens();
        if stride < heads * d || (n > 0 && x.len() < (n - 1) * stride + heads * d) {
            return Err(KernelError::shape("RopeTable::apply", format!("x of {} elements, {n} tokens x {heads} heads x {d}, stride {stride}", x.len())));
        }
        x.par_chunks_mut(stride).take(n).enumerate().for_each(|(t, row)| {
            let (c, s) = (&self.cos[t * self.pairs..(t + 1) * self.pairs], &self.sin[t * self.pairs..(t + 1) * self.pairs]);
            for h in 0..heads {
                rotate_row(&mut row[h * d..(h + 1) * d], c, s);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_frequencies_follow_wan() {
        let r = Rope3d::wan(128, 1024, 10000.0).unwrap();
        assert_eq!(r.freqs.iter().map(|f| f.len()).collect::<Vec<_>>(), vec![22, 21, 21]);
        assert!((r.freqs[0][1] - 10000f64.powf(-2.0 / 44.0)).abs() < 1e-15);
        assert!((r.freqs[1][1] - 10000f64.powf(-2.0 / 42.0)).abs() < 1e-15);
        let r16 = Rope3d::wan(16, 32, 10000.0).unwrap();
        assert_eq!(r16.freqs.iter().map(|f| f.len()).collect::<Vec<_>>(), vec![4, 2, 2]);
    }

    #[test]
    fn rotation_uses_global_positions() {
        let r = Rope3d::wan(12, 64, 10000.0).unwrap();
        let grid = [3, 4, 5];
        let full = r.table(grid, 0..60).unwrap();
        let part = r.table(grid, 23..41).unwrap();
        assert_eq!(&full.cos[23 * 6..41 * 6], &part.cos[..]);
        // token 23 = frame 1, row 0, column 3: pair 0 is the frame axis, angle 1·ω_t0 = 1
        assert!((part.cos[0] - 1f32.cos()).abs() < 1e-7);
        let mut x: Vec<f32> = (0..18 * 2 * 12).map(|i| (i % 13) as f32 - 6.0).collect();
        let before: Vec<f32> = x.clone();
        part.apply(&mut x, 2, 24).unwrap();
        // rotations preserve the norm of every pair
        for (a, b) in x.chunks(2).zip(before.chunks(2)) {
            assert!(((a[0] * a[0] + a[1] * a[1]) - (b[0] * b[0] + b[1] * b[1])).abs() < 1e-3);
        }
        let (c, s) = (part.cos[0], part.sin[0]);
        assert!((x[0] - (before[0] * c - before[1] * s)).abs() < 1e-6);
        assert!((x[1] - (before[0] * s + before[1] * c)).abs() < 1e-6);
    }

    #[test]
    fn rejects_positions_past_the_table() {
        let r = Rope3d::wan(16, 8, 10000.0).unwrap();
        assert!(r.table([2, 9, 4], 0..10).is_err());
        assert!(r.table([2, 4, 4], 0..33).is_err());
    }
}
