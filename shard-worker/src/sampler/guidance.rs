//! Classifier-free guidance (reference/wan2.1.md §5.4): `v = v_u + g·(v_c − v_u)`, in float32 as
//! the original Wan code computes it, on any slice of the model outputs.

use crate::{Result, WorkerError};

pub use tessera_cluster::limits::guidance_enabled;

/// Combines the conditional and unconditional outputs in place: `cond ← uncond + scale·(cond −
/// uncond)`. Both slices cover the same elements.
pub fn apply_guidance(cond: &mut [f32], uncond: &[f32], scale: f32) -> Result<()> {
    if cond.len() != uncond.len() {
        return Err(WorkerError::input("uncond", format!("{} values for {} conditional values", uncond.len(), cond.len())));
    }
    if !scale.is_finite() {
        return Err(WorkerError::input("guidance_scale", format!("{scale} is not finite")));
    }
    tessera_kernels::cpu::guide(cond, uncond, scale)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_elementwise_and_checks_lengths() {
        let mut cond = vec![1.0f32, 3.0, -2.0];
        apply_guidance(&mut cond, &[0.0, 1.0, -2.0], 5.0).unwrap();
        assert_eq!(cond, vec![5.0, 11.0, -2.0]);
        let mut same = vec![0.5f32, 0.25];
        apply_guidance(&mut same, &[1.0, 2.0], 1.0).unwrap();
        assert_eq!(same, vec![0.5, 0.25]);
        assert!(apply_guidance(&mut [1.0], &[1.0, 2.0], 5.0).is_err());
        assert!(apply_guidance(&mut [1.0], &[1.0], f32::NAN).is_err());
        assert!(guidance_enabled(5.0) && !guidance_enabled(1.0));
    }

    #[test]
    fn slices_give_the_whole_result() {
        let n = (1 << 16) + 123;
        let cond: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let uncond: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut whole = cond.clone();
        apply_guidance(&mut whole, &uncond, 6.0).unwrap();
        let mut parts = cond.clone();
        let (a, b) = parts.split_at_mut(1000);
        apply_guidance(a, &uncond[..1000], 6.0).unwrap();
        apply_guidance(b, &uncond[1000..], 6.0).unwrap();
        assert_eq!(whole, parts);
    }
}
