//! The backend seam: the operations the models are built from, behind one trait with three
//! implementations: the CUDA kernels of [`crate::cuda`] ([`CudaOps`], bf16), a host emulation
//! with the same contracts, the same checks and the same bf16 roundings ([`HostOps`], the
//! `bf16-host` backend), and the f32 CPU kernels of [`crate::cpu`] ([`CpuOps`]). The models are written once against [`Ops`], so every buffer
//! layout, stride and offset they use runs (and is tested against the golden cases) on any
//! machine; only the thin CUDA adapter needs a GPU.

mod contract;
mod cpu_ops;
mod cuda_ops;
mod host_ops;
mod host_vec;

pub use cpu_ops::CpuOps;
pub use cuda_ops::CudaOps;
pub use host_ops::HostOps;

use crate::cpu::{Activation, AttentionShape, Conv3dParams, PatchGeometry, RopeTable};
use crate::cuda::attention::HEAD_DIMS;
use crate::cuda::nccl::NcclType;
use crate::cuda::OutputElem;
use crate::{Device, KernelError, Result};
use half::bf16;
use std::ops::Range;

/// The backends a model runs on, as users name them (`--backend cpu|bf16-host|cuda[:N]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// f32 on the CPU ([`CpuOps`]).
    #[default]
    Cpu,
    /// The CUDA path's bf16 contract emulated on the CPU ([`HostOps`]).
    Bf16Host,
    /// bf16 on CUDA device N ([`CudaOps`]).
    Cuda(usize),
}

impl Backend {
    /// Every spelling [`parse`](Self::parse) takes, for messages.
    pub const NAMES: &'static str = "cpu, bf16-host, cuda or cuda:N";

    /// `cpu`, `bf16-host`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "bf16-host" => Some(Self::Bf16Host),
            "cuda" => Some(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda),
        }
    }

    /// The name [`parse`](Self::parse) reads back.
    pub fn name(&self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Bf16Host => "bf16-host".into(),
            Self::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Where its buffers live.
    pub fn device(&self) -> Device {
        match self {
            Self::Cpu | Self::Bf16Host => Device::Cpu,
            Self::Cuda(n) => Device::Cuda(*n),
        }
    }

    /// Whether it stores activations in bf16 (held to the bf16 tolerances).
    pub fn is_bf16(&self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

impl From<Device> for Backend {
    fn from(d: Device) -> Self {
        match d {
            Device::Cpu => Self::Cpu,
            Device::Cuda(n) => Self::Cuda(n),
        }
    }
}

/// Element type of a buffer: bf16 (matrix-product operands, attention inputs, the model's
/// activations) or f32 (residual stream, modulation, norm parameters, latents, log-sum-exps).
/// Both travel between ranks: through NCCL on GPUs, as little-endian bytes between hosts.
pub trait Elem: OutputElem + NcclType {
    /// From f32, rounded to nearest even for bf16 (what the kernels' stores do).
    fn from_f32(v: f32) -> Self;
    /// `v` as a value of this type holds it: rounded to bf16, unchanged for f32.
    fn round(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
    /// f32 values as this type: rounded into a new vector for bf16, the same vector for f32.
    fn vec_from_f32(values: Vec<f32>) -> Vec<Self> {
        values.into_iter().map(Self::from_f32).collect()
    }
    /// The values as f32: widened into a new vector for bf16, the same vector for f32.
    fn vec_to_f32(values: Vec<Self>) -> Vec<f32> {
        values.into_iter().map(|v| v.to_f32()).collect()
    }
    /// The values themselves when this type is f32 (no copy), else None.
    fn as_f32s(values: &[Self]) -> Option<&[f32]> {
        let _ = values;
        None
    }
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
    fn vec_from_f32(values: Vec<f32>) -> Vec<Self> {
        values
    }
    fn vec_to_f32(values: Vec<f32>) -> Vec<f32> {
        values
    }
    fn as_f32s(values: &[Self]) -> Option<&[f32]> {
        Some(values)
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

/// The operations the models run on one device. Every method has the contract of the CUDA kernel
/// wrapper of the same purpose (`tessera_kernels::cuda::*`), including its layout and alignment
/// requirements; work is ordered (one stream on a GPU). Activations and matrix operands are
/// stored as [`Ops::Act`]: bf16 on the CUDA path and its host twin, f32 on the CPU; what the
/// models keep in f32 (the residual stream, modulation, norm parameters, latents, log-sum-exps)
/// is f32 everywhere.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub trait Ops: Send + Sync + Sized {
    /// A buffer of `T` on the device.
    type Buf<T: Elem>: Send + Sync;
    /// RoPE cosines and sines of a run of tokens, on the device.
    type Rope: Send + Sync;
    /// The storage type of activations and matrix operands (bf16 or f32).
    type Act: Elem;

    /// Where the work runs, for messages.
    fn describe(&self) -> String;
    /// Elements in a buffer.
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// A new zero-filled buffer.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    /// A new buffer holding `host`.
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// A new buffer taking `host` (host backends keep the vector itself: no copy of large weights).
    fn upload_vec<T: Elem>(&self, host: Vec<T>) -> Result<Self::Buf<T>> {
        self.upload(&host)
    }
    /// Device memory in use and in total, in bytes, for devices with memory of their own (None on
    /// the host backends, whose memory is the process's).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// The whole buffer, copied to the host (waits for the queued work).
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    /// Writes `host` into `dst` from its offset (a staging upload, then a device copy; host
    /// backends copy directly).
    fn upload_into<T: Elem>(&self, host: &[T], dst: AtMut<'_, Self::Buf<T>>) -> Result<()> {
        if host.is_empty() {
            return region("upload_into", "dst", self.len(dst.buf), dst.offset, 0).map(drop);
        }
        let staged = self.upload(host)?;
        self.copy_rows(at(&staged, 0), host.len(), dst, host.len(), host.len(), 1)
    }
    /// The buffer's values in place when it lives in host memory (`cpu`, `bf16-host`), else None:
    /// host collectives then read them without a copy.
    fn host_view<'b, T: Elem>(&self, buf: &'b Self::Buf<T>) -> Option<&'b [T]> {
        let _ = buf;
        None
    }
    /// A RoPE table, copied to the device.
    fn upload_rope(&self, table: &RopeTable) -> Result<Self::Rope>;
    /// The head width [`attention`](Self::attention) runs heads of `head_dim` channels at: the
    /// CUDA flash kernel is built for 64 and 128 (smaller even heads are zero-padded by
    /// [`flash`]), and wider heads (multiples of 8 up to 512, the VAE's one head of 384) run on
    /// the wide kernel at their own width; the CPU takes any even width. None when no width serves.
    fn attention_width(&self, head_dim: usize) -> Option<usize> {
        if head_dim > HEAD_DIMS[HEAD_DIMS.len() - 1] {
            return Some(head_dim).filter(|&h| crate::cuda::attention::serves_head_dim(h));
        }
        HEAD_DIMS.iter().copied().find(|&p| p >= head_dim).filter(|_| head_dim > 0 && head_dim.is_multiple_of(2))
    }
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
    /// `y[m, n] = act(x[m, k]·w[n, k]ᵀ + bias[n])`, f32 accumulation (`act`: `None` or `GeluTanh`,
    /// fused in the epilogue). Rows are packed from the offsets.
    fn linear(
        &self,
        x: At<'_, Self::Buf<Self::Act>>,
        m: usize,
        k: usize,
        w: &Self::Buf<Self::Act>,
        n: usize,
        bias: Option<&Self::Buf<Self::Act>>,
        act: Activation,
        y: AtMut<'_, Self::Buf<Self::Act>>,
    ) -> Result<()>;
    /// LayerNorm of `rows` f32 rows of `dim` (packed from `x`'s offset), written as `Act` rows
    /// packed from `y`'s offset.
    fn layer_norm(
        &self,
        x: At<'_, Self::Buf<f32>>,
        rows: usize,
        dim: usize,
        p: &NormArgs<'_, Self::Buf<f32>>,
        y: AtMut<'_, Self::Buf<Self::Act>>,
    ) -> Result<()>;
    /// In place on `rows` rows `stride` apart: RMSNorm over `heads·head_dim` channels with
    /// `weight` (`[heads·head_dim]` f32), then the rotations of `rope` (one table row per row).
    fn qk_norm_rope(
        &self,
        x: AtMut<'_, Self::Buf<Self::Act>>,
        rows: usize,
        stride: usize,
        heads: usize,
        head_dim: usize,
        weight: &Self::Buf<f32>,
        eps: f32,
        rope: Option<&Self::Rope>,
    ) -> Result<()>;
    /// softmax(scale·q·kᵀ)·v per head (flash attention): `head_dim` one that
    /// [`attention_width`](Self::attention_width) maps to itself, strides multiples of 8, 16-byte
    /// aligned q/k/v starts. Writes `out` rows `out_stride` apart and `lse` `[heads, q_len]`.
    fn attention<O: Elem>(
        &self,
        q: At<'_, Self::Buf<Self::Act>>,
        k: At<'_, Self::Buf<Self::Act>>,
        v: At<'_, Self::Buf<Self::Act>>,
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
    /// Attention with a bias by query-key distance and an additive key mask (T5's relative
    /// position attention): `softmax_j(scale·q_i·k_j + rel[h·pitch + j + q_len − 1 − i] +
    /// key_add[j])·v` per head, written to `out` rows `out_stride` apart. `rel` holds each head's
    /// `q_len + kv_len − 1` biases (f32) from its offset, `pitch` apart; `key_add` one f32 per
    /// key (0 to attend, a large negative value to mask). On a GPU at most 8,192 keys.
    fn biased_attention(
        &self,
        q: At<'_, Self::Buf<Self::Act>>,
        k: At<'_, Self::Buf<Self::Act>>,
        v: At<'_, Self::Buf<Self::Act>>,
        shape: AttentionShape,
        scale: f32,
        rel: At<'_, Self::Buf<f32>>,
        pitch: usize,
        key_add: Option<At<'_, Self::Buf<f32>>>,
        out: AtMut<'_, Self::Buf<Self::Act>>,
        out_stride: usize,
    ) -> Result<()>;
    /// `x[i] ← x[i]·y[i]` for `n` elements (f32 arithmetic, stored as `Act`).
    fn mul(&self, x: AtMut<'_, Self::Buf<Self::Act>>, y: At<'_, Self::Buf<Self::Act>>, n: usize) -> Result<()>;
    /// RMSNorm of `rows` f32 rows of `dim` (packed from the start of `x`; no mean, T5's layer
    /// norm): `y = x / sqrt(mean(x²) + eps) · weight`, written as `Act`. The rows are stored as
    /// `Act` first (exact when they hold `Act` values, as residual streams do), then normalised
    /// in place by [`qk_norm_rope`](Self::qk_norm_rope) as one head without rotation.
    fn rms_norm(&self, x: &Self::Buf<f32>, rows: usize, dim: usize, weight: &Self::Buf<f32>, eps: f32, y: &mut Self::Buf<Self::Act>) -> Result<()> {
        self.narrow(at(x, 0), at_mut(y, 0), rows * dim)?;
        self.qk_norm_rope(at_mut(y, 0), rows, dim, 1, dim, weight, eps, None)
    }
    /// `x[r, c] += y[r, c]·gate[c]` over `n` elements in rows of `dim` (no gate: `x += y`), in f32.
    fn add<Y: Elem>(&self, x: AtMut<'_, Self::Buf<f32>>, y: At<'_, Self::Buf<Y>>, gate: Option<At<'_, Self::Buf<f32>>>, n: usize, dim: usize) -> Result<()>;
    /// `out[i] = Act(x[i])` for `n` elements (rounded to bf16, or copied).
    fn narrow(&self, x: At<'_, Self::Buf<f32>>, out: AtMut<'_, Self::Buf<Self::Act>>, n: usize) -> Result<()>;
    /// `out[i] = f32(x[i])` for `n` elements.
    fn widen(&self, x: At<'_, Self::Buf<Self::Act>>, out: AtMut<'_, Self::Buf<f32>>, n: usize) -> Result<()>;
    /// `Act` rows of tokens `tokens` of the f32 latent `[C, F, H, W]`, features (c, p_t, p_h, p_w).
    fn patchify(&self, latent: &Self::Buf<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut Self::Buf<Self::Act>) -> Result<()>;
    /// The f32 latent `[C, F, H, W]` from all tokens' f32 rows, features (c, p_t, p_h, p_w): patchify's inverse.
    fn unpatchify(&self, rows: &Self::Buf<f32>, g: &PatchGeometry, latent: &mut Self::Buf<f32>) -> Result<()>;

    // The VAE's operations, on channel-major frames `[C, T, H, W]` stored as `Act`.

    /// A convolution's weights and bias in the backend's storage (see [`ConvShape`]).
    type ConvWeight: Send + Sync;
    /// Takes a 3-D convolution's weight `[co, ci, kt, kh, kw]` and bias `[co]` (f32, PyTorch's
    /// layouts) into the backend's storage: as they are on the CPU, rounded to bf16 (the bias kept
    /// in f32) on the bf16 backends.
    fn conv_weight(&self, shape: ConvShape, weight: Vec<f32>, bias: Vec<f32>) -> Result<Self::ConvWeight>;
    /// PyTorch's `Conv3d` (cross-correlation, no dilation or groups) over the frames the pieces
    /// hold one after another in time (one to three pieces: a causal convolution's cached frames,
    /// then the new ones; each `[C, frames, H, W]` from its buffer's start, read in place), with
    /// `p`'s stride and zero padding (`p.kernel` must be the weight's). f32 accumulation over bf16
    /// products, plus the f32 bias, stored once as `Act`. Returns the output and its shape
    /// `[co, T', H', W']`.
    fn conv3d(
        &self,
        input: &[Piece<'_, Self::Buf<Self::Act>>],
        chw: [usize; 3],
        w: &Self::ConvWeight,
        p: &Conv3dParams,
    ) -> Result<(Self::Buf<Self::Act>, [usize; 4])>;
    /// In place on the channel-major `x` `[channels, positions]` (from its start):
    /// `F.normalize(x, dim=channels)·√channels·γ` (`γ` `[channels]` f32), then SiLU when `silu`;
    /// f32 arithmetic, one rounding to `Act` at the end.
    fn channel_norm(&self, x: &mut Self::Buf<Self::Act>, channels: usize, positions: usize, gamma: &Self::Buf<f32>, silu: bool) -> Result<()>;
    /// The `planes` planes of `h × w` packed at the start of `x`, nearest ×2 in both axes, written
    /// packed (`planes` planes of `2h × 2w`) at the start of `out`.
    fn upsample_nearest2x(&self, x: &Self::Buf<Self::Act>, planes: usize, h: usize, w: usize, out: &mut Self::Buf<Self::Act>) -> Result<()>;
    /// `x[i] ← x[i] + y[i]` for `n` elements (f32 arithmetic, stored as `Act`).
    fn accumulate(&self, x: AtMut<'_, Self::Buf<Self::Act>>, y: At<'_, Self::Buf<Self::Act>>, n: usize) -> Result<()>;
    /// `out[j, i] = x[i, j]` for the packed `[rows, cols]` matrix at `x`'s offset, written packed
    /// (`[cols, rows]`) at `out`'s.
    fn transpose(&self, x: At<'_, Self::Buf<Self::Act>>, rows: usize, cols: usize, out: AtMut<'_, Self::Buf<Self::Act>>) -> Result<()>;

    // ---- sampling (f32 latents, bit for bit the CPU kernels on every backend) ----
    /// Classifier-free guidance in place: `cond ← uncond + g·(cond − uncond)` over the whole
    /// (equally long) buffers. Twin: [`crate::cpu::guide`].
    fn guide(&self, cond: &mut Self::Buf<f32>, uncond: &Self::Buf<f32>, g: f32) -> Result<()>;
    /// One sampler step over the whole (equally long) buffers: `x` and the `history` buffers
    /// (none for Euler; x̃_{i−1}, m_{i−1}, m_{i−2} for UniPC) advanced in place with model
    /// output `v`. Twin: [`crate::cpu::sampler_step`].
    fn sampler_step(&self, update: &crate::cpu::SamplerUpdate, v: &Self::Buf<f32>, x: &mut Self::Buf<f32>, history: &mut [Self::Buf<f32>]) -> Result<()>;
}

/// The weight shape of a 3-D convolution, `[out_channels, in_channels, kt, kh, kw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Output channels.
    pub out_channels: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Kernel extent `[kt, kh, kw]`.
    pub kernel: [usize; 3],
}

impl ConvShape {
    /// Weights per output channel: `in_channels·kt·kh·kw` (the GEMM's depth).
    pub fn taps(&self) -> usize {
        self.in_channels * self.kernel.iter().product::<usize>()
    }
}

/// A run of channel-major frames `[C, frames, H, W]` at the start of a buffer.
pub struct Piece<'a, B> {
    /// The buffer.
    pub buf: &'a B,
    /// Frames it holds.
    pub frames: usize,
}

// Manual impls: `B` itself need not be `Copy`.
impl<B> Clone for Piece<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Piece<'_, B> {}

/// A convolution's weights on a host backend: f32 values (bf16-rounded on `bf16-host`).
pub struct HostConv {
    shape: ConvShape,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl HostConv {
    /// Checks the lengths against `shape`.
    fn new(shape: ConvShape, weight: Vec<f32>, bias: Vec<f32>) -> Result<Self> {
        let want = shape.out_channels * shape.taps();
        if weight.len() != want || bias.len() != shape.out_channels || want == 0 {
            return Err(shape_err("conv_weight", format!("weight {} and bias {} values for {shape:?}", weight.len(), bias.len())));
        }
        Ok(Self { shape, weight, bias })
    }

    /// The f32 convolution of checked pieces.
    fn run(&self, pieces: &[&[f32]], chw: [usize; 3], p: &Conv3dParams) -> Result<(Vec<f32>, [usize; 4])> {
        crate::cpu::conv3d_pieces(pieces, chw, &self.weight, Some(&self.bias), self.shape.out_channels, p)
    }
}

/// A buffer of `O`'s activation type.
pub type ActBuf<O> = <O as Ops>::Buf<<O as Ops>::Act>;

/// Whether `O` stores activations in f32 (then rounding them to `Act` changes nothing).
pub fn stores_f32<O: Ops>() -> bool {
    O::Act::BYTES == 4
}

/// Flash attention ([`Ops::attention`]) for any head width the backend serves
/// ([`Ops::attention_width`]): heads of that width go straight to the kernel; narrower heads are
/// copied into zero-padded rows of the kernel's width, attended, and the output copied back
/// (queries and keys gain only zero channels, so every score, probability, log-sum-exp and output
/// channel is unchanged).
#[allow(clippy::too_many_arguments)]
pub fn flash<O: Ops, E: Elem>(
    ops: &O,
    q: At<'_, O::Buf<O::Act>>,
    k: At<'_, O::Buf<O::Act>>,
    v: At<'_, O::Buf<O::Act>>,
    shape: AttentionShape,
    scale: f32,
    out: AtMut<'_, O::Buf<E>>,
    out_stride: usize,
    lse: &mut O::Buf<f32>,
) -> Result<()> {
    let hd = shape.head_dim;
    let Some(p) = ops.attention_width(hd) else {
        return Err(invalid_err("flash_attention", format!("head_dim {hd}: {} takes even head dims up to 128 and multiples of 8 up to 512", ops.describe())));
    };
    if p == hd {
        return ops.attention(q, k, v, shape, scale, out, out_stride, lse);
    }
    let (h, wide) = (shape.heads, shape.heads * p);
    let pad = |src: At<'_, O::Buf<O::Act>>, rows: usize, stride: usize| -> Result<O::Buf<O::Act>> {
        let mut dst = ops.zeros::<O::Act>(rows * wide)?;
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

/// A shape error of operation `op` (the contract's checks, before any kernel runs).
pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::shape(op, detail)
}

/// An unsupported-argument error of operation `op`.
pub(crate) fn invalid_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::invalid(op, detail)
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
    use crate::cpu;

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

    #[test]
    fn backend_names_round_trip() {
        for b in [Backend::Cpu, Backend::Bf16Host, Backend::Cuda(0), Backend::Cuda(3)] {
            assert_eq!(Backend::parse(&b.name()), Some(b));
        }
        assert_eq!(Backend::parse("cuda"), Some(Backend::Cuda(0)));
        assert_eq!((Backend::parse("gpu"), Backend::parse("cuda:x")), (None, None));
        assert_eq!((Backend::Bf16Host.device(), Backend::from(Device::Cuda(2))), (Device::Cpu, Backend::Cuda(2)));
    }

    #[test]
    fn supported_widths() {
        let w = |hd| HostOps.attention_width(hd);
        assert_eq!((w(16), w(64), w(72), w(128), w(130), w(15)), (Some(64), Some(64), Some(128), Some(128), None, None));
        let c = |hd| CpuOps.attention_width(hd);
        assert_eq!((c(16), c(24), c(130), c(15)), (Some(16), Some(24), Some(130), None));
    }

    #[test]
    fn padded_heads_match_plain_attention() {
        // 3 heads of 24 in a fused [q | k | v] buffer, output rows wider than the heads.
        let (heads, hd, n) = (3, 24, 7);
        let d = heads * hd;
        let host: Vec<f32> = (0..n * 3 * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let qkv: Vec<bf16> = host.iter().map(|&v| bf16::from_f32(v)).collect();
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
