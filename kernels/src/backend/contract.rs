//! The kernels' contracts as host-side checks, shared by both [`super::Ops`] implementations:
//! what each CUDA wrapper in `crate::cuda` requires of shapes, strides, lengths and
//! alignments, restated on (buffer length, offset) pairs. The CUDA adapter calls them before every
//! launch (so a bad layout is an error naming the operand, never a fault), and the host emulation
//! calls the same functions, so a layout the GPU would refuse fails the tests on any machine.
//!
//! Alignment: device buffers start 256-byte aligned (the CUDA allocator's guarantee), so the
//! alignment of a region is that of its offset in bytes.

use super::{region, shape_err, span, ConvShape, Elem};
use crate::cpu::{Activation, AttentionShape, Conv3dParams};
use crate::cuda::attention::serves_head_dim;
use crate::Result;
use std::ops::Range;

/// Fails unless a region starting `offset` elements of `bytes` each into a buffer is `align`-byte aligned.
pub(crate) fn aligned(op: &'static str, what: &str, offset: usize, bytes: usize, align: usize) -> Result<()> {
    if !(offset * bytes).is_multiple_of(align) {
        return Err(super::invalid_err(op, format!("{what} starts at element {offset}, not {align}-byte aligned")));
    }
    Ok(())
}

/// `cuda::gemm::linear`: returns the regions of `x` `[m, k]` and `y` `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    x: (usize, usize),
    m: usize,
    k: usize,
    w_len: usize,
    n: usize,
    bias_len: Option<usize>,
    act: Activation,
    y: (usize, usize),
) -> Result<(Range<usize>, Range<usize>)> {
    const OP: &str = "linear";
    if !matches!(act, Activation::None | Activation::GeluTanh | Activation::Gelu) {
        return Err(super::invalid_err(OP, format!("activation {act:?} is not served by the GPU's linear (None, GeluTanh and Gelu are)")));
    }
    if k == 0 || n == 0 {
        return Err(super::invalid_err(OP, format!("k = {k}, n = {n}")));
    }
    if w_len != n * k {
        return Err(shape_err(OP, format!("weight has {w_len} elements, [{n}, {k}] needs {}", n * k)));
    }
    if let Some(b) = bias_len.filter(|&b| b != n) {
        return Err(shape_err(OP, format!("bias has {b} elements, out features {n}")));
    }
    Ok((region(OP, "x", x.0, x.1, m * k)?, region(OP, "y", y.0, y.1, m * n)?))
}

/// The regions a LayerNorm touches: x, y, and each optional parameter.
pub(crate) type NormRegions = (Range<usize>, Range<usize>, [Option<Range<usize>>; 4]);

/// `cuda::norm::layer_norm_modulated`: `x` and `y` (length, offset) hold `rows·dim` from their
/// offsets, each parameter is a `[dim]` region; returns the ranges of x, y and the parameters.
pub(crate) fn layer_norm(x: (usize, usize), rows: usize, dim: usize, params: [Option<(usize, usize)>; 4], y: (usize, usize)) -> Result<NormRegions> {
    const OP: &str = "layer_norm";
    if dim == 0 {
        return Err(super::invalid_err(OP, "dim must be positive"));
    }
    let n = rows.checked_mul(dim).ok_or_else(|| shape_err(OP, "size overflows"))?;
    let (xr, yr) = (region(OP, "x", x.0, x.1, n)?, region(OP, "y", y.0, y.1, n)?);
    let names = ["weight", "bias", "scale", "shift"];
    let mut out = [None, None, None, None];
    for (i, p) in params.iter().enumerate() {
        if let Some((len, off)) = *p {
            out[i] = Some(region(OP, names[i], len, off, dim)?);
        }
    }
    Ok((xr, yr, out))
}

/// `cuda::norm::qk_norm_rope`: returns the region of `x` the rows span. `rope_tokens_pairs` is the
/// table's (tokens, pairs) when rotating.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_norm_rope(
    x: (usize, usize),
    rows: usize,
    stride: usize,
    heads: usize,
    head_dim: usize,
    weight_len: usize,
    rope_tokens_pairs: Option<(usize, usize)>,
) -> Result<Range<usize>> {
    const OP: &str = "qk_norm_rope";
    let dim = heads * head_dim;
    if dim == 0 || !head_dim.is_multiple_of(2) || stride < dim || !stride.is_multiple_of(2) {
        return Err(shape_err(OP, format!("heads {heads} x head_dim {head_dim} (even), stride {stride} (even, at least their product)")));
    }
    if weight_len != dim {
        return Err(shape_err(OP, format!("weight has {weight_len} elements, rows have {dim}")));
    }
    if let Some((tokens, pairs)) = rope_tokens_pairs {
        if tokens != rows || 2 * pairs != head_dim {
            return Err(shape_err(OP, format!("rope table of {tokens} tokens x {pairs} pairs for {rows} rows, head_dim {head_dim}")));
        }
    }
    // The kernel reads channel pairs as 32-bit words.
    aligned(OP, "x", x.1, 2, 4)?;
    region(OP, "x", x.0, x.1, span(rows, stride, dim))
}

/// `cuda::attention::flash_attention`: returns the regions of q, k, v and out (lengths as
/// `(buffer length, offset)` pairs); `O` is the output element type.
pub(crate) fn attention<O: Elem>(
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    shape: &AttentionShape,
    out: (usize, usize),
    out_stride: usize,
    lse_len: usize,
) -> Result<[Range<usize>; 4]> {
    const OP: &str = "flash_attention";
    let AttentionShape { heads, head_dim, q_stride, kv_stride, .. } = *shape;
    if !serves_head_dim(head_dim) || heads == 0 {
        return Err(super::invalid_err(OP, format!("head_dim {head_dim} (supported: {}), heads {heads}", crate::cuda::attention::SERVED_HEAD_DIMS)));
    }
    if !q_stride.is_multiple_of(8) || !kv_stride.is_multiple_of(8) || !out_stride.is_multiple_of(2) {
        return Err(super::invalid_err(OP, format!("q/kv strides ({q_stride}, {kv_stride}) must be multiples of 8 and the out stride ({out_stride}) even")));
    }
    for (name, (_, off)) in [("q", q), ("k", k), ("v", v)] {
        aligned(OP, name, off, 2, 16)?;
    }
    let ob = O::BYTES as usize;
    aligned(OP, "out", out.1, ob, 2 * ob)?;
    attention_regions(q, k, v, shape, out, out_stride, lse_len)
}

/// What any attention needs of its operands, whatever the device: positive heads, rows at least
/// `heads·head_dim` apart, every region inside its buffer. Returns the regions of q, k, v and out.
pub(crate) fn attention_regions(
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    shape: &AttentionShape,
    out: (usize, usize),
    out_stride: usize,
    lse_len: usize,
) -> Result<[Range<usize>; 4]> {
    const OP: &str = "attention";
    let AttentionShape { heads, head_dim, q_len, kv_len, q_stride, kv_stride } = *shape;
    if heads == 0 || head_dim == 0 {
        return Err(super::invalid_err(OP, format!("heads {heads}, head_dim {head_dim}")));
    }
    let hd = heads * head_dim;
    if q_stride < hd || kv_stride < hd || out_stride < hd {
        return Err(shape_err(OP, format!("strides q {q_stride}, kv {kv_stride}, out {out_stride} shorter than heads·head_dim = {hd}")));
    }
    region(OP, "lse", lse_len, 0, heads * q_len)?;
    Ok([
        region(OP, "q", q.0, q.1, span(q_len, q_stride, hd))?,
        region(OP, "k", k.0, k.1, span(kv_len, kv_stride, hd))?,
        region(OP, "v", v.0, v.1, span(kv_len, kv_stride, hd))?,
        region(OP, "out", out.0, out.1, span(q_len, out_stride, hd))?,
    ])
}

/// The regions a biased attention touches.
pub(crate) struct BiasedRegions {
    /// q, k, v and out.
    pub qkvo: [Range<usize>; 4],
    /// The bias table, from the first head's first bias to the last head's last.
    pub rel: Range<usize>,
    /// The key mask.
    pub key_add: Option<Range<usize>>,
}

/// `cuda::biased_attention::biased_attention` (with `on_gpu`, its key and channel limits) and its
/// CPU twin: the regions of q, k, v, out, the bias rows (`pitch` apart, `q_len + kv_len − 1` each)
/// and the key mask.
#[allow(clippy::too_many_arguments)]
pub(crate) fn biased_attention(
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    shape: &AttentionShape,
    out: (usize, usize),
    out_stride: usize,
    rel: (usize, usize),
    pitch: usize,
    key_add: Option<(usize, usize)>,
    on_gpu: bool,
) -> Result<BiasedRegions> {
    const OP: &str = "biased_attention";
    let AttentionShape { heads, head_dim, q_len, kv_len, .. } = *shape;
    if on_gpu && (kv_len > crate::cuda::biased_attention::MAX_KEYS || head_dim > 1024) {
        let max = crate::cuda::biased_attention::MAX_KEYS;
        return Err(super::invalid_err(OP, format!("{kv_len} keys of head_dim {head_dim}: the GPU kernel takes at most {max} keys and 1024 channels")));
    }
    let qkvo = attention_regions(q, k, v, shape, out, out_stride, heads * q_len)?;
    let span = (q_len + kv_len).saturating_sub(1);
    if span > pitch && heads > 1 {
        return Err(shape_err(OP, format!("bias rows of {span} values only {pitch} apart")));
    }
    let rel = region(OP, "rel", rel.0, rel.1, if span == 0 { 0 } else { (heads - 1) * pitch + span })?;
    let key_add = key_add.map(|(len, off)| region(OP, "key_add", len, off, kv_len)).transpose()?;
    Ok(BiasedRegions { qkvo, rel, key_add })
}

/// [`super::Ops::conv3d`]: one to [`MAX_PIECES`] pieces (given as (buffer length, frames)), each
/// holding its frames; input channels and kernel those of the weight. Returns the output shape
/// `[co, T', H', W']`.
/// Most input pieces of a convolution: a causal cache's two frames, then the new ones.
pub(crate) const MAX_PIECES: usize = 3;

pub(crate) fn conv3d(pieces: &[(usize, usize)], chw: [usize; 3], shape: &ConvShape, p: &Conv3dParams) -> Result<[usize; 4]> {
    const OP: &str = "conv3d";
    let [c, h, w] = chw;
    if pieces.is_empty() || pieces.len() > MAX_PIECES {
        return Err(super::invalid_err(OP, format!("{} input pieces (1 to {MAX_PIECES}: cached frames, then new ones)", pieces.len())));
    }
    if c != shape.in_channels || p.kernel != shape.kernel {
        return Err(shape_err(OP, format!("input of {c} channels and kernel {:?} for a weight {shape:?}", p.kernel)));
    }
    let mut frames = 0usize;
    for (i, &(len, f)) in pieces.iter().enumerate() {
        let need = c.checked_mul(f).and_then(|v| v.checked_mul(h)).and_then(|v| v.checked_mul(w));
        match need {
            Some(n) if n <= len => frames += f,
            _ => return Err(shape_err(OP, format!("piece {i}: {f} frames of [{c}, {h}, {w}] overrun a buffer of {len}"))),
        }
    }
    let [t, ho, wo] = p.output_size([frames, h, w])?;
    Ok([shape.out_channels, t, ho, wo])
}

/// `cuda::video::channel_rms_norm`: `x` holds `channels·positions` values, `gamma` `channels`.
pub(crate) fn channel_norm(x_len: usize, channels: usize, positions: usize, gamma_len: usize) -> Result<Range<usize>> {
    const OP: &str = "channel_rms_norm";
    if channels == 0 || gamma_len != channels {
        return Err(shape_err(OP, format!("gamma has {gamma_len} values for {channels} channels")));
    }
    region(OP, "x", x_len, 0, channels.checked_mul(positions).ok_or_else(|| shape_err(OP, "size overflows"))?)
}

/// `cuda::video::upsample_nearest2x`: the regions of `x` (`planes` planes of `h × w`) and `out`
/// (four times as many values).
pub(crate) fn upsample(x_len: usize, planes: usize, h: usize, w: usize, out_len: usize) -> Result<(Range<usize>, Range<usize>)> {
    const OP: &str = "upsample_nearest2x";
    let n = planes.checked_mul(h).and_then(|v| v.checked_mul(w)).filter(|v| v.checked_mul(4).is_some()).ok_or_else(|| shape_err(OP, "size overflows"))?;
    Ok((region(OP, "x", x_len, 0, n)?, region(OP, "out", out_len, 0, 4 * n)?))
}

/// `cuda::video::transpose`: the regions of `x` and `out`, `rows·cols` values each.
pub(crate) fn transpose(x: (usize, usize), rows: usize, cols: usize, out: (usize, usize)) -> Result<(Range<usize>, Range<usize>)> {
    const OP: &str = "transpose";
    let n = rows.checked_mul(cols).ok_or_else(|| shape_err(OP, "size overflows"))?;
    Ok((region(OP, "x", x.0, x.1, n)?, region(OP, "out", out.0, out.1, n)?))
}

/// Regions of a residual add's x, y and (optional) gate.
pub(crate) type AddRegions = (Range<usize>, Range<usize>, Option<Range<usize>>);

/// `cuda::elementwise::gated_residual_add`: returns the regions of x, y and the gate.
pub(crate) fn add(x: (usize, usize), y: (usize, usize), gate: Option<(usize, usize)>, n: usize, dim: usize) -> Result<AddRegions> {
    const OP: &str = "gated_residual_add";
    if dim == 0 || !n.is_multiple_of(dim) {
        return Err(shape_err(OP, format!("{n} elements are not rows of {dim}")));
    }
    let g = gate.map(|(len, off)| region(OP, "gate", len, off, dim)).transpose()?;
    Ok((region(OP, "x", x.0, x.1, n)?, region(OP, "y", y.0, y.1, n)?, g))
}

/// A 2-D copy of `rows` runs of `width` elements: returns the source and destination regions.
pub(crate) fn copy_rows(
    src: (usize, usize),
    src_pitch: usize,
    dst: (usize, usize),
    dst_pitch: usize,
    width: usize,
    rows: usize,
) -> Result<(Range<usize>, Range<usize>)> {
    const OP: &str = "copy_rows";
    if width > src_pitch || width > dst_pitch {
        return Err(shape_err(OP, format!("runs of {width} elements with pitches {src_pitch} and {dst_pitch}")));
    }
    Ok((region(OP, "src", src.0, src.1, span(rows, src_pitch, width))?, region(OP, "dst", dst.0, dst.1, span(rows, dst_pitch, width))?))
}

/// `cuda::attention::merge_partials`: `out_a`/`out_b` hold exactly `q_len·heads·head_dim` values,
/// `lse_a`/`lse_b` exactly `heads·q_len` (each pair given as (out length, lse length)).
pub(crate) fn merge_partials(a: (usize, usize), b: (usize, usize), q_len: usize, heads: usize, head_dim: usize) -> Result<()> {
    const OP: &str = "merge_partials";
    if heads == 0 || head_dim == 0 {
        return Err(super::invalid_err(OP, "heads and head_dim must be positive"));
    }
    let want = (q_len * heads * head_dim, q_len * heads);
    for (what, got) in [("a", a), ("b", b)] {
        if got != want {
            return Err(shape_err(OP, format!("partial {what}: out {} and lse {} values, expected {} and {}", got.0, got.1, want.0, want.1)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn attention_contract_refuses_what_the_kernel_refuses() {
        let shape = AttentionShape { heads: 2, head_dim: 64, q_len: 10, kv_len: 12, q_stride: 384, kv_stride: 384 };
        let big = 384 * 12;
        // q, k, v inside one fused projection: offsets 0, 128, 256 are 16-byte aligned.
        let r = attention::<bf16>((big, 0), (big, 128), (big, 256), &shape, (128 * 10, 0), 128, 20).unwrap();
        assert_eq!(r[1], 128..128 + 11 * 384 + 128);
        // A k offset of 4 elements is only 8-byte aligned.
        assert!(attention::<bf16>((big, 0), (big, 4), (big, 256), &shape, (1280, 0), 128, 20).is_err());
        // Unsupported head dim, odd strides, short lse, f32 output at an odd offset.
        assert!(attention::<bf16>((big, 0), (big, 0), (big, 0), &AttentionShape { head_dim: 16, ..shape }, (1280, 0), 128, 20).is_err());
        assert!(attention::<bf16>((big, 0), (big, 0), (big, 0), &AttentionShape { q_stride: 388, ..shape }, (1280, 0), 128, 20).is_err());
        assert!(attention::<bf16>((big, 0), (big, 128), (big, 256), &shape, (1280, 0), 128, 19).is_err());
        assert!(attention::<f32>((big, 0), (big, 128), (big, 256), &shape, (1290, 1), 128, 20).is_err());
        // Output rows past the buffer.
        assert!(attention::<bf16>((big, 0), (big, 128), (big, 256), &shape, (1279, 0), 128, 20).is_err());
    }

    #[test]
    fn other_contracts() {
        assert!(qk_norm_rope((100, 1), 2, 32, 2, 16, 32, None).is_err(), "odd offset is not 4-byte aligned");
        assert_eq!(qk_norm_rope((120, 32), 2, 48, 2, 16, 32, Some((2, 8))).unwrap(), 32..32 + 48 + 32);
        assert!(qk_norm_rope((96, 32), 2, 48, 2, 16, 32, None).is_err(), "rows overrun");
        assert!(qk_norm_rope((120, 32), 2, 48, 2, 16, 32, Some((3, 8))).is_err(), "table rows must equal rows");
        assert!(linear((12, 0), 3, 4, 8, 2, Some(2), Activation::Silu, (6, 0)).is_err());
        assert!(linear((12, 0), 3, 4, 8, 2, Some(3), Activation::None, (6, 0)).is_err());
        assert!(linear((12, 0), 3, 4, 8, 2, None, Activation::GeluTanh, (6, 0)).is_ok());
        assert!(add((10, 0), (10, 0), Some((4, 1)), 10, 4).is_err(), "10 is not rows of 4");
        assert!(add((8, 0), (8, 0), Some((4, 1)), 8, 4).is_err(), "gate region overruns");
        assert!(copy_rows((10, 0), 2, (20, 0), 4, 3, 2).is_err(), "width above the source pitch");
        assert_eq!(copy_rows((10, 0), 4, (20, 1), 8, 3, 2).unwrap(), (0..7, 1..12));
        assert!(layer_norm((8, 0), 2, 4, [Some((4, 1)), None, None, None], (8, 0)).is_err());
        assert!(layer_norm((12, 4), 2, 4, [None; 4], (8, 0)).is_ok());
        assert!(layer_norm((12, 5), 2, 4, [None; 4], (8, 0)).is_err());
        assert!(merge_partials((24, 6), (24, 6), 3, 2, 4).is_ok());
        assert!(merge_partials((24, 6), (24, 5), 3, 2, 4).is_err(), "short lse of b");
        assert!(merge_partials((0, 0), (0, 0), 0, 0, 4).is_err(), "no heads");
    }
}
