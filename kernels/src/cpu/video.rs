//! The VAE's layout operations on channel-major frames `[C, T, H, W]` in f32: the RMS norm over
//! channels (`WanRMS_norm`, optionally followed by SiLU), nearest ×2 upsampling of frame planes,
//! and the 2-D transpose between channel-major and position-major rows. CPU twins of
//! `cuda::video`.

use crate::multiversion;
use crate::simd::sigmoid;
use crate::{KernelError, Result};
use rayon::prelude::*;

/// Positions per parallel task of the norm's reduction.
const NORM_CHUNK: usize = 2048;

multiversion! {
    fn add_squares(acc: &mut [f32], x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v * v;
        }
    }
}

multiversion! {
    fn scale_row(row: &mut [f32], inv: &[f32], g: f32) {
        for (v, &s) in row.iter_mut().zip(inv) {
            *v *= s * g;
        }
    }
}

multiversion! {
    fn scale_row_silu(row: &mut [f32], inv: &[f32], g: f32) {
        for (v, &s) in row.iter_mut().zip(inv) {
            let y = *v * (s * g);
            *v = y * sigmoid(y);
        }
    }
}

/// `F.normalize(x, dim=channels)·√C·γ`, then SiLU when `silu` is set, in place on the
/// channel-major `x` `[C, positions]`: per position, each channel is multiplied by
/// `√C / max(‖x[:, p]‖₂, 1e-12)` and by its `γ`. The squares are summed over channels in order,
/// in f32.
pub fn channel_rms_norm(x: &mut [f32], positions: usize, gamma: &[f32], silu: bool) -> Result<()> {
    let c = gamma.len();
    if x.len() != c * positions {
        return Err(KernelError::shape("channel_rms_norm", format!("{} values are not {c} channels of {positions} positions", x.len())));
    }
    if positions == 0 || c == 0 {
        return Ok(());
    }
    let scale = (c as f32).sqrt();
    let data = &*x;
    let mut inv = vec![0.0f32; positions];
    inv.par_chunks_mut(NORM_CHUNK).enumerate().for_each(|(i, out)| {
        let start = i * NORM_CHUNK;
        for row in data.chunks_exact(positions) {
            add_squares(out, &row[start..start + out.len()]);
        }
        for v in out.iter_mut() {
            *v = scale / v.sqrt().max(1e-12);
        }
    });
    x.par_chunks_mut(positions).zip(gamma.par_iter()).for_each(|(row, &g)| {
        if silu {
            scale_row_silu(row, &inv, g);
        } else {
            scale_row(row, &inv, g);
        }
    });
    Ok(())
}

/// Each of the `planes` `h × w` planes of `x`, repeated ×2 in height and width (nearest; equals
/// PyTorch's `nearest-exact` at ×2) into `out` (`planes` planes of `2h × 2w`).
pub fn upsample_nearest2x<T: Copy + Send + Sync>(x: &[T], planes: usize, h: usize, w: usize, out: &mut [T]) -> Result<()> {
    let plane = h * w;
    if x.len() != planes * plane || out.len() != 4 * planes * plane {
        return Err(KernelError::shape("upsample_nearest2x", format!("{} in, {} out for {planes} planes of {h}x{w}", x.len(), out.len())));
    }
    if plane == 0 {
        return Ok(());
    }
    out.par_chunks_mut(4 * plane).zip(x.par_chunks(plane)).for_each(|(dst, src)| {
        for (r, row) in src.chunks_exact(w).enumerate() {
            let (top, bottom) = dst[4 * r * w..4 * (r + 1) * w].split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                pair[0] = v;
                pair[1] = v;
            }
            bottom.copy_from_slice(top);
        }
    });
    Ok(())
}

/// Rows per transposed block: 32 × 32 elements stay in L1 on both sides.
const BLOCK: usize = 32;

/// `out[j, i] = x[i, j]` for `x` `[rows, cols]` (both packed).
pub fn transpose<T: Copy + Send + Sync>(x: &[T], rows: usize, cols: usize, out: &mut [T]) -> Result<()> {
    if x.len() != rows * cols || out.len() != rows * cols {
        return Err(KernelError::shape("transpose", format!("{} in, {} out for [{rows}, {cols}]", x.len(), out.len())));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Each task writes BLOCK whole output rows (input columns j0..j0 + BLOCK).
    out.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, dst)| {
        let j0 = b * BLOCK;
        let nj = dst.len() / rows;
        for i0 in (0..rows).step_by(BLOCK) {
            for i in i0..(i0 + BLOCK).min(rows) {
                let src = &x[i * cols + j0..i * cols + j0 + nj];
                for (dj, &v) in src.iter().enumerate() {
                    dst[dj * rows + i] = v;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_matches_the_formula() {
        let (c, p) = (3, 5);
        let x: Vec<f32> = (0..c * p).map(|i| (i as f32 * 0.7).sin()).collect();
        let gamma = [0.5f32, 1.0, 2.0];
        for silu in [false, true] {
            let mut y = x.clone();
            channel_rms_norm(&mut y, p, &gamma, silu).unwrap();
            for pos in 0..p {
                let norm = (0..c).map(|ch| x[ch * p + pos].powi(2)).sum::<f32>().sqrt();
                for ch in 0..c {
                    let mut want = x[ch * p + pos] / norm * (c as f32).sqrt() * gamma[ch];
                    if silu {
                        want /= 1.0 + (-want).exp();
                    }
                    assert!((y[ch * p + pos] - want).abs() < 1e-5, "{silu} {pos} {ch}");
                }
            }
        }
        // A zero position stays zero (the 1e-12 floor), and shapes are checked.
        let mut z = vec![0.0f32; 6];
        channel_rms_norm(&mut z, 2, &gamma, true).unwrap();
        assert!(z.iter().all(|&v| v == 0.0));
        assert!(channel_rms_norm(&mut z, 3, &gamma, false).is_err());
    }

    #[test]
    fn upsample_and_transpose() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut up = [0.0f32; 32];
        upsample_nearest2x(&x, 2, 1, 4, &mut up).unwrap();
        assert_eq!(&up[..16], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);
        assert_eq!(&up[16..20], &[5.0, 5.0, 6.0, 6.0]);
        assert!(upsample_nearest2x(&x, 2, 2, 2, &mut up[..31]).is_err());
        let (rows, cols) = (37, 70);
        let m: Vec<u32> = (0..rows * cols).map(|i| i as u32).collect();
        let mut t = vec![0u32; rows * cols];
        transpose(&m, rows, cols, &mut t).unwrap();
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(t[j * rows + i], m[i * cols + j]);
            }
        }
        let mut back = vec![0u32; rows * cols];
        transpose(&t, cols, rows, &mut back).unwrap();
        assert_eq!(back, m);
    }
}
