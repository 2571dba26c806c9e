//! A frame split into bands of rows across ranks, for the split decode: each rank computes its
//! band of every frame. Its 3×3 convolutions borrow the rows they reach across the band's edges
//! from the neighbouring bands (a halo exchange before each), and the middle block's attention,
//! which sees the whole frame, gathers the frame at the lowest resolution and runs on all of it
//! (a small part of the decode's work: every rank repeats it rather than attend for its own
//! queries, whose kernel tiles would then differ from the one-device run's and round apart).
//! Everything else in the decoder works per position or per column (norms over channels, 1×1
//! and time convolutions, nearest upsampling, the causal frame caches), so a band's rows are the
//! one-device decode's rows, computed by the same kernels from the same inputs: bit for bit on
//! the CPU backends.

use super::clip::Clip;
use crate::parallel::{bytes_to_f32, f32_to_bytes, shard_ranges, Communicator, Traffic};
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::ops::Range;
use tessera_kernels::backend::Ops;

/// The subgroup id of the bands' communicator (the sequence-parallel groups take 1 to 4).
pub const BANDS_GROUP: u16 = 5;

/// The part of every frame the VAE's layers compute.
#[derive(Clone, Copy)]
pub(crate) enum Tile<'a> {
    /// The whole frame (one device).
    Whole,
    /// This rank's band of frames split by rows.
    Band(&'a Bands),
}

/// Frames split by rows over the members of a communicator, in member order, the top band first.
/// Every member calls the same layers in the same order, so their exchanges pair up.
pub struct Bands {
    comm: Communicator,
}

impl Bands {
    /// Bands over `comm`'s members (each must get at least one latent row: see [`Bands::rows`]).
    pub fn new(comm: Communicator) -> Self {
        Self { comm }
    }

    /// The rows of a frame `height` rows high that band `index` of `count` holds: contiguous,
    /// sizes differing by at most one, the first bands the larger.
    pub fn rows(height: usize, count: usize, index: usize) -> Range<usize> {
        shard_ranges(height, count).get(index).cloned().unwrap_or(0..0)
    }

    /// This band's place, top first.
    pub fn index(&self) -> usize {
        self.comm.rank()
    }

    /// Number of bands.
    pub fn count(&self) -> usize {
        self.comm.size()
    }

    /// `x` (this band's rows of every frame) with `rows` rows of the band above on top and of the
    /// band below underneath, and the zero padding still owed at the top and bottom: `rows` on a
    /// side with no neighbour (the frame's own edge), 0 where a neighbour's rows stand in for it.
    pub(crate) fn with_halo<O: Ops>(&self, ops: &O, x: &Clip<O>, rows: usize) -> Result<(Clip<O>, [usize; 2])> {
        let (index, count) = (self.index(), self.count());
        if x.h < rows {
            return Err(WorkerError::input(
                "decode",
                format!("a band of {} rows cannot lend its neighbours {rows}: too many ranks for the frame's height", x.h),
            ));
        }
        let (above, below) = (index > 0, index + 1 < count);
        let mut parts = vec![Bytes::new(); count];
        if above {
            parts[index - 1] = f32_to_bytes(&x.rows(ops, 0, rows)?.download(ops)?);
        }
        if below {
            parts[index + 1] = f32_to_bytes(&x.rows(ops, x.h - rows, x.h)?.download(ops)?);
        }
        let got = self.comm.exchange_bytes(parts, Traffic::Halo)?;
        let shape = [x.c, x.t, rows, x.w];
        let lent = |from: usize| -> Result<Clip<O>> {
            let v = bytes_to_f32(&got[from])?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(WorkerError::Collective(format!("band {from} lent {} values for halo rows of shape {shape:?}", v.len())));
            }
            Clip::upload(ops, shape, v)
        };
        let top = above.then(|| lent(index - 1)).transpose()?;
        let bottom = below.then(|| lent(index + 1)).transpose()?;
        let parts: Vec<&Clip<O>> = top.iter().chain([x]).chain(bottom.iter()).collect();
        let padding = [if above { 0 } else { rows }, if below { 0 } else { rows }];
        Ok((Clip::concat_rows(ops, &parts)?, padding))
    }

    /// The whole frames of which `x` is this band's rows (every band's rows, top band first), and
    /// where this band's rows lie in them. Counted as an all-gather.
    pub(crate) fn whole<O: Ops>(&self, ops: &O, x: &Clip<O>) -> Result<(Clip<O>, Range<usize>)> {
        let row = x.c * x.t * x.w;
        let got = self.comm.all_gather(&x.download(ops)?)?;
        let mut parts = Vec::with_capacity(got.len());
        let mut mine = 0..0;
        let mut top = 0;
        for (i, v) in got.into_iter().enumerate() {
            if row == 0 || !v.len().is_multiple_of(row) {
                return Err(WorkerError::Collective(format!("band {i} sent {} values, not rows of {} channels × {} frames × {}", v.len(), x.c, x.t, x.w)));
            }
            let h = v.len() / row;
            if i == self.index() {
                mine = top..top + h;
            }
            top += h;
            parts.push(Clip::upload(ops, [x.c, x.t, h, x.w], v)?);
        }
        Ok((Clip::concat_rows(ops, &parts.iter().collect::<Vec<_>>())?, mine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{run_in_process, ParallelPlan};
    use tessera_kernels::backend::CpuOps;

    #[test]
    fn bands_cover_the_frame_the_first_ones_larger() {
        let bands: Vec<_> = (0..3).map(|i| Bands::rows(8, 3, i)).collect();
        assert_eq!(bands, vec![0..3, 3..6, 6..8]);
        assert_eq!(Bands::rows(8, 3, 3), 0..0);
    }

    /// Each band gets its neighbours' edge rows, and zero padding only at the frame's edges.
    #[test]
    fn halos_are_the_neighbours_edge_rows() {
        let (h, w) = (7, 2);
        let frame: Vec<f32> = (0..2 * h * w).map(|i| i as f32).collect();
        let whole = Clip::upload(&CpuOps, [2, 1, h, w], frame).unwrap();
        let got = run_in_process(ParallelPlan::new(3, 1, 1).unwrap(), |ctx| {
            let bands = Bands::new(ctx.world().subgroup((0..3).collect(), BANDS_GROUP)?);
            let r = Bands::rows(h, 3, bands.index());
            let (ext, pad) = bands.with_halo(&CpuOps, &whole.rows(&CpuOps, r.start, r.end)?, 1)?;
            Ok((r, ext.buf, pad))
        })
        .unwrap();
        for (r, ext, pad) in got {
            let (top, bottom) = (r.start.saturating_sub(1), (r.end + 1).min(h));
            assert_eq!(ext, whole.rows(&CpuOps, top, bottom).unwrap().buf, "band {r:?}");
            assert_eq!(pad, [usize::from(r.start == 0), usize::from(r.end == h)]);
        }
    }
}
