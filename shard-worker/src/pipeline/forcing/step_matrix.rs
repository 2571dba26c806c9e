//! The step matrix of diffusion forcing (diffusers' `generate_timestep_matrix`): for every
//! iteration of a chunk, which step each latent frame is at, its model timestep, and whether the
//! iteration updates it. Frames move in blocks of the causal block size; with `ar_step` 0 every
//! unfinished block moves together (synchronous), with `ar_step` > 0 block b starts `ar_step`
//! iterations after block b−1 (asynchronous). Prefix frames (carried from the previous chunk) are
//! done from the start and never updated.

use crate::{Result, WorkerError};

/// A chunk's iterations, each a row over its latent frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepMatrix {
    /// Latent frames per row.
    pub frames: usize,
    /// Per iteration and frame: 0 = not started, s in 1..=S = at step s−1 of the schedule,
    /// S+1 = done.
    pub step_index: Vec<Vec<usize>>,
    /// Per iteration and frame: whether the iteration steps the frame's sampler.
    pub update: Vec<Vec<bool>>,
}

impl StepMatrix {
    /// The matrix of a chunk of `frames` latent frames in blocks of `block`, the first `prefix`
    /// frames already done, `steps` sampler steps per frame, block b lagging `ar_step`
    /// iterations behind block b−1.
    pub fn new(steps: usize, frames: usize, prefix: usize, block: usize, ar_step: usize) -> Result<Self> {
        let bad = |field: &'static str, detail: String| Err(WorkerError::input(field, detail));
        if steps == 0 {
            return bad("num_inference_steps", "must be positive".into());
        }
        if block == 0 || !frames.is_multiple_of(block) || !prefix.is_multiple_of(block) || prefix >= frames {
            return bad("causal_block_size", format!("{block} frames per block for a chunk of {frames} latent frames with a prefix of {prefix}"));
        }
        let blocks = frames / block;
        let done = steps + 1;
        let mut prev: Vec<usize> = (0..blocks).map(|b| if b < prefix / block { done } else { 0 }).collect();
        let (mut step_index, mut update) = (Vec::new(), Vec::new());
        while prev.iter().any(|&p| p < steps) {
            let mut new = vec![0i64; blocks];
            for b in 0..blocks {
                new[b] = if b == 0 || prev[b - 1] >= steps { prev[b] as i64 + 1 } else { new[b - 1] - ar_step as i64 };
            }
            let new: Vec<usize> = new.iter().map(|&v| v.clamp(0, done as i64) as usize).collect();
            let moved: Vec<bool> = new.iter().zip(&prev).map(|(&n, &p)| n != p && n != done).collect();
            step_index.push(new.iter().flat_map(|&v| std::iter::repeat_n(v, block)).collect());
            update.push(moved.iter().flat_map(|&v| std::iter::repeat_n(v, block)).collect());
            prev = new;
        }
        Ok(Self { frames, step_index, update })
    }

    /// Iterations.
    pub fn iterations(&self) -> usize {
        self.step_index.len()
    }

    /// Row `i`'s model timesteps from the schedule's template `timesteps` (length S): 999 for
    /// frames not started, `timesteps[s−1]` at step s, 0 when done.
    pub fn timesteps(&self, i: usize, timesteps: &[f32]) -> Vec<f32> {
        let s = timesteps.len();
        self.step_index[i]
            .iter()
            .map(|&k| {
                if k == 0 {
                    999.0
                } else if k > s {
                    0.0
                } else {
                    timesteps[k - 1]
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per block (one column per block, the frames of a block repeat it).
    fn blocks(m: &StepMatrix, block: usize) -> Vec<Vec<usize>> {
        m.step_index.iter().map(|r| r.iter().step_by(block).copied().collect()).collect()
    }

    /// README-df.md's worked example (`pipeline/df-a`): S = 3, blocks of 2, ar_step 2.
    #[test]
    fn the_worked_example() {
        let m = StepMatrix::new(3, 6, 0, 2, 2).unwrap();
        let want = [[1, 0, 0], [2, 0, 0], [3, 1, 0], [4, 2, 0], [4, 3, 1], [4, 4, 2], [4, 4, 3]];
        assert_eq!(blocks(&m, 2), want.map(|r| r.to_vec()).to_vec());
        let upd: Vec<Vec<bool>> = m.update.iter().map(|r| r.iter().step_by(2).copied().collect()).collect();
        assert_eq!(upd[3], vec![false, true, false]);
        let ext = [999.0, 941.0, 800.0];
        assert_eq!(m.timesteps(3, &ext), vec![0.0, 0.0, 941.0, 941.0, 999.0, 999.0]);
        // Chunk 1: a prefix block already done.
        let m = StepMatrix::new(3, 6, 2, 2, 2).unwrap();
        assert_eq!(blocks(&m, 2), [[4, 1, 0], [4, 2, 0], [4, 3, 1], [4, 4, 2], [4, 4, 3]].map(|r| r.to_vec()).to_vec());
        // Chunk 2.
        assert_eq!(blocks(&StepMatrix::new(3, 4, 2, 2, 2).unwrap(), 2), [[4, 1], [4, 2], [4, 3]].map(|r| r.to_vec()).to_vec());
    }

    /// Every frame outside the prefix is updated exactly S times, at steps 1..=S in order; with
    /// ar_step 0 all blocks move together.
    #[test]
    fn every_frame_steps_once_per_step_in_order() {
        for (steps, frames, prefix, block, ar) in [(5, 8, 2, 2, 0), (4, 9, 3, 3, 1), (6, 5, 0, 1, 3), (1, 4, 0, 4, 2)] {
            let m = StepMatrix::new(steps, frames, prefix, block, ar).unwrap();
            for f in 0..frames {
                let seen: Vec<usize> = (0..m.iterations()).filter(|&i| m.update[i][f]).map(|i| m.step_index[i][f]).collect();
                let want: Vec<usize> = if f < prefix { vec![] } else { (1..=steps).collect() };
                assert_eq!(seen, want, "frame {f} of {frames} ({steps} steps, blocks of {block}, ar {ar})");
            }
            if ar == 0 {
                assert_eq!(m.iterations(), steps);
            }
        }
        // The planner's closed form counts the rows, whatever the lag (shorter or longer than S).
        for (steps, frames, prefix, block, ar) in [(3, 6, 0, 2, 2), (3, 6, 2, 2, 2), (50, 25, 5, 5, 5), (4, 12, 0, 1, 9), (7, 10, 4, 2, 3), (2, 8, 0, 4, 0)] {
            let m = StepMatrix::new(steps, frames, prefix, block, ar).unwrap();
            assert_eq!(m.iterations(), super::super::iterations(steps, frames, prefix, block, ar), "{steps} {frames} {prefix} {block} {ar}");
        }
        assert!(StepMatrix::new(3, 5, 0, 2, 0).unwrap_err().to_string().contains("causal_block_size"));
    }
}
