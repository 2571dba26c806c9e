//! Element-wise kernels on the GPU: gated residual add, GELU (tanh), product, sum, f32 <-> bf16
//! conversion. Twins: [`crate::cpu::gated_residual_add`] / [`crate::cpu::residual_add`],
//! [`crate::cpu::apply_activation`] with `GeluTanh`, [`crate::cpu::mul_in_place`],
//! `HostOps::accumulate`, `half::bf16::from_f32` / `to_f32`.

use super::elem::OutputElem;
use super::launch::{self, check_len, opt_ptr, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::{KernelError, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

/// `x[r, c] += y[r, c]·gate[c]` over `n` elements of rows of `dim` (no gate: `x += y`). `x` is f32,
/// `y` bf16 or f32, `gate` `[dim]` f32.
pub fn gated_residual_add<Y: OutputElem>(
    dev: &CudaDevice,
    x: &mut impl DevicePtrMut<f32>,
    y: &impl DevicePtr<Y>,
    gate: Option<&impl DevicePtr<f32>>,
    n: usize,
    dim: usize,
) -> Result<()> {
    const OP: &str = "cuda::gated_residual_add";
    if dim == 0 || !n.is_multiple_of(dim) {
        return Err(KernelError::shape(OP, format!("{n} elements are not rows of {dim}")));
    }
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "y", y.len(), n)?;
    if let Some(g) = gate {
        if g.len() != dim {
            return Err(KernelError::shape(OP, format!("gate has {} elements, rows have {dim}", g.len())));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let name = if Y::NAME == "bf16" { "gated_residual_add_bf16" } else { "gated_residual_add_f32" };
    let f = dev.function(KernelSource::Residual, name)?;
    let rows = n / dim;
    let cfg = launch::row_stride(dev, rows);
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    let (yp, _gy) = ptr(y, s);
    let (gp, _gg) = opt_ptr(gate, s);
    let (rows_i, dim_i) = (rows as i64, launch::as_i32(OP, "dim", dim)?);
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&yp).arg(&gp).arg(&rows_i).arg(&dim_i);
    launch::launch(OP, b, cfg)
}

/// GELU (tanh approximation) in place on the first `n` elements of `x` (bf16 or f32).
/// Twin: [`crate::cpu::apply_activation`] with `GeluTanh`.
pub fn gelu_tanh<T: OutputElem>(dev: &CudaDevice, x: &mut impl DevicePtrMut<T>, n: usize) -> Result<()> {
    unary(dev, "cuda::gelu_tanh", ["gelu_tanh_bf16", "gelu_tanh_f32"], x, n)
}

/// Exact GELU, `x·Φ(x)` with the error function, in place on the first `n` elements of `x`
/// (bf16 or f32; f32 arithmetic, one rounding). Twin: [`crate::cpu::apply_activation`] with `Gelu`.
pub fn gelu_erf<T: OutputElem>(dev: &CudaDevice, x: &mut impl DevicePtrMut<T>, n: usize) -> Result<()> {
    unary(dev, "cuda::gelu_erf", ["gelu_erf_bf16", "gelu_erf_f32"], x, n)
}

/// Launches the in-place `gelu.cu` kernel of `kernels` (bf16 and f32 variants) on the first `n`
/// elements of `x`.
fn unary<T: OutputElem>(dev: &CudaDevice, op: &'static str, kernels: [&'static str; 2], x: &mut impl DevicePtrMut<T>, n: usize) -> Result<()> {
    check_len(op, "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let name = if T::NAME == "bf16" { kernels[0] } else { kernels[1] };
    let f = dev.function(KernelSource::Gelu, name)?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&n_i);
    launch::launch(op, b, cfg)
}

/// `x[i] ← x[i]·y[i]` for the first `n` elements (bf16 or f32; f32 arithmetic, one rounding).
/// Twin: [`crate::cpu::mul_in_place`].
pub fn mul<T: OutputElem>(dev: &CudaDevice, x: &mut impl DevicePtrMut<T>, y: &impl DevicePtr<T>, n: usize) -> Result<()> {
    binary(dev, "cuda::mul", ["mul_bf16", "mul_f32"], x, y, n)
}

/// `x[i] ← x[i] + y[i]` for the first `n` elements (bf16 or f32; f32 arithmetic, one rounding).
/// Twin: `HostOps::accumulate` (`bf16(f32(x) + f32(y))`).
pub fn add<T: OutputElem>(dev: &CudaDevice, x: &mut impl DevicePtrMut<T>, y: &impl DevicePtr<T>, n: usize) -> Result<()> {
    binary(dev, "cuda::add", ["add_bf16", "add_f32"], x, y, n)
}

/// Launches the `gelu.cu` kernel of `kernels` (bf16 and f32 variants) on `x[i] ← x[i] ∘ y[i]`
/// for the first `n` elements.
fn binary<T: OutputElem>(
    dev: &CudaDevice,
    op: &'static str,
    kernels: [&'static str; 2],
    x: &mut impl DevicePtrMut<T>,
    y: &impl DevicePtr<T>,
    n: usize,
) -> Result<()> {
    check_len(op, "x", x.len(), n)?;
    check_len(op, "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Gelu, if T::NAME == "bf16" { kernels[0] } else { kernels[1] })?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    let (yp, _gy) = ptr(y, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&yp).arg(&n_i);
    launch::launch(op, b, cfg)
}

/// `out[i] = bf16(x[i])` (round to nearest even) for the first `n` elements.
pub fn f32_to_bf16(dev: &CudaDevice, x: &impl DevicePtr<f32>, out: &mut impl DevicePtrMut<bf16>, n: usize) -> Result<()> {
    convert(dev, "cuda::f32_to_bf16", "f32_to_bf16_kernel", x, out, n)
}

/// `out[i] = f32(x[i])` for the first `n` elements.
pub fn bf16_to_f32(dev: &CudaDevice, x: &impl DevicePtr<bf16>, out: &mut impl DevicePtrMut<f32>, n: usize) -> Result<()> {
    convert(dev, "cuda::bf16_to_f32", "bf16_to_f32_kernel", x, out, n)
}

fn convert<A, B>(dev: &CudaDevice, op: &'static str, kernel: &'static str, x: &impl DevicePtr<A>, out: &mut impl DevicePtrMut<B>, n: usize) -> Result<()> {
    check_len(op, "input", x.len(), n)?;
    check_len(op, "output", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Convert, kernel)?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (op_, _go) = ptr_mut(out, s);
    let (xp, _gx) = ptr(x, s);
    let n_i = n as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&op_).arg(&xp).arg(&n_i);
    launch::launch(op, b, cfg)
}
