//! Video-to-video noising (reference/wan2.1.md §6.2): which step a strength starts from, and
//! `x = (1 − σ)·x₀ + σ·ε` at that step's σ.

use crate::{Result, WorkerError};
use rayon::prelude::*;

/// The first step kept for `strength` out of `num_steps`: `init = min(int(N·strength), N)`,
/// `t_start = N − init` (diffusers' `get_timesteps`). Strength must lie in [0, 1] and keep at
/// least one step.
pub fn first_step_for_strength(num_steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(WorkerError::input("strength", format!("{strength} is outside [0, 1]")));
    }
    let init = ((num_steps as f64 * strength) as usize).min(num_steps);
    if init == 0 {
        return Err(WorkerError::input("strength", format!("{strength} keeps no step of {num_steps}: raise the strength or the step count")));
    }
    Ok(num_steps - init)
}

/// Noises clean latents in place to level σ: `sample ← (1 − σ)·sample + σ·noise` (float32, as
/// diffusers' `add_noise`/`scale_noise` with flow sigmas). Works on any slice.
pub fn add_noise(sample: &mut [f32], noise: &[f32], sigma: f32) -> Result<()> {
    if sample.len() != noise.len() {
        return Err(WorkerError::input("noise", format!("{} values for {} latent values", noise.len(), sample.len())));
    }
    if !(0.0..=1.0).contains(&sigma) {
        return Err(WorkerError::input("sigma", format!("{sigma} is outside [0, 1]")));
    }
    let alpha = 1.0f32 - sigma;
    let mix = |x: &mut [f32], e: &[f32]| {
        for (x, &e) in x.iter_mut().zip(e) {
            *x = alpha * *x + sigma * e;
        }
    };
    if sample.len() < super::PARALLEL_MIN {
        mix(sample, noise);
    } else {
        sample.par_chunks_mut(super::CHUNK).zip(noise.par_chunks(super::CHUNK)).for_each(|(x, e)| mix(x, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_picks_the_first_step_like_diffusers() {
        assert_eq!(first_step_for_strength(50, 0.8).unwrap(), 10);
        assert_eq!(first_step_for_strength(50, 1.0).unwrap(), 0);
        assert_eq!(first_step_for_strength(10, 0.75).unwrap(), 3); // int(7.5) = 7 kept
        assert_eq!(first_step_for_strength(3, 0.34).unwrap(), 2);
        for bad in [0.0, 0.01, -0.1, 1.5, f64::NAN] {
            let err = first_step_for_strength(50, bad).unwrap_err().to_string();
            assert!(err.contains("strength"), "{bad}: {err}");
        }
    }

    #[test]
    fn mixes_clean_latents_and_noise() {
        let mut x = vec![1.0f32, -2.0];
        add_noise(&mut x, &[3.0, 4.0], 0.25).unwrap();
        assert_eq!(x, vec![0.75 + 0.75, -1.5 + 1.0]);
        let mut pure = vec![5.0f32];
        add_noise(&mut pure, &[-1.0], 1.0).unwrap();
        assert_eq!(pure, vec![-1.0]);
        assert!(add_noise(&mut [1.0], &[1.0, 2.0], 0.5).is_err());
        assert!(add_noise(&mut [1.0], &[1.0], 1.5).is_err());
    }
}
