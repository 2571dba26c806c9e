//! The operations the bf16 transformer is built from, behind one trait with two implementations:
//! the CUDA kernels of `tessera_kernels::cuda` ([`super::CudaOps`]) and a host emulation with the
//! same contracts, the same checks and the same bf16 roundings ([`super::HostOps`]). The model is
//! written once against [`Ops`], so every buffer layout, stride and offset it uses runs (and is
//! tested against the golden cases) on any machine; only the thin CUDA adapter needs a GPU.

use crate::{Result, WorkerError};
use half::bf16;
use std::ops::Range;
use tessera_kernels::cpu::{Activation, AttentionShape, PatchGeometry, RopeTable};
use tessera_kernels::cuda::nccl::NcclType;
use tessera_kernels::cuda::OutputElem;
use tessera_kernels::KernelError;

/// Element type of a buffer: bf16 (matrix-product operands, attention inputs, the model's
/// activations) or f32 (residual stream, modulation, norm parameters, latents, log-sum-exps).
/// Both travel between ranks: through NCCL on GPUs, as little-endian bytes between hosts.
pub trait Elem: OutputElem + NcclType {
    /// From f32, rounded to nearest even for bf16 (what the kernels' stores do).
    fn from_f32(v: f32) -> Self;
    /// Appends the values' little-endian bytes to `out`.
    fn put_le(values: &[Self], out: &mut Vec<u8>);
    /// The values of little-endian `bytes` (a whole number of elements; checked by the caller).
    fn get_le(bytes: &[u8]) -> Vec<Self>;
}

impl Elem for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn put_le(values: &[Self], out: &mut Vec<u8>) {
        values.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes()));
    }
    fn get_le(bytes: &[u8]) -> Vec<Self> {
        bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
    }
}

impl Elem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn put_le(values: &[Self], out: &mut Vec<u8>) {
        values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
    fn get_le(bytes: &[u8]) -> Vec<Self> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// A read-only region of a buffer: its elements from `offset` on.
pub struct At<'a, B> {
    /// The buffer.
    pub buf: &'a B,
    /// First element of the region.
    pub offset: usize,
}

// Manual impls: `B` itself need not be `Copy`.
impl<B> Clone for At<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for At<'_, B> {}

/// A writable region of a buffer: its elements from `offset` on.
pub struct AtMut<'a, B> {
    /// The buffer.
    pub buf: &'a mut B,
    /// First element of the region.
    pub offset: usize,
}

/// `buf[offset..]`, read-only.
pub fn at<B>(buf: &B, offset: usize) -> At<'_, B> {
    At { buf, offset }
}

/// `buf[offset..]`, writable.
pub fn at_mut<B>(buf: &mut B, offset: usize) -> AtMut<'_, B> {
    AtMut { buf, offset }
}

/// What a LayerNorm applies after normalising a row: `y = (x̂·weight + bias)·(1 + scale) + shift`,
/// each part optional, each `[dim]` f32 from its offset (modulation chunks are regions of one
/// vector).
pub struct NormArgs<'a, B> {
    /// Epsilon added to the variance.
    pub eps: f32,
    /// Elementwise affine weight.
    pub weight: Option<At<'a, B>>,
    /// Elementwise affine bias.
    pub bias: Option<At<'a, B>>,
    /// adaLN scale (applied as `1 + scale`).
    pub scale: Option<At<'a, B>>,
    /// adaLN shift.
    pub shift: Option<At<'a, B>>,
}

/// The operations of the bf16 forward on one device. Every method has the contract of the CUDA
/// kernel wrapper of the same purpose (`tessera_kernels::cuda::*`), including its layout and
/// alignment requirements; work is ordered (one stream on a GPU).
#[allow(clippy::too_many_arguments)]
pub trait Ops: Send + Sync + Sized {
    /// A buffer of `T` on the device.
    type Buf<T: Elem>: Send + Sync;
    /// RoPE cosines and sines of a run of tokens, on the device.
    type Rope: Send + Sync;

    /// Where the work runs, for messages.
    fn describe(&self) -> String;
    /// Elements in a buffer.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// A new zero-filled buffer.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    /// A new buffer holding `host`.
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// The whole buffer, copied to the host (waits for the queued work).
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    /// A RoPE table, copied to the device.
    fn upload_rope(&self, table: &RopeTable) -> Result<Self::Rope>;
    /// Copies `rows` runs of `width` elements, `src_pitch` apart in `src`, to runs `dst_pitch` apart
    /// in `dst` (a 2-D copy; `width` ≤ both pitches).
    fn copy_rows<T: Elem>(
        &self,
        src: At<'_, Self::Buf<T>>,
        src_pitch: usize,
        dst: AtMut<'_, Self::Buf<T>>,
        dst_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<()>;
    /// `y[m, n] = act(x[m, k]·w[n, k]ᵀ + bias[n])`, bf16 operands, f32 accumulation, bf16 out
    /// (`act`: `None` or `GeluTanh`, fused in the epilogue). Rows are packed from the offsets.
    fn linear(
        &self,
        x: At<'_, Self::Buf<bf16>>,
        m: usize,
        k: usize,
        w: &Self::Buf<bf16>,
        n: usize,
        bias: Option<&Self::Buf<bf16>>,
        act: Activation,
        y: AtMut<'_, Self::Buf<bf16>>,
    ) -> Result<()>;
    /// LayerNorm of `rows` f32 rows of `dim` (packed from the start of `x`), written as bf16.
    fn layer_norm(&self, x: &Self::Buf<f32>, rows: usize, dim: usize, p: &NormArgs<'_, Self::Buf<f32>>, y: &mut Self::Buf<bf16>) -> Result<()>;
    /// In place on `rows` bf16 rows `stride` apart: RMSNorm over `heads·head_dim` channels with
    /// `weight` (`[heads·head_dim]` f32), then the rotations of `rope` (one table row per row).
    fn qk_norm_rope(
        &self,
        x: AtMut<'_, Self::Buf<bf16>>,
        rows: usize,
        stride: usize,
        heads: usize,
        head_dim: usize,
        weight: &Self::Buf<f32>,
        eps: f32,
        rope: Option<&Self::Rope>,
    ) -> Result<()>;
    /// softmax(scale·q·kᵀ)·v per head (flash attention): `head_dim` 64 or 128, strides multiples of
    /// 8, 16-byte aligned q/k/v starts. Writes `out` rows `out_stride` apart and `lse` `[heads, q_len]`.
    fn attention<O: Elem>(
        &self,
        q: At<'_, Self::Buf<bf16>>,
        k: At<'_, Self::Buf<bf16>>,
        v: At<'_, Self::Buf<bf16>>,
        shape: AttentionShape,
        scale: f32,
        out: AtMut<'_, Self::Buf<O>>,
        out_stride: usize,
        lse: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// Merges the partial attention `(out_b, lse_b)` over one key set into `(out_a, lse_a)` over a
    /// disjoint one (ring attention): out `[q_len, heads·head_dim]` f32 packed, lse
    /// `[heads, q_len]`, each buffer exactly that long.
    fn merge_partials(
        &self,
        out_a: &mut Self::Buf<f32>,
        lse_a: &mut Self::Buf<f32>,
        out_b: &Self::Buf<f32>,
        lse_b: &Self::Buf<f32>,
        q_len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// `x[r, c] += y[r, c]·gate[c]` over `n` elements in rows of `dim` (no gate: `x += y`), in f32.
    fn add<Y: Elem>(&self, x: AtMut<'_, Self::Buf<f32>>, y: At<'_, Self::Buf<Y>>, gate: Option<At<'_, Self::Buf<f32>>>, n: usize, dim: usize) -> Result<()>;
    /// `out[i] = bf16(x[i])` for `n` elements.
    fn to_bf16(&self, x: At<'_, Self::Buf<f32>>, out: AtMut<'_, Self::Buf<bf16>>, n: usize) -> Result<()>;
    /// `out[i] = f32(x[i])` for `n` elements.
    fn to_f32(&self, x: At<'_, Self::Buf<bf16>>, out: AtMut<'_, Self::Buf<f32>>, n: usize) -> Result<()>;
    /// bf16 rows of tokens `tokens` of the f32 latent `[C, F, H, W]`, features (c, p_t, p_h, p_w).
    fn patchify(&self, latent: &Self::Buf<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut Self::Buf<bf16>) -> Result<()>;
    /// The f32 latent `[C, F, H, W]` from all tokens' f32 rows, features (p_t, p_h, p_w, c).
    fn unpatchify(&self, rows: &Self::Buf<f32>, g: &PatchGeometry, latent: &mut Self::Buf<f32>) -> Result<()>;
}

/// A shape error of operation `op` (the model's own checks, before any kernel runs).
pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> WorkerError {
    WorkerError::Kernel(KernelError::Shape { op, detail: detail.into() })
}

/// An unsupported-argument error of operation `op`.
pub(crate) fn invalid_err(op: &'static str, detail: impl Into<String>) -> WorkerError {
    WorkerError::Kernel(KernelError::Invalid { op, detail: detail.into() })
}

/// `offset..offset + len` if it lies inside a buffer of `have` elements, else an error naming `what`.
pub(crate) fn region(op: &'static str, what: &str, have: usize, offset: usize, len: usize) -> Result<Range<usize>> {
    match offset.checked_add(len) {
        Some(end) if end <= have => Ok(offset..end),
        _ => Err(shape_err(op, format!("{what}: {len} elements from {offset} overrun a buffer of {have}"))),
    }
}

/// Elements a run of `rows` rows of `width` elements, `pitch` apart, spans.
pub(crate) fn span(rows: usize, pitch: usize, width: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * pitch + width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_spans() {
        assert_eq!(region("t", "x", 10, 2, 8).unwrap(), 2..10);
        assert!(region("t", "x", 10, 3, 8).is_err());
        assert!(region("t", "x", 10, usize::MAX, 2).is_err());
        assert_eq!(span(0, 9, 4), 0);
        assert_eq!(span(3, 9, 4), 22);
        assert_eq!(<bf16 as Elem>::from_f32(1.0 + 1.0 / 512.0).to_f32(), 1.0, "ties round to even");
        let (h, f) = ([bf16::from_f32(-1.5), bf16::from_f32(3.0e-3)], [1.25f32, -7.0e9]);
        let mut b = Vec::new();
        Elem::put_le(&h, &mut b);
        assert_eq!((b.len(), <bf16 as Elem>::get_le(&b)), (4, h.to_vec()));
        b.clear();
        Elem::put_le(&f, &mut b);
        assert_eq!((b.len(), <f32 as Elem>::get_le(&b)), (8, f.to_vec()));
    }
}
