//! LayerNorm with adaLN modulation, and the q/k RMSNorm fused with 3-D RoPE, on the GPU.
//! Twins: [`crate::cpu::layer_norm`] and [`crate::cpu::qk_norm_rope`].

use super::launch::{self, as_i32, check_aligned, check_len, opt_ptr, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::RopeTable;
use crate::{KernelError, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

/// The device twin of [`crate::cpu::LayerNormParams`]: `y = (x̂·weight + bias)·(1 + scale) + shift`,
/// each `[dim]` f32 part optional (a view can be a chunk of the modulation vector).
#[derive(Debug, Default)]
pub struct LayerNormDevParams<'a> {
    /// Epsilon added to the variance.
    pub eps: f32,
    /// Elementwise affine weight.
    pub weight: Option<CudaView<'a, f32>>,
    /// Elementwise affine bias.
    pub bias: Option<CudaView<'a, f32>>,
    /// adaLN scale (applied as `1 + scale`).
    pub scale: Option<CudaView<'a, f32>>,
    /// adaLN shift.
    pub shift: Option<CudaView<'a, f32>>,
}

/// LayerNorm of each of the `rows` f32 rows of `x` (`[rows, dim]`), written as bf16 rows to `y`.
pub fn layer_norm_modulated(
    dev: &CudaDevice,
    x: &impl DevicePtr<f32>,
    rows: usize,
    dim: usize,
    p: &LayerNormDevParams<'_>,
    y: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "cuda::layer_norm_modulated";
    if dim == 0 {
        return Err(KernelError::invalid(OP, "dim must be positive"));
    }
    check_len(OP, "x", x.len(), rows * dim)?;
    check_len(OP, "y", y.len(), rows * dim)?;
    for (name, v) in [("weight", &p.weight), ("bias", &p.bias), ("scale", &p.scale), ("shift", &p.shift)] {
        if let Some(v) = v {
            if v.len() != dim {
                return Err(KernelError::shape(OP, format!("{name} has {} elements, rows have {dim}", v.len())));
            }
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, dim_i) = (as_i32(OP, "rows", rows)?, as_i32(OP, "dim", dim)?);
    let f = dev.function(KernelSource::AdalnNorm, "layer_norm_modulated_bf16")?;
    let s = dev.stream();
    let (yp, _gy) = ptr_mut(y, s);
    let (xp, _gx) = ptr(x, s);
    let (wp, _gw) = opt_ptr(p.weight.as_ref(), s);
    let (bp, _gb) = opt_ptr(p.bias.as_ref(), s);
    let (sp, _gs) = opt_ptr(p.scale.as_ref(), s);
    let (hp, _gh) = opt_ptr(p.shift.as_ref(), s);
    let mut b = s.launch_builder(&f);
    b.arg(&yp).arg(&xp).arg(&rows_i).arg(&dim_i).arg(&p.eps).arg(&wp).arg(&bp).arg(&sp).arg(&hp);
    launch::launch(OP, b, launch::per_row(OP, rows)?)
}

/// A [`RopeTable`] copied to the device: cosines and sines `[tokens, pairs]`.
#[derive(Debug)]
pub struct DeviceRopeTable {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    pairs: usize,
    tokens: usize,
}

impl DeviceRopeTable {
    /// Uploads `table`.
    pub fn upload(dev: &CudaDevice, table: &RopeTable) -> Result<Self> {
        Ok(Self { cos: dev.upload(table.cos())?, sin: dev.upload(table.sin())?, pairs: table.pairs(), tokens: table.tokens() })
    }

    /// Number of tokens (rows) covered.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// In place on `rows` bf16 rows of `x` (`stride` apart; `heads·head_dim` channels each):
/// RMSNorm over the row with `weight` (`[heads·head_dim]` f32), then, when `rope` is given, the
/// rotation of the row's token (table row = row of `x`). f32 arithmetic, one rounding to bf16.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    dev: &CudaDevice,
    x: &mut impl DevicePtrMut<bf16>,
    rows: usize,
    stride: usize,
    heads: usize,
    head_dim: usize,
    weight: &impl DevicePtr<f32>,
    eps: f32,
    rope: Option<&DeviceRopeTable>,
) -> Result<()> {
    const OP: &str = "cuda::qk_norm_rope";
    let dim = heads * head_dim;
    if dim == 0 || !head_dim.is_multiple_of(2) || stride < dim || !stride.is_multiple_of(2) {
        return Err(KernelError::shape(OP, format!("heads {heads} x head_dim {head_dim} (even), stride {stride} (even, at least their product)")));
    }
    check_len(OP, "weight", weight.len(), dim)?;
    if weight.len() != dim {
        return Err(KernelError::shape(OP, format!("weight has {} elements, rows have {dim}", weight.len())));
    }
    check_len(OP, "x", x.len(), if rows == 0 { 0 } else { (rows - 1) * stride + dim })?;
    if let Some(t) = rope {
        if t.tokens != rows || 2 * t.pairs != head_dim {
            return Err(KernelError::shape(OP, format!("rope table of {} tokens x {} pairs for {rows} rows, head_dim {head_dim}", t.tokens, t.pairs)));
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, heads_i, hd_i) = (as_i32(OP, "rows", rows)?, as_i32(OP, "heads", heads)?, as_i32(OP, "head_dim", head_dim)?);
    as_i32(OP, "heads·head_dim", dim)?;
    let stride_i = stride as i64;
    let f = dev.function(KernelSource::QkNormRope, "qk_norm_rope_bf16")?;
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    check_aligned(OP, "x", xp, 4)?;
    let (wp, _gw) = ptr(weight, s);
    let (cp, _gc) = opt_ptr(rope.map(|t| &t.cos), s);
    let (sp, _gs) = opt_ptr(rope.map(|t| &t.sin), s);
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&rows_i).arg(&stride_i).arg(&heads_i).arg(&hd_i).arg(&wp).arg(&eps).arg(&cp).arg(&sp);
    launch::launch(OP, b, launch::per_row(OP, rows)?)
}
