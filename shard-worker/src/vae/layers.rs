//! The VAE's parameterised layers on any backend: RMS norm over channels (`WanRMS_norm`), the
//! causal 3-D convolution with its frame cache (`WanCausalConv3d`), and 2-D convolutions applied
//! frame by frame; on whole frames or on a band of rows ([`Tile`]), whose convolutions first
//! borrow the rows they reach from the neighbouring bands.

use super::band::Tile;
use super::clip::{Clip, FrameCache};
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use tessera_kernels::backend::{ConvShape, Ops};
use tessera_kernels::cpu::{Conv2dParams, Conv3dParams};

/// `F.normalize(x, dim=channels)·√C·γ`: per position, divides by the L2 norm over channels
/// (at least 1e-12), then scales each channel.
pub(crate) struct ChannelRmsNorm<O: Ops> {
    gamma: O::Buf<f32>,
}

impl<O: Ops> ChannelRmsNorm<O> {
    /// Loads `{prefix}.gamma`, shaped `[dim, 1, 1, 1]` (video blocks) or `[dim, 1, 1]` (`images`, the
    /// attention block).
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, dim: usize, images: bool) -> Result<Self> {
        let shape: &[usize] = if images { &[dim, 1, 1] } else { &[dim, 1, 1, 1] };
        Ok(Self { gamma: ops.upload_vec(src.tensor(&format!("{prefix}.gamma"), shape)?)? })
    }

    /// Normalises every position of `x` in place, then applies SiLU when `silu` is set.
    pub fn apply(&self, ops: &O, x: &mut Clip<O>, silu: bool) -> Result<()> {
        let (c, n) = (x.c, x.positions());
        if n == 0 {
            return Ok(());
        }
        Ok(ops.channel_norm(&mut x.buf, c, n, &self.gamma, silu)?)
    }
}

/// A convolution's weights on the backend with its geometry: `WanCausalConv3d` (time padded only
/// at the start, by twice the nominal padding, so frame t never sees later frames; height and
/// width padded on both sides) or an `nn.Conv2d` applied to every frame (a kernel one frame deep).
pub(crate) struct CausalConv3d<O: Ops> {
    weight: O::ConvWeight,
    shape: ConvShape,
    stride: [usize; 3],
    /// Zero padding `[before, after]` per axis, the causal frames included.
    padding: [[usize; 2]; 3],
}

impl<O: Ops> CausalConv3d<O> {
    /// Loads `{prefix}.weight` `[out, in, kt, kh, kw]` and `{prefix}.bias` `[out]`; `padding` is
    /// upstream's `(pt, ph, pw)`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ops: &O,
        src: &dyn WeightSource,
        prefix: &str,
        cin: usize,
        cout: usize,
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    ) -> Result<Self> {
        let [kt, kh, kw] = kernel;
        let weight = src.tensor(&format!("{prefix}.weight"), &[cout, cin, kt, kh, kw])?;
        let [pt, ph, pw] = padding;
        Self::build(ops, src, prefix, ConvShape { out_channels: cout, in_channels: cin, kernel }, weight, stride, [[2 * pt, 0], [ph, ph], [pw, pw]])
    }

    fn build(ops: &O, src: &dyn WeightSource, prefix: &str, shape: ConvShape, weight: Vec<f32>, stride: [usize; 3], padding: [[usize; 2]; 3]) -> Result<Self> {
        let bias = src.tensor(&format!("{prefix}.bias"), &[shape.out_channels])?;
        Ok(Self { weight: ops.conv_weight(shape, weight, bias)?, shape, stride, padding })
    }

    /// A 3×3×3 convolution with padding 1 (causal in time).
    pub fn load3(ops: &O, src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load(ops, src, prefix, cin, cout, [3; 3], [1; 3], [1; 3])
    }

    /// A 1×1×1 convolution (shortcuts and the quant convs).
    pub fn load1(ops: &O, src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load(ops, src, prefix, cin, cout, [1; 3], [1; 3], [0; 3])
    }

    /// An `nn.Conv2d` run on every frame: `{prefix}.weight` `[out, in, kh, kw]`, `{prefix}.bias`.
    pub fn load_2d(ops: &O, src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize, params: Conv2dParams) -> Result<Self> {
        let [kh, kw] = params.kernel;
        let weight = src.tensor(&format!("{prefix}.weight"), &[cout, cin, kh, kw])?;
        let p = params.per_frame();
        Self::build(ops, src, prefix, ConvShape { out_channels: cout, in_channels: cin, kernel: p.kernel }, weight, p.stride, p.padding)
    }

    /// Zero frames that precede the sequence in time.
    fn causal_frames(&self) -> usize {
        self.padding[0][0]
    }

    /// Runs on `x` preceded by the frames `before` (earlier chunks' frames, oldest first, read in
    /// place); zero frames make up the rest of the causal context. With stride 1 the output has
    /// one frame per frame of `x`. Whole frames only.
    pub fn forward_after(&self, ops: &O, before: &[Clip<O>], x: &Clip<O>) -> Result<Clip<O>> {
        self.run(ops, before, x, self.padding[1])
    }

    /// [`forward_after`](Self::forward_after) with `rows` zero rows above and below the frames.
    fn run(&self, ops: &O, before: &[Clip<O>], x: &Clip<O>, rows: [usize; 2]) -> Result<Clip<O>> {
        let cached: usize = before.iter().map(|b| b.t).sum();
        let mut padding = self.padding;
        padding[0][0] = self.causal_frames().saturating_sub(cached);
        padding[1] = rows;
        let params = Conv3dParams::new(self.shape.kernel).with_stride(self.stride).with_padding(padding);
        let pieces: Vec<_> = before.iter().map(Clip::piece).chain([x.piece()]).collect();
        let (y, shape) = ops.conv3d(&pieces, [x.c, x.h, x.w], &self.weight, &params)?;
        Clip::new(ops, shape, y)
    }

    /// The input the convolution reads on `tile`, and its zero rows above and below: `x` itself
    /// on whole frames or with a kernel one row high; on a band, `x` with the neighbouring bands'
    /// rows the kernel reaches (`None` stands for `x` itself). Output row j reads input rows
    /// `s·j − pt` to `s·j − pt + kh − 1` (stride `s`, kernel `kh`, padding `pt` above), so a band
    /// starting at a multiple of `s` needs `pt` rows from above and `kh − s − pt` from below; the
    /// padding stays only on the sides with no neighbour.
    fn tile_input(&self, ops: &O, tile: Tile<'_>, x: &Clip<O>) -> Result<(Option<Clip<O>>, [usize; 2])> {
        let (kh, s, [pt, pb]) = (self.shape.kernel[1], self.stride[1], self.padding[1]);
        let bands = match tile {
            Tile::Band(bands) if kh > 1 => bands,
            _ => return Ok((None, self.padding[1])),
        };
        let Some(below) = kh.checked_sub(s + pt).filter(|_| x.h.is_multiple_of(s)) else {
            return Err(WorkerError::input("video", format!("a band of {} rows cannot run a convolution of kernel {kh}, stride {s}, padding {pt} above", x.h)));
        };
        let (ext, [has_above, has_below]) = bands.with_halo(ops, x, pt, below)?;
        Ok((Some(ext), [if has_above { 0 } else { pt }, if has_below { 0 } else { pb }]))
    }

    /// Runs on `x` alone (no earlier frames), on `tile`.
    pub fn forward(&self, ops: &O, tile: Tile<'_>, x: &Clip<O>) -> Result<Clip<O>> {
        let (ext, rows) = self.tile_input(ops, tile, x)?;
        self.run(ops, &[], ext.as_ref().unwrap_or(x), rows)
    }

    /// Runs on `x` preceded by the frames in `cache`, on `tile`, and updates the cache (on a band,
    /// it keeps the frames with their borrowed rows, which the next chunk reads again). A
    /// convolution without time padding ignores the cache, as upstream's does.
    pub fn forward_cached(&self, ops: &O, tile: Tile<'_>, x: &Clip<O>, cache: &mut FrameCache<O>) -> Result<Clip<O>> {
        if self.causal_frames() == 0 {
            return self.forward(ops, tile, x);
        }
        let (ext, rows) = self.tile_input(ops, tile, x)?;
        let input = ext.as_ref().unwrap_or(x);
        let y = self.run(ops, cache.frames(), input, rows)?;
        cache.push(ops, input)?;
        Ok(y)
    }
}

/// `RMS → SiLU → CausalConv3d` with the convolution's cache: the residual blocks' two halves and the
/// encoder and decoder heads. The cache holds the convolution's inputs (after norm and SiLU).
pub(crate) fn norm_silu_conv<O: Ops>(
    ops: &O,
    tile: Tile<'_>,
    norm: &ChannelRmsNorm<O>,
    conv: &CausalConv3d<O>,
    mut x: Clip<O>,
    cache: &mut FrameCache<O>,
) -> Result<Clip<O>> {
    norm.apply(ops, &mut x, true)?;
    conv.forward_cached(ops, tile, &x, cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::RandomWeights;
    use tessera_kernels::backend::CpuOps;

    #[test]
    fn rms_norm_over_channels_with_silu() {
        let (ops, src) = (CpuOps, RandomWeights::new(3));
        let norm = ChannelRmsNorm::load(&ops, &src, "n", 3, false).unwrap();
        let data = vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0];
        let mut y = Clip::upload(&ops, [3, 2, 1, 2], data.clone()).unwrap();
        norm.apply(&ops, &mut y, true).unwrap();
        for p in 0..4 {
            let l2 = (0..3).map(|c| (data[c * 4 + p] as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
            for c in 0..3 {
                let v = data[c * 4 + p] as f64 / l2 * 3f64.sqrt() * norm.gamma[c] as f64;
                let want = v / (1.0 + (-v).exp());
                assert!((y.buf[c * 4 + p] as f64 - want).abs() < 1e-6, "{p} {c}");
            }
        }
    }

    #[test]
    fn cached_chunks_equal_one_causal_pass() {
        let (ops, src) = (CpuOps, RandomWeights::new(5));
        let conv = CausalConv3d::load3(&ops, &src, "c", 2, 3).unwrap();
        let x = Clip::upload(&ops, [2, 5, 3, 4], (0..120).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect()).unwrap();
        let whole = conv.forward(&ops, Tile::Whole, &x).unwrap();
        let mut cache = FrameCache::default();
        let parts: Vec<_> = [(0, 1), (1, 2), (2, 5)]
            .iter()
            .map(|&(a, b)| conv.forward_cached(&ops, Tile::Whole, &x.frames(&ops, a, b).unwrap(), &mut cache).unwrap())
            .collect();
        let joined = Clip::concat_time(&ops, &parts.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(joined.shape(), whole.shape());
        for (a, b) in joined.buf.iter().zip(&whole.buf) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
