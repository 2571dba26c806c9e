//! How a job's token sequence is split over ranks: contiguous ranges of the flattened
//! (frame, row, column) sequence (even, or balanced for the work a causal mask leaves each ring
//! member), and the Ulysses × ring layout of the ranks.

use crate::model::Visibility;
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

/// How a group's ranks share a job: `cfg` halves (CFG-parallel: the conditional and the
/// unconditional pass of guidance on different ranks, 1 or 2), each a sequence-parallel group of
/// `ulysses × ring` ranks. Half `h` is ranks `h·sp .. (h+1)·sp` (sp = ulysses × ring); inside it,
/// sequence rank `q` sits in Ulysses group `q / ulysses` (consecutive ranks, e.g. one NVLink
/// domain) and ring group `q % ulysses`. Rank `q` of each half holds the same tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelPlan {
    /// CFG-parallel degree: 1, or 2 (each half runs one guidance branch).
    pub cfg: usize,
    /// All-to-all (head-sharding) degree; must divide the head count.
    pub ulysses: usize,
    /// Ring degree.
    pub ring: usize,
}

impl ParallelPlan {
    /// Ring-only over `ranks` when `ulysses` is 1; otherwise `ranks / ulysses` ring steps.
    pub fn new(ranks: usize, ulysses: usize, heads: usize) -> Result<Self> {
        Self::with_cfg(ranks, ulysses, 1, heads)
    }

    /// `ranks` split into `cfg` halves (1 or 2), each of Ulysses degree `ulysses` and the rest ring.
    pub fn with_cfg(ranks: usize, ulysses: usize, cfg: usize, heads: usize) -> Result<Self> {
        let bad = |detail: String| WorkerError::input("parallel plan", detail);
        if ranks == 0 || ulysses == 0 {
            return Err(bad(format!("ranks ({ranks}) and ulysses degree ({ulysses}) must be positive")));
        }
        if !(1..=2).contains(&cfg) || !ranks.is_multiple_of(cfg) {
            return Err(bad(format!("cfg-parallel degree {cfg}: 1, or 2 with an even number of ranks ({ranks})")));
        }
        let sp = ranks / cfg;
        if !sp.is_multiple_of(ulysses) {
            return Err(bad(format!("ulysses degree {ulysses} does not divide the {sp} ranks of a sequence-parallel group")));
        }
        if !heads.is_multiple_of(ulysses) {
            return Err(bad(format!("ulysses degree {ulysses} does not divide the model's {heads} attention heads")));
        }
        Ok(Self { cfg, ulysses, ring: sp / ulysses })
    }

    /// Total ranks.
    pub fn ranks(&self) -> usize {
        self.cfg * self.sequence_ranks()
    }

    /// Ranks of one sequence-parallel group (a CFG half): `ulysses × ring`.
    pub fn sequence_ranks(&self) -> usize {
        self.ulysses * self.ring
    }

    /// The plan of one CFG half on its own (its ranks numbered from 0): what the sequence-parallel
    /// attention of a half runs.
    pub fn sequence_plan(&self) -> ParallelPlan {
        ParallelPlan { cfg: 1, ..*self }
    }

    /// The CFG half `rank` is in (0: the conditional pass).
    pub fn half(&self, rank: usize) -> usize {
        rank / self.sequence_ranks()
    }

    /// `rank`'s place in its sequence-parallel group (its share of the tokens).
    pub fn sequence_rank(&self, rank: usize) -> usize {
        rank % self.sequence_ranks()
    }

    /// Global ranks of `rank`'s sequence-parallel group.
    pub fn sequence_group(&self, rank: usize) -> Vec<usize> {
        let first = self.half(rank) * self.sequence_ranks();
        (first..first + self.sequence_ranks()).collect()
    }

    /// Global ranks of `rank`'s Ulysses group.
    pub fn ulysses_group(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.ulysses * self.ulysses;
        (first..first + self.ulysses).collect()
    }

    /// Global ranks of `rank`'s ring group.
    pub fn ring_group(&self, rank: usize) -> Vec<usize> {
        let first = self.half(rank) * self.sequence_ranks();
        (0..self.ring).map(|j| first + self.sequence_rank(rank) % self.ulysses + j * self.ulysses).collect()
    }

    /// Global ranks of `rank`'s CFG pair (the ranks of every half holding its tokens).
    pub fn cfg_group(&self, rank: usize) -> Vec<usize> {
        (0..self.cfg).map(|h| h * self.sequence_ranks() + self.sequence_rank(rank)).collect()
    }
}

/// What one query token costs: `token` multiply-adds whatever it sees (the linear layers) and
/// `key` per key it sees (attention).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenCost {
    /// Per token (the linear layers: [`TransformerConfig::token_weights`](tessera_cluster::TransformerConfig::token_weights)).
    pub token: f64,
    /// Per visible key ([`TransformerConfig::key_weights`](tessera_cluster::TransformerConfig::key_weights)).
    pub key: f64,
}

/// The cut of `total` tokens over the ranks of the sequence-parallel `plan` when queries see
/// `visibility`'s keys. With full attention, or one ring member, the even cut ([`shard_ranges`]).
/// Under a causal mask a ring member's attention grows with where its queries sit (its first
/// queries see a short prefix, the last member's see everything), so contiguous spans of equal
/// `cost` go to the ring members — longer spans early, shorter late — and each span is split
/// evenly among its Ulysses group, whose all-to-all shares the span's attention by heads. Every
/// rank computes the same cut; spans are never empty while there are tokens enough.
pub fn balanced_ranges(total: usize, plan: ParallelPlan, visibility: Visibility, cost: TokenCost) -> Vec<Range<usize>> {
    let (ranks, ring, u) = (plan.sequence_ranks(), plan.ring, plan.ulysses.max(1));
    if matches!(visibility, Visibility::Full) || ring <= 1 || total < ranks {
        return shard_ranges(total, ranks);
    }
    let work = |q: usize| cost.token + cost.key * visibility.visible_end(q).min(total) as f64;
    let whole: f64 = (0..total).map(work).sum();
    // Cut after the token where the running work first reaches each member's share.
    let mut cuts = Vec::with_capacity(ring + 1);
    cuts.push(0);
    let (mut done, mut next) = (0.0, 1);
    for q in 0..total {
        done += work(q);
        if next < ring && done >= whole * next as f64 / ring as f64 {
            cuts.push(q + 1);
            next += 1;
        }
    }
    cuts.resize(ring, total);
    cuts.push(total);
    // Every member keeps at least its Ulysses group's tokens (one each).
    for k in 1..ring {
        cuts[k] = cuts[k].max(cuts[k - 1] + u).min(total - (ring - k) * u);
    }
    cuts.windows(2).flat_map(|span| shard_ranges(span[1] - span[0], u).into_iter().map(move |r| span[0] + r.start..span[0] + r.end)).collect()
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

    /// Each ring member's work (linear layers per token, attention per visible key) under `cut`.
    fn member_work(cut: &[Range<usize>], plan: ParallelPlan, visibility: Visibility, cost: TokenCost, total: usize) -> Vec<f64> {
        cut.chunks(plan.ulysses)
            .map(|group| (group[0].start..group[group.len() - 1].end).map(|q| cost.token + cost.key * visibility.visible_end(q).min(total) as f64).sum())
            .collect()
    }

    /// A SkyReels-V2-DF-14B chunk at 720p in its asynchronous setting: 25 latent frames of 45 × 80
    /// tokens in causal blocks of 5 frames. Cut evenly over a ring of 8, the last member does
    /// most of the attention; the balanced cut gives every ring member the same work to within
    /// a token's, with USP's Ulysses groups split evenly inside. Full attention keeps the even cut.
    #[test]
    fn a_causal_mask_is_balanced_over_the_ring() {
        let (d, ffn) = (5120.0, 13824.0);
        let cost = TokenCost { token: 6.0 * d * d + 2.0 * d * ffn, key: 2.0 * d };
        let (frame, total) = (45 * 80, 25 * 45 * 80);
        let causal = Visibility::BlockCausal { block: 5 * frame };
        for (ranks, ulysses) in [(8, 1), (8, 2), (4, 1), (3, 1)] {
            let plan = ParallelPlan::new(ranks, ulysses, 40).unwrap();
            let cut = balanced_ranges(total, plan, causal, cost);
            assert_eq!((cut.len(), cut[0].start, cut[ranks - 1].end), (ranks, 0, total));
            assert!(cut.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
            for group in cut.chunks(ulysses) {
                let (min, max) = (group.iter().map(|r| r.len()).min().unwrap(), group.iter().map(|r| r.len()).max().unwrap());
                assert!(max - min <= 1, "a Ulysses group splits its span evenly: {group:?}");
            }
            let ratio = |w: Vec<f64>| w.iter().cloned().fold(0.0, f64::max) / (w.iter().sum::<f64>() / w.len() as f64);
            let (even, balanced) =
                (ratio(member_work(&shard_ranges(total, ranks), plan, causal, cost, total)), ratio(member_work(&cut, plan, causal, cost, total)));
            eprintln!("{ranks} ranks (ulysses {ulysses}): busiest ring member / mean: even cut {even:.3}, balanced {balanced:.4}");
            assert!(balanced < 1.001, "{balanced}");
            assert!(even > 1.1, "the even cut is unbalanced under the mask: {even}");
        }
        let plan = ParallelPlan::new(8, 1, 40).unwrap();
        assert_eq!(balanced_ranges(total, plan, Visibility::Full, cost), shard_ranges(total, 8));
        // Fewer tokens than ranks: the even cut (some ranks hold none).
        assert_eq!(balanced_ranges(5, plan, causal, cost), shard_ranges(5, 8));
        // Tiny and lopsided: still every member holds a token.
        let cut = balanced_ranges(9, ParallelPlan::new(4, 1, 40).unwrap(), Visibility::BlockCausal { block: 3 }, cost);
        assert!(cut.iter().all(|r| !r.is_empty()) && cut[3].end == 9, "{cut:?}");
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
        assert_eq!((p.cfg, p.sequence_group(3), p.cfg_group(3)), (1, vec![0, 1, 2, 3], vec![3]));
    }

    /// Two CFG halves of 2 × 2: each half is its own Ulysses and ring groups; rank q of each half
    /// pairs with rank q of the other.
    #[test]
    fn cfg_halves_hold_their_own_groups() {
        let p = ParallelPlan::with_cfg(8, 2, 2, 12).unwrap();
        assert_eq!((p.ranks(), p.sequence_ranks(), p.ring), (8, 4, 2));
        assert_eq!((p.half(5), p.sequence_rank(5)), (1, 1));
        assert_eq!(p.sequence_group(5), vec![4, 5, 6, 7]);
        assert_eq!(p.ulysses_group(5), vec![4, 5]);
        assert_eq!(p.ring_group(5), vec![5, 7]);
        assert_eq!(p.ring_group(2), vec![0, 2]);
        assert_eq!(p.cfg_group(5), vec![1, 5]);
        assert!(ParallelPlan::with_cfg(3, 1, 2, 12).is_err(), "an odd group cannot halve");
        assert!(ParallelPlan::with_cfg(4, 1, 3, 12).is_err());
        assert!(ParallelPlan::with_cfg(4, 4, 2, 12).is_err(), "ulysses must divide a half");
    }
}
