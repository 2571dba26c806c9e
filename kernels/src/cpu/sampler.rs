//! The element-wise updates of flow-matching sampling on f32 latents (wan2.1.md §5): classifier-free
//! guidance and one sampler step (Euler, or UniPC's corrector + predictor with its history). The
//! scalar coefficients are computed by the sampler (`tessera_worker::sampler`, in diffusers' float32
//! order of operations); these are the CPU kernels and the twins of `cuda/sampler.cu`, which
//! reproduces them bit for bit (no fused multiply-adds on either side).

use crate::{KernelError, Result};
use rayon::prelude::*;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;
/// Below this many elements an update runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// The UniPC predictor of step i: from σ_i to σ_{i+1}.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniPcPredictor {
    /// σ_{i+1} / σ_i.
    pub ratio: f32,
    /// α_{i+1} · expm1(−h).
    pub alpha_phi: f32,
    /// α_{i+1} · B(h).
    pub alpha_b: f32,
    /// Second order: r = (λ_{i−1} − λ_i)/h, with D₁ = (m_{i−1} − m_i)/r weighted by ρ = 0.5.
    pub r: Option<f32>,
}

/// The UniPC corrector applied at step i (re-deriving x_i from x̃_{i−1} with m_i known).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniPcCorrector {
    /// σ_i / σ_{i−1}.
    pub ratio: f32,
    /// α_i · expm1(−h).
    pub alpha_phi: f32,
    /// α_i · B(h).
    pub alpha_b: f32,
    /// Second order: r = (λ_{i−2} − λ_{i−1})/h and ρ₀ (weight of D₁ = (m_{i−2} − m_{i−1})/r).
    pub second_order: Option<(f32, f32)>,
    /// ρ of the last difference m_i − m_{i−1} (0.5 at first order).
    pub rho_last: f32,
}

/// All scalars of one UniPC step i.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniPcStep {
    /// σ_i, for the data estimate m_i = x_i − σ_i·v_i.
    pub sigma: f32,
    /// The corrector (absent at a run's first step and after steps listed in `disable_corrector`).
    pub corrector: Option<UniPcCorrector>,
    /// The predictor.
    pub predictor: UniPcPredictor,
}

impl UniPcStep {
    /// Whether every scalar is finite (a grid with repeated σ would give 0/0).
    pub fn is_finite(&self) -> bool {
        let p = &self.predictor;
        let mut all = vec![self.sigma, p.ratio, p.alpha_phi, p.alpha_b, p.r.unwrap_or(0.0)];
        if let Some(c) = &self.corrector {
            let (r, rho0) = c.second_order.unwrap_or((0.0, 0.0));
            all.extend([c.ratio, c.alpha_phi, c.alpha_b, c.rho_last, r, rho0]);
        }
        all.iter().all(|x| x.is_finite())
    }

    /// Applies the step to equally long slices: `v` the model output, `x` the sample (replaced by
    /// the next one), `last` the previous corrected sample x̃_{i−1} (replaced by x̃_i), `m1` and
    /// `m2` the previous data estimates m_{i−1}, m_{i−2} (shifted to m_i, m_{i−1}).
    fn apply(&self, v: &[f32], x: &mut [f32], last: &mut [f32], m1: &mut [f32], m2: &mut [f32]) {
        let sigma = self.sigma;
        let p = self.predictor;
        let elements = v.iter().zip(x.iter_mut()).zip(last.iter_mut()).zip(m1.iter_mut()).zip(m2.iter_mut());
        for ((((&v, x), last), m1), m2) in elements {
            // convert_model_output: m_i = x_i − σ_i·v_i, on the uncorrected sample.
            let m = *x - sigma * v;
            let mut xi = *x;
            if let Some(c) = &self.corrector {
                let base = c.ratio * *last - c.alpha_phi * *m1;
                let corr_res = match c.second_order {
                    Some((r, rho0)) => rho0 * ((*m2 - *m1) / r),
                    None => 0.0,
                };
                let d1_t = m - *m1;
                xi = base - c.alpha_b * (corr_res + c.rho_last * d1_t);
            }
            *last = xi;
            let mut next = p.ratio * xi - p.alpha_phi * m;
            if let Some(r) = p.r {
                next -= p.alpha_b * (0.5f32 * ((*m1 - m) / r));
            }
            *x = next;
            *m2 = *m1;
            *m1 = m;
        }
    }
}

/// One sampler step's scalars: what [`sampler_step`] (and `Ops::sampler_step`) applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerUpdate {
    /// Flow-matching Euler (`FlowMatchEulerDiscreteScheduler`): `x ← x + dt·v`, dt = σ_{i+1} − σ_i.
    Euler {
        /// σ_{i+1} − σ_i.
        dt: f32,
    },
    /// A UniPC step (`UniPCMultistepScheduler`, bh1/bh2, data prediction, flow sigmas).
    UniPc(UniPcStep),
}

impl SamplerUpdate {
    /// How many history buffers (each as long as the sample) the update reads and writes: UniPC
    /// keeps x̃_{i−1}, m_{i−1} and m_{i−2}; Euler none.
    pub fn history_len(&self) -> usize {
        match self {
            Self::Euler { .. } => 0,
            Self::UniPc(_) => 3,
        }
    }
}

/// Applies `update` to `x` (the sample, replaced by the next one) with model output `v`;
/// `history` holds the sampler's buffers (empty for Euler; for UniPC x̃_{i−1}, m_{i−1}, m_{i−2},
/// advanced in place). All slices are equally long; long ones are split over threads, which gives
/// bit for bit the serial result (every element is updated on its own).
pub fn sampler_step(update: &SamplerUpdate, v: &[f32], x: &mut [f32], history: &mut [&mut [f32]]) -> Result<()> {
    const OP: &str = "sampler_step";
    let n = x.len();
    if v.len() != n {
        return Err(KernelError::shape(OP, format!("model output {}, sample {n}", v.len())));
    }
    if history.len() != update.history_len() || history.iter().any(|h| h.len() != n) {
        let lens: Vec<usize> = history.iter().map(|h| h.len()).collect();
        return Err(KernelError::shape(OP, format!("{} history buffers of {n} values, got lengths {lens:?}", update.history_len())));
    }
    match update {
        SamplerUpdate::Euler { dt } => {
            let euler = |x: &mut [f32], v: &[f32]| x.iter_mut().zip(v).for_each(|(x, &v)| *x += dt * v);
            if n < PARALLEL_MIN {
                euler(x, v);
            } else {
                x.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(x, v)| euler(x, v));
            }
        }
        SamplerUpdate::UniPc(step) => {
            let [last, m1, m2] = history else { return Err(KernelError::shape(OP, "UniPC keeps three history buffers")) };
            if n < PARALLEL_MIN {
                step.apply(v, x, last, m1, m2);
            } else {
                x.par_chunks_mut(CHUNK)
                    .zip(v.par_chunks(CHUNK))
                    .zip(last.par_chunks_mut(CHUNK))
                    .zip(m1.par_chunks_mut(CHUNK))
                    .zip(m2.par_chunks_mut(CHUNK))
                    .for_each(|((((x, v), last), m1), m2)| step.apply(v, x, last, m1, m2));
            }
        }
    }
    Ok(())
}

/// Classifier-free guidance in place: `cond ← uncond + g·(cond − uncond)` (f32, the original Wan
/// code's order).
pub fn guide(cond: &mut [f32], uncond: &[f32], g: f32) -> Result<()> {
    if cond.len() != uncond.len() {
        return Err(KernelError::shape("guide", format!("cond {}, uncond {}", cond.len(), uncond.len())));
    }
    let combine = |c: &mut [f32], u: &[f32]| c.iter_mut().zip(u).for_each(|(c, &u)| *c = u + g * (*c - u));
    if cond.len() < PARALLEL_MIN {
        combine(cond, uncond);
    } else {
        cond.par_chunks_mut(CHUNK).zip(uncond.par_chunks(CHUNK)).for_each(|(c, u)| combine(c, u));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) as f32 / u32::MAX as f32) * 2.0 - 1.0).collect()
    }

    fn unipc() -> SamplerUpdate {
        let corrector = UniPcCorrector { ratio: 0.9, alpha_phi: -0.2, alpha_b: -0.15, second_order: Some((-0.8, 0.4)), rho_last: 0.3 };
        SamplerUpdate::UniPc(UniPcStep {
            sigma: 0.7,
            corrector: Some(corrector),
            predictor: UniPcPredictor { ratio: 0.85, alpha_phi: -0.1, alpha_b: -0.09, r: Some(-1.1) },
        })
    }

    #[test]
    fn formulas() {
        let mut c = vec![3.0, 2.0, 1.0];
        guide(&mut c, &[1.0, 2.0, -1.0], 5.0).unwrap();
        assert_eq!(c, vec![11.0, 2.0, 9.0]);
        let mut x = vec![1.0, 1.0, 1.0];
        sampler_step(&SamplerUpdate::Euler { dt: -0.5 }, &[3.0, 2.0, 1.0], &mut x, &mut []).unwrap();
        assert_eq!(x, vec![-0.5, 0.0, 0.5]);
        // First-order UniPC without a corrector: x' = ratio·x − α·φ·(x − σ·v); m1 ← m, m2 ← m1.
        let first =
            SamplerUpdate::UniPc(UniPcStep { sigma: 0.5, corrector: None, predictor: UniPcPredictor { ratio: 0.5, alpha_phi: -0.25, alpha_b: 0.0, r: None } });
        let (mut x, mut last, mut m1, mut m2) = (vec![2.0f32], vec![0.0f32], vec![7.0f32], vec![0.0f32]);
        sampler_step(&first, &[2.0], &mut x, &mut [&mut last, &mut m1, &mut m2]).unwrap();
        assert_eq!((x[0], last[0], m1[0], m2[0]), (0.5 * 2.0 + 0.25 * 1.0, 2.0, 1.0, 7.0));
    }

    #[test]
    fn misuse_is_a_shape_error() {
        let mut x = vec![0.0f32; 4];
        assert!(guide(&mut x, &[0.0; 3], 1.0).is_err());
        assert!(sampler_step(&SamplerUpdate::Euler { dt: 0.1 }, &[0.0; 3], &mut x, &mut []).is_err());
        let mut h = vec![0.0f32; 4];
        assert!(sampler_step(&SamplerUpdate::Euler { dt: 0.1 }, &[0.0; 4], &mut x, &mut [&mut h]).is_err(), "Euler keeps no history");
        let (mut a, mut b, mut c) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 3]);
        assert!(sampler_step(&unipc(), &[0.0; 4], &mut x, &mut [&mut a, &mut b, &mut c]).is_err());
        assert!(sampler_step(&unipc(), &[0.0; 4], &mut x, &mut [&mut a, &mut b]).is_err());
    }

    /// Long inputs split over threads give the serial result bit for bit.
    #[test]
    fn parallel_equals_serial() {
        let n = PARALLEL_MIN + 3 * CHUNK + 17;
        let v = pattern(n, 1);
        let (x0, h0) = (pattern(n, 2), [pattern(n, 3), pattern(n, 4), pattern(n, 5)]);
        let run = |pieces: &[usize]| {
            let (mut x, mut h) = (x0.clone(), h0.clone());
            let mut start = 0;
            for &end in pieces.iter().chain(std::iter::once(&n)) {
                let [a, b, c] = &mut h;
                sampler_step(&unipc(), &v[start..end], &mut x[start..end], &mut [&mut a[start..end], &mut b[start..end], &mut c[start..end]]).unwrap();
                start = end;
            }
            (x, h)
        };
        let (whole, small) = (run(&[]), run(&[5, 1000, 20_000, 40_000]));
        assert_eq!(whole, small);
        assert!(whole.0.iter().all(|x| x.is_finite()));
        let mut c = x0.clone();
        guide(&mut c, &v, 6.0).unwrap();
        let mut parts = x0.clone();
        let (a, b) = parts.split_at_mut(1000);
        guide(a, &v[..1000], 6.0).unwrap();
        guide(b, &v[1000..], 6.0).unwrap();
        assert_eq!(c, parts);
    }
}
