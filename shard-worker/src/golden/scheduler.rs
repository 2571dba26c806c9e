//! Sampler cases (`scheduler/*`): the case folder is a diffusers `scheduler/` folder
//! (`scheduler_config.json`); `io.safetensors` holds `sigmas`, `timesteps`, `sample_0`,
//! `model_outputs[i]` and `samples[i]` (the sample after step i). The σ grid, the timesteps and
//! every step's sample are compared; with `opts.ranks` > 1 the latent is stepped as that many
//! contiguous slices, each with its own sampler state, the way sequence-parallel ranks step it, on
//! the backend of `opts` (the sampler's f32 kernels).

use super::{compare, outcome, read_tensor, Case, CaseMeta, Comparison, Outcome, RunOptions, Tolerance};
use crate::parallel::shard_ranges;
use crate::sampler::{SamplerConfig, SamplerState, Schedule, Timesteps};
use crate::weights::SafetensorsFile;
use crate::{Result, WorkerError};
use tessera_kernels::backend::{Backend, CpuOps, CudaOps, HostOps, Ops};
use tessera_kernels::Tensor;

/// Builds the schedule from the case's `scheduler_config.json` with as many steps as the case has
/// timesteps, then replays the recorded model outputs from `sample_0`.
pub(super) fn run(case: &Case, opts: &RunOptions) -> Result<Outcome> {
    let meta = CaseMeta::read(&case.dir)?;
    let config = SamplerConfig::from_path(&case.dir.join("scheduler_config.json"))?;
    let io = SafetensorsFile::open(&case.dir.join("io.safetensors"))?;
    let steps = io
        .shape("timesteps")
        .map(|s| s.iter().product::<usize>())
        .ok_or_else(|| WorkerError::MissingTensor { name: "timesteps".into(), source_desc: io.path().display().to_string() })?;
    let schedule = Schedule::new(&config, steps)?;
    let tol = &meta.tolerance;
    let mut comparisons = Vec::with_capacity(steps + 2);

    let sigmas = Tensor::new(vec![schedule.sigmas().len()], schedule.sigmas().to_vec())?;
    comparisons.push(compare(&io, "sigmas", &sigmas, tol)?);
    comparisons.push(match schedule.timesteps() {
        // Integer timesteps must match exactly: one off changes the model input.
        Timesteps::Int(got) => {
            let (_, want) = io.read_i64("timesteps")?;
            if want.len() != got.len() {
                return Err(WorkerError::BadTensor { name: "timesteps".into(), detail: format!("{} reference values, {} computed", want.len(), got.len()) });
            }
            let exact = Tolerance { rel_l2: 0.0, max_abs: Some(0.0), max_abs_over_max_ref: None };
            let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(&want).map(|(&g, &w)| (g as f32, w as f32)).unzip();
            let mut c = Comparison::new(&g, &w, &exact);
            c.passed &= got == &want;
            ("timesteps (exact)".to_string(), c)
        }
        Timesteps::Float(got) => compare(&io, "timesteps", &Tensor::new(vec![got.len()], got.clone())?, tol)?,
    });

    let sample_0 = read_tensor(&io, "sample_0")?;
    let model_outputs = read_tensor(&io, "model_outputs")?;
    let len = sample_0.data().len();
    if model_outputs.data().len() != steps * len {
        return Err(WorkerError::BadTensor {
            name: "model_outputs".into(),
            detail: format!("shape {:?} is not {steps} outputs of shape {:?}", model_outputs.shape(), sample_0.shape()),
        });
    }
    let slices = shard_ranges(len, opts.ranks.max(1));
    // The sampler's arithmetic is f32 on every backend (bit for bit the CPU kernels): the case's
    // own tolerance holds whatever `opts.backend` is.
    let samples = match opts.backend {
        Backend::Cpu => replay(&CpuOps, &schedule, &slices, sample_0.data(), model_outputs.data())?,
        Backend::Bf16Host => replay(&HostOps, &schedule, &slices, sample_0.data(), model_outputs.data())?,
        Backend::Cuda(n) => replay(&CudaOps::open(n)?, &schedule, &slices, sample_0.data(), model_outputs.data())?,
    };
    let want = read_tensor(&io, "samples")?;
    if want.data().len() != samples.len() {
        return Err(WorkerError::BadTensor {
            name: "samples".into(),
            detail: format!("reference shape {:?}, computed {steps} samples of {len}", want.shape()),
        });
    }
    for i in 0..steps {
        let range = i * len..(i + 1) * len;
        comparisons.push((format!("samples[{i}]"), Comparison::new(&samples[range.clone()], &want.data()[range], tol)));
    }
    Ok(outcome(comparisons))
}

/// Steps `x0` through every step of `schedule` with the recorded `outputs`, the latent cut into
/// `slices` (each with its own state on `ops`' device); returns every step's sample, in order.
fn replay<O: Ops>(ops: &O, schedule: &Schedule, slices: &[std::ops::Range<usize>], x0: &[f32], outputs: &[f32]) -> Result<Vec<f32>> {
    let len = x0.len();
    let mut states = slices.iter().map(|r| SamplerState::new(ops, schedule.kind(), r.len())).collect::<Result<Vec<_>>>()?;
    let mut xs = slices.iter().map(|r| Ok(ops.upload(&x0[r.clone()])?)).collect::<Result<Vec<_>>>()?;
    let mut samples = Vec::with_capacity(schedule.num_steps() * len);
    for i in schedule.steps() {
        let v = &outputs[i * len..(i + 1) * len];
        for ((range, state), x) in slices.iter().zip(&mut states).zip(&mut xs) {
            state.step(ops, schedule, i, &ops.upload(&v[range.clone()])?, x)?;
        }
        for x in &xs {
            samples.extend(ops.download(x)?);
        }
    }
    Ok(samples)
}
