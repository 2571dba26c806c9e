//! The patch grid of a latent video: how it is cut into spacetime patches (the tokens). The cutting
//! itself is the backend's `patchify`/`unpatchify` (`tessera_kernels::cpu::patch` and its twins).

use crate::{Result, WorkerError};

/// The patch grid of one latent video: (frames, rows, columns) in patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    /// Patches along time, rows and columns.
    pub dims: [usize; 3],
    /// Patch size along time, rows and columns.
    pub patch: [usize; 3],
}

impl PatchGrid {
    /// The grid of a latent `[frames, height, width]`; each must be a multiple of the patch size.
    pub fn new(latent_fhw: [usize; 3], patch: [usize; 3]) -> Result<Self> {
        let names = ["frames", "height", "width"];
        let mut dims = [0; 3];
        for i in 0..3 {
            if latent_fhw[i] == 0 || !latent_fhw[i].is_multiple_of(patch[i]) {
                return Err(WorkerError::input(
                    "hidden_states",
                    format!("latent {} {} is not a positive multiple of the patch size {}", names[i], latent_fhw[i], patch[i]),
                ));
            }
            dims[i] = latent_fhw[i] / patch[i];
        }
        Ok(Self { dims, patch })
    }

    /// Number of tokens, F'·H'·W'.
    pub fn tokens(&self) -> usize {
        self.dims.iter().product()
    }

    /// Latent extent `[frames, height, width]`.
    pub fn latent(&self) -> [usize; 3] {
        [self.dims[0] * self.patch[0], self.dims[1] * self.patch[1], self.dims[2] * self.patch[2]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_requires_divisible_sizes() {
        assert!(PatchGrid::new([3, 7, 8], [1, 2, 2]).is_err());
        let g = PatchGrid::new([3, 6, 10], [1, 2, 2]).unwrap();
        assert_eq!(g.dims, [3, 3, 5]);
        assert_eq!(g.tokens(), 45);
    }
}
