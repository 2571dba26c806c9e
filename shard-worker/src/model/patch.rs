//! Cutting a latent video into spacetime patches (the tokens) and putting the model's per-patch
//! outputs back into a latent video.

use crate::{Result, WorkerError};
use std::ops::Range;

/// The patch grid of one latent video: (frames, rows, columns) in patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    /// Patches along time, rows and columns.
    pub dims: [usize; 3],
    /// Patch size along time, rows and columns.
    pub patch: [usize; 3],
}

impl PatchGrid {
    /// The grid of a latent `[frames, height, width]`; each must be a multiple of the patch size.
    pub fn new(latent_fhw: [usize; 3], patch: [usize; 3]) -> Result<Self> {
        let names = ["frames", "height", "width"];
        let mut dims = [0; 3];
        for i in 0..3 {
            if latent_fhw[i] == 0 || !latent_fhw[i].is_multiple_of(patch[i]) {
                return Err(WorkerError::input(
                    "hidden_states",
                    format!("latent {} {} is not a positive multiple of the patch size {}", names[i], latent_fhw[i], patch[i]),
                ));
            }
            dims[i] = latent_fhw[i] / patch[i];
        }
        Ok(Self { dims, patch })
    }

    /// Number of tokens, F'·H'·W'.
    pub fn tokens(&self) -> usize {
        self.dims.iter().product()
    }

    /// Latent extent `[frames, height, width]`.
    pub fn latent(&self) -> [usize; 3] {
        [self.dims[0] * self.patch[0], self.dims[1] * self.patch[1], self.dims[2] * self.patch[2]]
    }

    fn volume(&self) -> usize {
        self.patch.iter().product()
    }
}

/// Gathers the patches of tokens `tokens` from one latent `[C, F, H, W]`: row `i` holds token
/// `tokens.start + i`, features ordered (channel, p_t, p_h, p_w) like the patch-embedding Conv3d weight.
pub fn patchify(latent: &[f32], channels: usize, grid: &PatchGrid, tokens: Range<usize>) -> Vec<f32> {
    let [_, h2, w2] = grid.dims;
    let [pt, ph, pw] = grid.patch;
    let [fl, hl, wl] = grid.latent();
    let feat = channels * grid.volume();
    let mut out = vec![0.0f32; tokens.len() * feat];
    for (row, s) in tokens.enumerate() {
        let (f, h, w) = (s / (h2 * w2), (s / w2) % h2, s % w2);
        let dst = &mut out[row * feat..(row + 1) * feat];
        let mut j = 0;
        for c in 0..channels {
            for a in 0..pt {
                for b in 0..ph {
                    let base = ((c * fl + f * pt + a) * hl + h * ph + b) * wl + w * pw;
                    dst[j..j + pw].copy_from_slice(&latent[base..base + pw]);
                    j += pw;
                }
            }
        }
    }
    out
}

/// Scatters per-token outputs `[S, p_t·p_h·p_w·C]` (features ordered (p_t, p_h, p_w, channel))
/// of all tokens into a latent `[C, F, H, W]`.
pub fn unpatchify(tokens: &[f32], channels: usize, grid: &PatchGrid) -> Vec<f32> {
    let [_, h2, w2] = grid.dims;
    let [pt, ph, pw] = grid.patch;
    let [fl, hl, wl] = grid.latent();
    let feat = channels * grid.volume();
    let mut out = vec![0.0f32; channels * fl * hl * wl];
    for (s, src) in tokens.chunks_exact(feat).enumerate() {
        let (f, h, w) = (s / (h2 * w2), (s / w2) % h2, s % w2);
        for a in 0..pt {
            for b in 0..ph {
                for e in 0..pw {
                    let k = ((a * ph + b) * pw + e) * channels;
                    for c in 0..channels {
                        out[((c * fl + f * pt + a) * hl + h * ph + b) * wl + w * pw + e] = src[k + c];
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_requires_divisible_sizes() {
        assert!(PatchGrid::new([3, 7, 8], [1, 2, 2]).is_err());
        let g = PatchGrid::new([3, 6, 10], [1, 2, 2]).unwrap();
        assert_eq!(g.dims, [3, 3, 5]);
        assert_eq!(g.tokens(), 45);
    }

    #[test]
    fn patchify_ranges_and_round_trip() {
        let (c, grid) = (3, PatchGrid::new([2, 4, 6], [1, 2, 2]).unwrap());
        let latent: Vec<f32> = (0..c * 2 * 4 * 6).map(|i| i as f32).collect();
        let all = patchify(&latent, c, &grid, 0..grid.tokens());
        let part = patchify(&latent, c, &grid, 5..9);
        assert_eq!(&all[5 * 12..9 * 12], &part[..]);
        // token 0, channel 0: latent[0,0,0:2,0:2] = 0, 1, 6, 7
        assert_eq!(&all[..4], &[0.0, 1.0, 6.0, 7.0]);
        // reorder features (c, p) -> (p, c) and unpatchify: must give back the latent
        let mut swapped = vec![0.0; all.len()];
        for (t, row) in all.chunks(12).enumerate() {
            for ch in 0..c {
                for p in 0..4 {
                    swapped[t * 12 + p * c + ch] = row[ch * 4 + p];
                }
            }
        }
        assert_eq!(unpatchify(&swapped, c, &grid), latent);
    }
}
