//! The initial noise of a generation: standard normal values from the counter-based generator,
//! indexed by each element's position in the flattened `[C, T, h, w]` latent, so any slice of it
//! can be drawn on any worker and the whole is the same whatever the number of workers.

use crate::Result;
use tessera_kernels::cpu::{patch_rows, PatchGeometry};
use tessera_kernels::random::fill_normal;
use tessera_kernels::Tensor;

/// Generator stream of the initial latent noise (for video-to-video, the noise mixed into the
/// encoded input: upstream draws one noise tensor either way).
pub const NOISE_STREAM: u64 = 0x6e6f_6973_6530; // "noise0"

/// Elements `range` of the flattened latent noise of `seed` on `stream`.
pub fn noise_slice(seed: u64, stream: u64, range: std::ops::Range<usize>) -> Vec<f32> {
    let mut out = vec![0.0; range.len()];
    fill_normal(seed, stream, range.start as u64, &mut out);
    out
}

/// The patch rows of tokens `tokens` of the latent noise of `seed` on `stream` (the latent's
/// patch geometry `g`): what `patchify` cuts out of [`initial_noise`], drawn without the rest
/// of the latent ever existing (each run of `p_w` values is one contiguous draw).
pub fn noise_rows(seed: u64, stream: u64, g: &PatchGeometry, tokens: std::ops::Range<usize>) -> Result<Vec<f32>> {
    Ok(patch_rows(g, tokens, |base, run| fill_normal(seed, stream, base as u64, run))?)
}

/// The whole latent noise `[1, channels, T, h, w]`.
pub fn initial_noise(seed: u64, stream: u64, channels: usize, fhw: [usize; 3]) -> Tensor {
    let shape = [1, channels, fhw[0], fhw[1], fhw[2]];
    let n = shape.iter().product();
    Tensor::new(shape, noise_slice(seed, stream, 0..n)).expect("shape and length agree")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_drawn_apart_equal_the_whole() {
        let whole = initial_noise(9, NOISE_STREAM, 4, [3, 4, 6]);
        let n = whole.len();
        let mut pieces = Vec::new();
        for r in [0..7, 7..50, 50..n] {
            pieces.extend(noise_slice(9, NOISE_STREAM, r));
        }
        assert_eq!(pieces, whole.data());
        let mean = whole.data().iter().sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.3, "mean {mean}");
        assert_ne!(initial_noise(10, NOISE_STREAM, 4, [3, 4, 6]).data(), whole.data());
    }

    /// A rank's rows drawn alone are the rows patchify cuts from the whole noise.
    #[test]
    fn rows_drawn_alone_are_the_rows_of_the_whole() {
        let g = PatchGeometry { channels: 4, grid: [3, 2, 3], patch: [1, 2, 2] };
        let whole = initial_noise(9, NOISE_STREAM, 4, g.latent_fhw());
        for tokens in [0..18, 0..5, 5..13, 17..18] {
            let want = tessera_kernels::cpu::patchify(whole.data(), &g, tokens.clone()).unwrap();
            assert_eq!(noise_rows(9, NOISE_STREAM, &g, tokens.clone()).unwrap(), want, "{tokens:?}");
        }
    }
}
