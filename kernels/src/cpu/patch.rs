//! Spacetime patches: a latent video `[C, F, H, W]` cut into token rows, and per-token outputs put
//! back into a latent. Token `s` of the patch grid (F', H', W') sits at
//! (s / (H'·W'), (s / W') mod H', s mod W'); each patch is p_t × p_h × p_w latent cells.

use crate::{KernelError, Result};
use rayon::prelude::*;
use std::ops::Range;

/// The patch grid of a latent video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGeometry {
    /// Latent channels C.
    pub channels: usize,
    /// Patches along time, rows, columns (F', H', W').
    pub grid: [usize; 3],
    /// Patch size along time, rows, columns.
    pub patch: [usize; 3],
}

impl PatchGeometry {
    /// Number of tokens F'·H'·W'.
    pub fn tokens(&self) -> usize {
        self.grid.iter().product()
    }

    /// Features per token, C·p_t·p_h·p_w.
    pub fn features(&self) -> usize {
        self.channels * self.patch.iter().product::<usize>()
    }

    /// Latent extent `[F, H, W]`.
    pub fn latent_fhw(&self) -> [usize; 3] {
        [self.grid[0] * self.patch[0], self.grid[1] * self.patch[1], self.grid[2] * self.patch[2]]
    }

    /// Elements of the latent, C·F·H·W.
    pub fn latent_len(&self) -> usize {
        self.channels * self.latent_fhw().iter().product::<usize>()
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.channels == 0 || self.grid.contains(&0) || self.patch.contains(&0) {
            return Err(KernelError::invalid(op, format!("{self:?} has an empty dimension")));
        }
        Ok(())
    }
}

/// Rows for tokens `tokens` of `latent`: row `i` holds token `tokens.start + i`, features ordered
/// (channel, p_t, p_h, p_w), the order of the patch-embedding Conv3d weight.
pub fn patchify(latent: &[f32], g: &PatchGeometry, tokens: Range<usize>) -> Result<Vec<f32>> {
    if latent.len() != g.latent_len() {
        return Err(KernelError::shape("patchify", format!("latent of {} elements for {g:?}, tokens {tokens:?}", latent.len())));
    }
    patch_rows(g, tokens, |base, run| run.copy_from_slice(&latent[base..base + run.len()]))
}

/// The rows of tokens `tokens` of a latent of geometry `g` (as [`patchify`] lays them out), each
/// contiguous run of `p_w` values filled by `fill(index of its first element in the flattened
/// latent, run)`: the one walk of a token's patch, for a latent in memory or one drawn on the
/// fly (the initial noise).
pub fn patch_rows(g: &PatchGeometry, tokens: Range<usize>, fill: impl Fn(usize, &mut [f32]) + Sync) -> Result<Vec<f32>> {
    g.check("patchify")?;
    if tokens.start > tokens.end || tokens.end > g.tokens() {
        return Err(KernelError::shape("patchify", format!("tokens {tokens:?} of {g:?}")));
    }
    let [_, gh, gw] = g.grid;
    let [pt, ph, pw] = g.patch;
    let [fl, hl, wl] = g.latent_fhw();
    let feat = g.features();
    let mut out = vec![0.0f32; tokens.len() * feat];
    out.par_chunks_mut(feat).enumerate().for_each(|(row, dst)| {
        let s = tokens.start + row;
        let (f, h, w) = (s / (gh * gw), (s / gw) % gh, s % gw);
        let mut j = 0;
        for c in 0..g.channels {
            for a in 0..pt {
                for b in 0..ph {
                    fill(((c * fl + f * pt + a) * hl + h * ph + b) * wl + w * pw, &mut dst[j..j + pw]);
                    j += pw;
                }
            }
        }
    });
    Ok(out)
}

/// The latent `[C, F, H, W]` from all tokens' rows `[S, C·p_t·p_h·p_w]`, features ordered
/// (channel, p_t, p_h, p_w) as [`patchify`] writes them: its exact inverse. (The transformer's
/// output projection is loaded with its rows in this order: a token's velocity row lines up with
/// its patch row, element by element.)
pub fn unpatchify(rows: &[f32], g: &PatchGeometry) -> Result<Vec<f32>> {
    g.check("unpatchify")?;
    let feat = g.features();
    if rows.len() != g.tokens() * feat {
        return Err(KernelError::shape("unpatchify", format!("{} elements, {} tokens x {feat} features expected", rows.len(), g.tokens())));
    }
    let [_, gh, gw] = g.grid;
    let [pt, ph, pw] = g.patch;
    let [fl, hl, wl] = g.latent_fhw();
    let mut out = vec![0.0f32; g.latent_len()];
    // One latent frame-row (fixed channel, frame, latent row) per task: a gather from the rows.
    out.par_chunks_mut(wl).enumerate().for_each(|(line, dst)| {
        let (y, z, c) = (line % hl, (line / hl) % fl, line / (hl * fl));
        let (f, a, h, b) = (z / pt, z % pt, y / ph, y % ph);
        for (x, d) in dst.iter_mut().enumerate() {
            let (w, e) = (x / pw, x % pw);
            let s = (f * gh + h) * gw + w;
            *d = rows[s * feat + ((c * pt + a) * ph + b) * pw + e];
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_ranges_and_round_trip() {
        let g = PatchGeometry { channels: 3, grid: [2, 2, 3], patch: [1, 2, 2] };
        let latent: Vec<f32> = (0..g.latent_len()).map(|i| i as f32).collect();
        let all = patchify(&latent, &g, 0..g.tokens()).unwrap();
        let part = patchify(&latent, &g, 5..9).unwrap();
        assert_eq!(&all[5 * 12..9 * 12], &part[..]);
        // token 0, channel 0: latent[0, 0, 0:2, 0:2] = 0, 1, 6, 7 (W = 6)
        assert_eq!(&all[..4], &[0.0, 1.0, 6.0, 7.0]);
        // unpatchify is patchify's inverse
        assert_eq!(unpatchify(&all, &g).unwrap(), latent);
        assert!(patchify(&latent, &g, 0..13).is_err());
        assert!(unpatchify(&all[1..], &g).is_err());
    }

    #[test]
    fn temporal_patches_round_trip() {
        let g = PatchGeometry { channels: 2, grid: [2, 1, 2], patch: [2, 1, 3] };
        let latent: Vec<f32> = (0..g.latent_len()).map(|i| i as f32 * 0.5).collect();
        let rows = patchify(&latent, &g, 0..g.tokens()).unwrap();
        assert_eq!(unpatchify(&rows, &g).unwrap(), latent);
    }
}
