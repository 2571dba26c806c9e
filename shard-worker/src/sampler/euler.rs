//! Flow-matching Euler as diffusers' `FlowMatchEulerDiscreteScheduler.step` computes it
//! (reference/wan2.1.md §5.1): `x ← x + (σ_{i+1} − σ_i)·v` in float32; the step's scalar (the
//! element-wise update is the backend's `sampler_step`).

/// dt = σ_{i+1} − σ_i (float32).
pub(super) fn dt(sigmas: &[f32], i: usize) -> f32 {
    sigmas[i + 1] - sigmas[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_along_the_velocity_by_the_sigma_gap() {
        let sigmas = [1.0f32, 0.75, 0.0];
        assert_eq!(dt(&sigmas, 0), -0.25);
        assert_eq!(dt(&sigmas, 1), -0.75);
    }
}
