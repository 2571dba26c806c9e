//! 3-D and 2-D convolutions with PyTorch's `Conv3d`/`Conv2d` semantics (cross-correlation, no
//! dilation, no groups, explicit zero padding per side) on the CPU in f32. Each call is a GEMM
//! `weight [C_out, C_in·k] × columns [C_in·k, positions]` over tiles of im2col columns, so the
//! memory a call needs beyond its input and output is one tile of columns, whatever the video size.

use super::matmul::{gemm_into, MatRef, Threads};
use crate::{KernelError, Result};
use rayon::prelude::*;

/// Largest tile of im2col columns, in f32 elements (16 MiB): big enough to keep the GEMMs efficient,
/// small enough to stay near the last-level cache.
const COL_BUDGET: usize = 4 << 20;
/// Fewest output positions per tile, so that a very deep kernel still gives a wide product.
const MIN_TILE: usize = 128;

/// Kernel size, stride and zero padding of a 3-D convolution, per axis (time, height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3dParams {
    /// Kernel extent `[kt, kh, kw]`.
    pub kernel: [usize; 3],
    /// Stride `[st, sh, sw]`.
    pub stride: [usize; 3],
    /// Zero padding `[before, after]` per axis.
    pub padding: [[usize; 2]; 3],
}

impl Conv3dParams {
    /// A kernel of this size with stride 1 and no padding.
    pub fn new(kernel: [usize; 3]) -> Self {
        Self { kernel, stride: [1; 3], padding: [[0; 2]; 3] }
    }

    /// The same, with `stride`.
    pub fn with_stride(mut self, stride: [usize; 3]) -> Self {
        self.stride = stride;
        self
    }

    /// The same, with `padding` (`[before, after]` per axis).
    pub fn with_padding(mut self, padding: [[usize; 2]; 3]) -> Self {
        self.padding = padding;
        self
    }

    /// Output extent `[T, H, W]` for an input of extent `input`.
    pub fn output_size(&self, input: [usize; 3]) -> Result<[usize; 3]> {
        let mut out = [0; 3];
        for a in 0..3 {
            let (k, s, [p0, p1]) = (self.kernel[a], self.stride[a], self.padding[a]);
            if k == 0 || s == 0 {
                return Err(KernelError::invalid("conv3d", format!("kernel {:?} and stride {:?} must be positive", self.kernel, self.stride)));
            }
            let padded = input[a] + p0 + p1;
            if padded < k {
                return Err(KernelError::shape("conv3d", format!("axis {a}: padded input {padded} is shorter than the kernel {k}")));
            }
            out[a] = (padded - k) / s + 1;
        }
        Ok(out)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1; 3] && self.stride == [1; 3] && self.padding == [[0; 2]; 3]
    }
}

/// Kernel size, stride and zero padding of a 2-D convolution, per axis (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Kernel extent `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Zero padding `[before, after]` per axis (`nn.ZeroPad2d((l, r, t, b))` is `[[t, b], [l, r]]`).
    pub padding: [[usize; 2]; 2],
}

impl Conv2dParams {
    /// A kernel of this size with stride 1 and no padding.
    pub fn new(kernel: [usize; 2]) -> Self {
        Self { kernel, stride: [1; 2], padding: [[0; 2]; 2] }
    }

    /// The same, with `stride`.
    pub fn with_stride(mut self, stride: [usize; 2]) -> Self {
        self.stride = stride;
        self
    }

    /// The same, with `padding`.
    pub fn with_padding(mut self, padding: [[usize; 2]; 2]) -> Self {
        self.padding = padding;
        self
    }

    /// The 3-D convolution that applies this one to every frame of a `[C, T, H, W]` input.
    pub fn per_frame(&self) -> Conv3dParams {
        Conv3dParams {
            kernel: [1, self.kernel[0], self.kernel[1]],
            stride: [1, self.stride[0], self.stride[1]],
            padding: [[0, 0], self.padding[0], self.padding[1]],
        }
    }
}

/// Geometry of one call, with everything the im2col fill needs.
struct Geometry<'a> {
    input: &'a Frames<'a>,
    kernel: [usize; 3],
    stride: [usize; 3],
    pad_before: [usize; 3],
    output: [usize; 3],
}

/// A `[C, T, H, W]` input held as consecutive pieces along time, each `[C, T_i, H, W]`, read in place.
struct Frames<'a> {
    pieces: &'a [&'a [f32]],
    /// For each input frame: (piece, frame within the piece, frames in the piece).
    index: Vec<(usize, usize, usize)>,
    c: usize,
    h: usize,
    w: usize,
}

impl<'a> Frames<'a> {
    fn new(pieces: &'a [&'a [f32]], [c, h, w]: [usize; 3]) -> Result<Self> {
        let frame = c * h * w;
        if frame == 0 {
            return Err(KernelError::invalid("conv3d", format!("input frames of [{c}, {h}, {w}] have no elements")));
        }
        let mut index = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if p.len() % frame != 0 {
                return Err(KernelError::shape("conv3d", format!("input piece {i} has {} elements, not whole frames of [{c}, {h}, {w}]", p.len())));
            }
            let t = p.len() / frame;
            index.extend((0..t).map(|f| (i, f, t)));
        }
        Ok(Self { pieces, index, c, h, w })
    }

    fn frames(&self) -> usize {
        self.index.len()
    }

    /// Row `hr` of channel `ci` in input frame `ti`.
    fn row(&self, ci: usize, ti: usize, hr: usize) -> &'a [f32] {
        let (piece, f, t) = self.index[ti];
        &self.pieces[piece][((ci * t + f) * self.h + hr) * self.w..][..self.w]
    }
}

/// 3-D convolution of `x` `[C_in, T, H, W]` (row-major) with `weight` `[C_out, C_in, kt, kh, kw]`
/// and optional `bias` `[C_out]`. Returns the output `[C_out, T', H', W']` and its shape.
pub fn conv3d(x: &[f32], shape: [usize; 4], weight: &[f32], bias: Option<&[f32]>, out_channels: usize, p: &Conv3dParams) -> Result<(Vec<f32>, [usize; 4])> {
    let [c, t, h, w] = shape;
    if x.len() != c * t * h * w {
        return Err(KernelError::shape("conv3d", format!("input has {} elements for shape {shape:?}", x.len())));
    }
    conv3d_pieces(&[x], [c, h, w], weight, bias, out_channels, p)
}

/// [`conv3d`] of an input given as consecutive pieces along time, each `[C_in, T_i, H, W]` with
/// `chw = [C_in, H, W]` (for example a causal convolution's cached frames followed by the new
/// ones): the pieces are read in place, never joined.
pub fn conv3d_pieces(
    pieces: &[&[f32]],
    chw: [usize; 3],
    weight: &[f32],
    bias: Option<&[f32]>,
    out_channels: usize,
    p: &Conv3dParams,
) -> Result<(Vec<f32>, [usize; 4])> {
    let taps = chw[0] * p.kernel.iter().product::<usize>();
    conv3d_tiled(&Frames::new(pieces, chw)?, weight, bias, out_channels, p, (COL_BUDGET / taps.max(1)).max(MIN_TILE))
}

/// 2-D convolution of `x` `[C_in, H, W]` with `weight` `[C_out, C_in, kh, kw]` and optional `bias`
/// `[C_out]`. Returns the output `[C_out, H', W']` and its shape. (For a stack of frames
/// `[C_in, T, H, W]`, call [`conv3d`] with [`Conv2dParams::per_frame`]: the weights are the same.)
pub fn conv2d(x: &[f32], shape: [usize; 3], weight: &[f32], bias: Option<&[f32]>, out_channels: usize, p: &Conv2dParams) -> Result<(Vec<f32>, [usize; 3])> {
    let [c, h, w] = shape;
    let (y, [co, _, ho, wo]) = conv3d(x, [c, 1, h, w], weight, bias, out_channels, &p.per_frame())?;
    Ok((y, [co, ho, wo]))
}

/// The convolution with at most `tile` output positions per GEMM.
fn conv3d_tiled(x: &Frames<'_>, weight: &[f32], bias: Option<&[f32]>, co: usize, p: &Conv3dParams, tile: usize) -> Result<(Vec<f32>, [usize; 4])> {
    let (c, t, h, w) = (x.c, x.frames(), x.h, x.w);
    if co == 0 {
        return Err(KernelError::invalid("conv3d", "output channels must be positive"));
    }
    let out = p.output_size([t, h, w])?;
    let k = c * p.kernel.iter().product::<usize>();
    if weight.len() != co * k {
        return Err(KernelError::shape("conv3d", format!("weight has {} elements, [{co}, {c}, {:?}] needs {}", weight.len(), p.kernel, co * k)));
    }
    if let Some(b) = bias {
        if b.len() != co {
            return Err(KernelError::shape("conv3d", format!("bias has {} elements for {co} output channels", b.len())));
        }
    }
    let positions: usize = out.iter().product();
    let out_shape = [co, out[0], out[1], out[2]];
    if let Some(active) = time_taps_needed(p, t, out[0]) {
        if active.is_empty() {
            // every tap reads padding: the output is the bias alone
            let y = bias.map_or_else(|| vec![0.0; co * positions], |b| b.iter().flat_map(|&v| std::iter::repeat_n(v, positions)).collect());
            return Ok((y, out_shape));
        }
        return conv3d_time_taps(x, weight, bias, co, p, tile, active, out_shape);
    }
    let mut y = vec![0.0f32; co * positions];
    if let Some(b) = bias {
        y.par_chunks_mut(positions).zip(b.par_iter()).for_each(|(row, &b)| row.fill(b));
    }
    let a = MatRef::row_major(weight, co, k, k)?;
    if p.is_pointwise() {
        // Each piece is a [C, T_i·H·W] matrix: one product per piece, into its output frames.
        let mut start = 0;
        for piece in x.pieces.iter().filter(|p| !p.is_empty()) {
            let n = piece.len() / c;
            gemm_into(&mut y[start..], positions, bias.is_some(), a, MatRef::row_major(piece, c, n, n)?, Threads::Pool)?;
            start += n;
        }
        return Ok((y, out_shape));
    }
    let g = Geometry { input: x, kernel: p.kernel, stride: p.stride, pad_before: p.padding.map(|[b, _]| b), output: out };
    let tile = tile.clamp(1, positions);
    let mut col = vec![0.0f32; k * tile];
    let mut q0 = 0;
    while q0 < positions {
        let n = tile.min(positions - q0);
        let cols = &mut col[..k * n];
        cols.par_chunks_mut(n).enumerate().with_min_len(4).for_each(|(r, row)| fill_row(row, &g, r, q0));
        gemm_into(&mut y[q0..], positions, bias.is_some(), a, MatRef::row_major(cols, k, n, n)?, Threads::Pool)?;
        q0 += n;
    }
    Ok((y, out_shape))
}

/// The time taps that read a real frame for at least one output frame, when that is fewer than
/// all of them (a causal convolution's first chunk reads mostly padding); `None` when all are.
fn time_taps_needed(p: &Conv3dParams, t: usize, t_out: usize) -> Option<std::ops::Range<usize>> {
    let (kt, st, pt) = (p.kernel[0], p.stride[0], p.padding[0][0]);
    // Output frame j reads input frame j·st + dt − pt: the last output frame needs the smallest dt,
    // the first the largest.
    let lo = pt.saturating_sub(t_out.saturating_sub(1) * st);
    let hi = (t + pt).min(kt);
    (lo > 0 || hi < kt).then(|| lo..hi.max(lo))
}

/// [`conv3d_tiled`] with only the time taps `active`: the other taps multiply zero padding, so
/// they are dropped from the kernel (and the GEMM), with the padding shifted to match.
#[allow(clippy::too_many_arguments)]
fn conv3d_time_taps(
    x: &Frames<'_>,
    weight: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    p: &Conv3dParams,
    tile: usize,
    active: std::ops::Range<usize>,
    out_shape: [usize; 4],
) -> Result<(Vec<f32>, [usize; 4])> {
    let [kt, kh, kw] = p.kernel;
    let (plane, n) = (kh * kw, active.len());
    let mut sub = Vec::with_capacity(co * x.c * n * plane);
    for filter in weight.chunks_exact(kt * plane) {
        sub.extend_from_slice(&filter[active.start * plane..active.end * plane]);
    }
    // Same output frames: input frame j·st + dt − pt = j·st + (dt − lo) − (pt − lo).
    let before = p.padding[0][0] - active.start;
    let span = (out_shape[1] - 1) * p.stride[0] + n;
    let after = span.saturating_sub(x.frames() + before);
    let mut padding = p.padding;
    padding[0] = [before, after];
    let reduced = Conv3dParams { kernel: [n, kh, kw], padding, ..*p };
    let (y, s) = conv3d_tiled(x, &sub, bias, co, &reduced, tile)?;
    debug_assert_eq!(s, out_shape, "dropping time taps must keep the output frames");
    Ok((y, s))
}

/// Fills im2col row `r` (one (input channel, dt, dh, dw) tap) for output positions `q0 ..`
/// `q0 + row.len()` (flattened over (t, h, w) of the output), with zeros where the tap reads padding.
fn fill_row(row: &mut [f32], g: &Geometry<'_>, r: usize, q0: usize) {
    let (t, h, w) = (g.input.frames(), g.input.h, g.input.w);
    let [kt, kh, kw] = g.kernel;
    let [st, sh, sw] = g.stride;
    let [pt, ph, pw] = g.pad_before;
    let [_, ho, wo] = g.output;
    let taps = kt * kh * kw;
    let (ci, tap) = (r / taps, r % taps);
    let (dt, dh, dw) = (tap / (kh * kw), (tap / kw) % kh, tap % kw);
    // Output columns whose input column wo·sw + dw − pw lies inside [0, w).
    let lo = pw.saturating_sub(dw).div_ceil(sw);
    let hi = if w + pw > dw { (w + pw - dw).div_ceil(sw) } else { 0 }.min(wo);
    let plane = ho * wo;
    let mut off = 0;
    while off < row.len() {
        let q = q0 + off;
        let (to, ho_i, wo_s) = (q / plane, (q % plane) / wo, q % wo);
        let wo_e = wo.min(wo_s + row.len() - off);
        let seg = &mut row[off..off + wo_e - wo_s];
        off += wo_e - wo_s;
        let ti = (to * st + dt).checked_sub(pt).filter(|&v| v < t);
        let hi_row = (ho_i * sh + dh).checked_sub(ph).filter(|&v| v < h);
        let (Some(ti), Some(hr)) = (ti, hi_row) else {
            seg.fill(0.0);
            continue;
        };
        let (a, b) = (lo.clamp(wo_s, wo_e), hi.max(lo).clamp(wo_s, wo_e));
        seg[..a - wo_s].fill(0.0);
        seg[b - wo_s..].fill(0.0);
        let src = g.input.row(ci, ti, hr);
        let dst = &mut seg[a - wo_s..b - wo_s];
        if sw == 1 {
            dst.copy_from_slice(&src[a + dw - pw..b + dw - pw]);
        } else {
            for (i, o) in dst.iter_mut().enumerate() {
                *o = src[(a + i) * sw + dw - pw];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Direct convolution in f64, the test oracle.
    fn naive(x: &[f32], shape: [usize; 4], wt: &[f32], bias: Option<&[f32]>, co: usize, p: &Conv3dParams) -> (Vec<f32>, [usize; 4]) {
        let [c, t, h, w] = shape;
        let [kt, kh, kw] = p.kernel;
        let [ot, oh, ow] = p.output_size([t, h, w]).unwrap();
        let mut y = vec![0.0f32; co * ot * oh * ow];
        let at = |ci: usize, ti: isize, hi: isize, wi: isize| -> f64 {
            if ti < 0 || hi < 0 || wi < 0 || ti >= t as isize || hi >= h as isize || wi >= w as isize {
                0.0
            } else {
                x[((ci * t + ti as usize) * h + hi as usize) * w + wi as usize] as f64
            }
        };
        for o in 0..co {
            for (a, b, cc) in itertools3(ot, oh, ow) {
                let mut s = bias.map_or(0.0, |b| b[o] as f64);
                for ci in 0..c {
                    for dt in 0..kt {
                        for dh in 0..kh {
                            for dw in 0..kw {
                                let ti = (a * p.stride[0] + dt) as isize - p.padding[0][0] as isize;
                                let hi = (b * p.stride[1] + dh) as isize - p.padding[1][0] as isize;
                                let wi = (cc * p.stride[2] + dw) as isize - p.padding[2][0] as isize;
                                s += at(ci, ti, hi, wi) * wt[(((o * c + ci) * kt + dt) * kh + dh) * kw + dw] as f64;
                            }
                        }
                    }
                }
                y[((o * ot + a) * oh + b) * ow + cc] = s as f32;
            }
        }
        (y, [co, ot, oh, ow])
    }

    fn itertools3(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn check(shape: [usize; 4], co: usize, p: Conv3dParams, with_bias: bool, tile: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(shape.iter().sum::<usize>() as u64 * 31 + co as u64);
        let x = rand_vec(&mut rng, shape.iter().product());
        let k: usize = shape[0] * p.kernel.iter().product::<usize>();
        let wt = rand_vec(&mut rng, co * k);
        let b = rand_vec(&mut rng, co);
        let bias = with_bias.then_some(b.as_slice());
        let [c, t, h, w] = shape;
        let (got, gs) = conv3d_tiled(&Frames::new(&[&x], [c, h, w]).unwrap(), &wt, bias, co, &p, tile).unwrap();
        // the same input split into pieces along time (first frame, the rest) gives the same output
        let frames = |a: usize, b: usize| -> Vec<f32> { (0..c).flat_map(|ci| x[(ci * t + a) * h * w..(ci * t + b) * h * w].to_vec()).collect() };
        let (first, rest) = (frames(0, t.min(1)), frames(t.min(1), t));
        let (pieces, _) = conv3d_tiled(&Frames::new(&[&first, &[], &rest], [c, h, w]).unwrap(), &wt, bias, co, &p, tile).unwrap();
        assert_eq!(pieces, got, "{shape:?} {p:?} in pieces");
        let (want, ws) = naive(&x, shape, &wt, bias, co, &p);
        assert_eq!(gs, ws, "{shape:?} {p:?}");
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{shape:?} {p:?} tile {tile} at {i}: {a} vs {e}");
        }
    }

    #[test]
    fn matches_direct_convolution() {
        let causal = Conv3dParams::new([3, 3, 3]).with_padding([[2, 0], [1, 1], [1, 1]]);
        // one tile, tiles that end mid-row and mid-frame, a single position per tile
        for tile in [usize::MAX, 7, 13, 1] {
            check([4, 3, 5, 6], 5, causal, true, tile);
            check([3, 1, 4, 4], 2, causal, false, tile);
            // temporal-only kernels (the VAE's time_conv), with and without stride
            check([6, 4, 3, 5], 12, Conv3dParams::new([3, 1, 1]).with_padding([[2, 0], [0, 0], [0, 0]]), true, tile);
            check([4, 5, 3, 3], 4, Conv3dParams::new([3, 1, 1]).with_stride([2, 1, 1]), true, tile);
            // per-frame 2-D kernels: upsample conv (pad 1) and downsample conv (pad right/bottom, stride 2)
            check([3, 2, 5, 7], 4, Conv2dParams::new([3, 3]).with_padding([[1, 1], [1, 1]]).per_frame(), true, tile);
            check([3, 2, 6, 7], 3, Conv2dParams::new([3, 3]).with_stride([2, 2]).with_padding([[0, 1], [0, 1]]).per_frame(), true, tile);
            // odd strides and paddings on every axis
            check([2, 5, 7, 6], 3, Conv3dParams::new([2, 3, 2]).with_stride([2, 3, 2]).with_padding([[1, 2], [0, 2], [3, 1]]), true, tile);
            // first chunks of causal convs: taps that only read padding are dropped
            check([3, 1, 4, 5], 4, causal, true, tile);
            check([3, 2, 4, 5], 4, causal, true, tile);
            check([2, 3, 2, 3], 3, Conv3dParams::new([3, 1, 1]).with_padding([[5, 1], [0, 0], [0, 0]]), true, tile);
            check([2, 3, 2, 3], 3, Conv3dParams::new([3, 2, 1]).with_stride([2, 1, 1]).with_padding([[3, 4], [1, 0], [0, 0]]), true, tile);
            check([2, 1, 2, 3], 3, Conv3dParams::new([2, 1, 1]).with_padding([[4, 0], [0, 0], [0, 0]]), true, tile);
            check([2, 1, 2, 3], 3, Conv3dParams::new([3, 1, 1]).with_padding([[0, 2], [0, 0], [0, 0]]), true, tile);
            // no tap ever reads a frame: bias only
            check([2, 1, 2, 3], 3, Conv3dParams::new([1, 1, 1]).with_stride([5, 1, 1]).with_padding([[2, 0], [0, 0], [0, 0]]), true, tile);
            check([2, 1, 2, 3], 3, Conv3dParams::new([1, 1, 1]).with_stride([5, 1, 1]).with_padding([[2, 0], [0, 0], [0, 0]]), false, tile);
            // pointwise (plain GEMM path)
            check([7, 2, 3, 4], 5, Conv3dParams::new([1, 1, 1]), true, tile);
        }
    }

    #[test]
    fn conv2d_is_one_frame_of_conv3d() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let x = rand_vec(&mut rng, 3 * 6 * 5);
        let wt = rand_vec(&mut rng, 4 * 3 * 9);
        let p = Conv2dParams::new([3, 3]).with_stride([2, 2]).with_padding([[0, 1], [0, 1]]);
        let (got, s) = conv2d(&x, [3, 6, 5], &wt, None, 4, &p).unwrap();
        assert_eq!(s, [4, 3, 2]);
        let (want, _) = naive(&x, [3, 1, 6, 5], &wt, None, 4, &p.per_frame());
        for (a, e) in got.iter().zip(&want) {
            assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()));
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let p = Conv3dParams::new([3, 3, 3]);
        assert!(conv3d(&[0.0; 10], [1, 2, 2, 2], &[0.0; 27], None, 1, &p).is_err()); // input length
        assert!(conv3d(&[0.0; 8], [1, 2, 2, 2], &[0.0; 27], None, 1, &p).is_err()); // kernel longer than input
        let padded = p.with_padding([[1, 1]; 3]);
        assert!(conv3d(&[0.0; 8], [1, 2, 2, 2], &[0.0; 26], None, 1, &padded).is_err()); // weight length
        assert!(conv3d(&[0.0; 8], [1, 2, 2, 2], &[0.0; 27], Some(&[0.0; 2]), 1, &padded).is_err()); // bias length
        assert!(conv3d(&[0.0; 8], [1, 2, 2, 2], &[0.0; 27], None, 1, &padded.with_stride([0, 1, 1])).is_err());
        assert!(conv3d(&[0.0; 8], [1, 2, 2, 2], &[0.0; 27], None, 1, &padded).is_ok());
        assert!(conv3d_pieces(&[&[0.0; 8], &[0.0; 3]], [1, 2, 2], &[0.0; 27], None, 1, &padded).is_err()); // not whole frames
        assert!(conv3d_pieces(&[&[0.0; 8], &[0.0; 4]], [1, 2, 2], &[0.0; 27], None, 1, &padded).is_ok());
        assert!(conv3d(&[], [0, 2, 2, 2], &[], None, 1, &padded).is_err()); // no channels
    }
}
