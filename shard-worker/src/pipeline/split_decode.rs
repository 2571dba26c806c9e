//! Stage 4 split across ranks: member 0 cuts the latent's rows into bands ([`Bands`]), each rank
//! decodes its band (halo rows from its neighbours, the middle block's keys and values from every
//! band), and member 0 joins the bands' frames for the observer. The frames are the one-device
//! decode's; each rank's memory and work are its band's, not the video's.

use super::{FrameStream, PipelineObserver, WanPipeline};
use crate::parallel::{bytes_to_f32, f32_to_bytes, Communicator, Traffic};
use crate::vae::{Bands, BANDS_GROUP};
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::ops::Range;
use tessera_kernels::Tensor;

/// The largest dimension a latent shape may have on the wire (shapes travel as f32 values, exact
/// up to 2²⁴).
const MAX_DIM: f32 = 16_777_216.0;

impl WanPipeline {
    /// [`decode`](Self::decode) split across `world`'s members: member 0 passes the latents
    /// `[B, C, T, h, w]`, the others `None`; every member calls it. The frames, `[B, 3, n, H, W]` in
    /// [0, 1], go to member 0's observer as they are joined; the others' observers see none. Up to
    /// `h` members decode a band each; the rest only take part in the exchanges.
    pub fn decode_split(&self, latents: Option<&Tensor>, world: &Communicator, observer: &mut dyn PipelineObserver) -> Result<()> {
        let shape = shared_shape(latents, world)?;
        let mut stream = FrameStream(self.vae.start_decode(shape[0]));
        self.decode_bands(&mut stream, latents, shape, world, observer)
    }

    /// [`decode_more`](Self::decode_more) split across `world`'s members, as
    /// [`decode_split`](Self::decode_split) is: the next latent frames of `stream`'s video from
    /// member 0. Every member keeps its own stream (its band's causal caches), started with
    /// [`start_decode`](Self::start_decode) and continued by this call alone, in the same world.
    pub fn decode_more_split(
        &self,
        stream: &mut FrameStream,
        latents: Option<&Tensor>,
        world: &Communicator,
        observer: &mut dyn PipelineObserver,
    ) -> Result<()> {
        let shape = shared_shape(latents, world)?;
        self.decode_bands(stream, latents, shape, world, observer)
    }

    fn decode_bands(
        &self,
        stream: &mut FrameStream,
        latents: Option<&Tensor>,
        shape: [usize; 5],
        world: &Communicator,
        observer: &mut dyn PipelineObserver,
    ) -> Result<()> {
        let [batch, channels, frames, height, width] = shape;
        let (me, count) = (world.rank(), world.size().min(height));
        let band = |i: usize| if i < count { Bands::rows(height, count, i) } else { 0..0 };
        let parts = match latents {
            Some(l) if me == 0 => (0..world.size()).map(|i| rows_of(l, band(i))).collect(),
            _ => vec![Vec::new(); world.size()],
        };
        let mine = world.all_to_all(parts)?.swap_remove(0);
        let mut join = Join { world, count, band: &band, observer };
        if me >= count {
            // One piece of frames per latent frame, as the bands decode them.
            return (0..frames).try_for_each(|_| join.piece(None));
        }
        let rows = band(me);
        let z = self.vae.denormalize_latent(&Tensor::new([batch, channels, frames, rows.len(), width], mine)?)?;
        let bands = Bands::new(world.subgroup((0..count).collect(), BANDS_GROUP)?);
        self.vae.decode_band(&mut stream.0, &z, &bands, &mut |piece| join.piece(Some(piece)))
    }
}

/// Brings each piece of the bands' frames to member 0 and hands the joined frames on.
struct Join<'a> {
    world: &'a Communicator,
    count: usize,
    band: &'a dyn Fn(usize) -> Range<usize>,
    observer: &'a mut dyn PipelineObserver,
}

impl Join<'_> {
    /// This member's piece `[B, 3, n, rows·s, W]` of the next frames (`None` without a band) to
    /// member 0, which joins the bands' rows and passes the frames on, mapped to [0, 1].
    fn piece(&mut self, piece: Option<Tensor>) -> Result<()> {
        let mut parts = vec![Bytes::new(); self.world.size()];
        parts[0] = piece.as_ref().map(|p| f32_to_bytes(p.data())).unwrap_or_default();
        let got = self.world.exchange_bytes(parts, Traffic::Gather)?;
        if self.world.rank() != 0 {
            return Ok(());
        }
        let own = piece.ok_or_else(|| WorkerError::Collective("member 0 decoded no band".into()))?;
        let s = own.shape().to_vec();
        let (planes, scale, width) = (s[0] * s[1] * s[2], s[3] / (self.band)(0).len().max(1), s[4]);
        let heights: Vec<usize> = (0..self.count).map(|i| (self.band)(i).len() * scale).collect();
        let bands = got.iter().take(self.count).map(|b| bytes_to_f32(b)).collect::<Result<Vec<_>>>()?;
        for (i, (b, h)) in bands.iter().zip(&heights).enumerate() {
            if b.len() != planes * h * width {
                return Err(WorkerError::Collective(format!("band {i} sent {} values for {planes} planes of {h}x{width}", b.len())));
            }
        }
        let height: usize = heights.iter().sum();
        let mut data = Vec::with_capacity(planes * height * width);
        for p in 0..planes {
            for (b, h) in bands.iter().zip(&heights) {
                data.extend(b[p * h * width..(p + 1) * h * width].iter().map(|v| (v + 1.0) * 0.5));
            }
        }
        self.observer.on_frames(&Tensor::new([s[0], s[1], s[2], height, width], data)?)
    }
}

/// Member 0's latent shape on every member (an error on all if member 0 has none).
fn shared_shape(latents: Option<&Tensor>, world: &Communicator) -> Result<[usize; 5]> {
    let mine: Vec<f32> = match latents {
        Some(l) if l.shape().len() == 5 && l.shape().iter().all(|&d| (d as f32) < MAX_DIM) => l.shape().iter().map(|&d| d as f32).collect(),
        _ => vec![0.0; 5],
    };
    let got = world.broadcast(0, if world.rank() == 0 { &mine } else { &[] })?;
    match got[..] {
        [b, c, t, h, w] if got.iter().all(|&d| d >= 1.0 && d < MAX_DIM && d.fract() == 0.0) => Ok([b, c, t, h, w].map(|d| d as usize)),
        _ => Err(WorkerError::input("latent", format!("member 0 has no [B, C, T, h, w] latent to decode (shape {got:?})"))),
    }
}

/// Rows `rows` of every plane of a `[B, C, T, h, w]` tensor, plane after plane.
fn rows_of(t: &Tensor, rows: Range<usize>) -> Vec<f32> {
    let s = t.shape();
    let (h, w) = (s[3], s[4]);
    let mut out = Vec::with_capacity(t.data().len() / h.max(1) * rows.len());
    for plane in t.data().chunks_exact((h * w).max(1)) {
        out.extend_from_slice(&plane[rows.start * w..rows.end * w]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{run_in_process, ParallelPlan};
    use crate::pipeline::{FrameCollector, PipelinePreset};

    /// Latent frames `frames` of a `[B, C, T, h, w]` tensor.
    fn latent_frames(x: &Tensor, frames: Range<usize>) -> Tensor {
        let s = x.shape();
        let plane = s[3] * s[4];
        let data = x.data().chunks_exact(s[2] * plane).flat_map(|c| c[frames.start * plane..frames.end * plane].iter().copied()).collect();
        Tensor::new([s[0], s[1], frames.len(), s[3], s[4]], data).unwrap()
    }

    /// Over any number of ranks (more than the latent has rows too: some then only join the
    /// exchanges), in one call or chunk by chunk, the split decode gives member 0 the one-device
    /// frames bit for bit, and the other members none.
    #[test]
    fn split_decode_gives_the_one_device_frames_bit_for_bit() {
        let pipe = PipelinePreset::Tiny.build(1).unwrap();
        let z = pipe.vae().config().z_dim;
        let (t, h, w) = (3, 5, 6);
        let latents = Tensor::new([1, z, t, h, w], (0..z * t * h * w).map(|i| ((i * 7919 % 211) as f32 / 50.0) - 2.0).collect()).unwrap();
        let mut one = FrameCollector::default();
        pipe.decode(&latents, &mut one).unwrap();
        let want = one.frames().unwrap();
        for ranks in [2, 3, 6] {
            let got = run_in_process(ParallelPlan::new(ranks, 1, 1).unwrap(), |ctx| {
                let lead = ctx.rank() == 0;
                let (mut whole, mut chunked) = (FrameCollector::default(), FrameCollector::default());
                pipe.decode_split(lead.then_some(&latents), ctx.world(), &mut whole)?;
                let mut stream = pipe.start_decode();
                for part in [0..1, 1..3] {
                    let piece = latent_frames(&latents, part);
                    pipe.decode_more_split(&mut stream, lead.then_some(&piece), ctx.world(), &mut chunked)?;
                }
                Ok(if lead {
                    Some((whole.frames()?, chunked.frames()?))
                } else {
                    assert!(whole.frames().is_err() && chunked.frames().is_err());
                    None
                })
            })
            .unwrap();
            let (whole, chunked) = got[0].as_ref().unwrap();
            for (what, frames) in [("one call", whole), ("chunk by chunk", chunked)] {
                assert_eq!(frames.shape(), want.shape(), "{ranks} ranks, {what}");
                let worst = frames.data().iter().zip(want.data()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(frames.data() == want.data(), "{ranks} ranks, {what}: frames differ by up to {worst}");
            }
        }
    }

    /// A member 0 without a latent is an error on every member, not a hang.
    #[test]
    fn no_latent_on_member_0_is_an_error_everywhere() {
        let pipe = PipelinePreset::Tiny.build(1).unwrap();
        let got = run_in_process(ParallelPlan::new(2, 1, 1).unwrap(), |ctx| {
            Ok(pipe.decode_split(None, ctx.world(), &mut FrameCollector::default()).unwrap_err().to_string())
        })
        .unwrap();
        assert!(got.iter().all(|e| e.contains("no [B, C, T, h, w] latent")), "{got:?}");
    }
}
