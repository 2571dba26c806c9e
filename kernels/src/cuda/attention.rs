//! Flash attention (forward, with log-sum-exp) for heads of 64 and 128, the wide attention for
//! heads above 128 (`attention_wide.cu`), and the merge of partial results, on the GPU.
//! Twins: [`crate::cpu::attention`] (both attentions) and [`crate::cpu::merge_partials`], same
//! layouts.

use super::elem::OutputElem;
use super::launch::{self, as_i32, check_aligned, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::AttentionShape;
use crate::{KernelError, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

/// Head dimensions the attention kernel is built for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Widest head the wide attention kernel takes (heads above 128 channels, multiples of 8).
pub const WIDE_HEAD_MAX: usize = 512;

/// The head widths attention serves on the GPU, for messages.
pub const SERVED_HEAD_DIMS: &str = "64, 128, or a multiple of 8 from 136 to 512";

/// Whether the GPU attention takes heads of `head_dim` channels unpadded: the flash kernel's 64
/// and 128, or the wide kernel's multiples of 8 above 128 up to [`WIDE_HEAD_MAX`].
pub fn serves_head_dim(head_dim: usize) -> bool {
    HEAD_DIMS.contains(&head_dim) || (head_dim > 128 && head_dim <= WIDE_HEAD_MAX && head_dim.is_multiple_of(8))
}

/// Query rows per block of the flash kernel, both head widths (4 warps of two 16-row tiles).
const FLASH_BLOCK_ROWS: usize = 128;

/// Key and value rows per tile of the flash kernel: 64 at head dim 64, 32 at 128 (where 64 would
/// spill registers).
fn flash_key_rows(head_dim: usize) -> usize {
    if head_dim == 64 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the flash kernel for `head_dim`, in bytes: `FaTile::SMEM_BYTES` of
/// `flash_attention.cu`, which traps when given less. Rows are padded by 8 elements; a K and a V
/// tile, and the Q tile beside them at 128 (it stays there) or over them at 64 (read into
/// registers first).
pub fn flash_smem_bytes(head_dim: usize) -> usize {
    let row = (head_dim + 8) * 2;
    let (kv, q) = (2 * flash_key_rows(head_dim) * row, FLASH_BLOCK_ROWS * row);
    if head_dim == 64 {
        kv.max(q)
    } else {
        kv + q
    }
}

/// Shared memory a kernel gets without asking for more (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

fn kernel_name<O: OutputElem>(head_dim: usize) -> &'static str {
    match (head_dim, O::NAME) {
        (64, "bf16") => "flash_attention_d64_bf16",
        (64, _) => "flash_attention_d64_f32",
        (_, "bf16") => "flash_attention_d128_bf16",
        _ => "flash_attention_d128_f32",
    }
}

/// softmax(scale·q·kᵀ)·v for every head, bf16 inputs, f32 accumulation on tensor cores.
///
/// `q`, `k`, `v` are token-major with row strides `shape.q_stride` / `shape.kv_stride` (multiples
/// of 8, 16-byte aligned starts), head `h` in channels `[h·head_dim, (h+1)·head_dim)`; `head_dim`
/// is 64 or 128 (the tensor-core kernel) or a multiple of 8 up to [`WIDE_HEAD_MAX`] (the wide
/// kernel: f32 probabilities, for the VAE's one head of 384). Writes `out` rows `[q_len, out_stride]` (channels `[0, heads·head_dim)` of each
/// row) and `lse` `[heads, q_len]` (ln Σ exp(scale·q·k); −∞ and zero output when `kv_len` is 0).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention<O: OutputElem>(
    dev: &CudaDevice,
    q: &impl DevicePtr<bf16>,
    k: &impl DevicePtr<bf16>,
    v: &impl DevicePtr<bf16>,
    shape: AttentionShape,
    scale: f32,
    out: &mut impl DevicePtrMut<O>,
    out_stride: usize,
    lse: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const OP: &str = "cuda::flash_attention";
    let AttentionShape { heads, head_dim, q_len, kv_len, q_stride, kv_stride } = shape;
    if !serves_head_dim(head_dim) || heads == 0 {
        return Err(KernelError::invalid(OP, format!("head_dim {head_dim} (supported: {SERVED_HEAD_DIMS}), heads {heads}")));
    }
    let hd = heads * head_dim;
    if q_stride < hd || kv_stride < hd || out_stride < hd {
        return Err(KernelError::shape(OP, format!("strides q {q_stride}, kv {kv_stride}, out {out_stride} shorter than heads·head_dim = {hd}")));
    }
    if !q_stride.is_multiple_of(8) || !kv_stride.is_multiple_of(8) || !out_stride.is_multiple_of(2) {
        return Err(KernelError::invalid(OP, format!("q/kv strides ({q_stride}, {kv_stride}) must be multiples of 8 and the out stride ({out_stride}) even")));
    }
    let need = |rows: usize, stride: usize| {
        if rows == 0 {
            0
        } else {
            (rows - 1) * stride + hd
        }
    };
    check_len(OP, "q", q.len(), need(q_len, q_stride))?;
    check_len(OP, "k", k.len(), need(kv_len, kv_stride))?;
    check_len(OP, "v", v.len(), need(kv_len, kv_stride))?;
    check_len(OP, "out", out.len(), need(q_len, out_stride))?;
    check_len(OP, "lse", lse.len(), heads * q_len)?;
    if q_len == 0 {
        return Ok(());
    }
    let (q_len_i, kv_len_i) = (as_i32(OP, "q_len", q_len)?, as_i32(OP, "kv_len", kv_len)?);
    let heads_u = u32::try_from(heads).ok().filter(|&h| h <= 65_535).ok_or_else(|| KernelError::invalid(OP, format!("{heads} heads")))?;
    // Heads of 64 and 128: the tensor-core flash kernel; wider heads: the wide kernel (one warp
    // per query row, f32 probabilities), which also takes the head width.
    let wide = !HEAD_DIMS.contains(&head_dim);
    let (f, rows, threads) = if wide {
        let name = if O::NAME == "bf16" { "wide_attention_bf16" } else { "wide_attention_f32" };
        (dev.function(KernelSource::WideAttention, name)?, WIDE_BLOCK_ROWS, 256)
    } else {
        (dev.function(KernelSource::FlashAttention, kernel_name::<O>(head_dim))?, FLASH_BLOCK_ROWS, 128)
    };
    let smem = if wide { 0 } else { flash_smem_bytes(head_dim) };
    if smem > DEFAULT_SMEM_LIMIT {
        // Above 48 KiB a kernel must ask for its dynamic shared memory (every GPU the bf16 kernels
        // run on, sm_80 and later, offers at least 99 KiB to a block).
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(|e| KernelError::cuda(OP, format!("{smem} bytes of shared memory for head_dim {head_dim}: {e}")))?;
    }
    let hd_i = as_i32(OP, "head_dim", head_dim)?;
    let s = dev.stream();
    let (qp, _gq) = ptr(q, s);
    let (kp, _gk) = ptr(k, s);
    let (vp, _gv) = ptr(v, s);
    let (op, _go) = ptr_mut(out, s);
    let (lp, _gl) = ptr_mut(lse, s);
    for (name, p) in [("q", qp), ("k", kp), ("v", vp)] {
        check_aligned(OP, name, p, 16)?;
    }
    check_aligned(OP, "out", op, 2 * O::BYTES)?;
    let (qs, kvs, os) = (q_stride as i64, kv_stride as i64, out_stride as i64);
    let cfg = LaunchConfig { grid_dim: (q_len.div_ceil(rows) as u32, heads_u, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
    let mut b = s.launch_builder(&f);
    b.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&lp).arg(&q_len_i).arg(&kv_len_i).arg(&qs).arg(&kvs).arg(&os);
    if wide {
        b.arg(&hd_i);
    }
    b.arg(&scale);
    launch::launch(OP, b, cfg)
}

/// Query rows per block of the wide kernel (one warp each).
const WIDE_BLOCK_ROWS: usize = 8;

/// Merges the partial result `(out_b, lse_b)` over one key set into `(out_a, lse_a)` over a
/// disjoint key set (ring attention). Layouts as [`flash_attention`] writes them with packed rows:
/// out `[q_len, heads·head_dim]` f32, lse `[heads, q_len]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_partials(
    dev: &CudaDevice,
    out_a: &mut impl DevicePtrMut<f32>,
    lse_a: &mut impl DevicePtrMut<f32>,
    out_b: &impl DevicePtr<f32>,
    lse_b: &impl DevicePtr<f32>,
    q_len: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    const OP: &str = "cuda::merge_partials";
    let hd = heads * head_dim;
    if hd == 0 {
        return Err(KernelError::invalid(OP, "heads and head_dim must be positive"));
    }
    check_len(OP, "out_a", out_a.len(), q_len * hd)?;
    check_len(OP, "out_b", out_b.len(), q_len * hd)?;
    check_len(OP, "lse_a", lse_a.len(), q_len * heads)?;
    check_len(OP, "lse_b", lse_b.len(), q_len * heads)?;
    if q_len == 0 {
        return Ok(());
    }
    let (q_len_i, heads_i, hd_i) = (as_i32(OP, "q_len", q_len)?, as_i32(OP, "heads", heads)?, as_i32(OP, "head_dim", head_dim)?);
    as_i32(OP, "heads·head_dim", hd)?;
    let f = dev.function(KernelSource::LseMerge, "lse_merge_f32")?;
    let s = dev.stream();
    let (ap, _ga) = ptr_mut(out_a, s);
    let (lap, _gla) = ptr_mut(lse_a, s);
    let (bp, _gb) = ptr(out_b, s);
    let (lbp, _glb) = ptr(lse_b, s);
    let mut b = s.launch_builder(&f);
    b.arg(&ap).arg(&lap).arg(&bp).arg(&lbp).arg(&q_len_i).arg(&heads_i).arg(&hd_i);
    launch::launch(OP, b, launch::per_row(OP, q_len)?)
}

/// Floating-point operations of one attention call (two matrix products, 2 flops per multiply-add),
/// the figure attention benchmarks divide by time.
pub fn attention_flops(shape: &AttentionShape) -> f64 {
    4.0 * shape.heads as f64 * shape.q_len as f64 * shape.kv_len as f64 * shape.head_dim as f64
}
