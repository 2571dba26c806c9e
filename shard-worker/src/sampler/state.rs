//! The per-slice sampler state: the element-wise history a multistep sampler keeps between steps
//! for one contiguous slice of the latent, in the backend's f32 buffers (on the device where the
//! model runs), and the step that advances it (`Ops::sampler_step`).

use super::schedule::Schedule;
use super::SamplerKind;
use crate::{Result, WorkerError};
use tessera_kernels::backend::{at, at_mut, Ops};

/// A slice's sampler history, as plain data (for checkpoints: restore with
/// [`SamplerState::from_history`]); in the latent's own layout, whatever the slicing of the run.
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

/// The sampler state of one contiguous slice of the latent (the whole latent is one slice) on
/// backend `O`: UniPC keeps x̃_{i−1}, m_{i−1} and m_{i−2}, Euler nothing.
pub struct SamplerState<O: Ops> {
    kind: SamplerKind,
    len: usize,
    next_step: Option<usize>,
    /// UniPC: [x̃_{i−1}, m_{i−1}, m_{i−2}]; Euler: none.
    buffers: Vec<O::Buf<f32>>,
}

/// History buffers a sampler kind keeps.
fn buffer_count(kind: SamplerKind) -> usize {
    match kind {
        SamplerKind::UniPc => 3,
        SamplerKind::Euler => 0,
    }
}

impl<O: Ops> SamplerState<O> {
    /// A fresh state for a slice of `len` elements (zeroed history on the device).
    pub fn new(ops: &O, kind: SamplerKind, len: usize) -> Result<Self> {
        let buffers = (0..buffer_count(kind)).map(|_| Ok(ops.zeros::<f32>(len)?)).collect::<Result<_>>()?;
        Ok(Self { kind, len, next_step: None, buffers })
    }

    /// A state from its parts: the history buffers of a slice of `len` elements, in the order
    /// [`buffers`](Self::buffers) gives (lengths checked).
    pub fn from_buffers(ops: &O, kind: SamplerKind, len: usize, next_step: Option<usize>, buffers: Vec<O::Buf<f32>>) -> Result<Self> {
        let want = buffer_count(kind);
        if buffers.len() != want || buffers.iter().any(|b| ops.len(b) != len) {
            let lens: Vec<usize> = buffers.iter().map(|b| ops.len(b)).collect();
            return Err(WorkerError::input("sampler_history", format!("{} buffers of {len} values expected, got lengths {lens:?}", want)));
        }
        Ok(Self { kind, len, next_step, buffers })
    }

    /// Restores a state from a checkpointed history (the slice is the whole latent; buffer
    /// lengths are checked).
    pub fn from_history(ops: &O, history: &SamplerHistory) -> Result<Self> {
        let want = if history.kind == SamplerKind::UniPc { history.len } else { 0 };
        let named = [("last_sample", &history.last_sample), ("prev_output", &history.prev_output), ("prev_output_2", &history.prev_output_2)];
        for (name, buf) in named {
            if buf.len() != want {
                return Err(WorkerError::input("sampler_history", format!("{name} has {} values, expected {want}", buf.len())));
            }
        }
        let buffers = named.iter().take(buffer_count(history.kind)).map(|(_, b)| Ok(ops.upload(b)?)).collect::<Result<_>>()?;
        Ok(Self { kind: history.kind, len: history.len, next_step: history.next_step, buffers })
    }

    /// The history as plain host data (for a checkpoint of a one-slice run).
    pub fn to_history(&self, ops: &O) -> Result<SamplerHistory> {
        let hosts = self.buffers.iter().map(|b| Ok(ops.download(b)?)).collect::<Result<Vec<_>>>()?;
        Ok(history_from_parts(self.kind, self.len, self.next_step, hosts))
    }

    /// The history buffers on the device ([x̃_{i−1}, m_{i−1}, m_{i−2}] for UniPC, none for Euler).
    pub fn buffers(&self) -> &[O::Buf<f32>] {
        &self.buffers
    }

    /// The sampler kind.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Slice length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The step the state expects next (`None` before the first).
    pub fn next_step(&self) -> Option<usize> {
        self.next_step
    }

    /// Step `i` of `schedule` on this slice: `model_output` is the (guided) velocity for the
    /// slice's elements, `sample` the slice of x_i, replaced by x_{i+1}. Steps must come in
    /// order from `schedule.first_step()`.
    pub fn step(&mut self, ops: &O, schedule: &Schedule, i: usize, model_output: &O::Buf<f32>, sample: &mut O::Buf<f32>) -> Result<()> {
        if schedule.kind() != self.kind {
            return Err(WorkerError::input("schedule", format!("a {} schedule cannot step a {} sampler state", schedule.kind().name(), self.kind.name())));
        }
        for (field, len) in [("model_output", ops.len(model_output)), ("sample", ops.len(sample))] {
            if len != self.len {
                return Err(WorkerError::input(field, format!("{len} values for a sampler slice of {}", self.len)));
            }
        }
        let expected = self.next_step.unwrap_or(schedule.first_step());
        if i != expected {
            return Err(WorkerError::input("step", format!("step {i} requested, step {expected} is next")));
        }
        let update =
            schedule.coefficients(i).ok_or_else(|| WorkerError::input("step", format!("step {i} is past the schedule's {} steps", schedule.num_steps())))?;
        ops.sampler_step(update, model_output, sample, &mut self.buffers)?;
        self.next_step = Some(i + 1);
        Ok(())
    }
}

impl<O: Ops> SamplerState<O> {
    /// Makes the last corrected sample x̃ the given `sample` (UniPC; nothing for Euler). diffusers'
    /// diffusion-forcing pipeline needs it: it steps each latent frame through a view of the latent
    /// and writes the result into that view, so after a frame's first step (which keeps the view
    /// as x̃) x̃ is the step's output, and the frame's second corrector uses that.
    pub fn alias_last_sample(&mut self, ops: &O, sample: &O::Buf<f32>) -> Result<()> {
        let len = self.len;
        if ops.len(sample) != len {
            return Err(WorkerError::input("sample", format!("{} values for a sampler slice of {len}", ops.len(sample))));
        }
        match self.buffers.first_mut() {
            Some(last) if len > 0 => Ok(ops.copy_rows(at(sample, 0), len, at_mut(last, 0), len, len, 1)?),
            _ => Ok(()),
        }
    }
}

/// A [`SamplerHistory`] from host copies of the history buffers, in [`SamplerState::buffers`]'
/// order.
pub fn history_from_parts(kind: SamplerKind, len: usize, next_step: Option<usize>, buffers: Vec<Vec<f32>>) -> SamplerHistory {
    let mut it = buffers.into_iter();
    let mut next = || it.next().unwrap_or_default();
    let (last_sample, prev_output, prev_output_2) = (next(), next(), next());
    SamplerHistory { kind, len, next_step, last_sample, prev_output, prev_output_2 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{SamplerConfig, StepCoefficients};
    use tessera_kernels::backend::CpuOps;

    fn pattern(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    /// Runs a whole schedule on `n` elements split at `cuts` (each piece its own state).
    fn run_sliced(schedule: &Schedule, n: usize, cuts: &[usize]) -> Vec<f32> {
        let mut x = pattern(n, 1);
        let bounds: Vec<usize> = std::iter::once(0).chain(cuts.iter().copied()).chain(std::iter::once(n)).collect();
        let mut states: Vec<SamplerState<CpuOps>> = bounds.windows(2).map(|w| SamplerState::new(&CpuOps, schedule.kind(), w[1] - w[0]).unwrap()).collect();
        for i in schedule.steps() {
            let v = pattern(n, 100 + i as u32);
            for (w, state) in bounds.windows(2).zip(&mut states) {
                let mut piece = x[w[0]..w[1]].to_vec();
                state.step(&CpuOps, schedule, i, &v[w[0]..w[1]].to_vec(), &mut piece).unwrap();
                x[w[0]..w[1]].copy_from_slice(&piece);
            }
        }
        x
    }

    #[test]
    fn slice_wise_stepping_equals_whole_tensor_stepping_bit_for_bit() {
        for config in [SamplerConfig::unipc(3.0), SamplerConfig::euler(5.0)] {
            let schedule = Schedule::new(&config, 12).unwrap();
            // Large enough for the kernels' parallel path on the whole latent, serial on small pieces.
            let n = (1 << 16) + 4321;
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
        SamplerState::new(&CpuOps, SamplerKind::UniPc, n).unwrap().step(&CpuOps, &unipc, 0, &v, &mut by_unipc).unwrap();
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
        let mut state = SamplerState::new(&CpuOps, SamplerKind::UniPc, n).unwrap();
        assert!(state.step(&CpuOps, &late, 0, &pattern(n, 6), &mut x).is_err());
        for i in late.steps() {
            state.step(&CpuOps, &late, i, &pattern(n, 6 + i as u32), &mut x).unwrap();
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
        let mut state = SamplerState::new(&CpuOps, SamplerKind::UniPc, 8).unwrap();
        let mut x = vec![0.0f32; 8];
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(state.step(&CpuOps, &schedule, 0, &vec![0.0; 7], &mut x)).contains("model_output"));
        assert!(err(state.step(&CpuOps, &schedule, 0, &vec![0.0; 8], &mut vec![0.0; 5])).contains("sample"));
        assert!(err(state.step(&CpuOps, &schedule, 1, &vec![0.0; 8], &mut x)).contains("step"));
        let euler = Schedule::new(&SamplerConfig::euler(3.0), 4).unwrap();
        assert!(err(state.step(&CpuOps, &euler, 0, &vec![0.0; 8], &mut x)).contains("schedule"));
        for i in 0..4 {
            state.step(&CpuOps, &schedule, i, &vec![0.5; 8], &mut x).unwrap();
        }
        assert!(err(state.step(&CpuOps, &schedule, 4, &vec![0.0; 8], &mut x)).contains("past"));
        assert!(SamplerState::from_buffers(&CpuOps, SamplerKind::UniPc, 8, None, vec![vec![0.0; 8]; 2]).is_err());
        assert!(SamplerState::from_buffers(&CpuOps, SamplerKind::Euler, 8, None, vec![]).is_ok());
    }

    #[test]
    fn history_round_trips_mid_run() {
        let schedule = Schedule::new(&SamplerConfig::unipc(5.0), 6).unwrap();
        let n = 33;
        let mut x = pattern(n, 9);
        let mut a = SamplerState::new(&CpuOps, SamplerKind::UniPc, n).unwrap();
        for i in 0..3 {
            a.step(&CpuOps, &schedule, i, &pattern(n, 20 + i as u32), &mut x).unwrap();
        }
        let mut b = SamplerState::from_history(&CpuOps, &a.to_history(&CpuOps).unwrap()).unwrap();
        let mut xb = x.clone();
        for i in 3..6 {
            let v = pattern(n, 20 + i as u32);
            a.step(&CpuOps, &schedule, i, &v, &mut x).unwrap();
            b.step(&CpuOps, &schedule, i, &v, &mut xb).unwrap();
        }
        assert_eq!(x, xb);
        let mut broken = a.to_history(&CpuOps).unwrap();
        broken.prev_output.pop();
        assert!(SamplerState::<CpuOps>::from_history(&CpuOps, &broken).err().unwrap().to_string().contains("prev_output"));
    }
}
