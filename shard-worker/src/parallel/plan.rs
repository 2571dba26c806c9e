//! How a job's token sequence is split over ranks: contiguous ranges of the flattened
//! (frame, row, column) sequence, and the Ulysses × ring layout of the ranks.

use crate::{Result, WorkerError};
use std::ops::Range;

/// Splits `total` tokens into `parts` contiguous ranges whose sizes differ by at most one
/// (the first `total % parts` ranges get the extra token). No padding: ranges may be empty
/// when there are fewer tokens than parts.
pub fn shard_ranges(total: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Degrees of sequence parallelism: `ulysses × ring` ranks. Rank `r` sits in Ulysses group
/// `r / ulysses` (consecutive ranks, e.g. one NVLink domain) and ring group `r % ulysses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelPlan {
    /// All-to-all (head-sharding) degree; must divide the head count.
    pub ulysses: usize,
    /// Ring degree.
    pub ring: usize,
}

impl ParallelPlan {
    /// Ring-only over `ranks` when `ulysses` is 1; otherwise `ranks / ulysses` ring steps.
    pub fn new(ranks: usize, ulysses: usize, heads: usize) -> Result<Self> {
        let bad = |detail: String| WorkerError::input("parallel plan", detail);
        if ranks == 0 || ulysses == 0 {
            return Err(bad(format!("ranks ({ranks}) and ulysses degree ({ulysses}) must be positive")));
        }
        if !ranks.is_multiple_of(ulysses) {
            return Err(bad(format!("ulysses degree {ulysses} does not divide the {ranks} ranks")));
        }
        if !heads.is_multiple_of(ulysses) {
            return Err(bad(format!("ulysses degree {ulysses} does not divide the model's {heads} attention heads")));
        }
        Ok(Self { ulysses, ring: ranks / ulysses })
    }

    /// Total ranks.
    pub fn ranks(&self) -> usize {
        self.ulysses * self.ring
    }

    /// Global ranks of `rank`'s Ulysses group.
    pub fn ulysses_group(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.ulysses * self.ulysses;
        (first..first + self.ulysses).collect()
    }

    /// Global ranks of `rank`'s ring group.
    pub fn ring_group(&self, rank: usize) -> Vec<usize> {
        (0..self.ring).map(|j| rank % self.ulysses + j * self.ulysses).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_without_padding() {
        for total in [0, 1, 7, 75, 1950] {
            for parts in 1..=8 {
                let r = shard_ranges(total, parts);
                assert_eq!(r.len(), parts);
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, total);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                let (min, max) = (r.iter().map(|x| x.len()).min().unwrap(), r.iter().map(|x| x.len()).max().unwrap());
                assert!(max - min <= 1);
            }
        }
    }

    #[test]
    fn plan_groups_and_errors() {
        let p = ParallelPlan::new(4, 2, 12).unwrap();
        assert_eq!(p.ring, 2);
        assert_eq!(p.ulysses_group(3), vec![2, 3]);
        assert_eq!(p.ring_group(3), vec![1, 3]);
        let e = ParallelPlan::new(3, 3, 2).unwrap_err().to_string();
        assert!(e.contains("does not divide the model's 2 attention heads"), "{e}");
        assert!(ParallelPlan::new(4, 3, 12).is_err());
    }
}
