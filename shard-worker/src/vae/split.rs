//! The VAE split across ranks by rows: the input is cut into bands, one per member (at most one
//! per latent row), every member runs its band ([`Bands`]), and the bands' outputs are joined.
//! Decode and encode give member 0 what one device gives; the other members get nothing back.
//! Where the input is decides what moves before the bands run ([`SplitLatent`]): member 0 holding
//! it scatters the bands; every member holding it (a job's input video, a diffusion-forcing
//! run's chunks) cuts its own band and nothing moves; a sequence-parallel run's latent, spread
//! over the members as patch rows, reaches the bands in one all-to-all, and no member ever holds
//! more of it than its band.

use super::band::{Bands, Tile, BANDS_GROUP};
use super::{VaeDecodeStream, VaeFamily, ENCODE_CHUNK};
use crate::on_backend::OnBackend;
use crate::parallel::{bytes_to_f32, f32_to_bytes, Communicator, Traffic};
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::ops::Range;
use tessera_kernels::cpu::PatchGeometry;
use tessera_kernels::Tensor;

/// The largest dimension a shape may have on the wire (shapes travel as f32 values, exact up to
/// 2²⁴).
const MAX_DIM: f32 = 16_777_216.0;

/// A split decode's latent `[B, C, T, h, w]`, as the members hold it.
#[derive(Clone, Copy)]
pub enum SplitLatent<'a> {
    /// Member 0 holds all of it (the others pass `Lead(None)`) and sends each band its rows.
    Lead(Option<&'a Tensor>),
    /// Every member holds all of it, the same values: each cuts its own band, and nothing moves.
    Held(&'a Tensor),
    /// Spread over the members as patch rows (a sequence-parallel run's latent, batch 1): one
    /// all-to-all sends each band its rows from every member that holds any.
    Patches(&'a PatchShard),
}

/// A member's share of a latent `[1, C, F, H, W]` laid out as patch rows (as
/// `tessera_kernels::cpu::patchify` lays them out), and where every member's share lies.
#[derive(Clone, Debug)]
pub struct PatchShard {
    /// The latent's patch geometry.
    pub geometry: PatchGeometry,
    /// Every member's tokens, in member order: contiguous ranges, ascending with the members,
    /// that together hold every token once (a member holding none has an empty range).
    pub tokens: Vec<Range<usize>>,
    /// This member's rows: its tokens' features, token after token.
    pub rows: Vec<f32>,
}

impl OnBackend<VaeFamily> {
    /// [`decode_with`](Self::decode_with) split across `world`'s members: every member calls it
    /// with its part of the latents `[B, z_dim, T, h, w]` ([`SplitLatent`]). Each band's latent
    /// goes through `map` before it decodes (the identity, `&Ok`, for a de-normalised latent; the
    /// pipeline's de-normalisation, which works per element, so that mapping a band gives the
    /// rows of mapping the whole). Member 0's `on_frames` gets the pieces of video, clamped to
    /// [−1, 1], as they are joined; the others' get none.
    pub fn decode_split(
        &self,
        latents: SplitLatent<'_>,
        world: &Communicator,
        map: &dyn Fn(Tensor) -> Result<Tensor>,
        on_frames: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let shape = split_shape(latents, world)?;
        let mut stream = self.start_decode(shape[0]);
        self.decode_bands(&mut stream, latents, shape, world, map, on_frames)
    }

    /// [`decode_more`](Self::decode_more) split across `world`'s members as
    /// [`decode_split`](Self::decode_split) is. Every member keeps its own stream (its band's
    /// causal caches), continued by this call alone, in the same world.
    pub fn decode_more_split(
        &self,
        stream: &mut VaeDecodeStream,
        latents: SplitLatent<'_>,
        world: &Communicator,
        map: &dyn Fn(Tensor) -> Result<Tensor>,
        on_frames: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let shape = split_shape(latents, world)?;
        self.decode_bands(stream, latents, shape, world, map, on_frames)
    }

    fn decode_bands(
        &self,
        stream: &mut VaeDecodeStream,
        latents: SplitLatent<'_>,
        shape: [usize; 5],
        world: &Communicator,
        map: &dyn Fn(Tensor) -> Result<Tensor>,
        on_frames: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let [batch, channels, frames, height, width] = shape;
        let bands = bands(world, height);
        let sf = self.config().spatial_factor();
        let heights: Vec<usize> = bands.iter().filter(|r| !r.is_empty()).map(|r| r.len() * sf).collect();
        let mine = match latents {
            SplitLatent::Lead(x) => scatter_rows(x, world, &bands)?,
            SplitLatent::Held(x) => rows_of(x, bands[world.rank()].clone()),
            SplitLatent::Patches(shard) => band_from_patches(shard, world, &bands)?,
        };
        let mut join = |piece: Option<&Tensor>| -> Result<()> {
            match join_rows(world, &heights, piece)? {
                Some(frames) => on_frames(frames),
                None => Ok(()),
            }
        };
        let rows = &bands[world.rank()];
        if rows.is_empty() {
            // One piece of frames per latent frame, as the bands decode them.
            return (0..frames).try_for_each(|_| join(None));
        }
        let z = map(Tensor::new([batch, channels, frames, rows.len(), width], mine)?)?;
        let group = Bands::new(world.subgroup((0..heights.len()).collect(), BANDS_GROUP)?);
        self.decode_band(stream, &z, &group, &mut |piece| join(Some(&piece)))
    }

    /// [`encode`](Self::encode) split across `world`'s members: member 0 passes the video
    /// `[B, in_channels, F, H, W]`, the others `None`; every member calls it. Member 0 gets the
    /// mean and log-variance, the others `None`.
    pub fn encode_split(&self, video: Option<&Tensor>, world: &Communicator) -> Result<Option<(Tensor, Tensor)>> {
        let shape = shared_shape(video, world, "video")?;
        let plan = self.encode_plan(shape, world)?;
        let mine = scatter_rows(video, world, &plan.pixels)?;
        let encoded = self.encode_mine(mine, shape, &plan, world)?;
        let mean = join_rows(world, &plan.heights, encoded.as_ref().map(|e| &e.0))?;
        let logvar = join_rows(world, &plan.heights, encoded.as_ref().map(|e| &e.1))?;
        Ok(mean.zip(logvar))
    }

    /// [`encode`](Self::encode) split across `world`'s members when every member holds the same
    /// `video` (a job's input, sent to every rank): each encodes its band's rows, nothing is
    /// scattered, and every member gets the whole mean and log-variance.
    pub fn encode_split_held(&self, video: &Tensor, world: &Communicator) -> Result<(Tensor, Tensor)> {
        let shape: [usize; 5] =
            video.shape().try_into().map_err(|_| WorkerError::input("video", format!("expected [B, C, F, H, W], got {:?}", video.shape())))?;
        let plan = self.encode_plan(shape, world)?;
        let mine = rows_of(video, plan.pixels[world.rank()].clone());
        let encoded = self.encode_mine(mine, shape, &plan, world)?;
        let [batch, _, frames, _, width] = shape;
        let lead = [batch, self.config().z_dim, (frames - 1) / ENCODE_CHUNK + 1];
        let width = width / self.config().spatial_factor();
        let mean = join_everywhere(world, &plan.heights, encoded.as_ref().map(|e| &e.0), lead, width)?;
        let logvar = join_everywhere(world, &plan.heights, encoded.as_ref().map(|e| &e.1), lead, width)?;
        Ok((mean, logvar))
    }

    /// The bands of a split encode of a video of `shape` (checked on every member before any band
    /// runs, so that none waits on a refused one).
    fn encode_plan(&self, shape: [usize; 5], world: &Communicator) -> Result<EncodePlan> {
        let [_, _, frames, height, width] = shape;
        let sf = self.config().spatial_factor();
        if frames == 0 || !(frames - 1).is_multiple_of(ENCODE_CHUNK) || height == 0 || width == 0 || !height.is_multiple_of(sf) || !width.is_multiple_of(sf) {
            return Err(WorkerError::input(
                "video",
                format!("{frames} frames of {height}x{width}: the encoder takes 1 + {ENCODE_CHUNK}k frames, sides multiples of {sf}"),
            ));
        }
        let latent = bands(world, height / sf);
        Ok(EncodePlan {
            pixels: latent.iter().map(|r| r.start * sf..r.end * sf).collect(),
            heights: latent.iter().filter(|r| !r.is_empty()).map(Range::len).collect(),
        })
    }

    /// This member's band `mine` (its rows of every plane of a video of `shape`) encoded, or
    /// `None` without a band.
    fn encode_mine(&self, mine: Vec<f32>, shape: [usize; 5], plan: &EncodePlan, world: &Communicator) -> Result<Option<(Tensor, Tensor)>> {
        let rows = &plan.pixels[world.rank()];
        if rows.is_empty() {
            return Ok(None);
        }
        let [batch, channels, frames, _, width] = shape;
        let group = Bands::new(world.subgroup((0..plan.heights.len()).collect(), BANDS_GROUP)?);
        let band = Tensor::new([batch, channels, frames, rows.len(), width], mine)?;
        Ok(Some(self.encode_tile(&band, Tile::Band(&group))?))
    }
}

/// The bands of a split encode: each member's pixel rows, and the latent rows of each band that
/// has any.
struct EncodePlan {
    pixels: Vec<Range<usize>>,
    heights: Vec<usize>,
}

/// Each member's rows of a frame `height` rows high: one band per member, at most one per row
/// (members past that get none).
fn bands(world: &Communicator, height: usize) -> Vec<Range<usize>> {
    let count = world.size().min(height);
    (0..world.size()).map(|i| if i < count { Bands::rows(height, count, i) } else { 0..0 }).collect()
}

/// The shape `[B, C, T, H, W]` of a split decode's latent, the same on every member.
fn split_shape(latents: SplitLatent<'_>, world: &Communicator) -> Result<[usize; 5]> {
    match latents {
        SplitLatent::Lead(x) => shared_shape(x, world, "latent"),
        SplitLatent::Held(x) => x.shape().try_into().map_err(|_| WorkerError::input("latent", format!("expected [B, C, T, h, w], got {:?}", x.shape()))),
        SplitLatent::Patches(p) => {
            let [f, h, w] = p.geometry.latent_fhw();
            Ok([1, p.geometry.channels, f, h, w])
        }
    }
}

/// Member 0's `[B, C, T, H, W]` shape on every member (an error on all if member 0 has none).
fn shared_shape(x: Option<&Tensor>, world: &Communicator, what: &'static str) -> Result<[usize; 5]> {
    let mine: Vec<f32> = match x {
        Some(t) if t.shape().len() == 5 && t.shape().iter().all(|&d| (d as f32) < MAX_DIM) => t.shape().iter().map(|&d| d as f32).collect(),
        _ => vec![0.0; 5],
    };
    let got = world.broadcast(0, if world.rank() == 0 { &mine } else { &[] })?;
    match got[..] {
        [b, c, t, h, w] if got.iter().all(|&d| (1.0..MAX_DIM).contains(&d) && d.fract() == 0.0) => Ok([b, c, t, h, w].map(|d| d as usize)),
        _ => Err(WorkerError::input(what, format!("member 0 has no [B, C, T, H, W] {what} to split (shape {got:?})"))),
    }
}

/// Member 0 sends each member its `bands` rows of every plane of `x`; returns this member's.
fn scatter_rows(x: Option<&Tensor>, world: &Communicator, bands: &[Range<usize>]) -> Result<Vec<f32>> {
    let parts = match x {
        Some(x) if world.rank() == 0 => bands.iter().map(|r| rows_of(x, r.clone())).collect(),
        _ => vec![Vec::new(); world.size()],
    };
    Ok(world.all_to_all(parts)?.swap_remove(0))
}

/// This member's band (`bands[rank]`'s rows of every plane of the latent `[1, C, F, H, W]`) from
/// the members' patch rows: each sends every band what it holds of it, in one all-to-all.
fn band_from_patches(shard: &PatchShard, world: &Communicator, bands: &[Range<usize>]) -> Result<Vec<f32>> {
    let g = &shard.geometry;
    let tokens = &shard.tokens;
    let covered = tokens.iter().filter(|r| !r.is_empty()).try_fold(0, |next, r| (r.start == next).then_some(r.end));
    if tokens.len() != world.size() || covered != Some(g.tokens()) {
        return Err(WorkerError::input(
            "latent",
            format!("tokens {tokens:?} of {} members do not hold the {} tokens of {g:?} once each", world.size(), g.tokens()),
        ));
    }
    let own = tokens[world.rank()].clone();
    if shard.rows.len() != own.len() * g.features() {
        return Err(WorkerError::input("latent", format!("{} values for tokens {own:?} of {} features", shard.rows.len(), g.features())));
    }
    let parts = bands
        .iter()
        .map(|band| {
            let mut part = Vec::new();
            patch_runs(g, band.clone(), own.clone(), |_, src, len| part.extend_from_slice(&shard.rows[src..src + len]));
            part
        })
        .collect();
    let got = world.all_to_all(parts)?;
    let band = bands[world.rank()].clone();
    let [f, _, w] = g.latent_fhw();
    let mut out = vec![0.0f32; g.channels * f * band.len() * w];
    for (member, (part, from)) in got.iter().zip(tokens).enumerate() {
        let mut at = 0;
        let mut fits = true;
        patch_runs(g, band.clone(), from.clone(), |dst, _, len| {
            fits &= at + len <= part.len();
            if fits {
                out[dst..dst + len].copy_from_slice(&part[at..at + len]);
                at += len;
            }
        });
        if !fits || at != part.len() {
            return Err(WorkerError::Collective(format!(
                "member {member} sent {} values of band {band:?}; its tokens {from:?} hold a different number",
                part.len()
            )));
        }
    }
    Ok(out)
}

/// Walks the values that tokens `tokens` hold of latent rows `band`, in the band's order
/// (channel, frame, row, column of `[C, F, band, W]`): `run(index in the band, index in the
/// tokens' patch rows, length)` for each run of a patch's row (p_w values, contiguous in both).
/// Sender and receiver walk alike, so the sent values arrive in the order they are placed.
fn patch_runs(g: &PatchGeometry, band: Range<usize>, tokens: Range<usize>, mut run: impl FnMut(usize, usize, usize)) {
    if tokens.is_empty() || band.is_empty() {
        return;
    }
    let [_, gh, gw] = g.grid;
    let [pt, ph, pw] = g.patch;
    let [fl, _, wl] = g.latent_fhw();
    let feat = g.features();
    let mut dst = 0;
    for c in 0..g.channels {
        for z in 0..fl {
            for y in band.clone() {
                // Tokens of this latent row: one patch row (h) of one patch frame (f), gw of them.
                let first = ((z / pt) * gh + y / ph) * gw;
                let (lo, hi) = (tokens.start.max(first), tokens.end.min(first + gw));
                let offset = ((c * pt + z % pt) * ph + y % ph) * pw;
                for s in lo..hi {
                    run(dst + (s - first) * pw, (s - tokens.start) * feat + offset, pw);
                }
                dst += wl;
            }
        }
    }
}

/// Every member's `piece` `[B, C, n, heights[i], W]` (`None` from members without a band) to
/// member 0, which returns them joined top to bottom; the others get `None`.
fn join_rows(world: &Communicator, heights: &[usize], piece: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut parts = vec![Bytes::new(); world.size()];
    parts[0] = piece.map(|p| f32_to_bytes(p.data())).unwrap_or_default();
    let got = world.exchange_bytes(parts, Traffic::Gather)?;
    if world.rank() != 0 {
        return Ok(None);
    }
    let own = piece.ok_or_else(|| WorkerError::Collective("member 0 has no band".into()))?;
    let s = own.shape();
    let parts = got.iter().take(heights.len()).map(|b| bytes_to_f32(b)).collect::<Result<Vec<_>>>()?;
    join_parts(&parts, [s[0], s[1], s[2]], heights, s[4]).map(Some)
}

/// Every member's `piece` `[lead…, heights[i], width]` (`None` from members without a band) on
/// every member, joined top to bottom. Counted as an all-gather.
fn join_everywhere(world: &Communicator, heights: &[usize], piece: Option<&Tensor>, lead: [usize; 3], width: usize) -> Result<Tensor> {
    let parts = world.all_gather(piece.map_or(&[][..], |p| p.data()))?;
    join_parts(&parts[..heights.len().min(parts.len())], lead, heights, width)
}

/// The bands' `parts`, each `[lead…, heights[i], width]`, joined top to bottom.
fn join_parts(parts: &[Vec<f32>], lead: [usize; 3], heights: &[usize], width: usize) -> Result<Tensor> {
    let planes = lead.iter().product::<usize>();
    for (i, (b, h)) in parts.iter().zip(heights).enumerate() {
        if b.len() != planes * h * width {
            return Err(WorkerError::Collective(format!("band {i} sent {} values for {planes} planes of {h}x{width}", b.len())));
        }
    }
    let height: usize = heights.iter().sum();
    let mut data = Vec::with_capacity(planes * height * width);
    for p in 0..planes {
        for (b, h) in parts.iter().zip(heights) {
            data.extend_from_slice(&b[p * h * width..(p + 1) * h * width]);
        }
    }
    Ok(Tensor::new([lead[0], lead[1], lead[2], height, width], data)?)
}

/// Rows `rows` of every plane of a `[B, C, T, H, W]` tensor, plane after plane.
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
    use crate::parallel::{run_in_process, shard_ranges, ParallelPlan};
    use crate::vae::{VaePreset, WanVae};
    use tessera_kernels::cpu;

    /// The pieces of video a split decode of `latents` gives this member.
    fn decoded_pieces(vae: &WanVae, latents: SplitLatent<'_>, world: &Communicator) -> Result<Vec<Tensor>> {
        let mut pieces = Vec::new();
        vae.decode_split(latents, world, &Ok, &mut |p| {
            pieces.push(p);
            Ok(())
        })?;
        Ok(pieces)
    }

    fn ramp(shape: [usize; 5], seed: usize) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::new(shape, (0..n).map(|i| (((i + seed) * 7919 % 211) as f32 / 105.0) - 1.0).collect()).unwrap()
    }

    /// Over 2, 3 and 5 ranks (5 is more than the latent's 4 rows: one only joins the exchanges),
    /// the split encode gives member 0 the one-device mean and log-variance bit for bit (every
    /// member too when each holds the video), and the split decode of them the one-device video.
    #[test]
    fn split_encode_and_decode_give_the_one_device_results_bit_for_bit() {
        let vae = WanVae::preset(VaePreset::Tiny, 3).unwrap();
        let video = ramp([1, 3, 5, 32, 24], 1);
        let (mean, logvar) = vae.encode(&video).unwrap();
        let decoded = vae.decode(&mean).unwrap();
        for ranks in [2, 3, 5] {
            let got = run_in_process(ParallelPlan::new(ranks, 1, 1).unwrap(), |ctx| {
                let lead = ctx.rank() == 0;
                let encoded = vae.encode_split(lead.then_some(&video), ctx.world())?;
                let (held_mean, held_logvar) = vae.encode_split_held(&video, ctx.world())?;
                assert!(held_mean.data() == mean.data() && held_logvar.data() == logvar.data(), "{ranks} ranks: encoded where every member holds the video");
                let pieces = decoded_pieces(&vae, SplitLatent::Lead(encoded.as_ref().map(|e| &e.0)), ctx.world())?;
                assert_eq!(encoded.is_some(), lead);
                Ok(encoded.map(|e| (e, pieces)))
            })
            .unwrap();
            let ((m, l), pieces) = got.into_iter().next().flatten().unwrap();
            assert!(m.shape() == mean.shape() && m.data() == mean.data(), "{ranks} ranks: mean");
            assert!(l.data() == logvar.data(), "{ranks} ranks: log-variance");
            assert_eq!(pieces.len(), mean.dim(2), "one piece per latent frame");
            let joined = crate::pipeline::concat_time(&pieces).unwrap();
            assert!(joined.shape() == decoded.shape() && joined.data() == decoded.data(), "{ranks} ranks: decoded video");
        }
    }

    /// A latent held by every member, or spread over them as patch rows (patches of 1×2×2 rows
    /// that band edges cut through, token ranges that end mid-row, members that hold no tokens
    /// as a second CFG half holds none, more members than rows), decodes split to the one-device
    /// video bit for bit. From patch rows, the all-to-all moves exactly the values that a member
    /// holds of another member's band, counted here element by element.
    #[test]
    fn held_and_patch_row_latents_decode_to_the_one_device_video() {
        let vae = WanVae::preset(VaePreset::Tiny, 3).unwrap();
        let z = vae.config().z_dim;
        let latent = ramp([1, z, 3, 6, 4], 2);
        let want = vae.decode(&latent).unwrap();
        let g = PatchGeometry { channels: z, grid: [3, 3, 2], patch: [1, 2, 2] };
        let all_rows = cpu::patchify(latent.data(), &g, 0..g.tokens()).unwrap();
        for (members, holders) in [(2, 2), (3, 3), (4, 2), (4, 4), (7, 3), (8, 8)] {
            let mut tokens = shard_ranges(g.tokens(), holders);
            tokens.resize(members, 0..0);
            let band_of: Vec<Range<usize>> = (0..members).map(|i| Bands::rows(6, members.min(6), i)).collect();
            // Values whose token's holder is not the member whose band holds their row.
            let mut crossing = 0u64;
            for zc in 0..z * 3 {
                for y in 0..6 {
                    for x in 0..4 {
                        let s = ((zc % 3) * 3 + y / 2) * 2 + x / 2;
                        let holder = tokens.iter().position(|r| r.contains(&s)).unwrap();
                        let band = band_of.iter().position(|r| r.contains(&y)).unwrap();
                        crossing += u64::from(holder != band);
                    }
                }
            }
            let got = run_in_process(ParallelPlan::new(members, 1, 1).unwrap(), |ctx| {
                let own = tokens[ctx.rank()].clone();
                let rows = all_rows[own.start * g.features()..own.end * g.features()].to_vec();
                let shard = PatchShard { geometry: g, tokens: tokens.clone(), rows };
                let before = ctx.world().stats().all_to_all;
                let frames = decoded_pieces(&vae, SplitLatent::Patches(&shard), ctx.world())?;
                let moved = ctx.world().stats().all_to_all - before;
                let held = decoded_pieces(&vae, SplitLatent::Held(&latent), ctx.world())?;
                Ok((frames, held, moved))
            })
            .unwrap();
            assert_eq!(got.iter().map(|g| g.2).sum::<u64>(), crossing * 4, "{members} members: bytes of the all-to-all");
            for (rank, (frames, held, _)) in got.into_iter().enumerate() {
                if rank > 0 {
                    assert!(frames.is_empty() && held.is_empty(), "member {rank} got frames");
                    continue;
                }
                for (how, pieces) in [("patch rows", frames), ("held", held)] {
                    let joined = crate::pipeline::concat_time(&pieces).unwrap();
                    assert!(joined.shape() == want.shape() && joined.data() == want.data(), "{members} members, {how}: decoded video");
                }
            }
        }
    }

    /// Patch rows that do not hold every token once, or not as many values as their tokens,
    /// are refused before anything moves.
    #[test]
    fn patch_rows_that_do_not_cover_the_latent_are_refused() {
        let vae = WanVae::preset(VaePreset::Tiny, 3).unwrap();
        let z = vae.config().z_dim;
        let g = PatchGeometry { channels: z, grid: [1, 2, 2], patch: [1, 2, 2] };
        for (tokens, values) in [(vec![0..2, 3..4], 2), (vec![0..2, 1..4], 2), (vec![2..4, 0..2], 2), (vec![0..2, 2..4], 1)] {
            let errors = run_in_process(ParallelPlan::new(2, 1, 1).unwrap(), |ctx| {
                let rows = vec![0.0; tokens[ctx.rank()].len().min(values) * g.features()];
                let shard = PatchShard { geometry: g, tokens: tokens.clone(), rows };
                let err = vae.decode_split(SplitLatent::Patches(&shard), ctx.world(), &Ok, &mut |_| Ok(())).unwrap_err();
                Ok(err.to_string())
            })
            .unwrap();
            assert!(errors.iter().all(|e| e.contains("latent")), "{tokens:?}: {errors:?}");
        }
    }
}
