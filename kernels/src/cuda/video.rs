//! The VAE's operations on channel-major bf16 frames `[C, T, H, W]` on the GPU (`video.cu`):
//! - [`channel_rms_norm`] (`channel_rms_norm_bf16`), twin [`crate::cpu::channel_rms_norm`];
//! - [`upsample_nearest2x`] (`upsample_nearest2x_bf16`), twin [`crate::cpu::upsample_nearest2x`];
//! - [`transpose`] (`transpose_bf16`), twin [`crate::cpu::transpose`];
//! - [`conv3d`]: `im2col_conv3d_bf16` over tiles of output positions, a cuBLASLt GEMM into f32
//!   ([`super::gemm::linear`]), then `conv_bias_store_bf16`; twin [`crate::cpu::conv3d_pieces`]
//!   with the weight rounded to bf16 (the `bf16-host` backend's `conv3d`).
//!
//! Each rounds to bf16 exactly where `HostOps` does: once, at the store.

use super::launch::{self, as_i32, check_aligned, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::backend::ConvShape;
use crate::cpu::{Activation, Conv3dParams};
use crate::{KernelError, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

/// Largest im2col tile, in bf16 elements (128 MiB), and largest f32 GEMM tile `[co, tile]`: wide
/// products for cuBLASLt, bounded scratch memory whatever the video size.
pub const TILE_BUDGET: usize = 64 << 20;
/// Fewest output positions per tile (a very deep kernel still gives a wide product).
pub const MIN_TILE: usize = 128;

/// A 3-D convolution's weight and bias on the device: the weight `[co, k_pitch]` in bf16 (each
/// row the `taps` weights in PyTorch's order `(ci, dt, dh, dw)`, rounded to nearest even, then
/// zeros up to `k_pitch`, the taps rounded up to a multiple of 8 so that every row of both GEMM
/// operands starts 16-byte aligned), the bias `[co]` in f32.
pub struct DeviceConv {
    shape: ConvShape,
    k_pitch: usize,
    weight: CudaSlice<bf16>,
    bias: CudaSlice<f32>,
}

impl DeviceConv {
    /// Uploads `weight` `[co, ci, kt, kh, kw]` (f32, rounded to bf16 here) and `bias` `[co]` (kept f32).
    pub fn new(dev: &CudaDevice, shape: ConvShape, weight: &[f32], bias: &[f32]) -> Result<Self> {
        const OP: &str = "conv_weight";
        let (co, taps) = (shape.out_channels, shape.taps());
        if co == 0 || taps == 0 || weight.len() != co * taps || bias.len() != co {
            return Err(KernelError::shape(OP, format!("weight {} and bias {} values for {shape:?}", weight.len(), bias.len())));
        }
        let k_pitch = taps.next_multiple_of(8);
        let mut padded = vec![bf16::ZERO; co * k_pitch];
        for (dst, src) in padded.chunks_exact_mut(k_pitch).zip(weight.chunks_exact(taps)) {
            dst[..taps].iter_mut().zip(src).for_each(|(d, &s)| *d = bf16::from_f32(s));
        }
        Ok(Self { shape, k_pitch, weight: dev.upload(&padded)?, bias: dev.upload(bias)? })
    }

    /// The weight's shape.
    pub fn shape(&self) -> &ConvShape {
        &self.shape
    }

    /// Elements per weight row (and im2col row): the taps rounded up to a multiple of 8.
    pub fn k_pitch(&self) -> usize {
        self.k_pitch
    }
}

/// The default tile of output positions for `w` over `positions`: at most [`TILE_BUDGET`]
/// elements in the im2col tile and in the f32 GEMM tile, at least [`MIN_TILE`] positions.
pub fn default_tile(w: &DeviceConv, positions: usize) -> usize {
    let by_cols = TILE_BUDGET / w.k_pitch;
    let by_out = TILE_BUDGET / w.shape.out_channels;
    by_cols.min(by_out).max(MIN_TILE).min(positions.max(1))
}

/// PyTorch's `Conv3d` over the frames `pieces` hold one after another in time (one or two
/// pieces: each `(buffer, frames)`, `[C, frames, H, W]` from the buffer's start, read in place),
/// `chw = [C, H, W]`, with `p`'s stride and zero padding; `p.kernel` must be the weight's. f32
/// accumulation of bf16 products, plus the f32 bias, rounded once to bf16. Returns the new
/// output `[co, T', H', W']` and its shape.
pub fn conv3d<P: DevicePtr<bf16>>(
    dev: &CudaDevice,
    pieces: &[(&P, usize)],
    chw: [usize; 3],
    w: &DeviceConv,
    p: &Conv3dParams,
) -> Result<(CudaSlice<bf16>, [usize; 4])> {
    conv3d_tiled(dev, pieces, chw, w, p, None)
}

/// [`conv3d`] with at most `max_tile` output positions per im2col + GEMM step (tests force small
/// tiles to cross tile boundaries).
pub fn conv3d_with_tile<P: DevicePtr<bf16>>(
    dev: &CudaDevice,
    pieces: &[(&P, usize)],
    chw: [usize; 3],
    w: &DeviceConv,
    p: &Conv3dParams,
    max_tile: usize,
) -> Result<(CudaSlice<bf16>, [usize; 4])> {
    conv3d_tiled(dev, pieces, chw, w, p, Some(max_tile.max(1)))
}

fn conv3d_tiled<P: DevicePtr<bf16>>(
    dev: &CudaDevice,
    pieces: &[(&P, usize)],
    chw: [usize; 3],
    w: &DeviceConv,
    p: &Conv3dParams,
    max_tile: Option<usize>,
) -> Result<(CudaSlice<bf16>, [usize; 4])> {
    const OP: &str = "cuda::conv3d";
    let [c, h, wd] = chw;
    let shape = &w.shape;
    if pieces.is_empty() || pieces.len() > 2 {
        return Err(KernelError::invalid(OP, format!("{} input pieces (one or two)", pieces.len())));
    }
    if c != shape.in_channels || p.kernel != shape.kernel {
        return Err(KernelError::shape(OP, format!("input of {c} channels and kernel {:?} for a weight {shape:?}", p.kernel)));
    }
    let mut frames = [0usize; 2];
    for (i, &(buf, f)) in pieces.iter().enumerate() {
        let need = c.checked_mul(f).and_then(|v| v.checked_mul(h)).and_then(|v| v.checked_mul(wd));
        match need {
            Some(n) if n <= buf.len() => frames[i] = f,
            _ => return Err(KernelError::shape(OP, format!("piece {i}: {f} frames of [{c}, {h}, {wd}] overrun a buffer of {}", buf.len()))),
        }
    }
    let [to, ho, wo] = p.output_size([frames[0] + frames[1], h, wd])?;
    let co = shape.out_channels;
    let positions = to * ho * wo;
    let out_shape = [co, to, ho, wo];
    let mut out = dev.zeros::<bf16>(co * positions)?;
    let (k_pitch, taps) = (w.k_pitch, shape.taps());
    let tile = max_tile.unwrap_or_else(|| default_tile(w, positions)).min(positions);
    // The kernels' 32-bit parameters (positions and element offsets are 64-bit).
    let ints = [
        as_i32(OP, "piece a frames", frames[0])?,
        as_i32(OP, "piece b frames", frames[1])?,
        as_i32(OP, "channels", c)?,
        as_i32(OP, "height", h)?,
        as_i32(OP, "width", wd)?,
        as_i32(OP, "kt", p.kernel[0])?,
        as_i32(OP, "kh", p.kernel[1])?,
        as_i32(OP, "kw", p.kernel[2])?,
        as_i32(OP, "stride t", p.stride[0])?,
        as_i32(OP, "stride h", p.stride[1])?,
        as_i32(OP, "stride w", p.stride[2])?,
        as_i32(OP, "padding t", p.padding[0][0])?,
        as_i32(OP, "padding h", p.padding[1][0])?,
        as_i32(OP, "padding w", p.padding[2][0])?,
        as_i32(OP, "output height", ho)?,
        as_i32(OP, "output width", wo)?,
    ];
    as_i32(OP, "frames", frames[0] + frames[1])?;
    as_i32(OP, "tile", tile)?;
    let (co_i, k_pitch_i, taps_i) = (as_i32(OP, "out channels", co)?, as_i32(OP, "k_pitch", k_pitch)?, as_i32(OP, "taps", taps)?);
    let positions_i = positions as i64;
    let im2col = dev.function(KernelSource::Video, "im2col_conv3d_bf16")?;
    let store = dev.function(KernelSource::Video, "conv_bias_store_bf16")?;
    // Scratch tiles, reused by every step. They are freed when they drop at the end of this call,
    // after the last launch that uses them is queued: the free is ordered on the device's stream
    // (stream-ordered `cuMemFreeAsync`, or a synchronisation first), as for `backend::flash`'s
    // padded copies, so no queued kernel or GEMM reads freed memory.
    let mut cols = dev.zeros::<bf16>(tile * k_pitch)?;
    let mut y = dev.zeros::<f32>(co * tile)?;
    let s = dev.stream();
    let (pa, _ga) = ptr(pieces[0].0, s);
    let (pb, _gb) = match pieces.get(1) {
        Some(&(b, _)) => {
            let (pb, g) = ptr(b, s);
            (pb, Some(g))
        }
        // Never read (piece b has no frames); a valid address all the same.
        None => (pa, None),
    };
    let mut p0 = 0usize;
    while p0 < positions {
        let n = tile.min(positions - p0);
        let (n_i, p0_i) = (n as i32, p0 as i64);
        {
            let mut cv = cols.slice_mut(..n * k_pitch);
            let (cp, _gc) = ptr_mut(&mut cv, s);
            let mut b = s.launch_builder(&im2col);
            b.arg(&cp).arg(&pa).arg(&pb);
            for v in &ints {
                b.arg(v);
            }
            b.arg(&p0_i).arg(&n_i).arg(&k_pitch_i).arg(&taps_i);
            launch::launch(OP, b, launch::elementwise(dev, n * (k_pitch / 8))?)?;
        }
        {
            let cv = cols.slice(..n * k_pitch);
            let mut yv = y.slice_mut(..co * n);
            // y[co, n] = weight[co, k_pitch] · cols[n, k_pitch]ᵀ, f32 accumulation and output.
            super::gemm::linear::<f32>(dev, &w.weight, co, k_pitch, &cv, n, None::<&CudaSlice<f32>>, Activation::None, &mut yv)?;
        }
        {
            let yv = y.slice(..co * n);
            let (yp, _gy) = ptr(&yv, s);
            let (bp, _gbias) = ptr(&w.bias, s);
            let (op, _go) = ptr_mut(&mut out, s);
            let mut b = s.launch_builder(&store);
            b.arg(&op).arg(&yp).arg(&bp).arg(&co_i).arg(&n_i).arg(&p0_i).arg(&positions_i);
            launch::launch(OP, b, launch::elementwise(dev, co * n)?)?;
        }
        p0 += n;
    }
    Ok((out, out_shape))
}

/// In place on the channel-major `x` `[channels, positions]`: `F.normalize(x, dim=channels)·√C·γ`
/// (`γ` `[channels]` f32), then SiLU when `silu`; f32 arithmetic, one rounding to bf16.
pub fn channel_rms_norm(
    dev: &CudaDevice,
    x: &mut impl DevicePtrMut<bf16>,
    channels: usize,
    positions: usize,
    gamma: &impl DevicePtr<f32>,
    silu: bool,
) -> Result<()> {
    const OP: &str = "cuda::channel_rms_norm";
    if channels == 0 || gamma.len() != channels {
        return Err(KernelError::shape(OP, format!("gamma has {} values for {channels} channels", gamma.len())));
    }
    check_len(OP, "x", x.len(), channels * positions)?;
    if positions == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Video, "channel_rms_norm_bf16")?;
    let cfg = launch::elementwise(dev, positions)?;
    let s = dev.stream();
    let (xp, _gx) = ptr_mut(x, s);
    let (gp, _gg) = ptr(gamma, s);
    // The twin's factor: √C in f32.
    let (c_i, p_i, scale, silu_i) = (as_i32(OP, "channels", channels)?, positions as i64, (channels as f32).sqrt(), i32::from(silu));
    let mut b = s.launch_builder(&f);
    b.arg(&xp).arg(&gp).arg(&c_i).arg(&p_i).arg(&scale).arg(&silu_i);
    launch::launch(OP, b, cfg)
}

/// The `planes` planes of `h × w` at the start of `x`, nearest ×2 in both axes, written packed
/// (`planes` planes of `2h × 2w`) at the start of `out` (4-byte aligned: the kernel writes pairs).
pub fn upsample_nearest2x(dev: &CudaDevice, x: &impl DevicePtr<bf16>, planes: usize, h: usize, w: usize, out: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    const OP: &str = "cuda::upsample_nearest2x";
    let n =
        planes.checked_mul(h).and_then(|v| v.checked_mul(w)).filter(|v| v.checked_mul(4).is_some()).ok_or_else(|| KernelError::shape(OP, "size overflows"))?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), 4 * n)?;
    if n == 0 {
        return Ok(());
    }
    let (h_i, w_i) = (as_i32(OP, "h", h)?, as_i32(OP, "w", w)?);
    let f = dev.function(KernelSource::Video, "upsample_nearest2x_bf16")?;
    let cfg = launch::elementwise(dev, n)?;
    let s = dev.stream();
    let (op, _go) = ptr_mut(out, s);
    let (xp, _gx) = ptr(x, s);
    check_aligned(OP, "out", op, 4)?;
    let planes_i = planes as i64;
    let mut b = s.launch_builder(&f);
    b.arg(&op).arg(&xp).arg(&planes_i).arg(&h_i).arg(&w_i);
    launch::launch(OP, b, cfg)
}

/// `out[j, i] = x[i, j]` for the packed `[rows, cols]` matrix at the start of `x`, written packed
/// (`[cols, rows]`) at the start of `out`. Any element offsets (no alignment needed).
pub fn transpose(dev: &CudaDevice, x: &impl DevicePtr<bf16>, rows: usize, cols: usize, out: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    const OP: &str = "cuda::transpose";
    let n = rows.checked_mul(cols).ok_or_else(|| KernelError::shape(OP, "size overflows"))?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(KernelSource::Video, "transpose_bf16")?;
    let tiles = rows.div_ceil(32) * cols.div_ceil(32);
    let blocks = tiles.clamp(1, (dev.multiprocessors() * 8).max(1));
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let s = dev.stream();
    let (op, _go) = ptr_mut(out, s);
    let (xp, _gx) = ptr(x, s);
    let (rows_i, cols_i) = (rows as i64, cols as i64);
    let mut b = s.launch_builder(&f);
    b.arg(&op).arg(&xp).arg(&rows_i).arg(&cols_i);
    launch::launch(OP, b, cfg)
}
