//! `WanEncoder3d`: video frames to the latent distribution's parameters, one chunk at a time with
//! causal state, so that encoding chunk by chunk equals one pass over the whole sequence; on whole
//! frames or on one band of rows of frames split across ranks ([`Tile`]).

use super::band::Tile;
use super::blocks::{MidBlock, MidState, Resample, ResampleMode, ResampleState, ResidualBlock, ResidualState};
use super::clip::{Clip, FrameCache};
use super::config::VaeConfig;
use super::layers::{norm_silu_conv, CausalConv3d, ChannelRmsNorm};
use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::backend::Ops;

/// An entry of the encoder's flat `down_blocks` list.
enum DownLayer<O: Ops> {
    Residual(ResidualBlock<O>),
    Resample(Resample<O>),
}

/// The encoder (without `quant_conv`, which the VAE applies last).
pub(crate) struct Encoder<O: Ops> {
    conv_in: CausalConv3d<O>,
    down_blocks: Vec<DownLayer<O>>,
    mid: MidBlock<O>,
    norm_out: ChannelRmsNorm<O>,
    conv_out: CausalConv3d<O>,
    /// Index of the first temporal downsampler in `down_blocks`: every layer before it maps frame t
    /// to frame t, so those run one frame at a time (same output, a fraction of the memory at full
    /// resolution).
    per_frame_until: usize,
}

/// The state of one entry of `down_blocks`.
enum DownState<O: Ops> {
    Residual(ResidualState<O>),
    Resample(ResampleState<O>),
}

/// Everything the encoder remembers between chunks of one sample.
pub(crate) struct EncoderState<O: Ops> {
    conv_in: FrameCache<O>,
    down_blocks: Vec<DownState<O>>,
    mid: MidState<O>,
    conv_out: FrameCache<O>,
}

impl<O: Ops> Encoder<O> {
    /// Loads `encoder.*` for `cfg`: widths `base_dim · [1, dim_mult…]`, `num_res_blocks` residual
    /// blocks per stage, and a downsampler after every stage but the last (in time too where
    /// `temperal_downsample` says so), all in one flat list as upstream numbers them.
    pub fn load(ops: &O, src: &dyn WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let dims = cfg.encoder_dims();
        let stages = cfg.dim_mult.len();
        let mut down_blocks = Vec::new();
        for i in 0..stages {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let prefix = format!("encoder.down_blocks.{}", down_blocks.len());
                down_blocks.push(DownLayer::Residual(ResidualBlock::load(ops, src, &prefix, cin, cout)?));
                cin = cout;
            }
            if i + 1 < stages {
                let prefix = format!("encoder.down_blocks.{}", down_blocks.len());
                let mode = if cfg.temperal_downsample[i] { ResampleMode::Downsample3d } else { ResampleMode::Downsample2d };
                down_blocks.push(DownLayer::Resample(Resample::load(ops, src, &prefix, cout, mode)?));
            }
        }
        let top = dims[stages];
        let per_frame_until = down_blocks.iter().position(|l| matches!(l, DownLayer::Resample(r) if r.is_temporal())).unwrap_or(down_blocks.len());
        Ok(Self {
            per_frame_until,
            conv_in: CausalConv3d::load3(ops, src, "encoder.conv_in", cfg.in_channels, dims[0])?,
            down_blocks,
            mid: MidBlock::load(ops, src, "encoder.mid_block", top)?,
            norm_out: ChannelRmsNorm::load(ops, src, "encoder.norm_out", top, false)?,
            conv_out: CausalConv3d::load3(ops, src, "encoder.conv_out", top, 2 * cfg.z_dim)?,
        })
    }

    /// A fresh state: the start of a sequence.
    pub fn new_state(&self) -> EncoderState<O> {
        EncoderState {
            conv_in: FrameCache::default(),
            down_blocks: self
                .down_blocks
                .iter()
                .map(|l| match l {
                    DownLayer::Residual(_) => DownState::Residual(ResidualState::default()),
                    DownLayer::Resample(_) => DownState::Resample(ResampleState::default()),
                })
                .collect(),
            mid: MidState::default(),
            conv_out: FrameCache::default(),
        }
    }

    /// Encodes the next chunk of video frames `[in_channels, n, H, W]` into `[2·z_dim, n', H/8, W/8]`
    /// (before `quant_conv`).
    pub fn forward(&self, ops: &O, tile: Tile<'_>, video: &Clip<O>, state: &mut EncoderState<O>) -> Result<Clip<O>> {
        let split = self.per_frame_until;
        let mut frames = Vec::with_capacity(video.t);
        for f in 0..video.t {
            let mut x = self.conv_in.forward_cached(ops, tile, &video.frames(ops, f, f + 1)?, &mut state.conv_in)?;
            for i in 0..split {
                x = self.down_layer(ops, tile, i, x, state)?;
            }
            frames.push(x);
        }
        let mut x = Clip::concat_time(ops, &frames.iter().collect::<Vec<_>>())?;
        drop(frames);
        for i in split..self.down_blocks.len() {
            x = self.down_layer(ops, tile, i, x, state)?;
        }
        let x = self.mid.forward(ops, tile, x, &mut state.mid)?;
        norm_silu_conv(ops, tile, &self.norm_out, &self.conv_out, x, &mut state.conv_out)
    }

    /// Runs entry `i` of `down_blocks` on the next frames.
    fn down_layer(&self, ops: &O, tile: Tile<'_>, i: usize, x: Clip<O>, state: &mut EncoderState<O>) -> Result<Clip<O>> {
        match (&self.down_blocks[i], &mut state.down_blocks[i]) {
            (DownLayer::Residual(r), DownState::Residual(s)) => r.forward(ops, tile, x, s),
            (DownLayer::Resample(r), DownState::Resample(s)) => r.forward(ops, tile, x, s),
            _ => unreachable!("states are built from the layers"),
        }
    }
}
