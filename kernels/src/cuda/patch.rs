//! Patchify (latent -> bf16 token rows) and unpatchify (f32 token rows -> latent) on the GPU.
//! Twins: [`crate::cpu::patchify`] and [`crate::cpu::unpatchify`], same feature orders.

use super::launch::{self, as_i32, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::PatchGeometry;
use crate::{KernelError, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;
use std::ops::Range;

fn geometry_args(op: &'static str, g: &PatchGeometry) -> Result<[i32; 7]> {
    if g.channels == 0 || g.grid.contains(&0) || g.patch.contains(&0) {
        return Err(KernelError::invalid(op, format!("{g:?} has an empty dimension")));
    }
    as_i32(op, "features", g.features())?;
    Ok([
        as_i32(op, "channels", g.channels)?,
        as_i32(op, "grid frames", g.grid[0])?,
        as_i32(op, "grid rows", g.grid[1])?,
        as_i32(op, "grid columns", g.grid[2])?,
        as_i32(op, "patch t", g.patch[0])?,
        as_i32(op, "patch h", g.patch[1])?,
        as_i32(op, "patch w", g.patch[2])?,
    ])
}

/// Rows for tokens `tokens` of the f32 `latent` `[C, F, H, W]`, features ordered
/// (channel, p_t, p_h, p_w), written as bf16 to `out` `[tokens, features]`.
pub fn patchify(dev: &CudaDevice, latent: &impl DevicePtr<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    const OP: &str = "cuda::patchify";
    let a = geometry_args(OP, g)?;
    if tokens.start > tokens.end || tokens.end > g.tokens() {
        return Err(KernelError::shape(OP, format!("tokens {tokens:?} of a grid of {}", g.tokens())));
    }
    check_len(OP, "latent", latent.len(), g.latent_len())?;
    let n = tokens.len() * g.features();
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Patch, "patchify_bf16")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (op, _go) = ptr_mut(out, s);
    let (lp, _gl) = ptr(latent, s);
    let (t0, tn) = (tokens.start as i64, tokens.len() as i64);
    let mut b = s.launch_builder(&f);
    b.arg(&op).arg(&lp);
    for v in &a {
        b.arg(v);
    }
    b.arg(&t0).arg(&tn);
    launch::launch(OP, b, cfg)
}

/// The f32 latent `[C, F, H, W]` from all tokens' f32 rows `[S, features]` ordered
/// (channel, p_t, p_h, p_w): patchify's inverse.
pub fn unpatchify(dev: &CudaDevice, rows: &impl DevicePtr<f32>, g: &PatchGeometry, latent: &mut impl DevicePtrMut<f32>) -> Result<()> {
    const OP: &str = "cuda::unpatchify";
    let a = geometry_args(OP, g)?;
    check_len(OP, "rows", rows.len(), g.tokens() * g.features())?;
    check_len(OP, "latent", latent.len(), g.latent_len())?;
    let f = dev.function(KernelSource::Patch, "unpatchify_f32")?;
    let cfg = launch::elementwise(dev, g.latent_len())?;
    let s = dev.stream();
    let (lp, _gl) = ptr_mut(latent, s);
    let (rp, _gr) = ptr(rows, s);
    let mut b = s.launch_builder(&f);
    b.arg(&lp).arg(&rp);
    for v in &a {
        b.arg(v);
    }
    launch::launch(OP, b, cfg)
}
