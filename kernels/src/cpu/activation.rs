//! Element-wise activations: GELU (tanh approximation and exact), SiLU.

use crate::multiversion;
use crate::simd::sigmoid;
use rayon::prelude::*;

/// An activation applied after a matrix product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// `GELU(approximate="tanh")`.
    GeluTanh,
    /// Exact GELU, `x·Φ(x)` with the error function.
    Gelu,
    /// `x·σ(x)`.
    Silu,
}

const PAR_CHUNK: usize = 1 << 14;

multiversion! {
    fn gelu_tanh_slice(xs: &mut [f32]) {
        // 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³): no cancellation near 0.
        const K: f32 = 0.797_884_6; // sqrt(2/pi)
        for x in xs.iter_mut() {
            let v = *x;
            let u = K * (v + 0.044_715 * v * v * v);
            *x = v * sigmoid(2.0 * u);
        }
    }
}

multiversion! {
    fn silu_slice(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x *= sigmoid(*x);
        }
    }
}

fn gelu_erf_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        let v = *x as f64;
        *x = (0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2))) as f32;
    }
}

/// Applies `act` in place, in parallel over large buffers.
pub fn apply_activation(xs: &mut [f32], act: Activation) {
    let f: fn(&mut [f32]) = match act {
        Activation::None => return,
        Activation::GeluTanh => gelu_tanh_slice,
        Activation::Gelu => gelu_erf_slice,
        Activation::Silu => silu_slice,
    };
    if xs.len() <= PAR_CHUNK {
        f(xs);
    } else {
        xs.par_chunks_mut(PAR_CHUNK).for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_formulas() {
        let xs: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 100.0).collect();
        for act in [Activation::GeluTanh, Activation::Gelu, Activation::Silu] {
            let mut y = xs.clone();
            apply_activation(&mut y, act);
            for (&x, &got) in xs.iter().zip(&y) {
                let x64 = x as f64;
                let want = match act {
                    Activation::GeluTanh => 0.5 * x64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh()),
                    Activation::Gelu => 0.5 * x64 * (1.0 + libm::erf(x64 / 2f64.sqrt())),
                    Activation::Silu => x64 / (1.0 + (-x64).exp()),
                    Activation::None => unreachable!(),
                };
                assert!((got as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()), "{act:?}({x}) = {got}, want {want}");
            }
        }
    }
}
