//! The sinusoidal timestep embedding of diffusion models (diffusers `get_timestep_embedding`).

use crate::{KernelError, Result};

/// Embeds each timestep `t` as `[cos(t·ω_k) | sin(t·ω_k)]` (cosines first, as Wan's
/// `flip_sin_to_cos=True`), ω_k = max_period^(−k/(half − shift)), k < half = dim/2.
/// Computed in f32 as upstream does. Returns `[timesteps.len(), dim]`.
pub fn timestep_embedding(timesteps: &[f32], dim: usize, downscale_freq_shift: f32, max_period: f32) -> Result<Vec<f32>> {
    if dim < 2 || !dim.is_multiple_of(2) {
        return Err(KernelError::invalid("timestep_embedding", format!("dim {dim} must be even and positive")));
    }
    let half = dim / 2;
    let ln_p = -(max_period as f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|k| ((ln_p * k as f32) / (half as f32 - downscale_freq_shift)).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        out.extend(freqs.iter().map(|&w| (t * w).cos()));
        out.extend(freqs.iter().map(|&w| (t * w).sin()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_cos_then_sin() {
        let e = timestep_embedding(&[0.0, 500.0], 8, 0.0, 10000.0).unwrap();
        assert_eq!(&e[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // k = 1 of 4: ω = 10000^(-1/4) = 0.1
        assert!((e[8 + 1] - (500.0f32 * 0.1).cos()).abs() < 1e-4);
        assert!((e[8 + 5] - (500.0f32 * 0.1).sin()).abs() < 1e-4);
        assert!(timestep_embedding(&[1.0], 7, 0.0, 10000.0).is_err());
    }
}
