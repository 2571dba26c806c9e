//! Stage 4 split across ranks: the latent decoded in bands of rows, one per rank
//! (`WanVae::decode_split`), each band de-normalised by its rank; member 0's observer gets the
//! frames in [0, 1]. The frames are the one-device decode's; each rank's memory and work are its
//! band's, not the video's.

use super::{to_unit, FrameStream, PipelineObserver, WanPipeline};
use crate::parallel::Communicator;
use crate::vae::SplitLatent;
use crate::Result;

impl WanPipeline {
    /// [`decode`](Self::decode) split across `world`'s members: every member calls it with its
    /// part of the latents `[B, C, T, h, w]` ([`SplitLatent`]). The frames, `[B, 3, n, H, W]` in
    /// [0, 1], go to member 0's observer as they are joined; the others' observers see none. Up to
    /// `h` members decode a band each; the rest only take part in the exchanges.
    pub fn decode_split(&self, latents: SplitLatent<'_>, world: &Communicator, observer: &mut dyn PipelineObserver) -> Result<()> {
        self.vae.decode_split(latents, world, &|z| self.vae.denormalize_latent(&z), &mut |frames| observer.on_frames(&to_unit(frames)))
    }

    /// [`decode_more`](Self::decode_more) split across `world`'s members, as
    /// [`decode_split`](Self::decode_split) is: the next latent frames of `stream`'s video. Every
    /// member keeps its own stream (its band's causal caches), started with
    /// [`start_decode`](Self::start_decode) and continued by this call alone, in the same world.
    pub fn decode_more_split(
        &self,
        stream: &mut FrameStream,
        latents: SplitLatent<'_>,
        world: &Communicator,
        observer: &mut dyn PipelineObserver,
    ) -> Result<()> {
        let denormalize = |z| self.vae.denormalize_latent(&z);
        self.vae.decode_more_split(&mut stream.0, latents, world, &denormalize, &mut |frames| observer.on_frames(&to_unit(frames)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{run_in_process, ParallelPlan};
    use crate::pipeline::{FrameCollector, PipelinePreset};
    use std::ops::Range;
    use tessera_kernels::Tensor;

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
                pipe.decode_split(SplitLatent::Lead(lead.then_some(&latents)), ctx.world(), &mut whole)?;
                let mut stream = pipe.start_decode();
                for part in [0..1, 1..3] {
                    let piece = latent_frames(&latents, part);
                    pipe.decode_more_split(&mut stream, SplitLatent::Lead(lead.then_some(&piece)), ctx.world(), &mut chunked)?;
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
            Ok(pipe.decode_split(SplitLatent::Lead(None), ctx.world(), &mut FrameCollector::default()).unwrap_err().to_string())
        })
        .unwrap();
        assert!(got.iter().all(|e| e.contains("no [B, C, T, H, W] latent")), "{got:?}");
    }
}
