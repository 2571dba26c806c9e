//! Sampling updates of f32 latents on the GPU: classifier-free guidance, Euler step, weighted sums
//! (UniPC). Twins: [`crate::cpu::cfg_combine`], [`crate::cpu::euler_step`],
//! [`crate::cpu::weighted_sum`].

use super::launch::{self, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::sampler::MAX_TERMS;
use crate::{KernelError, Result};
use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, PushKernelArg};

/// `out = uncond + g·(cond − uncond)` over `n` elements.
pub fn cfg_combine(
    dev: &CudaDevice,
    uncond: &impl DevicePtr<f32>,
    cond: &impl DevicePtr<f32>,
    g: f32,
    out: &mut impl DevicePtrMut<f32>,
    n: usize,
) -> Result<()> {
    const OP: &str = "cuda::cfg_combine";
    check_len(OP, "uncond", uncond.len(), n)?;
    check_len(OP, "cond", cond.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Sampler, "cfg_combine_f32")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (op, _go) = ptr_mut(out, s);
    let (up, _gu) = ptr(uncond, s);
    let (cp, _gc) = ptr(cond, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&op).arg(&up).arg(&cp).arg(&g).arg(&n_i);
    launch::launch(OP, b, cfg)
}

/// `x += dt·v` over `n` elements, in place.
pub fn euler_step(dev: &CudaDevice, x: &mut impl DevicePtrMut<f32>, v: &impl DevicePtr<f32>, dt: f32, n: usize) -> Result<()> {
    const OP: &str = "cuda::euler_step";
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "v", v.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Sampler, "euler_step_f32")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    let (vp, _gv) = ptr(v, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&vp).arg(&dt).arg(&n_i);
    launch::launch(OP, b, cfg)
}

/// `out = Σ_t c_t·in_t` over `n` elements, 1 to 4 terms, summed in the order given.
pub fn weighted_sum(dev: &CudaDevice, terms: &[(f32, CudaView<'_, f32>)], out: &mut impl DevicePtrMut<f32>, n: usize) -> Result<()> {
    const OP: &str = "cuda::weighted_sum";
    if terms.is_empty() || terms.len() > MAX_TERMS {
        return Err(KernelError::invalid(OP, format!("1 to {MAX_TERMS} terms, got {}", terms.len())));
    }
    for (i, (_, t)) in terms.iter().enumerate() {
        check_len(OP, &format!("term {i}"), t.len(), n)?;
    }
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Sampler, "weighted_sum_f32")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (op, _go) = ptr_mut(out, s);
    let ptrs: Vec<_> = terms.iter().map(|(_, t)| ptr(t, s)).collect();
    // Unused operands repeat the first (never read: the kernel stops at `terms`).
    let p = |i: usize| ptrs.get(i).map_or(ptrs[0].0, |x| x.0);
    let c = |i: usize| terms.get(i).map_or(0.0, |t| t.0);
    let (p0, p1, p2, p3) = (p(0), p(1), p(2), p(3));
    let (c0, c1, c2, c3) = (c(0), c(1), c(2), c(3));
    let (count, n_i) = (terms.len() as i32, n as i64);
    let mut b = s.launch_builder(&f);
    b.arg(&op).arg(&count).arg(&p0).arg(&c0).arg(&p1).arg(&c1).arg(&p2).arg(&c2).arg(&p3).arg(&c3).arg(&n_i);
    launch::launch(OP, b, cfg)
}
