//! The self-attention seam: how a block's queries meet the keys and values of the whole
//! sequence. One device attends locally; the sequence-parallel strategies implement the same trait.

use crate::Result;
use tessera_kernels::cpu::{attention, AttentionShape};

/// Computes softmax(q·kᵀ/√d)·v for a block's (possibly sharded) token rows.
pub trait SelfAttention: Sync {
    /// `q`, `k`, `v` are this shard's rows `[n, heads·head_dim]` (normalised, rotated);
    /// returns the attention output for the same rows, attending over the full sequence.
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], heads: usize, head_dim: usize) -> Result<Vec<f32>>;
}

/// All tokens on this device: one tiled attention call.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAttention;

impl SelfAttention for LocalAttention {
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], heads: usize, head_dim: usize) -> Result<Vec<f32>> {
        let hd = heads * head_dim;
        let shape = AttentionShape::packed(heads, head_dim, q.len() / hd, k.len() / hd);
        Ok(attention(q, k, v, shape, 1.0 / (head_dim as f32).sqrt())?.out)
    }
}
