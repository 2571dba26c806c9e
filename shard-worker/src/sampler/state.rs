//! The per-slice sampler state: the elementwise history a multistep sampler keeps between steps
//! for one contiguous slice of the flattened latent, and the step that advances it.

use super::schedule::{Schedule, StepCoefficients};
use super::{euler, SamplerKind, CHUNK, PARALLEL_MIN};
use crate::{Result, WorkerError};
use rayon::prelude::*;

/// A slice's sampler history, as plain data (for checkpoints: restore with
/// [`SamplerState::from_history`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerHistory {
    /// The sampler kind.
    pub kind: SamplerKind,
    /// Slice length.
    pub len: usize,
    /// The step the state expects next (`None` before the first step).
    pub next_step: Option<usize>,
    /// UniPC: x̃_{i−1}, the last corrected sample (empty for Euler).
    pub last_sample: Vec<f32>,
    /// UniPC: m_{i−1}, the last data estimate (empty for Euler).
    pub prev_output: Vec<f32>,
    /// UniPC: m_{i−2} (empty for Euler).
    pub prev_output_2: Vec<f32>,
}

/// The sampler state of one contiguous slice of the latent (the whole latent is one slice).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerState {
    history: SamplerHistory,
}

impl SamplerState {
    /// A fresh state for a slice of `len` elements.
    pub fn new(kind: SamplerKind, len: usize) -> Self {
        let buffer = || if kind == SamplerKind::UniPc { vec![0.0f32; len] } else { Vec::new() };
        Self { history: SamplerHistory { kind, len, next_step: None, last_sample: buffer(), prev_output: buffer(), prev_output_2: buffer() } }
    }

    /// Restores a state from a checkpointed history (buffer lengths are checked).
    pub fn from_history(history: SamplerHistory) -> Result<Self> {
        let want = if history.kind == SamplerKind::UniPc { history.len } else { 0 };
        for (name, buf) in [("last_sample", &history.last_sample), ("prev_output", &history.prev_output), ("prev_output_2", &history.prev_output_2)] {
            if buf.len() != want {
                return Err(WorkerError::input("sampler_history", format!("{name} has {} values, expected {want}", buf.len())));
            }
        }
        Ok(Self { history })
    }

    /// The history, for checkpointing.
    pub fn history(&self) -> &SamplerHistory {
        &self.history
    }

    /// Consumes the state into its history.
    pub fn into_history(self) -> SamplerHistory {
        self.history
    }

    /// The sampler kind.
    pub fn kind(&self) -> SamplerKind {
        self.history.kind
    }

    /// Slice length.
    pub fn len(&self) -> usize {
        self.history.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.history.len == 0
    }

    /// The step this state takes next, given the schedule.
    pub fn next_step(&self, schedule: &Schedule) -> usize {
        self.history.next_step.unwrap_or(schedule.first_step())
    }

    /// Step `i` of `schedule` on this slice: `model_output` is the (guided) velocity for the
    /// slice's elements, `sample` the slice of x_i, replaced by x_{i+1}. Steps must come in
    /// order from `schedule.first_step()`.
    pub fn step(&mut self, schedule: &Schedule, i: usize, model_output: &[f32], sample: &mut [f32]) -> Result<()> {
        let h = &mut self.history;
        if schedule.kind() != h.kind {
            return Err(WorkerError::input("schedule", format!("a {} schedule cannot step a {} sampler state", schedule.kind().name(), h.kind.name())));
        }
        for (field, len) in [("model_output", model_output.len()), ("sample", sample.len())] {
            if len != h.len {
                return Err(WorkerError::input(field, format!("{len} values for a sampler slice of {}", h.len)));
            }
        }
        let expected = h.next_step.unwrap_or(schedule.first_step());
        if i != expected {
            return Err(WorkerError::input("step", format!("step {i} requested, step {expected} is next")));
        }
        let coefficients =
            schedule.coefficients(i).ok_or_else(|| WorkerError::input("step", format!("step {i} is past the schedule's {} steps", schedule.num_steps())))?;
        let parallel = h.len >= PARALLEL_MIN;
        match coefficients {
            StepCoefficients::Euler { dt } => {
                if parallel {
                    sample.par_chunks_mut(CHUNK).zip(model_output.par_chunks(CHUNK)).for_each(|(x, v)| euler::apply(*dt, v, x));
                } else {
                    euler::apply(*dt, model_output, sample);
                }
            }
            StepCoefficients::UniPc(step) => {
                let (last, m1, m2) = (&mut h.last_sample, &mut h.prev_output, &mut h.prev_output_2);
                if parallel {
                    sample
                        .par_chunks_mut(CHUNK)
                        .zip(model_output.par_chunks(CHUNK))
                        .zip(last.par_chunks_mut(CHUNK))
                        .zip(m1.par_chunks_mut(CHUNK))
                        .zip(m2.par_chunks_mut(CHUNK))
                        .for_each(|((((x, v), last), m1), m2)| step.apply(v, x, last, m1, m2));
                } else {
                    step.apply(model_output, sample, last, m1, m2);
                }
            }
        }
        h.next_step = Some(i + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplerConfig;

    fn pattern(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    /// Runs a whole schedule on `n` elements split at `cuts` (each piece its own state).
    fn run_sliced(schedule: &Schedule, n: usize, cuts: &[usize]) -> Vec<f32> {
        let mut x = pattern(n, 1);
        let bounds: Vec<usize> = std::iter::once(0).chain(cuts.iter().copied()).chain(std::iter::once(n)).collect();
        let mut states: Vec<SamplerState> = bounds.windows(2).map(|w| SamplerState::new(schedule.kind(), w[1] - w[0])).collect();
        for i in schedule.steps() {
            let v = pattern(n, 100 + i as u32);
            for (w, state) in bounds.windows(2).zip(&mut states) {
                state.step(schedule, i, &v[w[0]..w[1]], &mut x[w[0]..w[1]]).unwrap();
            }
        }
        x
    }

    #[test]
    fn slice_wise_stepping_equals_whole_tensor_stepping_bit_for_bit() {
        for config in [SamplerConfig::unipc(3.0), SamplerConfig::euler(5.0)] {
            let schedule = Schedule::new(&config, 12).unwrap();
            // Large enough for the parallel path on the whole latent, serial on small pieces.
            let n = PARALLEL_MIN + 4321;
            let whole = run_sliced(&schedule, n, &[]);
            let sliced = run_sliced(&schedule, n, &[7, 1000, 1001, n / 2, n - 3]);
            assert!(whole.iter().all(|x| x.is_finite()));
            assert_eq!(whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), sliced.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{config:?}");
        }
    }

    #[test]
    fn first_unipc_step_equals_euler() {
        let unipc = Schedule::new(&SamplerConfig::unipc(3.0), 10).unwrap();
        let n = 257;
        let x0 = pattern(n, 3);
        let v = pattern(n, 4);
        let mut by_unipc = x0.clone();
        SamplerState::new(SamplerKind::UniPc, n).step(&unipc, 0, &v, &mut by_unipc).unwrap();
        // Euler on the same σ grid.
        let dt = unipc.sigmas()[1] - unipc.sigmas()[0];
        let by_euler: Vec<f32> = x0.iter().zip(&v).map(|(x, v)| x + dt * v).collect();
        for (a, b) in by_unipc.iter().zip(&by_euler) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn later_start_restarts_the_multistep_history() {
        let full = Schedule::new(&SamplerConfig::unipc(3.0), 10).unwrap();
        let late = full.for_strength(0.6).unwrap();
        assert_eq!(late.first_step(), 4);
        let n = 64;
        let mut x = pattern(n, 5);
        let mut state = SamplerState::new(SamplerKind::UniPc, n);
        assert!(state.step(&late, 0, &pattern(n, 6), &mut x).is_err());
        for i in late.steps() {
            state.step(&late, i, &pattern(n, 6 + i as u32), &mut x).unwrap();
        }
        assert!(x.iter().all(|v| v.is_finite()));
        match late.coefficients(4) {
            Some(StepCoefficients::UniPc(s)) => assert!(s.corrector.is_none() && s.predictor.r.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn misuse_is_an_error_naming_the_input() {
        let schedule = Schedule::new(&SamplerConfig::unipc(3.0), 4).unwrap();
        let mut state = SamplerState::new(SamplerKind::UniPc, 8);
        let mut x = vec![0.0f32; 8];
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(state.step(&schedule, 0, &[0.0; 7], &mut x)).contains("model_output"));
        assert!(err(state.step(&schedule, 0, &[0.0; 8], &mut x[..5])).contains("sample"));
        assert!(err(state.step(&schedule, 1, &[0.0; 8], &mut x)).contains("step"));
        let euler = Schedule::new(&SamplerConfig::euler(3.0), 4).unwrap();
        assert!(err(state.step(&euler, 0, &[0.0; 8], &mut x)).contains("schedule"));
        for i in 0..4 {
            state.step(&schedule, i, &[0.5; 8], &mut x).unwrap();
        }
        assert!(err(state.step(&schedule, 4, &[0.0; 8], &mut x)).contains("past"));
    }

    #[test]
    fn history_round_trips_mid_run() {
        let schedule = Schedule::new(&SamplerConfig::unipc(5.0), 6).unwrap();
        let n = 33;
        let mut x = pattern(n, 9);
        let mut a = SamplerState::new(SamplerKind::UniPc, n);
        for i in 0..3 {
            a.step(&schedule, i, &pattern(n, 20 + i as u32), &mut x).unwrap();
        }
        let mut b = SamplerState::from_history(a.history().clone()).unwrap();
        let mut xb = x.clone();
        for i in 3..6 {
            let v = pattern(n, 20 + i as u32);
            a.step(&schedule, i, &v, &mut x).unwrap();
            b.step(&schedule, i, &v, &mut xb).unwrap();
        }
        assert_eq!(x, xb);
        let mut broken = a.into_history();
        broken.prev_output.pop();
        assert!(SamplerState::from_history(broken).unwrap_err().to_string().contains("prev_output"));
    }
}
