//! σ schedules (reference/wan2.1.md §5.2) and the per-step scalar coefficients derived from them,
//! reproducing diffusers' numpy/torch arithmetic: float64 grids, stored as float32.

use super::config::{FinalSigmas, SamplerConfig, UniPcOptions};
use super::{euler, unipc, SamplerKind};
use crate::{Result, WorkerError};
use std::ops::Range;

/// The timesteps fed to the model, in the type the diffusers scheduler produces them.
#[derive(Clone, Debug, PartialEq)]
pub enum Timesteps {
    /// UniPC: `int64(σ·1000)`, truncated from the float64 σ.
    Int(Vec<i64>),
    /// Flow-match Euler: `σ·1000` in float32.
    Float(Vec<f32>),
}

impl Timesteps {
    /// Number of timesteps (= inference steps).
    pub fn len(&self) -> usize {
        match self {
            Self::Int(t) => t.len(),
            Self::Float(t) => t.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Timestep `i` as the float the transformer's sinusoidal embedding takes.
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            Self::Int(t) => t.get(i).map(|&t| t as f32),
            Self::Float(t) => t.get(i).copied(),
        }
    }

    /// All timesteps as floats.
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.len()).filter_map(|i| self.get(i)).collect()
    }
}

/// The scalars of one sampler step, shared by every slice of the latent: the update the backend
/// kernels apply (`Ops::sampler_step`).
pub use tessera_kernels::cpu::SamplerUpdate as StepCoefficients;

/// A run's σ grid, model timesteps and per-step coefficients: built once, shared by all slices.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    config: SamplerConfig,
    sigmas: Vec<f32>,
    timesteps: Timesteps,
    first_step: usize,
    /// Coefficients of steps `first_step..N`, indexed by `i − first_step`.
    coefficients: Vec<StepCoefficients>,
}

impl Schedule {
    /// The schedule of `num_steps` inference steps for `config`, as diffusers' `set_timesteps`
    /// builds it, run from step 0 (text-to-video, image-to-video).
    pub fn new(config: &SamplerConfig, num_steps: usize) -> Result<Self> {
        config.validate()?;
        if num_steps == 0 {
            return Err(WorkerError::input("num_steps", "at least one inference step is needed"));
        }
        let (sigmas, timesteps) = match config.kind {
            SamplerKind::UniPc => unipc_flow_sigmas(config.shift, config.num_train_timesteps, num_steps, config.unipc.final_sigmas),
            SamplerKind::Euler => flow_match_euler_sigmas(config.shift, config.num_train_timesteps, num_steps),
        };
        let mut schedule = Self { config: config.clone(), sigmas, timesteps, first_step: 0, coefficients: Vec::new() };
        schedule.coefficients = schedule.compute_coefficients(0)?;
        Ok(schedule)
    }

    /// The same grid run from step `first_step` instead of 0 (video-to-video: the steps before are
    /// skipped, and the multistep history starts afresh there, as in diffusers).
    pub fn starting_at(&self, first_step: usize) -> Result<Self> {
        if first_step >= self.num_steps() {
            return Err(WorkerError::input("first_step", format!("{first_step} is past the last step ({} steps)", self.num_steps())));
        }
        let coefficients = self.compute_coefficients(first_step)?;
        Ok(Self { first_step, coefficients, ..self.clone() })
    }

    /// Video-to-video: the schedule from the first step that `strength` keeps (§6.2).
    pub fn for_strength(&self, strength: f64) -> Result<Self> {
        self.starting_at(super::first_step_for_strength(self.num_steps(), strength)?)
    }

    fn compute_coefficients(&self, first_step: usize) -> Result<Vec<StepCoefficients>> {
        let steps = first_step..self.num_steps();
        let coefficients: Vec<StepCoefficients> = match self.config.kind {
            SamplerKind::Euler => steps.map(|i| StepCoefficients::Euler { dt: euler::dt(&self.sigmas, i) }).collect(),
            SamplerKind::UniPc => steps.map(|i| StepCoefficients::UniPc(unipc::step(&self.sigmas, &self.config.unipc, first_step, i))).collect(),
        };
        let finite = |x: f32| x.is_finite();
        let bad = coefficients.iter().position(|c| match c {
            StepCoefficients::Euler { dt } => !finite(*dt),
            StepCoefficients::UniPc(s) => !s.is_finite(),
        });
        match bad {
            Some(k) => Err(WorkerError::input(
                "num_steps",
                format!("step {} of {} has non-finite sampler coefficients (too many steps for this grid?)", first_step + k, self.num_steps()),
            )),
            None => Ok(coefficients),
        }
    }

    /// The sampler kind.
    pub fn kind(&self) -> SamplerKind {
        self.config.kind
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// UniPC options in effect.
    pub fn unipc_options(&self) -> &UniPcOptions {
        &self.config.unipc
    }

    /// N, the number of inference steps of the whole grid.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The first step run (0, or later for video-to-video).
    pub fn first_step(&self) -> usize {
        self.first_step
    }

    /// The step indices run, in order.
    pub fn steps(&self) -> Range<usize> {
        self.first_step..self.num_steps()
    }

    /// σ_0 … σ_N (float32, σ_N appended after the grid).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// σ_i.
    pub fn sigma(&self, i: usize) -> Option<f32> {
        self.sigmas.get(i).copied()
    }

    /// The model timesteps t_0 … t_{N−1}.
    pub fn timesteps(&self) -> &Timesteps {
        &self.timesteps
    }

    /// t_i as fed to the transformer.
    pub fn model_timestep(&self, i: usize) -> Option<f32> {
        self.timesteps.get(i)
    }

    /// The scalar coefficients of step `i` (`None` outside [`Self::steps`]).
    pub fn coefficients(&self, i: usize) -> Option<&StepCoefficients> {
        i.checked_sub(self.first_step).and_then(|k| self.coefficients.get(k))
    }
}

/// numpy's `linspace(start, stop, num)` in float64: `k·step + start`, last element set to `stop`.
pub(super) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|k| k as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `s·σ / (1 + (s−1)·σ)` in float64.
fn shift_f64(shift: f64, sigma: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// diffusers `UniPCMultistepScheduler.set_timesteps` with `use_flow_sigmas`: linspace(1, 1/T,
/// N+1)[:-1], shifted, σ₀ −= 1e-6 when within 1e-6 of 1, timesteps int64(σ·T), final σ appended,
/// all σ stored as float32.
fn unipc_flow_sigmas(shift: f64, train_steps: u32, n: usize, last: FinalSigmas) -> (Vec<f32>, Timesteps) {
    let t = train_steps as f64;
    let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / t, n + 1).into_iter().take(n).map(|s| shift_f64(shift, s)).collect();
    if (sigmas[0] - 1.0).abs() < 1e-6 {
        sigmas[0] -= 1e-6;
    }
    let timesteps = sigmas.iter().map(|&s| (s * t) as i64).collect();
    let sigma_last = match last {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => sigmas[n - 1],
    };
    let stored = sigmas.iter().chain(std::iter::once(&sigma_last)).map(|&s| s as f32).collect();
    (stored, Timesteps::Int(timesteps))
}

/// diffusers `FlowMatchEulerDiscreteScheduler`: `__init__` shifts the float32 training grid
/// (giving σ_max, σ_min), then `set_timesteps` shifts linspace(σ_max·T, σ_min·T, N)/T a second
/// time in float64; σ stored as float32, timesteps = σ·T in float32, σ_N = 0 appended.
fn flow_match_euler_sigmas(shift: f64, train_steps: u32, n: usize) -> (Vec<f32>, Timesteps) {
    let t32 = train_steps as f32;
    let s32 = shift as f32;
    let shift_f32 = |sigma: f32| s32 * sigma / (1.0 + (shift - 1.0) as f32 * sigma);
    // The training grid runs T, T−1, …, 1 (float32) over T; only its ends matter: T/T = 1.
    let sigma_max = shift_f32(1.0) as f64;
    let sigma_min = shift_f32(1.0f32 / t32) as f64;
    let t = train_steps as f64;
    let sigmas: Vec<f32> = linspace(sigma_max * t, sigma_min * t, n).into_iter().map(|ts| shift_f64(shift, ts / t) as f32).collect();
    let timesteps = sigmas.iter().map(|&s| s * t32).collect();
    let stored = sigmas.into_iter().chain(std::iter::once(0.0)).collect();
    (stored, Timesteps::Float(timesteps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints_and_spacing() {
        assert_eq!(linspace(1.0, 0.0, 5), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(linspace(2.0, 3.0, 1), vec![2.0]);
        assert!(linspace(2.0, 3.0, 0).is_empty());
    }

    /// The numbers of reference/wan2.1.md §5.2 (computed there with numpy).
    #[test]
    fn unipc_grid_matches_the_reference_table() {
        let s = Schedule::new(&SamplerConfig::unipc(5.0), 50).unwrap();
        let Timesteps::Int(t) = s.timesteps() else { panic!("UniPC timesteps are integers") };
        assert_eq!(&t[..6], &[999, 995, 991, 987, 982, 978]);
        assert_eq!(&t[46..], &[305, 244, 175, 96]);
        assert!((s.sigmas()[0] - 0.999999).abs() < 1e-7);
        assert!((s.sigmas()[49] - 0.096778).abs() < 1e-6);
        assert_eq!(s.sigmas()[50], 0.0);
        let s = Schedule::new(&SamplerConfig::unipc(3.0), 40).unwrap();
        let Timesteps::Int(t) = s.timesteps() else { panic!() };
        assert_eq!(&t[..6], &[999, 991, 982, 973, 964, 954]);
        assert_eq!(&t[36..], &[251, 197, 138, 74]);
        assert!((s.sigmas()[39] - 0.074077).abs() < 1e-6);
    }

    #[test]
    fn euler_grid_starts_at_one_and_ends_at_zero() {
        let s = Schedule::new(&SamplerConfig::euler(3.0), 10).unwrap();
        assert_eq!(s.sigmas()[0], 1.0);
        assert_eq!(s.sigmas()[10], 0.0);
        assert_eq!(s.model_timestep(0), Some(1000.0));
        assert!(s.sigmas().windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn sigma_min_final_type_repeats_the_last_grid_sigma() {
        let mut c = SamplerConfig::unipc(3.0);
        c.unipc.final_sigmas = FinalSigmas::SigmaMin;
        let s = Schedule::new(&c, 8).unwrap();
        assert_eq!(s.sigmas()[8], s.sigmas()[7]);
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(Schedule::new(&SamplerConfig::unipc(3.0), 0).is_err());
        assert!(Schedule::new(&SamplerConfig::unipc(3.0).with_shift(0.0), 10).is_err());
        assert!(Schedule::new(&SamplerConfig::euler(f64::NAN), 10).is_err());
        let s = Schedule::new(&SamplerConfig::unipc(3.0), 10).unwrap();
        assert!(s.starting_at(10).is_err());
        let later = s.starting_at(4).unwrap();
        assert_eq!(later.steps(), 4..10);
        assert!(later.coefficients(3).is_none() && later.coefficients(4).is_some() && later.coefficients(10).is_none());
    }
}
