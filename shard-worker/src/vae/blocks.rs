//! The VAE's blocks on any backend: residual block, per-frame attention block, the middle block,
//! and the resampling layers (spatial ×2 up/down, and their temporal variants with causal state).
//! Each stateful block has a state type holding what it must remember between chunks. Every block
//! runs on whole frames or on a band of rows ([`Tile`]).

use super::band::Tile;
use super::clip::{Clip, FrameCache};
use super::layers::{norm_silu_conv, CausalConv3d, ChannelRmsNorm};
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use tessera_kernels::backend::{at, at_mut, flash, ActBuf, Elem, Ops};
use tessera_kernels::cpu::{Activation, AttentionShape, Conv2dParams};

/// `WanResidualBlock`: `x + [RMS → SiLU → conv3 → RMS → SiLU → conv3](x)`, with a 1×1×1 shortcut
/// when the width changes.
pub(crate) struct ResidualBlock<O: Ops> {
    norm1: ChannelRmsNorm<O>,
    conv1: CausalConv3d<O>,
    norm2: ChannelRmsNorm<O>,
    conv2: CausalConv3d<O>,
    shortcut: Option<CausalConv3d<O>>,
}

/// The frame caches of a residual block's two convolutions.
pub(crate) struct ResidualState<O: Ops> {
    conv1: FrameCache<O>,
    conv2: FrameCache<O>,
}

impl<O: Ops> Default for ResidualState<O> {
    fn default() -> Self {
        Self { conv1: FrameCache::default(), conv2: FrameCache::default() }
    }
}

impl<O: Ops> ResidualBlock<O> {
    /// Loads `{prefix}.{norm1, conv1, norm2, conv2[, conv_shortcut]}`.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: ChannelRmsNorm::load(ops, src, &format!("{prefix}.norm1"), cin, false)?,
            conv1: CausalConv3d::load3(ops, src, &format!("{prefix}.conv1"), cin, cout)?,
            norm2: ChannelRmsNorm::load(ops, src, &format!("{prefix}.norm2"), cout, false)?,
            conv2: CausalConv3d::load3(ops, src, &format!("{prefix}.conv2"), cout, cout)?,
            shortcut: if cin != cout { Some(CausalConv3d::load1(ops, src, &format!("{prefix}.conv_shortcut"), cin, cout)?) } else { None },
        })
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, ops: &O, tile: Tile<'_>, x: Clip<O>, state: &mut ResidualState<O>) -> Result<Clip<O>> {
        let h = norm_silu_conv(ops, tile, &self.norm1, &self.conv1, x.duplicate(ops)?, &mut state.conv1)?;
        let h = norm_silu_conv(ops, tile, &self.norm2, &self.conv2, h, &mut state.conv2)?;
        let mut out = match &self.shortcut {
            Some(s) => s.forward(ops, tile, &x)?,
            None => x,
        };
        ops.accumulate(at_mut(&mut out.buf, 0), at(&h.buf, 0), h.len())?;
        Ok(out)
    }
}

/// `WanAttentionBlock`: per frame, one head over the H·W positions, `x + proj(SDPA(qkv(RMS(x))))`.
pub(crate) struct AttentionBlock<O: Ops> {
    norm: ChannelRmsNorm<O>,
    qkv_weight: ActBuf<O>,
    qkv_bias: ActBuf<O>,
    proj_weight: ActBuf<O>,
    proj_bias: ActBuf<O>,
    dim: usize,
}

impl<O: Ops> AttentionBlock<O> {
    /// Loads `{prefix}.{norm.gamma, to_qkv, proj}` (1×1 `Conv2d`s, used as `[out, in]` linears).
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, dim: usize) -> Result<Self> {
        let act =
            |name: &str, shape: &[usize]| -> Result<ActBuf<O>> { Ok(ops.upload_vec(O::Act::vec_from_f32(src.tensor(&format!("{prefix}.{name}"), shape)?))?) };
        Ok(Self {
            norm: ChannelRmsNorm::load(ops, src, &format!("{prefix}.norm"), dim, true)?,
            qkv_weight: act("to_qkv.weight", &[3 * dim, dim, 1, 1])?,
            qkv_bias: act("to_qkv.bias", &[3 * dim])?,
            proj_weight: act("proj.weight", &[dim, dim, 1, 1])?,
            proj_bias: act("proj.bias", &[dim])?,
            dim,
        })
    }

    /// Runs on every frame of `x` (frames are independent: no state). On a band, on the whole
    /// frames gathered from every band (see `band`), keeping this band's rows.
    pub fn forward(&self, ops: &O, tile: Tile<'_>, mut x: Clip<O>) -> Result<Clip<O>> {
        if let Tile::Band(bands) = tile {
            let (whole, mine) = bands.whole(ops, &x)?;
            return self.forward(ops, Tile::Whole, whole)?.rows(ops, mine.start, mine.end);
        }
        if x.t == 1 {
            self.attend(ops, &mut x)?;
            return Ok(x);
        }
        let p = x.plane();
        for f in 0..x.t {
            let mut frame = x.frames(ops, f, f + 1)?;
            self.attend(ops, &mut frame)?;
            ops.copy_rows(at(&frame.buf, 0), p, at_mut(&mut x.buf, f * p), x.t * p, p, x.c)?;
        }
        Ok(x)
    }

    /// `frame += proj(SDPA(qkv(RMS(frame))))` for one frame `[C, 1, H, W]`.
    fn attend(&self, ops: &O, frame: &mut Clip<O>) -> Result<()> {
        let (c, hw) = (self.dim, frame.plane());
        let mut n = frame.duplicate(ops)?;
        self.norm.apply(ops, &mut n, false)?;
        // Token-major rows: nᵀ [hw, c], then qkv [hw, 3c] = nᵀ·Wᵀ + b.
        let mut rows = ops.zeros::<O::Act>(hw * c)?;
        ops.transpose(at(&n.buf, 0), c, hw, at_mut(&mut rows, 0))?;
        drop(n);
        let mut qkv = ops.zeros::<O::Act>(hw * 3 * c)?;
        ops.linear(at(&rows, 0), hw, c, &self.qkv_weight, 3 * c, Some(&self.qkv_bias), Activation::None, at_mut(&mut qkv, 0))?;
        let shape = AttentionShape { heads: 1, head_dim: c, q_len: hw, kv_len: hw, q_stride: 3 * c, kv_stride: 3 * c };
        let mut lse = ops.zeros::<f32>(hw)?;
        flash(ops, at(&qkv, 0), at(&qkv, c), at(&qkv, 2 * c), shape, 1.0 / (c as f32).sqrt(), at_mut(&mut rows, 0), c, &mut lse)?;
        drop(qkv);
        let mut y = ops.zeros::<O::Act>(hw * c)?;
        ops.linear(at(&rows, 0), hw, c, &self.proj_weight, c, Some(&self.proj_bias), Activation::None, at_mut(&mut y, 0))?;
        // Back to channel-major [c, hw], added to the frame.
        ops.transpose(at(&y, 0), hw, c, at_mut(&mut rows, 0))?;
        ops.accumulate(at_mut(&mut frame.buf, 0), at(&rows, 0), c * hw)?;
        Ok(())
    }
}

/// `WanMidBlock`: residual, attention, residual, at constant width.
pub(crate) struct MidBlock<O: Ops> {
    res0: ResidualBlock<O>,
    attn: AttentionBlock<O>,
    res1: ResidualBlock<O>,
}

/// The states of the middle block's two residual blocks.
pub(crate) struct MidState<O: Ops> {
    res0: ResidualState<O>,
    res1: ResidualState<O>,
}

impl<O: Ops> Default for MidState<O> {
    fn default() -> Self {
        Self { res0: ResidualState::default(), res1: ResidualState::default() }
    }
}

impl<O: Ops> MidBlock<O> {
    /// Loads `{prefix}.resnets.{0,1}` and `{prefix}.attentions.0`.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::load(ops, src, &format!("{prefix}.resnets.0"), dim, dim)?,
            attn: AttentionBlock::load(ops, src, &format!("{prefix}.attentions.0"), dim)?,
            res1: ResidualBlock::load(ops, src, &format!("{prefix}.resnets.1"), dim, dim)?,
        })
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, ops: &O, tile: Tile<'_>, x: Clip<O>, state: &mut MidState<O>) -> Result<Clip<O>> {
        let x = self.res0.forward(ops, tile, x, &mut state.res0)?;
        let x = self.attn.forward(ops, tile, x)?;
        self.res1.forward(ops, tile, x, &mut state.res1)
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
pub(crate) struct Resample<O: Ops> {
    mode: ResampleMode,
    conv: CausalConv3d<O>,
    time_conv: Option<CausalConv3d<O>>,
    dim: usize,
}

/// What a temporal resample remembers between chunks.
pub(crate) struct ResampleState<O: Ops> {
    /// Whether the first frame of the sequence has gone by (upsampling never resamples it in time).
    started: bool,
    /// Cache of the upsampling time conv.
    cache: FrameCache<O>,
    /// Last frame of the previous chunk (downsampling: the start of the next stride-2 window).
    last: Option<Clip<O>>,
}

impl<O: Ops> Default for ResampleState<O> {
    fn default() -> Self {
        Self { started: false, cache: FrameCache::default(), last: None }
    }
}

impl<O: Ops> Resample<O> {
    /// Loads `{prefix}.resample.1` and, for the 3-D modes, `{prefix}.time_conv`.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, dim: usize, mode: ResampleMode) -> Result<Self> {
        let conv_name = format!("{prefix}.resample.1");
        let conv = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                CausalConv3d::load_2d(ops, src, &conv_name, dim, dim / 2, Conv2dParams::new([3, 3]).with_padding([[1, 1], [1, 1]]))?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                CausalConv3d::load_2d(ops, src, &conv_name, dim, dim, Conv2dParams::new([3, 3]).with_stride([2, 2]).with_padding([[0, 1], [0, 1]]))?
            }
        };
        let time_name = format!("{prefix}.time_conv");
        let time_conv = match mode {
            ResampleMode::Upsample3d => Some(CausalConv3d::load(ops, src, &time_name, dim, 2 * dim, [3, 1, 1], [1; 3], [1, 0, 0])?),
            ResampleMode::Downsample3d => Some(CausalConv3d::load(ops, src, &time_name, dim, dim, [3, 1, 1], [2, 1, 1], [0; 3])?),
            _ => None,
        };
        Ok(Self { mode, conv, time_conv, dim })
    }

    /// Whether this layer also resamples time.
    pub fn is_temporal(&self) -> bool {
        self.time_conv.is_some()
    }

    /// Runs on the next chunk of frames.
    pub fn forward(&self, ops: &O, tile: Tile<'_>, x: Clip<O>, state: &mut ResampleState<O>) -> Result<Clip<O>> {
        match (self.mode, &self.time_conv) {
            (ResampleMode::Upsample2d, _) => self.upsample_spatial(ops, tile, &x),
            (ResampleMode::Upsample3d, Some(tc)) => {
                let x = self.upsample_time(ops, tile, tc, x, state)?;
                self.upsample_spatial(ops, tile, &x)
            }
            (ResampleMode::Downsample2d, _) => self.conv.forward(ops, tile, &x),
            (ResampleMode::Downsample3d, Some(tc)) => {
                let x = self.conv.forward(ops, tile, &x)?;
                self.downsample_time(ops, tc, x, state)
            }
            _ => unreachable!("3-D modes always load a time conv"),
        }
    }

    /// Frame 0 of the sequence passes through; every later frame becomes two: the time conv
    /// (causal over the frames after the first) gives 2C channels, split and interleaved in time.
    fn upsample_time(&self, ops: &O, tile: Tile<'_>, tc: &CausalConv3d<O>, x: Clip<O>, state: &mut ResampleState<O>) -> Result<Clip<O>> {
        let (first, rest) = if state.started {
            (None, x)
        } else {
            state.started = true;
            (Some(x.frames(ops, 0, 1)?), x.frames(ops, 1, x.t)?)
        };
        let mut parts = Vec::with_capacity(2);
        parts.extend(first);
        if rest.t > 0 {
            let y = tc.forward_cached(ops, tile, &rest, &mut state.cache)?;
            parts.push(interleave_halves(ops, &y, self.dim)?);
        }
        match parts.len() {
            1 => Ok(parts.pop().expect("one part")),
            _ => Clip::concat_time(ops, &parts.iter().collect::<Vec<_>>()),
        }
    }

    /// Nearest ×2 of every frame, then the 3×3 conv.
    fn upsample_spatial(&self, ops: &O, tile: Tile<'_>, x: &Clip<O>) -> Result<Clip<O>> {
        let mut up = Clip::zeros(ops, [x.c, x.t, 2 * x.h, 2 * x.w])?;
        if x.len() > 0 {
            ops.upsample_nearest2x(&x.buf, x.c * x.t, x.h, x.w, &mut up.buf)?;
        }
        self.conv.forward(ops, tile, &up)
    }

    /// Frame 0 of the sequence passes through; output frame j ≥ 1 is the time conv over input
    /// frames 2j−2, 2j−1, 2j (stride 2), the first of which may come from the previous chunk.
    fn downsample_time(&self, ops: &O, tc: &CausalConv3d<O>, x: Clip<O>, state: &mut ResampleState<O>) -> Result<Clip<O>> {
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
        let last = x.frames(ops, x.t - 1, x.t)?;
        let out = match state.last.take() {
            None => {
                if x.t == 1 {
                    x
                } else {
                    let y = tc.forward(ops, Tile::Whole, &x)?;
                    Clip::concat_time(ops, &[&x.frames(ops, 0, 1)?, &y])?
                }
            }
            Some(prev) => tc.forward_after(ops, std::slice::from_ref(&prev), &x)?,
        };
        state.last = Some(last);
        Ok(out)
    }
}

/// `[2C, T, H, W]` → `[C, 2T, H, W]`: frame 2i is channels `[0, C)` of frame i, frame 2i+1 is
/// channels `[C, 2C)` (upstream's `reshape(b, 2, c, t, h, w)`, `stack(dim=3)`). Half `s` is the
/// `C·T` planes from `s·C·T·HW`; plane r = (ch, i) lands at `(2r + s)·HW`: one 2-D copy per half.
fn interleave_halves<O: Ops>(ops: &O, y: &Clip<O>, c: usize) -> Result<Clip<O>> {
    let (t, p) = (y.t, y.plane());
    let mut out = Clip::zeros(ops, [c, 2 * t, y.h, y.w])?;
    if c * t * p > 0 {
        for half in 0..2 {
            ops.copy_rows(at(&y.buf, half * c * t * p), p, at_mut(&mut out.buf, half * p), 2 * p, p, c * t)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::RandomWeights;
    use tessera_kernels::backend::CpuOps;

    const OPS: CpuOps = CpuOps;

    fn clip(shape: [usize; 4], seed: usize) -> Clip<CpuOps> {
        let n = shape.iter().product::<usize>();
        Clip::upload(&OPS, shape, (0..n).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.0) - 1.0).collect()).unwrap()
    }

    fn close(a: &Clip<CpuOps>, b: &Clip<CpuOps>) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.buf.iter().zip(&b.buf) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn join(parts: Vec<Clip<CpuOps>>) -> Clip<CpuOps> {
        Clip::concat_time(&OPS, &parts.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn interleave_halves_alternates_frames() {
        // 2 channels × 2 frames of one pixel: [a0 a1 | b0 b1] → frames a0 b0 a1 b1
        let y = Clip::upload(&OPS, [2, 2, 1, 1], vec![1.0, 2.0, 10.0, 20.0]).unwrap();
        assert_eq!(interleave_halves(&OPS, &y, 1).unwrap().buf, vec![1.0, 10.0, 2.0, 20.0]);
    }

    /// Each stateful block gives the same frames in chunks as in one call.
    #[test]
    fn chunked_blocks_equal_one_pass() {
        let src = RandomWeights::new(1);
        let res = ResidualBlock::load(&OPS, &src, "r", 4, 6).unwrap();
        let x = clip([4, 5, 3, 2], 1);
        let f = |a, b| x.frames(&OPS, a, b).unwrap();
        let whole = res.forward(&OPS, Tile::Whole, x.duplicate(&OPS).unwrap(), &mut ResidualState::default()).unwrap();
        let mut st = ResidualState::default();
        let parts = [(0, 1), (1, 3), (3, 4), (4, 5)].iter().map(|&(a, b)| res.forward(&OPS, Tile::Whole, f(a, b), &mut st).unwrap()).collect();
        close(&join(parts), &whole);

        let up = Resample::load(&OPS, &src, "u", 4, ResampleMode::Upsample3d).unwrap();
        let whole = up.forward(&OPS, Tile::Whole, x.duplicate(&OPS).unwrap(), &mut ResampleState::default()).unwrap();
        assert_eq!(whole.shape(), [2, 9, 6, 4]);
        let mut st = ResampleState::default();
        let parts = (0..5).map(|i| up.forward(&OPS, Tile::Whole, f(i, i + 1), &mut st).unwrap()).collect();
        close(&join(parts), &whole);

        let down = Resample::load(&OPS, &src, "d", 4, ResampleMode::Downsample3d).unwrap();
        let whole = down.forward(&OPS, Tile::Whole, x.duplicate(&OPS).unwrap(), &mut ResampleState::default()).unwrap();
        assert_eq!(whole.shape(), [4, 3, 1, 1]);
        let mut st = ResampleState::default();
        let parts = [(0, 1), (1, 3), (3, 5)].iter().map(|&(a, b)| down.forward(&OPS, Tile::Whole, f(a, b), &mut st).unwrap()).collect();
        close(&join(parts), &whole);
        // a chunk of odd length after the first cannot be downsampled
        assert!(down.forward(&OPS, Tile::Whole, f(0, 1), &mut st).is_err());
    }

    #[test]
    fn attention_is_per_frame() {
        let src = RandomWeights::new(2);
        let attn = AttentionBlock::load(&OPS, &src, "a", 8).unwrap();
        let x = clip([8, 3, 2, 3], 5);
        let second = attn.forward(&OPS, Tile::Whole, x.frames(&OPS, 1, 2).unwrap()).unwrap();
        let whole = attn.forward(&OPS, Tile::Whole, x).unwrap();
        close(&whole.frames(&OPS, 1, 2).unwrap(), &second);
    }
}
