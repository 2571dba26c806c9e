//! The VAE's blocks: residual block, per-frame attention block, the middle block, and the
//! resampling layers (spatial ×2 up/down, and their temporal variants with causal state).
//! Each stateful block has a state type holding what it must remember between chunks.

use super::clip::{Clip, FrameCache};
use super::layers::{norm_silu_conv, CausalConv3d, ChannelRmsNorm, FrameConv2d};
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use rayon::prelude::*;
use tessera_kernels::cpu::{attention, gemm_into, AttentionShape, Conv2dParams, MatRef, Threads};

/// `WanResidualBlock`: `x + [RMS → SiLU → conv3 → RMS → SiLU → conv3](x)`, with a 1×1×1 shortcut
/// when the width changes.
pub(crate) struct ResidualBlock {
    norm1: ChannelRmsNorm,
    conv1: CausalConv3d,
    norm2: ChannelRmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

/// The frame caches of a residual block's two convolutions.
#[derive(Default)]
pub(crate) struct ResidualState {
    conv1: FrameCache,
    conv2: FrameCache,
}

impl ResidualBlock {
    /// Loads `{prefix}.{norm1, conv1, norm2, conv2[, conv_shortcut]}`.
    pub fn load(src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: ChannelRmsNorm::load(src, &format!("{prefix}.norm1"), cin, false)?,
            conv1: CausalConv3d::load3(src, &format!("{prefix}.conv1"), cin, cout)?,
            norm2: ChannelRmsNorm::load(src, &format!("{prefix}.norm2"), cout, false)?,
            conv2: CausalConv3d::load3(src, &format!("{prefix}.conv2"), cout, cout)?,
            shortcut: if cin != cout { Some(CausalConv3d::load1(src, &format!("{prefix}.conv_shortcut"), cin, cout)?) } else { None },
        })
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, x: Clip, state: &mut ResidualState) -> Result<Clip> {
        let h = norm_silu_conv(&self.norm1, &self.conv1, x.clone(), &mut state.conv1)?;
        let h = norm_silu_conv(&self.norm2, &self.conv2, h, &mut state.conv2)?;
        let mut out = match &self.shortcut {
            Some(s) => s.forward(&x)?,
            None => x,
        };
        out.add_assign(&h);
        Ok(out)
    }
}

/// `WanAttentionBlock`: per frame, one head over the H·W positions, `x + proj(SDPA(qkv(RMS(x))))`.
pub(crate) struct AttentionBlock {
    norm: ChannelRmsNorm,
    qkv_weight: Vec<f32>,
    qkv_bias: Vec<f32>,
    proj_weight: Vec<f32>,
    proj_bias: Vec<f32>,
    dim: usize,
}

impl AttentionBlock {
    /// Loads `{prefix}.{norm.gamma, to_qkv, proj}` (1×1 `Conv2d`s).
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: ChannelRmsNorm::load(src, &format!("{prefix}.norm"), dim, true)?,
            qkv_weight: src.tensor(&format!("{prefix}.to_qkv.weight"), &[3 * dim, dim, 1, 1])?,
            qkv_bias: src.tensor(&format!("{prefix}.to_qkv.bias"), &[3 * dim])?,
            proj_weight: src.tensor(&format!("{prefix}.proj.weight"), &[dim, dim, 1, 1])?,
            proj_bias: src.tensor(&format!("{prefix}.proj.bias"), &[dim])?,
            dim,
        })
    }

    /// Runs on every frame of `x` (frames are independent: no state).
    pub fn forward(&self, mut x: Clip) -> Result<Clip> {
        let (c, hw, t) = (self.dim, x.plane(), x.t);
        for f in 0..t {
            let mut n = x.frames(f, f + 1);
            self.norm.apply(&mut n, false);
            // qkv[p, j] = Σ_i n[i, p]·W[j, i] + b[j]: token-major rows of q | k | v.
            let mut qkv: Vec<f32> = self.qkv_bias.iter().copied().cycle().take(hw * 3 * c).collect();
            gemm_into(&mut qkv, 3 * c, true, MatRef::transposed(&n.data, hw, c, hw)?, MatRef::transposed(&self.qkv_weight, c, 3 * c, c)?, Threads::Pool)?;
            drop(n);
            let shape = AttentionShape { heads: 1, head_dim: c, q_len: hw, kv_len: hw, q_stride: 3 * c, kv_stride: 3 * c };
            let o = attention(&qkv, &qkv[c..], &qkv[2 * c..], shape, 1.0 / (c as f32).sqrt())?.out;
            drop(qkv);
            // y[j, p] = Σ_i Wp[j, i]·o[p, i] + b[j], channel-major like x.
            let mut y: Vec<f32> = self.proj_bias.iter().flat_map(|&b| std::iter::repeat_n(b, hw)).collect();
            gemm_into(&mut y, hw, true, MatRef::row_major(&self.proj_weight, c, c, c)?, MatRef::transposed(&o, c, hw, c)?, Threads::Pool)?;
            x.data.par_chunks_mut(t * hw).zip(y.par_chunks(hw)).for_each(|(row, y)| {
                row[f * hw..(f + 1) * hw].iter_mut().zip(y).for_each(|(a, b)| *a += b);
            });
        }
        Ok(x)
    }
}

/// `WanMidBlock`: residual, attention, residual, at constant width.
pub(crate) struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

/// The states of the middle block's two residual blocks.
#[derive(Default)]
pub(crate) struct MidState {
    res0: ResidualState,
    res1: ResidualState,
}

impl MidBlock {
    /// Loads `{prefix}.resnets.{0,1}` and `{prefix}.attentions.0`.
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::load(src, &format!("{prefix}.resnets.0"), dim, dim)?,
            attn: AttentionBlock::load(src, &format!("{prefix}.attentions.0"), dim)?,
            res1: ResidualBlock::load(src, &format!("{prefix}.resnets.1"), dim, dim)?,
        })
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, x: Clip, state: &mut MidState) -> Result<Clip> {
        let x = self.res0.forward(x, &mut state.res0)?;
        let x = self.attn.forward(x)?;
        self.res1.forward(x, &mut state.res1)
    }
}

/// What a `WanResample` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResampleMode {
    /// Nearest ×2 in H and W, then a 3×3 conv to half the channels.
    Upsample2d,
    /// [`Self::Upsample2d`] after doubling the frames (all but the first) with a temporal conv.
    Upsample3d,
    /// Zero-pad right and bottom by one, then a 3×3 conv with stride 2.
    Downsample2d,
    /// [`Self::Downsample2d`], then halve the frames (all but the first) with a strided temporal conv.
    Downsample3d,
}

/// `WanResample`: spatial ×2 up or down, optionally with a temporal ×2 as well.
pub(crate) struct Resample {
    mode: ResampleMode,
    conv: FrameConv2d,
    time_conv: Option<CausalConv3d>,
    dim: usize,
}

/// What a temporal resample remembers between chunks.
#[derive(Default)]
pub(crate) struct ResampleState {
    /// Whether the first frame of the sequence has gone by (upsampling never resamples it in time).
    started: bool,
    /// Cache of the upsampling time conv.
    cache: FrameCache,
    /// Last frame of the previous chunk (downsampling: the start of the next stride-2 window).
    last: Option<Clip>,
}

impl Resample {
    /// Loads `{prefix}.resample.1` and, for the 3-D modes, `{prefix}.time_conv`.
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize, mode: ResampleMode) -> Result<Self> {
        let conv_name = format!("{prefix}.resample.1");
        let conv = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                FrameConv2d::load(src, &conv_name, dim, dim / 2, Conv2dParams::new([3, 3]).with_padding([[1, 1], [1, 1]]))?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                FrameConv2d::load(src, &conv_name, dim, dim, Conv2dParams::new([3, 3]).with_stride([2, 2]).with_padding([[0, 1], [0, 1]]))?
            }
        };
        let time_name = format!("{prefix}.time_conv");
        let time_conv = match mode {
            ResampleMode::Upsample3d => Some(CausalConv3d::load(src, &time_name, dim, 2 * dim, [3, 1, 1], [1; 3], [1, 0, 0])?),
            ResampleMode::Downsample3d => Some(CausalConv3d::load(src, &time_name, dim, dim, [3, 1, 1], [2, 1, 1], [0; 3])?),
            _ => None,
        };
        Ok(Self { mode, conv, time_conv, dim })
    }

    /// Whether this layer also resamples time.
    pub fn is_temporal(&self) -> bool {
        self.time_conv.is_some()
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, x: Clip, state: &mut ResampleState) -> Result<Clip> {
        match (self.mode, &self.time_conv) {
            (ResampleMode::Upsample2d, _) => self.upsample_spatial(&x),
            (ResampleMode::Upsample3d, Some(tc)) => {
                let x = self.upsample_time(tc, x, state)?;
                self.upsample_spatial(&x)
            }
            (ResampleMode::Downsample2d, _) => self.conv.forward(&x),
            (ResampleMode::Downsample3d, Some(tc)) => {
                let x = self.conv.forward(&x)?;
                self.downsample_time(tc, x, state)
            }
            _ => unreachable!("3-D modes always load a time conv"),
        }
    }

    /// Frame 0 of the sequence passes through; every later frame becomes two: the time conv
    /// (causal over the frames after the first) gives 2C channels, split and interleaved in time.
    fn upsample_time(&self, tc: &CausalConv3d, x: Clip, state: &mut ResampleState) -> Result<Clip> {
        let (first, rest) = if state.started {
            (None, x)
        } else {
            state.started = true;
            (Some(x.frames(0, 1)), x.frames(1, x.t))
        };
        let mut parts = Vec::with_capacity(2);
        parts.extend(first);
        if rest.t > 0 {
            let y = tc.forward_cached(&rest, &mut state.cache)?;
            parts.push(interleave_halves(&y, self.dim));
        }
        Ok(match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Clip::concat_time(&parts.iter().collect::<Vec<_>>()),
        })
    }

    /// Nearest ×2 of each frame, then the 3×3 conv; one frame at a time, so the 4× larger
    /// upsampled input exists for one frame only.
    fn upsample_spatial(&self, x: &Clip) -> Result<Clip> {
        let (h2, w2) = (2 * x.h, 2 * x.w);
        let co = self.conv.out_channels();
        let mut out = Clip::zeros([co, x.t, h2, w2]);
        let plane = h2 * w2;
        for f in 0..x.t {
            let up = upsample_nearest2x(x, f);
            let y = self.conv.forward(&up)?;
            out.data.par_chunks_mut(x.t * plane).zip(y.data.par_chunks(plane)).for_each(|(dst, src)| {
                dst[f * plane..(f + 1) * plane].copy_from_slice(src);
            });
        }
        Ok(out)
    }

    /// Frame 0 of the sequence passes through; output frame j ≥ 1 is the time conv over input
    /// frames 2j−2, 2j−1, 2j (stride 2), the first of which may come from the previous chunk.
    fn downsample_time(&self, tc: &CausalConv3d, x: Clip, state: &mut ResampleState) -> Result<Clip> {
        if x.t == 0 {
            return Ok(x);
        }
        match &state.last {
            None if x.t.is_multiple_of(2) => {
                return Err(WorkerError::input("video", format!("a temporal downsample got a first chunk of {} frames; it needs an odd count", x.t)))
            }
            Some(_) if !x.t.is_multiple_of(2) => {
                return Err(WorkerError::input("video", format!("a temporal downsample got a chunk of {} frames after the first; it needs an even count", x.t)))
            }
            _ => {}
        }
        let last = x.frames(x.t - 1, x.t);
        let out = match state.last.take() {
            None => {
                if x.t == 1 {
                    x
                } else {
                    let y = tc.forward(&x)?;
                    Clip::concat_time(&[&x.frames(0, 1), &y])
                }
            }
            Some(prev) => tc.forward_after(Some(&prev), &x)?,
        };
        state.last = Some(last);
        Ok(out)
    }
}

/// `[2C, T, H, W]` → `[C, 2T, H, W]`: frame 2i is channels `[0, C)` of frame i, frame 2i+1 is
/// channels `[C, 2C)` (upstream's `reshape(b, 2, c, t, h, w)`, `stack(dim=3)`).
fn interleave_halves(y: &Clip, c: usize) -> Clip {
    let (t, plane) = (y.t, y.plane());
    let mut out = Clip::zeros([c, 2 * t, y.h, y.w]);
    out.data.par_chunks_mut(2 * t * plane).enumerate().for_each(|(ch, dst)| {
        for i in 0..t {
            for half in 0..2 {
                let src = &y.data[((half * c + ch) * t + i) * plane..][..plane];
                dst[(2 * i + half) * plane..][..plane].copy_from_slice(src);
            }
        }
    });
    out
}

/// Frame `f` of `x`, repeated ×2 in height and width (nearest; equals `nearest-exact` at ×2).
fn upsample_nearest2x(x: &Clip, f: usize) -> Clip {
    let (h, w, plane) = (x.h, x.w, x.plane());
    let mut out = Clip::zeros([x.c, 1, 2 * h, 2 * w]);
    out.data.par_chunks_mut(4 * plane).enumerate().for_each(|(ch, dst)| {
        let src = &x.data[(ch * x.t + f) * plane..][..plane];
        for (r, row) in src.chunks_exact(w).enumerate() {
            let (top, bottom) = dst[2 * r * 2 * w..(2 * r + 2) * 2 * w].split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                pair.fill(v);
            }
            bottom.copy_from_slice(top);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::RandomWeights;

    fn clip(shape: [usize; 4], seed: usize) -> Clip {
        let n = shape.iter().product::<usize>();
        Clip::new(shape, (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.0) - 1.0).collect())
    }

    fn close(a: &Clip, b: &Clip) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn nearest_upsample_and_interleave() {
        let x = Clip::new([1, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(upsample_nearest2x(&x, 1).data, vec![3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]);
        // 2 channels × 2 frames of one pixel: [a0 a1 | b0 b1] → frames a0 b0 a1 b1
        let y = Clip::new([2, 2, 1, 1], vec![1.0, 2.0, 10.0, 20.0]);
        assert_eq!(interleave_halves(&y, 1).data, vec![1.0, 10.0, 2.0, 20.0]);
    }

    /// Each stateful block gives the same frames in chunks as in one call.
    #[test]
    fn chunked_blocks_equal_one_pass() {
        let src = RandomWeights::new(1);
        let res = ResidualBlock::load(&src, "r", 4, 6).unwrap();
        let x = clip([4, 5, 3, 2], 1);
        let whole = res.forward(x.clone(), &mut ResidualState::default()).unwrap();
        let mut st = ResidualState::default();
        let parts: Vec<Clip> = [(0, 1), (1, 3), (3, 4), (4, 5)].iter().map(|&(a, b)| res.forward(x.frames(a, b), &mut st).unwrap()).collect();
        close(&Clip::concat_time(&parts.iter().collect::<Vec<_>>()), &whole);

        let up = Resample::load(&src, "u", 4, ResampleMode::Upsample3d).unwrap();
        let whole = up.forward(x.clone(), &mut ResampleState::default()).unwrap();
        assert_eq!(whole.shape(), [2, 9, 6, 4]);
        let mut st = ResampleState::default();
        let parts: Vec<Clip> = (0..5).map(|i| up.forward(x.frames(i, i + 1), &mut st).unwrap()).collect();
        close(&Clip::concat_time(&parts.iter().collect::<Vec<_>>()), &whole);

        let down = Resample::load(&src, "d", 4, ResampleMode::Downsample3d).unwrap();
        let whole = down.forward(x.clone(), &mut ResampleState::default()).unwrap();
        assert_eq!(whole.shape(), [4, 3, 1, 1]);
        let mut st = ResampleState::default();
        let parts: Vec<Clip> = [(0, 1), (1, 3), (3, 5)].iter().map(|&(a, b)| down.forward(x.frames(a, b), &mut st).unwrap()).collect();
        close(&Clip::concat_time(&parts.iter().collect::<Vec<_>>()), &whole);
        // a chunk of odd length after the first cannot be downsampled
        assert!(down.forward(x.frames(0, 1), &mut st).is_err());
    }

    #[test]
    fn attention_is_per_frame() {
        let src = RandomWeights::new(2);
        let attn = AttentionBlock::load(&src, "a", 8).unwrap();
        let x = clip([8, 3, 2, 3], 5);
        let whole = attn.forward(x.clone()).unwrap();
        let second = attn.forward(x.frames(1, 2)).unwrap();
        close(&whole.frames(1, 2), &second);
    }
}
