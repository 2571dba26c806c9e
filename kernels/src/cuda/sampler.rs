//! Sampling updates of f32 latents on the GPU: classifier-free guidance and one sampler step
//! (Euler or UniPC with its history), bit for bit the CPU twins [`crate::cpu::guide`] and
//! [`crate::cpu::sampler_step`].

use super::launch::{self, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::sampler::SamplerUpdate;
use crate::{KernelError, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

/// `cond = uncond + g·(cond − uncond)` over `n` elements, in place.
pub fn guide(dev: &CudaDevice, cond: &mut impl DevicePtrMut<f32>, uncond: &impl DevicePtr<f32>, g: f32, n: usize) -> Result<()> {
    const OP: &str = "cuda::guide";
    check_len(OP, "cond", cond.len(), n)?;
    check_len(OP, "uncond", uncond.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Sampler, "guide_f32")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (cp, _gc) = ptr_mut(cond, s);
    let (up, _gu) = ptr(uncond, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&cp).arg(&up).arg(&g).arg(&n_i);
    launch::launch(OP, b, cfg)
}

/// One sampler step over `n` elements: `x` (the sample) and the `history` buffers (none for
/// Euler; x̃_{i−1}, m_{i−1}, m_{i−2} for UniPC) advanced in place with model output `v`.
pub fn sampler_step<H: DevicePtrMut<f32>>(
    dev: &CudaDevice,
    update: &SamplerUpdate,
    v: &impl DevicePtr<f32>,
    x: &mut impl DevicePtrMut<f32>,
    history: &mut [H],
    n: usize,
) -> Result<()> {
    const OP: &str = "cuda::sampler_step";
    check_len(OP, "v", v.len(), n)?;
    check_len(OP, "x", x.len(), n)?;
    if history.len() != update.history_len() {
        return Err(KernelError::shape(OP, format!("{} history buffers for {}", history.len(), update.history_len())));
    }
    for h in history.iter() {
        check_len(OP, "history", h.len(), n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let n_i = n as i64;
    match (update, history) {
        (SamplerUpdate::Euler { dt }, _) => {
            let f = dev.function(KernelSource::Sampler, "euler_step_f32")?;
            let (xp, _gx) = ptr_mut(x, s);
            let (vp, _gv) = ptr(v, s);
            let mut b = s.launch_builder(&f);
            b.arg(&xp).arg(&vp).arg(dt).arg(&n_i);
            launch::launch(OP, b, cfg)
        }
        (SamplerUpdate::UniPc(step), [last, m1, m2]) => {
            let f = dev.function(KernelSource::Sampler, "unipc_step_f32")?;
            let (xp, _gx) = ptr_mut(x, s);
            let (vp, _gv) = ptr(v, s);
            let (lp, _gl) = ptr_mut(last, s);
            let (m1p, _g1) = ptr_mut(m1, s);
            let (m2p, _g2) = ptr_mut(m2, s);
            let c = step.corrector;
            let corrector = i32::from(c.is_some());
            let (c_ratio, c_alpha_phi, c_alpha_b, c_rho_last) = c.map_or((0.0f32, 0.0, 0.0, 0.0), |c| (c.ratio, c.alpha_phi, c.alpha_b, c.rho_last));
            let second = c.and_then(|c| c.second_order);
            let (c_second, (c_r, c_rho0)) = (i32::from(second.is_some()), second.unwrap_or((1.0, 0.0)));
            let p = step.predictor;
            let (p_second, p_r) = (i32::from(p.r.is_some()), p.r.unwrap_or(1.0));
            let mut b = s.launch_builder(&f);
            b.arg(&xp).arg(&vp).arg(&lp).arg(&m1p).arg(&m2p).arg(&step.sigma).arg(&corrector);
            b.arg(&c_ratio).arg(&c_alpha_phi).arg(&c_alpha_b).arg(&c_second).arg(&c_r).arg(&c_rho0).arg(&c_rho_last);
            b.arg(&p.ratio).arg(&p.alpha_phi).arg(&p.alpha_b).arg(&p_second).arg(&p_r).arg(&n_i);
            launch::launch(OP, b, cfg)
        }
        (SamplerUpdate::UniPc(_), _) => Err(KernelError::shape(OP, "UniPC keeps three history buffers")),
    }
}
