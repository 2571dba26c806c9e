//! Flow-matching Euler as diffusers' `FlowMatchEulerDiscreteScheduler.step` computes it
//! (reference/wan2.1.md §5.1): `x ← x + (σ_{i+1} − σ_i)·v` in float32.

/// dt = σ_{i+1} − σ_i (float32).
pub(super) fn dt(sigmas: &[f32], i: usize) -> f32 {
    sigmas[i + 1] - sigmas[i]
}

/// Applies one Euler step to a slice: `x ← x + dt·v`.
pub(super) fn apply(dt: f32, v: &[f32], x: &mut [f32]) {
    for (x, &v) in x.iter_mut().zip(v) {
        *x += dt * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_along_the_velocity_by_the_sigma_gap() {
        let sigmas = [1.0f32, 0.75, 0.0];
        assert_eq!(dt(&sigmas, 0), -0.25);
        let mut x = vec![1.0f32, 2.0];
        apply(dt(&sigmas, 1), &[4.0, -4.0], &mut x);
        assert_eq!(x, vec![-2.0, 5.0]);
    }
}
