//! A frame split into bands of rows across ranks, for the split decode and encode: each rank
//! computes its band of every frame. Its 3×3 convolutions (stride 1, or the encoder's stride-2
//! downsamplers) borrow the rows they reach across the band's edges from the neighbouring bands
//! (a halo exchange before each), and the middle block's attention,
//! which sees the whole frame, gathers the frame at the lowest resolution and runs on all of it
//! (a small part of the decode's work: every rank repeats it rather than attend for its own
//! queries, whose kernel tiles would then differ from the one-device run's and round apart).
//! Everything else in the VAE works per position or per column (norms over channels, 1×1
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

    /// `x` (this band's rows of every frame) with the last `above` rows of the band above on top
    /// and the first `below` rows of the band below underneath, and whether each neighbour exists
    /// (at the frame's own edges there is none, and the rows are the layer's zero padding). Every
    /// band lends its first `below` rows up and its last `above` rows down.
    pub(crate) fn with_halo<O: Ops>(&self, ops: &O, x: &Clip<O>, above: usize, below: usize) -> Result<(Clip<O>, [bool; 2])> {
        let (index, count) = (self.index(), self.count());
        if x.h < above.max(below) {
            return Err(WorkerError::input(
                "video",
                format!("a band of {} rows cannot lend its neighbours {}: too many ranks for the frame's height", x.h, above.max(below)),
            ));
        }
        let (has_above, has_below) = (index > 0, index + 1 < count);
        let mut parts = vec![Bytes::new(); count];
        if has_above && below > 0 {
            parts[index - 1] = f32_to_bytes(&x.rows(ops, 0, below)?.download(ops)?);
        }
        if has_below && above > 0 {
            parts[index + 1] = f32_to_bytes(&x.rows(ops, x.h - above, x.h)?.download(ops)?);
        }
        let got = self.comm.exchange_bytes(parts, Traffic::Halo)?;
        let lent = |from: usize, rows: usize| -> Result<Option<Clip<O>>> {
            if rows == 0 {
                return Ok(None);
            }
            let shape = [x.c, x.t, rows, x.w];
            let v = bytes_to_f32(&got[from])?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(WorkerError::Collective(format!("band {from} lent {} values for halo rows of shape {shape:?}", v.len())));
            }
            Clip::upload(ops, shape, v).map(Some)
        };
        let top = if has_above { lent(index - 1, above)? } else { None };
        let bottom = if has_below { lent(index + 1, below)? } else { None };
        let parts: Vec<&Clip<O>> = top.iter().chain([x]).chain(bottom.iter()).collect();
        Ok((Clip::concat_rows(ops, &parts)?, [has_above, has_below]))
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

    /// Each band gets its neighbours' edge rows, as many as asked on each side, and none at the
    /// frame's edges.
    #[test]
    fn halos_are_the_neighbours_edge_rows() {
        let (h, w) = (7, 2);
        let frame: Vec<f32> = (0..2 * h * w).map(|i| i as f32).collect();
        let whole = Clip::upload(&CpuOps, [2, 1, h, w], frame).unwrap();
        let got = run_in_process(ParallelPlan::new(3, 1, 1).unwrap(), |ctx| {
            let bands = Bands::new(ctx.world().subgroup((0..3).collect(), BANDS_GROUP)?);
            let r = Bands::rows(h, 3, bands.index());
            let band = whole.rows(&CpuOps, r.start, r.end)?;
            let (one, sides) = bands.with_halo(&CpuOps, &band, 1, 1)?;
            let (below, _) = bands.with_halo(&CpuOps, &band, 0, 1)?;
            Ok((r, one.buf, sides, below.buf))
        })
        .unwrap();
        for (r, one, sides, below) in got {
            let (top, bottom) = (r.start.saturating_sub(1), (r.end + 1).min(h));
            assert_eq!(one, whole.rows(&CpuOps, top, bottom).unwrap().buf, "band {r:?}");
            assert_eq!(sides, [r.start > 0, r.end < h]);
            assert_eq!(below, whole.rows(&CpuOps, r.start, bottom).unwrap().buf, "band {r:?}, the rows below only");
        }
    }
}
