//! The Wan 2.1 VAE (diffusers `AutoencoderKLWan`), written once over the backend seam (`cpu`,
//! `bf16-host`, `cuda`): decode latents to video chunk by chunk (one latent frame per step, with
//! causal frame caches, so memory does not grow with the video's length; a [`DecodeStream`] keeps
//! those caches between calls, so a long video's latents can be decoded as they are made and the
//! frames equal one decode of the whole) and encode video to the latent distribution, plus the
//! latent normalisation the pipelines apply around them (on the host, in f32). Either can be split
//! by rows across ranks (`decode_split`, `encode_split`: [`Bands`], each rank running its band).
//! Reference: `wan2.1.md` §4.

mod band;
mod blocks;
mod clip;
mod config;
mod decoder;
mod encoder;
mod layers;
mod split;

pub use band::{Bands, BANDS_GROUP};
pub use config::{VaeConfig, VaePreset, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD};
pub use split::{PatchShard, SplitLatent};

use crate::on_backend::{model_family, on_backend, OnBackend};
use crate::weights::{RandomWeights, WeightSource, WeightStore};
use crate::{Result, WorkerError};
use band::Tile;
use clip::Clip;
use decoder::Decoder;
use encoder::Encoder;
use layers::CausalConv3d;
use rayon::prelude::*;
use std::path::Path;
use tessera_kernels::backend::{Backend, CpuOps, CudaOps, HostOps, Ops};
use tessera_kernels::Tensor;

/// Video frames per encoder chunk after the first, one-frame chunk (upstream's fixed 4).
const ENCODE_CHUNK: usize = 4;

/// A decode in progress on backend `O`: every sample's causal caches, kept between calls of
/// [`WanVae::decode_more`].
pub struct DecodeStream<O: Ops> {
    states: Vec<decoder::DecoderState<O>>,
}

/// A decode in progress, on the backend of the VAE that started it ([`WanVae::start_decode`]).
pub enum VaeDecodeStream {
    /// On the CPU.
    Cpu(DecodeStream<CpuOps>),
    /// Under the host twin of the GPU path.
    Bf16Host(DecodeStream<HostOps>),
    /// On a CUDA GPU.
    Cuda(DecodeStream<CudaOps>),
}

/// The Wan 2.1 VAE on backend `O`: written once, run by every backend.
pub struct Vae<O: Ops> {
    ops: O,
    cfg: VaeConfig,
    encoder: Encoder<O>,
    decoder: Decoder<O>,
    quant_conv: CausalConv3d<O>,
    post_quant_conv: CausalConv3d<O>,
}

impl<O: Ops> Vae<O> {
    /// Builds the VAE on `ops` from any weight source; every parameter is checked by name and
    /// shape, and tensors the VAE does not use are an error.
    pub fn from_source(ops: O, cfg: VaeConfig, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "vae config".into(), detail })?;
        let z = cfg.z_dim;
        let vae = Self {
            encoder: Encoder::load(&ops, src, &cfg)?,
            decoder: Decoder::load(&ops, src, &cfg)?,
            quant_conv: CausalConv3d::load1(&ops, src, "quant_conv", 2 * z, 2 * z)?,
            post_quant_conv: CausalConv3d::load1(&ops, src, "post_quant_conv", z, z)?,
            cfg,
            ops,
        };
        src.finish()?;
        Ok(vae)
    }

    /// The backend.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// A fresh decode of `batch` samples: the start of their videos.
    fn new_stream(&self, batch: usize) -> DecodeStream<O> {
        DecodeStream { states: (0..batch).map(|_| self.decoder.new_state()).collect() }
    }

    /// Decodes `chunk` latent frames per step (1 is upstream's scheme; any size gives the same
    /// video), handing each piece of video, clamped to [−1, 1], to `on_frames`.
    fn decode_chunks(&self, latent: &Tensor, chunk: usize, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        let mut stream = self.new_stream(latent.shape().first().copied().unwrap_or(0));
        self.decode_more(&mut stream, latent, chunk, Tile::Whole, on_frames)
    }

    /// Decodes the next latent frames of `stream`'s videos, `chunk` per step, on `tile` (a band:
    /// `latent` and the frames are the band's rows).
    fn decode_more(
        &self,
        stream: &mut DecodeStream<O>,
        latent: &Tensor,
        chunk: usize,
        tile: Tile<'_>,
        on_frames: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let s = latent.shape();
        if s.len() != 5 || s[1] != self.cfg.z_dim || s.contains(&0) || s[0] != stream.states.len() {
            return Err(WorkerError::input(
                "latent",
                format!("expected [{}, {}, T, h, w] with no empty dimension, got {s:?}", stream.states.len(), self.cfg.z_dim),
            ));
        }
        let ops = &self.ops;
        let frames = s[2];
        let states = &mut stream.states;
        let mut start = 0;
        while start < frames {
            let end = frames.min(start + chunk.max(1));
            let (mut samples, mut shape) = (Vec::with_capacity(states.len()), [0; 4]);
            for (b, state) in states.iter_mut().enumerate() {
                let z = self.post_quant_conv.forward(ops, tile, &Clip::from_batch(ops, latent, b, start, end)?)?;
                let video = self.decoder.forward(ops, tile, &z, state)?;
                shape = video.shape();
                let mut host = video.download(ops)?;
                host.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0)));
                samples.push(host);
            }
            on_frames(clip::stack(shape, samples)?)?;
            start = end;
        }
        Ok(())
    }

    /// Encodes with a first chunk of `first` frames and then chunks of `rest` (upstream: 1 and 4),
    /// on `tile` (a band: `video` and the latents are the band's rows).
    fn encode_chunks(&self, video: &Tensor, first: usize, rest: usize, tile: Tile<'_>) -> Result<(Tensor, Tensor)> {
        let s = video.shape();
        let c = &self.cfg;
        let sf = c.spatial_factor();
        if s.len() != 5 || s[1] != c.in_channels || s.contains(&0) {
            return Err(WorkerError::input("video", format!("expected [B, {}, F, H, W] with no empty dimension, got {s:?}", c.in_channels)));
        }
        if !(s[2] - 1).is_multiple_of(ENCODE_CHUNK) {
            return Err(WorkerError::input("video", format!("{} frames: the encoder takes 1 + {ENCODE_CHUNK}k frames", s[2])));
        }
        if !s[3].is_multiple_of(sf) || !s[4].is_multiple_of(sf) {
            return Err(WorkerError::input("video", format!("{}x{} pixels: height and width must be multiples of {sf}", s[3], s[4])));
        }
        let ops = &self.ops;
        let (batch, frames, z) = (s[0], s[2], c.z_dim);
        let (mut means, mut logvars, mut shape) = (Vec::with_capacity(batch), Vec::with_capacity(batch), [0; 4]);
        for b in 0..batch {
            let mut state = self.encoder.new_state();
            let mut outs = Vec::new();
            let mut start = 0;
            while start < frames {
                let end = frames.min(start + if start == 0 { first } else { rest });
                outs.push(self.encoder.forward(ops, tile, &Clip::from_batch(ops, video, b, start, end)?, &mut state)?);
                start = end;
            }
            let enc = self.quant_conv.forward(ops, tile, &Clip::concat_time(ops, &outs.iter().collect::<Vec<_>>())?)?;
            shape = [z, enc.t, enc.h, enc.w];
            let per_channel = enc.positions();
            let mut host = enc.download(ops)?;
            let logvar = host.split_off(z * per_channel);
            means.push(host);
            logvars.push(logvar.into_iter().map(|v| v.clamp(-30.0, 20.0)).collect());
        }
        Ok((clip::stack(shape, means)?, clip::stack(shape, logvars)?))
    }
}

model_family!(
    /// The Wan VAE as a [`ModelFamily`](crate::on_backend::ModelFamily): what [`WanVae`] chooses among.
    VaeFamily,
    Vae,
    VaeConfig
);

/// A loaded Wan 2.1 VAE on the backend chosen at run time (`from_source_on`, `backend` and
/// `device_memory` come with [`OnBackend`]).
pub type WanVae = OnBackend<VaeFamily>;

impl OnBackend<VaeFamily> {
    /// Loads a diffusers `vae/` folder (`config.json` and safetensors weights) onto the CPU in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, Backend::Cpu)
    }

    /// [`load`](Self::load) onto `backend`.
    pub fn load_on(dir: &Path, backend: Backend) -> Result<Self> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        Self::from_source_on(cfg, &WeightStore::open_dir(dir)?, backend)
    }

    /// A built-in configuration with deterministic random weights, on the CPU.
    pub fn preset(preset: VaePreset, seed: u64) -> Result<Self> {
        Self::from_source(preset.config(), &RandomWeights::new(seed))
    }

    /// The VAE on the CPU from any weight source (see [`Vae::from_source`]).
    pub fn from_source(cfg: VaeConfig, src: &dyn WeightSource) -> Result<Self> {
        Self::from_source_on(cfg, src, Backend::Cpu)
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        on_backend!(self, m => &m.cfg)
    }

    /// Decodes `latent` `[B, z_dim, T, h, w]` (already de-normalised, see
    /// [`denormalize_latent`](Self::denormalize_latent)) one latent frame at a time, handing each
    /// piece of video `[B, out_channels, n, 8h, 8w]`, clamped to [−1, 1], to `on_frames` as soon as
    /// it is ready: 1 frame for the first latent frame, 4 for each later one. Memory stays that of
    /// one step, whatever T is.
    pub fn decode_with(&self, latent: &Tensor, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        self.decode_chunks(latent, 1, on_frames)
    }

    /// Decodes the whole latent: `[B, out_channels, 1 + 4(T − 1), 8h, 8w]`, clamped to [−1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let mut pieces = Vec::new();
        self.decode_with(latent, &mut |t| {
            pieces.push(t);
            Ok(())
        })?;
        concat_frames(&pieces)
    }

    fn decode_chunks(&self, latent: &Tensor, chunk: usize, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        on_backend!(self, m => m.decode_chunks(latent, chunk, on_frames))
    }

    /// Starts decoding `batch` videos whose latents will come a few frames at a time
    /// ([`decode_more`](Self::decode_more)).
    pub fn start_decode(&self, batch: usize) -> VaeDecodeStream {
        match self {
            OnBackend::Cpu(m) => VaeDecodeStream::Cpu(m.new_stream(batch)),
            OnBackend::Bf16Host(m) => VaeDecodeStream::Bf16Host(m.new_stream(batch)),
            OnBackend::Cuda(m) => VaeDecodeStream::Cuda(m.new_stream(batch)),
        }
    }

    /// Decodes the next latent frames `[B, z_dim, n, h, w]` (de-normalised) of `stream`'s videos,
    /// continuing its causal caches, as [`decode_with`](Self::decode_with) does: the pieces of
    /// all calls together are the decode of the whole latent, bit for bit.
    pub fn decode_more(&self, stream: &mut VaeDecodeStream, latent: &Tensor, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        self.decode_tile(stream, latent, Tile::Whole, on_frames)
    }

    /// [`decode_more`](Self::decode_more) of this rank's band of rows of frames split by `bands`:
    /// `latent` is the band's latent rows `[B, z_dim, n, rows, w]` (de-normalised), the pieces
    /// are the band's video rows `[B, out_channels, n', 8·rows, 8w]`, which are the rows of the
    /// whole decode. Every band calls it with the same frames; a stream keeps to one band.
    pub fn decode_band(&self, stream: &mut VaeDecodeStream, latent: &Tensor, bands: &Bands, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        self.decode_tile(stream, latent, Tile::Band(bands), on_frames)
    }

    fn decode_tile(&self, stream: &mut VaeDecodeStream, latent: &Tensor, tile: Tile<'_>, on_frames: &mut dyn FnMut(Tensor) -> Result<()>) -> Result<()> {
        match (self, stream) {
            (OnBackend::Cpu(m), VaeDecodeStream::Cpu(s)) => m.decode_more(s, latent, 1, tile, on_frames),
            (OnBackend::Bf16Host(m), VaeDecodeStream::Bf16Host(s)) => m.decode_more(s, latent, 1, tile, on_frames),
            (OnBackend::Cuda(m), VaeDecodeStream::Cuda(s)) => m.decode_more(s, latent, 1, tile, on_frames),
            _ => Err(WorkerError::input("decode", "a decode stream continues on the backend of the VAE that started it")),
        }
    }

    /// Encodes `video` `[B, in_channels, F, H, W]` (values in [−1, 1], F = 1 + 4k, H and W
    /// multiples of 8) into the latent distribution: mean and log-variance (clamped to [−30, 20]),
    /// each `[B, z_dim, 1 + k, H/8, W/8]`. Pipelines use the mean, normalised with
    /// [`normalize_latent`](Self::normalize_latent). Frames go through in chunks of 1, 4, 4, ….
    pub fn encode(&self, video: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_tile(video, Tile::Whole)
    }

    /// [`encode`](Self::encode) on `tile`.
    fn encode_tile(&self, video: &Tensor, tile: Tile<'_>) -> Result<(Tensor, Tensor)> {
        self.encode_chunks(video, 1, ENCODE_CHUNK, tile)
    }

    fn encode_chunks(&self, video: &Tensor, first: usize, rest: usize, tile: Tile<'_>) -> Result<(Tensor, Tensor)> {
        on_backend!(self, m => m.encode_chunks(video, first, rest, tile))
    }

    /// `(μ − mean) / std` per channel, as the pipelines compute it (`(μ − mean)·(1/std)` in f32).
    pub fn normalize_latent(&self, mu: &Tensor) -> Result<Tensor> {
        self.per_channel(mu, |v, mean, inv_std| (v - mean) * inv_std)
    }

    /// `z·std + mean` per channel, as the pipelines compute it (`z / (1/std) + mean` in f32): the
    /// transformer's latents back into the decoder's range.
    pub fn denormalize_latent(&self, z: &Tensor) -> Result<Tensor> {
        self.per_channel(z, |v, mean, inv_std| v / inv_std + mean)
    }

    fn per_channel(&self, x: &Tensor, f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Result<Tensor> {
        let s = x.shape();
        if s.len() != 5 || s[1] != self.config().z_dim {
            return Err(WorkerError::input("latent", format!("expected [B, {}, T, h, w], got {s:?}", self.config().z_dim)));
        }
        let per_channel: usize = s[2..].iter().product();
        let z = self.config().z_dim;
        let mut out = x.clone();
        let cfg = self.config();
        if per_channel > 0 {
            out.data_mut().par_chunks_mut(per_channel).enumerate().for_each(|(i, row)| {
                let ch = i % z;
                let (mean, inv_std) = (cfg.latents_mean[ch] as f32, 1.0 / cfg.latents_std[ch] as f32);
                row.iter_mut().for_each(|v| *v = f(*v, mean, inv_std));
            });
        }
        Ok(out)
    }
}

/// Joins `[B, C, n_i, H, W]` pieces along time.
fn concat_frames(pieces: &[Tensor]) -> Result<Tensor> {
    let first = pieces.first().ok_or_else(|| WorkerError::input("latent", "no frames were decoded"))?;
    let s = first.shape().to_vec();
    let (batch, channels, plane) = (s[0], s[1], s[3] * s[4]);
    let frames: usize = pieces.iter().map(|p| p.dim(2)).sum();
    let mut data = Vec::with_capacity(batch * channels * frames * plane);
    for row in 0..batch * channels {
        for p in pieces {
            let n = p.dim(2) * plane;
            data.extend_from_slice(&p.data()[row * n..(row + 1) * n]);
        }
    }
    Ok(Tensor::new([batch, channels, frames, s[3], s[4]], data)?)
}

#[cfg(test)]
mod tests;
