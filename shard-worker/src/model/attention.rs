//! The self-attention seam of the transformer: how a block's queries meet the keys and values of
//! the whole sequence. One device attends locally ([`LocalAttention`]); the
//! sequence-parallel strategies (`parallel::device`) implement the same trait. Which keys a query
//! may see is a [`Visibility`]: all of them (Wan), or a block-causal prefix (SkyReels-V2
//! diffusion forcing), applied by [`visible_flash`] on any slice of queries against any block of
//! keys.

use crate::Result;
use std::ops::Range;
use tessera_kernels::backend::{at, at_mut, flash, At, AtMut, Elem, Ops};
use tessera_kernels::cpu::AttentionShape;

/// Which keys each query token sees, over the flattened (frame, row, column) token sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Visibility {
    /// Every key (full attention).
    #[default]
    Full,
    /// Tokens are cut into consecutive blocks of `block` tokens (whole frames: SkyReels-V2's
    /// `num_frame_per_block` frames); a query sees the keys of its own block and of every block
    /// before it.
    BlockCausal {
        /// Tokens per block (positive).
        block: usize,
    },
}

impl Visibility {
    /// The keys visible to query token `q` are `[0, end)`: a prefix of the sequence, growing with
    /// `q`.
    pub fn visible_end(self, q: usize) -> usize {
        match self {
            Self::Full => usize::MAX,
            Self::BlockCausal { block } => (q / block + 1).saturating_mul(block),
        }
    }

    /// The queries `q_first..q_first + nq` (global token indices) cut into runs that see the same
    /// number of the keys `k_first..k_first + nk`: (local query rows, visible keys, a prefix of
    /// the key block). Neighbouring runs with the same count are one run.
    pub fn runs(self, q_first: usize, nq: usize, k_first: usize, nk: usize) -> Vec<(Range<usize>, usize)> {
        let seen = |q: usize| self.visible_end(q).saturating_sub(k_first).min(nk);
        let mut out: Vec<(Range<usize>, usize)> = Vec::new();
        let mut q = 0;
        while q < nq {
            let next = match self {
                Self::Full => nq,
                Self::BlockCausal { block } => ((q_first + q) / block + 1).saturating_mul(block).saturating_sub(q_first).min(nq),
            };
            let keys = seen(q_first + q);
            match out.last_mut() {
                Some((rows, k)) if *k == keys => rows.end = next,
                _ => out.push((q..next, keys)),
            }
            q = next;
        }
        out
    }
}

/// Flash attention of `shape.q_len` queries (global tokens from `q_first`) over `shape.kv_len`
/// keys (global tokens from `k_first`), each query seeing only its visible keys. A query run that
/// sees none of these keys gets output 0 and log-sum-exp −∞ (a partial result that merging by
/// log-sum-exp leaves out). Returns false, writing nothing, when no query sees any of the keys:
/// the caller skips the block.
#[allow(clippy::too_many_arguments)]
pub fn visible_flash<O: Ops, E: Elem>(
    ops: &O,
    q: At<'_, O::Buf<O::Act>>,
    k: At<'_, O::Buf<O::Act>>,
    v: At<'_, O::Buf<O::Act>>,
    shape: AttentionShape,
    scale: f32,
    out: AtMut<'_, O::Buf<E>>,
    out_stride: usize,
    lse: &mut O::Buf<f32>,
    visibility: Visibility,
    (q_first, k_first): (usize, usize),
) -> Result<bool> {
    let (nq, nk, heads) = (shape.q_len, shape.kv_len, shape.heads);
    let runs = visibility.runs(q_first, nq, k_first, nk);
    if runs.iter().all(|(_, keys)| *keys == 0) {
        return Ok(false);
    }
    if let [(_, keys)] = runs.as_slice() {
        flash(ops, q, k, v, AttentionShape { kv_len: *keys, ..shape }, scale, out, out_stride, lse)?;
        return Ok(true);
    }
    let width = heads * shape.head_dim;
    let mut run_lse = ops.zeros::<f32>(heads * nq)?;
    for (rows, keys) in runs {
        let m = rows.len();
        let out_at = AtMut { buf: &mut *out.buf, offset: out.offset + rows.start * out_stride };
        if keys == 0 {
            ops.copy_rows(at(&ops.zeros::<E>(m * width)?, 0), width, out_at, out_stride, width, m)?;
            ops.copy_rows(at(&ops.upload(&vec![f32::NEG_INFINITY; heads * m])?, 0), m, at_mut(lse, rows.start), nq, m, heads)?;
            continue;
        }
        let q_at = at(q.buf, q.offset + rows.start * shape.q_stride);
        flash(ops, q_at, k, v, AttentionShape { q_len: m, kv_len: keys, ..shape }, scale, out_at, out_stride, &mut run_lse)?;
        // The run's log-sum-exps `[heads, m]` into their columns of `[heads, nq]`.
        ops.copy_rows(at(&run_lse, 0), m, at_mut(lse, rows.start), nq, m, heads)?;
    }
    Ok(true)
}

/// This shard's normalised, rotated queries, keys and values, as the fused projection writes them:
/// `rows` rows `stride` apart in `buf`, q in channels `[0, D)`, k in `[D, 2D)`, v in `[2D, 3D)`
/// with D = heads·head_dim.
pub struct QkvRows<'a, B> {
    /// The fused projection's output.
    pub buf: &'a B,
    /// This shard's token rows.
    pub rows: usize,
    /// Elements between rows.
    pub stride: usize,
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Which keys each query sees.
    pub visibility: Visibility,
}

/// Computes softmax(q·kᵀ/√d)·v on the device for a block's (possibly sharded) token rows.
pub trait SelfAttention<O: Ops>: Sync {
    /// Writes, for each of this shard's rows, the attention output over its visible keys of the
    /// full sequence to `out` `[rows, heads·head_dim]` (`Act`, packed). `lse` holds at least
    /// `heads·rows` f32 of scratch.
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<O::Act>>, out: &mut O::Buf<O::Act>, lse: &mut O::Buf<f32>) -> Result<()>;
}

/// All tokens on this device (the rows are the whole sequence): one flash-attention call per run
/// of queries that see the same keys.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAttention;

impl<O: Ops> SelfAttention<O> for LocalAttention {
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<O::Act>>, out: &mut O::Buf<O::Act>, lse: &mut O::Buf<f32>) -> Result<()> {
        let QkvRows { buf, rows, stride, heads, head_dim, visibility } = qkv;
        let d = heads * head_dim;
        let shape = AttentionShape { heads, head_dim, q_len: rows, kv_len: rows, q_stride: stride, kv_stride: stride };
        let scale = 1.0 / (head_dim as f32).sqrt();
        visible_flash(ops, at(buf, 0), at(buf, d), at(buf, 2 * d), shape, scale, at_mut(out, 0), d, lse, visibility, (0, 0))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_causal_runs_see_key_prefixes() {
        let full = Visibility::Full;
        assert_eq!(full.runs(5, 7, 0, 30), vec![(0..7, 30)]);
        // Blocks of 4 tokens; queries 6..14 against keys 0..12.
        let c = Visibility::BlockCausal { block: 4 };
        assert_eq!(c.runs(6, 8, 0, 12), vec![(0..2, 8), (2..8, 12)]);
        // Against keys 8..16: block 1 (tokens 4..8) sees none, block 2 sees 8..12, block 3 all.
        assert_eq!(c.runs(6, 8, 8, 8), vec![(0..2, 0), (2..6, 4), (6..8, 8)]);
        // A query sees its own token: the diagonal block is never empty.
        for q in 0..40 {
            assert!(c.visible_end(q) > q);
        }
    }
}
