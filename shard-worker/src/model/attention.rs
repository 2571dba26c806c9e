//! The self-attention seam of the transformer: how a block's queries meet the keys and values of
//! the whole sequence. One device attends locally ([`LocalAttention`]); the
//! sequence-parallel strategies (`parallel::device`) implement the same trait.

use crate::Result;
use tessera_kernels::backend::{at, at_mut, flash, Ops};
use tessera_kernels::cpu::AttentionShape;

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
}

/// Computes softmax(q·kᵀ/√d)·v on the device for a block's (possibly sharded) token rows.
pub trait SelfAttention<O: Ops>: Sync {
    /// Writes, for each of this shard's rows, the attention output over the full sequence to
    /// `out` `[rows, heads·head_dim]` (`Act`, packed). `lse` holds at least `heads·rows` f32 of
    /// scratch.
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<O::Act>>, out: &mut O::Buf<O::Act>, lse: &mut O::Buf<f32>) -> Result<()>;
}

/// All tokens on this device: one flash-attention call.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAttention;

impl<O: Ops> SelfAttention<O> for LocalAttention {
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<O::Act>>, out: &mut O::Buf<O::Act>, lse: &mut O::Buf<f32>) -> Result<()> {
        let QkvRows { buf, rows, stride, heads, head_dim } = qkv;
        let d = heads * head_dim;
        let shape = AttentionShape { heads, head_dim, q_len: rows, kv_len: rows, q_stride: stride, kv_stride: stride };
        Ok(flash(ops, at(buf, 0), at(buf, d), at(buf, 2 * d), shape, 1.0 / (head_dim as f32).sqrt(), at_mut(out, 0), d, lse)?)
    }
}
