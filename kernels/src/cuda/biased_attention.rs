//! Attention with a bias by query-key distance and an additive key mask (T5's relative-position
//! attention), on the GPU. Twin: [`crate::cpu::biased_attention`], same layouts.

use super::launch::{self, as_i32, check_len, opt_ptr, ptr, ptr_mut};
use super::source::KernelSource;
use super::CudaDevice;
use crate::cpu::AttentionShape;
use crate::{KernelError, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

/// Threads per block (one block per query row and head).
const THREADS: u32 = 128;

/// The most keys one call takes: the block keeps a score per key in shared memory (plus the
/// query row), within the 48 KiB every architecture gives a block without opting in.
pub const MAX_KEYS: usize = 8192;

/// `out[i, h] = softmax_j(scale·q_i·k_j + rel[h·pitch + j + q_len − 1 − i] + key_add[j])·v` for
/// every head: bf16 q/k/v rows at `shape`'s strides, f32 arithmetic, bf16 output rows
/// `out_stride` apart. `rel` holds each head's `q_len + kv_len − 1` biases, `pitch` apart;
/// `key_add` one value per key (0 to attend, a large negative value to mask).
#[allow(clippy::too_many_arguments)]
pub fn biased_attention(
    dev: &CudaDevice,
    q: &impl DevicePtr<bf16>,
    k: &impl DevicePtr<bf16>,
    v: &impl DevicePtr<bf16>,
    shape: AttentionShape,
    scale: f32,
    rel: &impl DevicePtr<f32>,
    pitch: usize,
    key_add: Option<&impl DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<bf16>,
    out_stride: usize,
) -> Result<()> {
    const OP: &str = "cuda::biased_attention";
    let AttentionShape { heads, head_dim, q_len, kv_len, q_stride, kv_stride } = shape;
    let hd = heads * head_dim;
    if heads == 0 || head_dim == 0 || q_stride < hd || kv_stride < hd || out_stride < hd {
        return Err(KernelError::shape(OP, format!("{shape:?} with out stride {out_stride}")));
    }
    if kv_len > MAX_KEYS || head_dim > 1024 {
        return Err(KernelError::invalid(OP, format!("{kv_len} keys of head_dim {head_dim}: at most {MAX_KEYS} keys and 1024 channels")));
    }
    let span = |rows: usize, stride: usize| if rows == 0 { 0 } else { (rows - 1) * stride + hd };
    check_len(OP, "q", q.len(), span(q_len, q_stride))?;
    check_len(OP, "k", k.len(), span(kv_len, kv_stride))?;
    check_len(OP, "v", v.len(), span(kv_len, kv_stride))?;
    check_len(OP, "out", out.len(), span(q_len, out_stride))?;
    let bias_span = (q_len + kv_len).saturating_sub(1);
    check_len(OP, "rel", rel.len(), if bias_span == 0 { 0 } else { (heads - 1) * pitch + bias_span })?;
    if let Some(m) = key_add {
        check_len(OP, "key_add", m.len(), kv_len)?;
    }
    if q_len == 0 {
        return Ok(());
    }
    let (heads_i, hd_i) = (as_i32(OP, "heads", heads)?, as_i32(OP, "head_dim", head_dim)?);
    let (q_i, kv_i) = (as_i32(OP, "q_len", q_len)?, as_i32(OP, "kv_len", kv_len)?);
    let q_rows = u32::try_from(q_len).map_err(|_| KernelError::invalid(OP, format!("{q_len} query rows")))?;
    let smem = ((head_dim + kv_len) * 4) as u32;
    let cfg = LaunchConfig { grid_dim: (q_rows, heads as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
    let f = dev.function(KernelSource::BiasedAttention, "biased_attention_bf16")?;
    let s = dev.stream();
    let (qp, _gq) = ptr(q, s);
    let (kp, _gk) = ptr(k, s);
    let (vp, _gv) = ptr(v, s);
    let (rp, _gr) = ptr(rel, s);
    let (mp, _gm) = opt_ptr(key_add, s);
    let (op, _go) = ptr_mut(out, s);
    let (qs, kvs, ps, os) = (q_stride as i64, kv_stride as i64, pitch as i64, out_stride as i64);
    let mut b = s.launch_builder(&f);
    b.arg(&qp).arg(&kp).arg(&vp).arg(&heads_i).arg(&hd_i).arg(&q_i).arg(&kv_i).arg(&qs).arg(&kvs).arg(&scale).arg(&rp).arg(&ps).arg(&mp).arg(&op).arg(&os);
    launch::launch(OP, b, cfg)
}
