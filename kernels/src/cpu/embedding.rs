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

/// [`timestep_embedding`] (no frequency shift) with the sinusoid computed in float64 and then
/// rounded to f32, as SkyReels-V2's `sinusoidal_embedding_1d` computes it: `[cos(t·w_k) | sin(t·w_k)]`
/// with `w_k = 10000^(−k/half)`.
pub fn timestep_embedding_f64(timesteps: &[f32], dim: usize, max_period: f64) -> Result<Vec<f32>> {
    if dim < 2 || !dim.is_multiple_of(2) {
        return Err(KernelError::invalid("timestep_embedding", format!("dim {dim} must be even and positive")));
    }
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half).map(|k| max_period.powf(-(k as f64) / half as f64)).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = f64::from(t);
        out.extend(freqs.iter().map(|&w| (t * w).cos() as f32));
        out.extend(freqs.iter().map(|&w| (t * w).sin() as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float64_sinusoids_round_once() {
        let (a, b) = (timestep_embedding(&[733.0], 32, 0.0, 10000.0).unwrap(), timestep_embedding_f64(&[733.0], 32, 10000.0).unwrap());
        assert_eq!(b[0], 733.0f64.cos() as f32);
        // The f32 sinusoid loses about t·ε to its argument; the f64 one is rounded once.
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3), "{a:?} {b:?}");
        assert_ne!(a, b);
    }

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
