//! Per-element updates: gated residual add, residual add, and the elementwise product.

use crate::multiversion;
use crate::{KernelError, Result};
use rayon::prelude::*;

multiversion! {
    fn gated_add_row(x: &mut [f32], y: &[f32], gate: &[f32]) {
        for ((x, &y), &g) in x.iter_mut().zip(y).zip(gate) {
            *x += y * g;
        }
    }
}

multiversion! {
    fn add_row(x: &mut [f32], y: &[f32]) {
        for (x, &y) in x.iter_mut().zip(y) {
            *x += y;
        }
    }
}

/// `x[r, :] += y[r, :] ⊙ gate` for every row `r` (rows of `gate.len()`), the gated residual of adaLN blocks.
pub fn gated_residual_add(x: &mut [f32], y: &[f32], gate: &[f32]) -> Result<()> {
    let dim = gate.len();
    if dim == 0 || x.len() != y.len() || !x.len().is_multiple_of(dim) {
        return Err(KernelError::shape("gated_residual_add", format!("x {}, y {}, gate {dim}", x.len(), y.len())));
    }
    x.par_chunks_mut(dim).zip(y.par_chunks(dim)).with_min_len(16).for_each(|(xr, yr)| gated_add_row(xr, yr, gate));
    Ok(())
}

/// `x += y`, element by element.
pub fn residual_add(x: &mut [f32], y: &[f32]) -> Result<()> {
    if x.len() != y.len() {
        return Err(KernelError::shape("residual_add", format!("x {}, y {}", x.len(), y.len())));
    }
    x.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(a, b)| add_row(a, b));
    Ok(())
}

multiversion! {
    fn mul_row(x: &mut [f32], y: &[f32]) {
        for (x, &y) in x.iter_mut().zip(y) {
            *x *= y;
        }
    }
}

/// `x ⊙= y`, element by element (the gate of T5's gated-GELU feed-forward).
pub fn mul_in_place(x: &mut [f32], y: &[f32]) -> Result<()> {
    if x.len() != y.len() {
        return Err(KernelError::shape("mul", format!("x {}, y {}", x.len(), y.len())));
    }
    x.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(a, b)| mul_row(a, b));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_multiplies_element_by_element() {
        let mut x = vec![1.5f32, -2.0, 0.0, 3.0];
        mul_in_place(&mut x, &[2.0, 0.5, 7.0, -1.0]).unwrap();
        assert_eq!(x, vec![3.0, -1.0, 0.0, -3.0]);
        assert!(mul_in_place(&mut x, &[1.0]).is_err());
    }

    #[test]
    fn gated_and_plain_adds() {
        let mut x = vec![1.0f32; 6];
        gated_residual_add(&mut x, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[0.5, -1.0, 2.0]).unwrap();
        assert_eq!(x, vec![1.5, -1.0, 7.0, 3.0, -4.0, 13.0]);
        residual_add(&mut x, &[1.0; 6]).unwrap();
        assert_eq!(x[0], 2.5);
        assert!(gated_residual_add(&mut x, &[0.0; 5], &[1.0; 3]).is_err());
    }
}
