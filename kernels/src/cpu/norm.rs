//! LayerNorm (with or without affine, with adaLN modulation) and RMSNorm, per row.

use crate::multiversion;
use crate::{KernelError, Result};
use rayon::prelude::*;

/// What a LayerNorm applies after normalising a row `x̂ = (x − mean) / sqrt(var + eps)`:
/// `y = (x̂·weight + bias)·(1 + scale) + shift`, each part optional.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerNormParams<'a> {
    /// Epsilon added to the variance.
    pub eps: f32,
    /// Elementwise affine weight `[dim]`.
    pub weight: Option<&'a [f32]>,
    /// Elementwise affine bias `[dim]`.
    pub bias: Option<&'a [f32]>,
    /// adaLN scale `[dim]` (applied as `1 + scale`).
    pub scale: Option<&'a [f32]>,
    /// adaLN shift `[dim]`.
    pub shift: Option<&'a [f32]>,
}

multiversion! {
    fn layer_norm_row(x: &[f32], y: &mut [f32], eps: f32, w: Option<&[f32]>, b: Option<&[f32]>, scale: Option<&[f32]>, shift: Option<&[f32]>) {
        let n = x.len() as f32;
        let mean = lane_sum(x) / n;
        let mut var_acc = [0.0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                let t = c[i] - mean;
                var_acc[i] += t * t;
            }
        }
        let mut var: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
        var += var_acc.iter().sum::<f32>();
        let inv = 1.0 / (var / n + eps).sqrt();
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - mean) * inv;
        }
        if let Some(w) = w {
            y.iter_mut().zip(w).for_each(|(o, &w)| *o *= w);
        }
        if let Some(b) = b {
            y.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
        if let Some(s) = scale {
            y.iter_mut().zip(s).for_each(|(o, &s)| *o *= 1.0 + s);
        }
        if let Some(s) = shift {
            y.iter_mut().zip(s).for_each(|(o, &s)| *o += s);
        }
    }
}

multiversion! {
    pub(crate) fn rms_norm_row(x: &mut [f32], eps: f32, w: &[f32]) {
        let mut acc = [0.0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                acc[i] += c[i] * c[i];
            }
        }
        let rem = chunks.remainder();
        let ss: f32 = rem.iter().map(|&v| v * v).sum::<f32>() + acc.iter().sum::<f32>();
        let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for (v, &w) in x.iter_mut().zip(w) {
            *v = *v * inv * w;
        }
    }
}

/// Sum with 16 independent lanes (vectorisable, and more accurate than one running sum).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

fn check_param(op: &'static str, name: &str, p: Option<&[f32]>, dim: usize) -> Result<()> {
    match p {
        Some(p) if p.len() != dim => Err(KernelError::shape(op, format!("{name} has {} elements, rows have {dim}", p.len()))),
        _ => Ok(()),
    }
}

/// LayerNorm over the last dimension (`dim`) of `x`, one row at a time, in parallel.
pub fn layer_norm(x: &[f32], dim: usize, p: &LayerNormParams<'_>) -> Result<Vec<f32>> {
    let mut y = vec![0.0f32; x.len()];
    layer_norm_into(x, dim, p, &mut y)?;
    Ok(y)
}

/// [`layer_norm`] into `y` (as long as `x`).
pub fn layer_norm_into(x: &[f32], dim: usize, p: &LayerNormParams<'_>, y: &mut [f32]) -> Result<()> {
    if dim == 0 || !x.len().is_multiple_of(dim) || y.len() != x.len() {
        return Err(KernelError::shape("layer_norm", format!("{} elements are not rows of {dim}, or y has {}", x.len(), y.len())));
    }
    for (name, v) in [("weight", p.weight), ("bias", p.bias), ("scale", p.scale), ("shift", p.shift)] {
        check_param("layer_norm", name, v, dim)?;
    }
    y.par_chunks_mut(dim).zip(x.par_chunks(dim)).with_min_len(16).for_each(|(yr, xr)| {
        layer_norm_row(xr, yr, p.eps, p.weight, p.bias, p.scale, p.shift);
    });
    Ok(())
}

/// RMSNorm over the last dimension: `y = x / sqrt(mean(x²) + eps) · weight`, in place.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(KernelError::shape("rms_norm", format!("{} elements are not rows of {dim}", x.len())));
    }
    x.par_chunks_mut(dim).with_min_len(16).for_each(|row| rms_norm_row(row, eps, weight));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_ref(x: &[f32], eps: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
        x.iter().map(|&v| (v as f64 - m) / (var + eps).sqrt()).collect()
    }

    #[test]
    fn layer_norm_with_affine_and_modulation() {
        let dim = 37;
        let x: Vec<f32> = (0..dim * 3).map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.3 + 2.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..dim).map(|i| -0.2 + i as f32 * 0.02).collect();
        let sc: Vec<f32> = (0..dim).map(|i| 0.1 * (i % 5) as f32).collect();
        let sh: Vec<f32> = (0..dim).map(|i| -0.05 * (i % 7) as f32).collect();
        let p = LayerNormParams { eps: 1e-6, weight: Some(&w), bias: Some(&b), scale: Some(&sc), shift: Some(&sh) };
        let y = layer_norm(&x, dim, &p).unwrap();
        for r in 0..3 {
            let n = ln_ref(&x[r * dim..(r + 1) * dim], 1e-6);
            for c in 0..dim {
                let want = (n[c] * w[c] as f64 + b[c] as f64) * (1.0 + sc[c] as f64) + sh[c] as f64;
                assert!((y[r * dim + c] as f64 - want).abs() < 1e-5);
            }
        }
        let plain = layer_norm(&x, dim, &LayerNormParams { eps: 1e-6, ..Default::default() }).unwrap();
        let n = ln_ref(&x[..dim], 1e-6);
        assert!(plain[..dim].iter().zip(&n).all(|(a, b)| (*a as f64 - b).abs() < 1e-5));
        assert!(layer_norm(&x, dim, &LayerNormParams { eps: 1e-6, weight: Some(&w[..3]), ..Default::default() }).is_err());
    }

    #[test]
    fn rms_norm_matches_formula() {
        let w: Vec<f32> = (0..20).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut x: Vec<f32> = (0..40).map(|i| i as f32 * 0.25 - 3.0).collect();
        let orig = x.clone();
        rms_norm(&mut x, &w, 1e-6).unwrap();
        for r in 0..2 {
            let row = &orig[r * 20..(r + 1) * 20];
            let rms = (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 20.0 + 1e-6).sqrt();
            for c in 0..20 {
                assert!((x[r * 20 + c] as f64 - row[c] as f64 / rms * w[c] as f64).abs() < 1e-5);
            }
        }
        assert!(rms_norm(&mut x, &w[..7], 1e-6).is_err());
    }
}
