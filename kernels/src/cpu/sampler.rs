//! Element-wise parts of flow-matching sampling on f32 latents (wan2.1.md §5): classifier-free
//! guidance, the Euler step, and weighted sums of latents (UniPC's predictor and corrector, the
//! data estimate x − σ·v). The scalar coefficients come from the sampler.

use crate::{KernelError, Result};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `uncond + g·(cond − uncond)`.
pub fn cfg_combine(uncond: &[f32], cond: &[f32], g: f32) -> Result<Vec<f32>> {
    if uncond.len() != cond.len() {
        return Err(KernelError::shape("cfg_combine", format!("uncond {}, cond {}", uncond.len(), cond.len())));
    }
    let mut out = vec![0.0f32; uncond.len()];
    out.par_chunks_mut(CHUNK).zip(uncond.par_chunks(CHUNK).zip(cond.par_chunks(CHUNK))).for_each(|(o, (u, c))| {
        for ((o, &u), &c) in o.iter_mut().zip(u).zip(c) {
            *o = u + g * (c - u);
        }
    });
    Ok(out)
}

/// `x += dt·v` in place (flow-matching Euler step, dt = σ_next − σ).
pub fn euler_step(x: &mut [f32], v: &[f32], dt: f32) -> Result<()> {
    if x.len() != v.len() {
        return Err(KernelError::shape("euler_step", format!("x {}, v {}", x.len(), v.len())));
    }
    x.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(x, v)| {
        for (x, &v) in x.iter_mut().zip(v) {
            *x += dt * v;
        }
    });
    Ok(())
}

/// Most terms of a [`weighted_sum`] (the GPU kernel takes four operands).
pub const MAX_TERMS: usize = 4;

/// `Σ_t c_t·in_t` over 1 to [`MAX_TERMS`] equally long inputs, summed in the order given.
pub fn weighted_sum(terms: &[(f32, &[f32])]) -> Result<Vec<f32>> {
    let n = terms.first().map(|t| t.1.len()).unwrap_or(0);
    if terms.is_empty() || terms.len() > MAX_TERMS || terms.iter().any(|t| t.1.len() != n) {
        let lens: Vec<usize> = terms.iter().map(|t| t.1.len()).collect();
        return Err(KernelError::shape("weighted_sum", format!("1 to {MAX_TERMS} equally long inputs, got lengths {lens:?}")));
    }
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let base = ci * CHUNK;
        let (c0, in0) = terms[0];
        for (i, o) in o.iter_mut().enumerate() {
            *o = c0 * in0[base + i];
        }
        for &(c, inp) in &terms[1..] {
            for (i, o) in o.iter_mut().enumerate() {
                *o += c * inp[base + i];
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas() {
        let u = [1.0, 2.0, -1.0];
        let c = [3.0, 2.0, 1.0];
        assert_eq!(cfg_combine(&u, &c, 5.0).unwrap(), vec![11.0, 2.0, 9.0]);
        let mut x = vec![1.0, 1.0, 1.0];
        euler_step(&mut x, &c, -0.5).unwrap();
        assert_eq!(x, vec![-0.5, 0.0, 0.5]);
        assert_eq!(weighted_sum(&[(2.0, &u), (-1.0, &c)]).unwrap(), vec![-1.0, 2.0, -3.0]);
        assert!(weighted_sum(&[]).is_err());
        assert!(weighted_sum(&[(1.0, &u), (1.0, &c[..2])]).is_err());
        assert!(cfg_combine(&u, &c[..1], 1.0).is_err());
    }

    #[test]
    fn long_inputs_cross_chunks() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let s = weighted_sum(&[(0.5, &a), (2.0, &b), (1.0, &a), (-1.0, &b)]).unwrap();
        for i in [0, CHUNK - 1, CHUNK, n - 1] {
            assert_eq!(s[i], 0.5 * a[i] + 2.0 * b[i] + a[i] - b[i]);
        }
    }
}
