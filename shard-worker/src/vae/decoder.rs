//! `WanDecoder3d`: latent frames to video frames, one chunk at a time with causal state, so that
//! decoding chunk by chunk equals one pass over the whole sequence; on whole frames or on one band
//! of rows of frames split across ranks ([`Tile`]).

use super::band::Tile;
use super::blocks::{MidBlock, MidState, Resample, ResampleMode, ResampleState, ResidualBlock, ResidualState};
use super::clip::{Clip, FrameCache};
use super::config::VaeConfig;
use super::layers::{norm_silu_conv, CausalConv3d, ChannelRmsNorm};
use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::backend::Ops;

/// One decoder stage: residual blocks, then an optional upsampler.
struct UpBlock<O: Ops> {
    resnets: Vec<ResidualBlock<O>>,
    upsampler: Option<Resample<O>>,
}

/// The decoder (without `post_quant_conv`, which the VAE applies first).
pub(crate) struct Decoder<O: Ops> {
    conv_in: CausalConv3d<O>,
    mid: MidBlock<O>,
    up_blocks: Vec<UpBlock<O>>,
    norm_out: ChannelRmsNorm<O>,
    conv_out: CausalConv3d<O>,
    /// The first stage after the last temporal upsampler: from there on every layer maps frame t
    /// to frame t, so those stages run one frame at a time (same output, a fraction of the memory
    /// at the highest resolutions).
    per_frame_from: usize,
}

/// Everything the decoder remembers between chunks of one sample.
pub(crate) struct DecoderState<O: Ops> {
    conv_in: FrameCache<O>,
    mid: MidState<O>,
    up_blocks: Vec<(Vec<ResidualState<O>>, ResampleState<O>)>,
    conv_out: FrameCache<O>,
}

impl<O: Ops> Decoder<O> {
    /// Loads `decoder.*` for `cfg`: widths `base_dim · [m_last, reversed dim_mult]`; stages after
    /// the first take half the previous width (the upsampler halves it); every stage but the last
    /// upsamples, in time too where `temperal_downsample` reversed says so.
    pub fn load(ops: &O, src: &dyn WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let dims = cfg.decoder_dims();
        let temporal = cfg.decoder_temporal_upsample();
        let stages = cfg.dim_mult.len();
        let mut up_blocks = Vec::with_capacity(stages);
        for i in 0..stages {
            let prefix = format!("decoder.up_blocks.{i}");
            let (mut cin, cout) = (if i > 0 { dims[i] / 2 } else { dims[i] }, dims[i + 1]);
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for r in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::load(ops, src, &format!("{prefix}.resnets.{r}"), cin, cout)?);
                cin = cout;
            }
            let upsampler = if i + 1 < stages {
                let mode = if temporal[i] { ResampleMode::Upsample3d } else { ResampleMode::Upsample2d };
                Some(Resample::load(ops, src, &format!("{prefix}.upsamplers.0"), cout, mode)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[stages];
        let per_frame_from = temporal.iter().rposition(|&t| t).map_or(0, |i| i + 1);
        Ok(Self {
            per_frame_from,
            conv_in: CausalConv3d::load3(ops, src, "decoder.conv_in", cfg.z_dim, dims[0])?,
            mid: MidBlock::load(ops, src, "decoder.mid_block", dims[0])?,
            up_blocks,
            norm_out: ChannelRmsNorm::load(ops, src, "decoder.norm_out", last, false)?,
            conv_out: CausalConv3d::load3(ops, src, "decoder.conv_out", last, cfg.out_channels)?,
        })
    }

    /// A fresh state: the start of a sequence.
    pub fn new_state(&self) -> DecoderState<O> {
        DecoderState {
            conv_in: FrameCache::default(),
            mid: MidState::default(),
            up_blocks: self.up_blocks.iter().map(|b| (b.resnets.iter().map(|_| ResidualState::default()).collect(), ResampleState::default())).collect(),
            conv_out: FrameCache::default(),
        }
    }

    /// Decodes the next chunk of latent frames `[z_dim, n, h, w]` (after `post_quant_conv`) into
    /// video frames `[out_channels, n', 8h, 8w]` (not clamped). On a band, `z` is the band's rows
    /// and so is the video (8 rows each).
    pub fn forward(&self, ops: &O, tile: Tile<'_>, z: &Clip<O>, state: &mut DecoderState<O>) -> Result<Clip<O>> {
        let x = self.conv_in.forward_cached(ops, tile, z, &mut state.conv_in)?;
        let mut x = self.mid.forward(ops, tile, x, &mut state.mid)?;
        for i in 0..self.per_frame_from {
            x = self.up_block(ops, tile, i, x, state)?;
        }
        let inputs = if x.t == 1 { vec![x] } else { (0..x.t).map(|f| x.frames(ops, f, f + 1)).collect::<Result<Vec<_>>>()? };
        let mut frames = Vec::with_capacity(inputs.len());
        for mut y in inputs {
            for i in self.per_frame_from..self.up_blocks.len() {
                y = self.up_block(ops, tile, i, y, state)?;
            }
            frames.push(norm_silu_conv(ops, tile, &self.norm_out, &self.conv_out, y, &mut state.conv_out)?);
        }
        match frames.len() {
            1 => Ok(frames.pop().expect("one frame")),
            _ => Clip::concat_time(ops, &frames.iter().collect::<Vec<_>>()),
        }
    }

    /// Runs stage `i` on the next frames.
    fn up_block(&self, ops: &O, tile: Tile<'_>, i: usize, mut x: Clip<O>, state: &mut DecoderState<O>) -> Result<Clip<O>> {
        let (block, (res_states, up_state)) = (&self.up_blocks[i], &mut state.up_blocks[i]);
        for (res, st) in block.resnets.iter().zip(res_states.iter_mut()) {
            x = res.forward(ops, tile, x, st)?;
        }
        match &block.upsampler {
            Some(up) => up.forward(ops, tile, x, up_state),
            None => Ok(x),
        }
    }
}
