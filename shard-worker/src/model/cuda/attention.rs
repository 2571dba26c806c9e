//! Attention on the device: the self-attention seam of the bf16 transformer (one device now; the
//! sequence-parallel strategies over NCCL implement the same trait later), and flash attention for
//! any even head dimension up to 128 (the kernel is built for 64 and 128; smaller heads, as in the
//! test configurations, are zero-padded, which changes no score and no output channel).

use super::ops::{at, at_mut, invalid_err, At, AtMut, Elem, Ops};
use crate::Result;
use half::bf16;
use tessera_kernels::cpu::AttentionShape;
use tessera_kernels::cuda::attention::HEAD_DIMS;

/// This shard's normalised, rotated queries, keys and values, as the fused projection writes them:
/// `rows` rows `stride` apart in `buf`, q in channels `[0, D)`, k in `[D, 2D)`, v in `[2D, 3D)`
/// with D = heads·head_dim.
pub struct QkvRows<'a, B> {
    /// The fused projection's output.
    pub buf: &'a B,
    /// This shard's token rows.
    pub rows: usize,
    /// Elements between rows.
    pub stride: usize,
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// Computes softmax(q·kᵀ/√d)·v on the device for a block's (possibly sharded) token rows.
pub trait DeviceSelfAttention<O: Ops>: Sync {
    /// Writes, for each of this shard's rows, the attention output over the full sequence to
    /// `out` `[rows, heads·head_dim]` (bf16, packed). `lse` holds at least `heads·rows` f32 of
    /// scratch.
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<bf16>>, out: &mut O::Buf<bf16>, lse: &mut O::Buf<f32>) -> Result<()>;
}

/// All tokens on this device: one flash-attention call.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalDeviceAttention;

impl<O: Ops> DeviceSelfAttention<O> for LocalDeviceAttention {
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<bf16>>, out: &mut O::Buf<bf16>, lse: &mut O::Buf<f32>) -> Result<()> {
        let QkvRows { buf, rows, stride, heads, head_dim } = qkv;
        let d = heads * head_dim;
        let shape = AttentionShape { heads, head_dim, q_len: rows, kv_len: rows, q_stride: stride, kv_stride: stride };
        flash(ops, at(buf, 0), at(buf, d), at(buf, 2 * d), shape, 1.0 / (head_dim as f32).sqrt(), at_mut(out, 0), d, lse)
    }
}

/// The head width the kernel runs a head of `head_dim` channels at: itself for 64 and 128,
/// otherwise the next supported width (heads zero-padded). None past 128.
pub(crate) fn kernel_head_dim(head_dim: usize) -> Option<usize> {
    HEAD_DIMS.iter().copied().find(|&p| p >= head_dim).filter(|_| head_dim > 0 && head_dim.is_multiple_of(2))
}

/// Flash attention ([`Ops::attention`]) for any even `shape.head_dim` up to 128: heads of 64 or
/// 128 go straight to the kernel; other heads are copied into zero-padded rows of the next
/// supported width, attended, and the output copied back (queries and keys gain only zero
/// channels, so every score, probability, log-sum-exp and output channel is unchanged).
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash<O: Ops, E: Elem>(
    ops: &O,
    q: At<'_, O::Buf<bf16>>,
    k: At<'_, O::Buf<bf16>>,
    v: At<'_, O::Buf<bf16>>,
    shape: AttentionShape,
    scale: f32,
    out: AtMut<'_, O::Buf<E>>,
    out_stride: usize,
    lse: &mut O::Buf<f32>,
) -> Result<()> {
    let hd = shape.head_dim;
    let Some(p) = kernel_head_dim(hd) else {
        return Err(invalid_err("flash_attention", format!("head_dim {hd}: the CUDA attention kernel takes even head dims up to 128")));
    };
    if p == hd {
        return ops.attention(q, k, v, shape, scale, out, out_stride, lse);
    }
    let (h, wide) = (shape.heads, shape.heads * p);
    let pad = |src: At<'_, O::Buf<bf16>>, rows: usize, stride: usize| -> Result<O::Buf<bf16>> {
        let mut dst = ops.zeros::<bf16>(rows * wide)?;
        for head in 0..h {
            ops.copy_rows(at(src.buf, src.offset + head * hd), stride, at_mut(&mut dst, head * p), wide, hd, rows)?;
        }
        Ok(dst)
    };
    let qp = pad(q, shape.q_len, shape.q_stride)?;
    let kp = pad(k, shape.kv_len, shape.kv_stride)?;
    let vp = pad(v, shape.kv_len, shape.kv_stride)?;
    let mut op = ops.zeros::<E>(shape.q_len * wide)?;
    let padded = AttentionShape { head_dim: p, q_stride: wide, kv_stride: wide, ..shape };
    ops.attention(at(&qp, 0), at(&kp, 0), at(&vp, 0), padded, scale, at_mut(&mut op, 0), wide, lse)?;
    let AtMut { buf: out, offset } = out;
    for head in 0..h {
        ops.copy_rows(at(&op, head * p), wide, at_mut(out, offset + head * hd), out_stride, hd, shape.q_len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cuda::weights::to_bf16;
    use crate::model::cuda::HostOps;
    use tessera_kernels::cpu;

    #[test]
    fn supported_widths() {
        assert_eq!(kernel_head_dim(16), Some(64));
        assert_eq!(kernel_head_dim(64), Some(64));
        assert_eq!(kernel_head_dim(72), Some(128));
        assert_eq!(kernel_head_dim(128), Some(128));
        assert_eq!(kernel_head_dim(130), None);
        assert_eq!(kernel_head_dim(15), None);
    }

    #[test]
    fn padded_heads_match_plain_attention() {
        // 3 heads of 24 in a fused [q | k | v] buffer, output rows wider than the heads.
        let (heads, hd, n) = (3, 24, 7);
        let d = heads * hd;
        let host: Vec<f32> = (0..n * 3 * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let qkv = to_bf16(&host);
        let wide: Vec<f32> = qkv.iter().map(|v| v.to_f32()).collect();
        let shape = AttentionShape { heads, head_dim: hd, q_len: n, kv_len: n, q_stride: 3 * d, kv_stride: 3 * d };
        let scale = 1.0 / (hd as f32).sqrt();
        let want = cpu::attention(&wide, &wide[d..], &wide[2 * d..], shape, scale).unwrap();
        let ops = HostOps;
        let (out_stride, out_off) = (d + 8, 2);
        let mut out = vec![0.0f32; out_off + n * out_stride];
        let mut lse = vec![0.0f32; heads * n];
        flash(&ops, at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), shape, scale, at_mut(&mut out, out_off), out_stride, &mut lse).unwrap();
        for r in 0..n {
            let got = &out[out_off + r * out_stride..out_off + r * out_stride + d];
            for (g, w) in got.iter().zip(&want.out[r * d..(r + 1) * d]) {
                assert!((g - w).abs() < 1e-5, "row {r}: {g} vs {w}");
            }
        }
        for (g, w) in lse.iter().zip(&want.lse) {
            assert!((g - w).abs() < 1e-5);
        }
        // The direct path refuses the unpadded head, as the kernel would.
        let err = ops.attention(at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), shape, scale, at_mut(&mut out, 0), d, &mut lse).unwrap_err();
        assert!(err.to_string().contains("head_dim 24"), "{err}");
    }
}
