//! The VAE's parameterised layers: RMS norm over channels (`WanRMS_norm`), the causal 3-D
//! convolution with its frame cache (`WanCausalConv3d`), and 2-D convolutions applied frame by frame.

use super::clip::{Clip, FrameCache};
use crate::weights::WeightSource;
use crate::Result;
use rayon::prelude::*;
use tessera_kernels::cpu::{conv3d, conv3d_pieces, Conv2dParams, Conv3dParams};
use tessera_kernels::multiversion;
use tessera_kernels::simd::sigmoid;

/// Positions per parallel task of the norm's reduction.
const NORM_CHUNK: usize = 2048;

/// `F.normalize(x, dim=channels)·√C·γ`: per position, divides by the L2 norm over channels
/// (at least 1e-12), then scales each channel.
pub(crate) struct ChannelRmsNorm {
    gamma: Vec<f32>,
    scale: f32,
}

multiversion! {
    fn add_squares(acc: &mut [f32], x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v * v;
        }
    }
}

multiversion! {
    fn scale_row(row: &mut [f32], inv: &[f32], g: f32) {
        for (v, &s) in row.iter_mut().zip(inv) {
            *v *= s * g;
        }
    }
}

multiversion! {
    fn scale_row_silu(row: &mut [f32], inv: &[f32], g: f32) {
        for (v, &s) in row.iter_mut().zip(inv) {
            let y = *v * (s * g);
            *v = y * sigmoid(y);
        }
    }
}

impl ChannelRmsNorm {
    /// Loads `{prefix}.gamma`, shaped `[dim, 1, 1, 1]` (video blocks) or `[dim, 1, 1]` (`images`, the
    /// attention block).
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize, images: bool) -> Result<Self> {
        let shape: &[usize] = if images { &[dim, 1, 1] } else { &[dim, 1, 1, 1] };
        Ok(Self { gamma: src.tensor(&format!("{prefix}.gamma"), shape)?, scale: (dim as f32).sqrt() })
    }

    /// Normalises every position of `x` in place, then applies SiLU when `silu` is set.
    pub fn apply(&self, x: &mut Clip, silu: bool) {
        debug_assert_eq!(x.c, self.gamma.len());
        let n = x.positions();
        if n == 0 {
            return;
        }
        let data = &x.data;
        let mut inv = vec![0.0f32; n];
        inv.par_chunks_mut(NORM_CHUNK).enumerate().for_each(|(i, out)| {
            let start = i * NORM_CHUNK;
            for row in data.chunks_exact(n) {
                add_squares(out, &row[start..start + out.len()]);
            }
            for v in out.iter_mut() {
                *v = self.scale / v.sqrt().max(1e-12);
            }
        });
        x.data.par_chunks_mut(n).zip(self.gamma.par_iter()).for_each(|(row, &g)| {
            if silu {
                scale_row_silu(row, &inv, g);
            } else {
                scale_row(row, &inv, g);
            }
        });
    }
}

/// `WanCausalConv3d`: a 3-D convolution whose time axis is padded only at the start (by twice the
/// nominal padding), so frame t never sees later frames; height and width are padded on both sides.
pub(crate) struct CausalConv3d {
    weight: Vec<f32>,
    bias: Vec<f32>,
    out_channels: usize,
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
}

impl CausalConv3d {
    /// Loads `{prefix}.weight` `[out, in, kt, kh, kw]` and `{prefix}.bias` `[out]`; `padding` is
    /// upstream's `(pt, ph, pw)`.
    pub fn load(src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize, kernel: [usize; 3], stride: [usize; 3], padding: [usize; 3]) -> Result<Self> {
        let [kt, kh, kw] = kernel;
        let weight = src.tensor(&format!("{prefix}.weight"), &[cout, cin, kt, kh, kw])?;
        let bias = src.tensor(&format!("{prefix}.bias"), &[cout])?;
        Ok(Self { weight, bias, out_channels: cout, kernel, stride, padding })
    }

    /// A 3×3×3 convolution with padding 1 (causal in time).
    pub fn load3(src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load(src, prefix, cin, cout, [3; 3], [1; 3], [1; 3])
    }

    /// A 1×1×1 convolution (shortcuts and the quant convs).
    pub fn load1(src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load(src, prefix, cin, cout, [1; 3], [1; 3], [0; 3])
    }

    /// Zero frames that precede the sequence in time.
    fn causal_frames(&self) -> usize {
        2 * self.padding[0]
    }

    /// Runs on `x` preceded by the frames `before` (the previous chunk's, read in place); zero
    /// frames make up the rest of the causal context. With stride 1 the output has one frame per
    /// frame of `x`.
    pub fn forward_after(&self, before: Option<&Clip>, x: &Clip) -> Result<Clip> {
        let [_, ph, pw] = self.padding;
        let cached = before.map_or(0, |b| b.t);
        let params =
            Conv3dParams::new(self.kernel).with_stride(self.stride).with_padding([[self.causal_frames().saturating_sub(cached), 0], [ph, ph], [pw, pw]]);
        let pieces: Vec<&[f32]> = before.map(|b| b.data.as_slice()).into_iter().chain([x.data.as_slice()]).collect();
        let (y, shape) = conv3d_pieces(&pieces, [x.c, x.h, x.w], &self.weight, Some(&self.bias), self.out_channels, &params)?;
        Ok(Clip::new(shape, y))
    }

    /// Runs on `x` alone (no earlier frames).
    pub fn forward(&self, x: &Clip) -> Result<Clip> {
        self.forward_after(None, x)
    }

    /// Runs on `x` preceded by the frames in `cache`, and updates the cache. A convolution without
    /// time padding ignores the cache, as upstream's does.
    pub fn forward_cached(&self, x: &Clip, cache: &mut FrameCache) -> Result<Clip> {
        if self.causal_frames() == 0 {
            return self.forward(x);
        }
        let y = self.forward_after(cache.frames(), x)?;
        cache.push(x);
        Ok(y)
    }
}

/// `RMS → SiLU → CausalConv3d` with the convolution's cache: the residual blocks' two halves and the
/// encoder and decoder heads. The cache holds the convolution's inputs (after norm and SiLU).
pub(crate) fn norm_silu_conv(norm: &ChannelRmsNorm, conv: &CausalConv3d, mut x: Clip, cache: &mut FrameCache) -> Result<Clip> {
    norm.apply(&mut x, true);
    conv.forward_cached(&x, cache)
}

/// An `nn.Conv2d` applied to every frame of a clip.
pub(crate) struct FrameConv2d {
    weight: Vec<f32>,
    bias: Vec<f32>,
    out_channels: usize,
    params: Conv3dParams,
}

impl FrameConv2d {
    /// Loads `{prefix}.weight` `[out, in, kh, kw]` and `{prefix}.bias` `[out]`.
    pub fn load(src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize, params: Conv2dParams) -> Result<Self> {
        let [kh, kw] = params.kernel;
        let weight = src.tensor(&format!("{prefix}.weight"), &[cout, cin, kh, kw])?;
        let bias = src.tensor(&format!("{prefix}.bias"), &[cout])?;
        Ok(Self { weight, bias, out_channels: cout, params: params.per_frame() })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Convolves every frame of `x`.
    pub fn forward(&self, x: &Clip) -> Result<Clip> {
        let (y, shape) = conv3d(&x.data, x.shape(), &self.weight, Some(&self.bias), self.out_channels, &self.params)?;
        Ok(Clip::new(shape, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::RandomWeights;

    #[test]
    fn rms_norm_over_channels_with_silu() {
        let src = RandomWeights::new(3);
        let norm = ChannelRmsNorm::load(&src, "n", 3, false).unwrap();
        let x = Clip::new([3, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0]);
        let mut y = x.clone();
        norm.apply(&mut y, true);
        for p in 0..4 {
            let l2 = (0..3).map(|c| (x.data[c * 4 + p] as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
            for c in 0..3 {
                let v = x.data[c * 4 + p] as f64 / l2 * 3f64.sqrt() * norm.gamma[c] as f64;
                let want = v / (1.0 + (-v).exp());
                assert!((y.data[c * 4 + p] as f64 - want).abs() < 1e-6, "{p} {c}");
            }
        }
        // an all-zero position stays zero (the 1e-12 floor, no NaN)
        let mut z = Clip::zeros([3, 1, 1, 1]);
        norm.apply(&mut z, false);
        assert!(z.data.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn cached_chunks_equal_one_causal_pass() {
        let src = RandomWeights::new(5);
        let conv = CausalConv3d::load3(&src, "c", 2, 3).unwrap();
        let x = Clip::new([2, 5, 3, 4], (0..120).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect());
        let whole = conv.forward(&x).unwrap();
        let mut cache = FrameCache::default();
        let parts: Vec<Clip> = [(0, 1), (1, 2), (2, 5)].iter().map(|&(a, b)| conv.forward_cached(&x.frames(a, b), &mut cache).unwrap()).collect();
        let joined = Clip::concat_time(&parts.iter().collect::<Vec<_>>());
        assert_eq!(joined.shape(), whole.shape());
        for (a, b) in joined.data.iter().zip(&whole.data) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
