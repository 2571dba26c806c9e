//! Flash attention (forward, with log-sum-exp) for heads of 64 and 128 (`flash_attention.cu` on
//! mma.sync, or on compute capability 9.0 `flash_attention_sm90.cu` on warpgroup MMAs: see
//! [`AttentionKernel`]), the wide attention for heads above 128 (`attention_wide.cu`), and the
//! merge of partial results, on the GPU.
//! Twins: [`crate::cpu::attention`] (both attentions) and [`crate::cpu::merge_partials`], same
//! layouts.

use super::arch::Arch;
use super::elem::OutputElem;
use super::launch::{self, as_i32, check_aligned, check_len, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::AttentionShape;
use crate::{KernelError, Result};
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

/// Query rows per block of both flash kernels, both head widths (mma.sync: 4 warps of two 16-row
/// tiles; wgmma: 2 warpgroups of 64 rows).
const FLASH_BLOCK_ROWS: usize = 128;

/// Key and value rows per tile of the mma.sync flash kernel: 64 at head dim 64, 32 at 128 (where
/// 64 would spill registers).
fn flash_key_rows(head_dim: usize) -> usize {
    if head_dim == 64 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of the mma.sync flash kernel for `head_dim`, in bytes: `FaTile::SMEM_BYTES` of
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

/// The tensor-core kernel that runs attention for heads of 64 and 128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `flash_attention.cu`: `mma.sync`, every GPU the kernels support (sm_80 on).
    Mma,
    /// `flash_attention_sm90.cu`: Hopper's warpgroup MMAs, compute capability 9.0 only; per key
    /// tile the scores, their softmax, then P·V, one after the other. Chosen with
    /// `TESSERA_CUDA_ATTENTION=wgmma` until the GPU suite has run it: it has not yet.
    Wgmma,
    /// The same kernel with FlashAttention-3's intra-warpgroup overlap: the softmax of key tile j
    /// runs while the tensor cores compute P·V of tile j − 1 (`OVERLAP` in the source).
    /// `TESSERA_CUDA_ATTENTION=wgmma-overlap`; not run on a GPU yet either.
    WgmmaOverlap,
}

impl AttentionKernel {
    /// The environment variable that picks the kernel: [`Self::name`] of one (`mma`, the default).
    pub const ENV: &'static str = "TESSERA_CUDA_ATTENTION";

    /// Every kernel, the default first.
    pub const ALL: [Self; 3] = [Self::Mma, Self::Wgmma, Self::WgmmaOverlap];

    /// The name [`Self::ENV`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mma => "mma",
            Self::Wgmma => "wgmma",
            Self::WgmmaOverlap => "wgmma-overlap",
        }
    }

    /// Whether the kernel runs on a device of `arch`.
    pub fn runs_on(self, arch: Arch) -> bool {
        self.source().target(arch).is_some()
    }

    /// The kernels a device of `arch` runs (what the GPU tests and benchmarks go through).
    pub fn available(arch: Arch) -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.runs_on(arch)).collect()
    }

    /// The source that defines the kernel.
    fn source(self) -> KernelSource {
        match self {
            Self::Mma => KernelSource::FlashAttention,
            Self::Wgmma | Self::WgmmaOverlap => KernelSource::FlashAttentionSm90,
        }
    }

    /// The kernel `value` names on a device of `arch` (`None`: the default); an unknown name, or
    /// a kernel this GPU cannot run, is an error naming the variable.
    pub fn choose(value: Option<&str>, arch: Arch) -> Result<Self> {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(Self::Mma) };
        let Some(kernel) = Self::ALL.into_iter().find(|k| k.name() == value) else {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            return Err(KernelError::invalid("cuda::attention", format!("{}={value}: expected one of {}", Self::ENV, names.join(", "))));
        };
        if !kernel.runs_on(arch) {
            return Err(KernelError::invalid(
                "cuda::attention",
                format!("{}={value}: warpgroup MMAs need compute capability 9.0; this GPU is {arch}", Self::ENV),
            ));
        }
        Ok(kernel)
    }

    /// The kernel [`Self::ENV`] names on a device of `arch`.
    pub fn from_env(arch: Arch) -> Result<Self> {
        Self::choose(std::env::var(Self::ENV).ok().as_deref(), arch)
    }

    /// The source, the entry point for `head_dim` and output `O`, threads per block, and dynamic
    /// shared memory in bytes.
    fn launch<O: OutputElem>(self, head_dim: usize) -> (KernelSource, &'static str, u32, usize) {
        let bf16_out = O::NAME == "bf16";
        match self {
            Self::Mma => {
                let name = match (head_dim, bf16_out) {
                    (64, true) => "flash_attention_d64_bf16",
                    (64, false) => "flash_attention_d64_f32",
                    (_, true) => "flash_attention_d128_bf16",
                    (_, false) => "flash_attention_d128_f32",
                };
                (self.source(), name, 128, flash_smem_bytes(head_dim))
            }
            Self::Wgmma | Self::WgmmaOverlap => {
                let name = match (self, head_dim, bf16_out) {
                    (Self::Wgmma, 64, true) => "flash_attention_sm90_d64_bf16",
                    (Self::Wgmma, 64, false) => "flash_attention_sm90_d64_f32",
                    (Self::Wgmma, _, true) => "flash_attention_sm90_d128_bf16",
                    (Self::Wgmma, _, false) => "flash_attention_sm90_d128_f32",
                    (_, 64, true) => "flash_attention_sm90_overlap_d64_bf16",
                    (_, 64, false) => "flash_attention_sm90_overlap_d64_f32",
                    (_, _, true) => "flash_attention_sm90_overlap_d128_bf16",
                    (_, _, false) => "flash_attention_sm90_overlap_d128_f32",
                };
                // `Fa90Tile::SMEM_BYTES`, both schedules: the Q tile (128 rows) and two stages of
                // a K and a V tile (64 rows each), unpadded (the kernel traps when given less).
                (self.source(), name, 256, (FLASH_BLOCK_ROWS + 4 * 64) * head_dim * 2)
            }
        }
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
    flash_attention_with(dev, dev.attention_kernel(), q, k, v, shape, scale, out, out_stride, lse)
}

/// [`flash_attention`] with the tensor-core kernel named (the device's choice aside): what the GPU
/// tests and the benchmark use to run both.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_with<O: OutputElem>(
    dev: &CudaDevice,
    kernel: AttentionKernel,
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
    let (f, rows, threads, smem) = if wide {
        let name = if O::NAME == "bf16" { "wide_attention_bf16" } else { "wide_attention_f32" };
        (dev.function(KernelSource::WideAttention, name)?, WIDE_BLOCK_ROWS, 256, 0)
    } else {
        let (source, name, threads, smem) = kernel.launch::<O>(head_dim);
        (dev.function_with_shared_memory(source, name, smem)?, FLASH_BLOCK_ROWS, threads, smem)
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attention_kernel_is_chosen_by_name_and_device() {
        let (hopper, ampere) = (Arch { major: 9, minor: 0 }, Arch { major: 8, minor: 0 });
        for unset in [None, Some(""), Some("mma"), Some(" mma ")] {
            assert_eq!(AttentionKernel::choose(unset, hopper).unwrap(), AttentionKernel::Mma, "{unset:?}");
        }
        assert_eq!(AttentionKernel::choose(Some("wgmma"), hopper).unwrap(), AttentionKernel::Wgmma);
        assert_eq!(AttentionKernel::choose(Some("wgmma-overlap"), hopper).unwrap(), AttentionKernel::WgmmaOverlap);
        for name in ["wgmma", "wgmma-overlap"] {
            let err = AttentionKernel::choose(Some(name), ampere).unwrap_err().to_string();
            assert!(err.contains(&format!("TESSERA_CUDA_ATTENTION={name}:")) && err.contains("sm_80"), "{err}");
        }
        let err = AttentionKernel::choose(Some("fast"), hopper).unwrap_err().to_string();
        assert!(err.contains("TESSERA_CUDA_ATTENTION=fast") && err.contains("mma, wgmma, wgmma-overlap"), "{err}");
        assert_eq!(AttentionKernel::available(hopper), AttentionKernel::ALL);
        assert_eq!(AttentionKernel::available(ampere), [AttentionKernel::Mma]);
        for k in AttentionKernel::ALL {
            assert_eq!(AttentionKernel::choose(Some(k.name()), hopper).unwrap(), k);
        }
    }

    #[test]
    fn shared_memory_sizes_are_the_kernels_tiles() {
        // flash_attention.cu: padded rows of D + 8; Q over K+V at 64, beside them at 128.
        assert_eq!(flash_smem_bytes(64), 128 * 72 * 2);
        assert_eq!(flash_smem_bytes(128), (128 + 2 * 32) * 136 * 2);
        // flash_attention_sm90.cu: Q (128 rows) and two stages of K and V (64 rows), unpadded.
        assert_eq!(AttentionKernel::Wgmma.launch::<f32>(64).3, 49_152);
        assert_eq!(AttentionKernel::Wgmma.launch::<half::bf16>(128).3, 98_304);
        assert_eq!(AttentionKernel::WgmmaOverlap.launch::<half::bf16>(128).3, 98_304);
        assert_eq!(AttentionKernel::Mma.launch::<f32>(128).3, 52_224);
    }
}
