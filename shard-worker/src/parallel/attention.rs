//! Self-attention across shards: Ulysses (all-to-all from sequence- to head-sharding and back),
//! ring (key/value blocks circulate, partial results merged by log-sum-exp, the next block's
//! transfer in flight while the current block is computed), and both together (USP).

use super::comm::Communicator;
use crate::model::SelfAttention;
use crate::{Result, WorkerError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tessera_kernels::cpu::{attention, merge_partials, AttentionShape};

/// Where the time of sharded attention went, summed over calls (nanoseconds).
#[derive(Debug, Default)]
pub struct AttentionTimings {
    compute_ns: AtomicU64,
    ring_wait_ns: AtomicU64,
    all_to_all_ns: AtomicU64,
}

impl AttentionTimings {
    /// (attention compute, waiting for ring blocks, all-to-all), in seconds.
    pub fn seconds(&self) -> (f64, f64, f64) {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        (s(&self.compute_ns), s(&self.ring_wait_ns), s(&self.all_to_all_ns))
    }
}

/// Sequence-parallel self-attention over a Ulysses group and a ring group (either may have
/// one member: ring-only is `ulysses` of size 1, Ulysses-only is `ring` of size 1).
pub struct ShardedAttention {
    ulysses: Communicator,
    ring: Communicator,
    timings: AttentionTimings,
}

fn since(t: Instant, into: &AtomicU64) {
    into.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

impl ShardedAttention {
    /// Attention over these groups; every member of both must run the same layers in order.
    pub fn new(ulysses: Communicator, ring: Communicator) -> Self {
        Self { ulysses, ring, timings: AttentionTimings::default() }
    }

    /// Time spent so far.
    pub fn timings(&self) -> &AttentionTimings {
        &self.timings
    }

    /// The ring group (ranks holding the other sequence shards of the same heads).
    pub fn ring(&self) -> &Communicator {
        &self.ring
    }

    /// The Ulysses group (ranks exchanging heads by all-to-all).
    pub fn ulysses(&self) -> &Communicator {
        &self.ulysses
    }

    /// Ring attention of local queries over the keys/values of every ring member.
    fn ring_attend(&self, q: &[f32], k: &[f32], v: &[f32], heads: usize, d: usize) -> Result<Vec<f32>> {
        // Per layer: DEBUG (RUST_LOG=tessera_worker::parallel=debug), or a job's trace would hold thousands.
        let span = (self.ring.size() > 1).then(|| tracing::debug_span!("ring_attention", hops = self.ring.size() - 1, wait_s = tracing::field::Empty));
        let _in = span.as_ref().map(|s| s.enter());
        let waited = self.timings.ring_wait_ns.load(Ordering::Relaxed);
        let out = self.ring_passes(q, k, v, heads, d);
        if let Some(s) = &span {
            s.record("wait_s", (self.timings.ring_wait_ns.load(Ordering::Relaxed) - waited) as f64 * 1e-9);
        }
        out
    }

    fn ring_passes(&self, q: &[f32], k: &[f32], v: &[f32], heads: usize, d: usize) -> Result<Vec<f32>> {
        let hd = heads * d;
        let nq = q.len() / hd;
        let scale = 1.0 / (d as f32).sqrt();
        let mut kv: Vec<f32> = Vec::with_capacity(k.len() + v.len());
        kv.extend_from_slice(k);
        kv.extend_from_slice(v);
        let mut acc: Option<(Vec<f32>, Vec<f32>)> = None;
        for step in 0..self.ring.size() {
            // Post the hand-off of the current block before computing on it.
            let pending = if step + 1 < self.ring.size() { Some(self.ring.ring_shift(&kv)?) } else { None };
            let t = Instant::now();
            let nk = kv.len() / (2 * hd);
            let part = attention(q, &kv[..nk * hd], &kv[nk * hd..], AttentionShape::packed(heads, d, nq, nk), scale)?;
            acc = Some(match acc {
                None => (part.out, part.lse),
                Some((mut o, mut l)) => {
                    merge_partials(&mut o, &mut l, &part.out, &part.lse, heads, d)?;
                    (o, l)
                }
            });
            since(t, &self.timings.compute_ns);
            if let Some(p) = pending {
                let t = Instant::now();
                kv = p.wait()?;
                since(t, &self.timings.ring_wait_ns);
                if kv.len() % (2 * hd) != 0 {
                    return Err(WorkerError::Collective(format!("ring block of {} values is not whole key/value rows of {hd}", kv.len())));
                }
            }
        }
        Ok(acc.map(|(o, _)| o).unwrap_or_default())
    }
}

/// Columns `[h0·d, h1·d)` of every row of `x` (rows of `hd`).
fn head_columns(x: &[f32], hd: usize, cols: std::ops::Range<usize>) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(hd).map(move |row| &row[cols.clone()])
}

impl SelfAttention for ShardedAttention {
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], heads: usize, head_dim: usize) -> Result<Vec<f32>> {
        let u = self.ulysses.size();
        if u == 1 {
            return self.ring_attend(q, k, v, heads, head_dim);
        }
        if heads % u != 0 {
            return Err(WorkerError::input("parallel plan", format!("ulysses degree {u} does not divide {heads} heads")));
        }
        let hd = heads * head_dim;
        let local = heads / u;
        let w = local * head_dim;
        let n = q.len() / hd;
        // Sequence-sharded → head-sharded: member j gets this shard's rows of its heads (q|k|v).
        let t = Instant::now();
        let parts: Vec<Vec<f32>> = (0..u)
            .map(|j| {
                let cols = j * w..(j + 1) * w;
                let mut p = Vec::with_capacity(3 * n * w);
                for x in [q, k, v] {
                    head_columns(x, hd, cols.clone()).for_each(|r| p.extend_from_slice(r));
                }
                p
            })
            .collect();
        let got = tracing::debug_span!("all_to_all", direction = "sequence_to_heads").in_scope(|| self.ulysses.all_to_all(parts))?;
        since(t, &self.timings.all_to_all_ns);
        let rows: Vec<usize> = got.iter().map(|p| p.len() / (3 * w)).collect();
        if got.iter().zip(&rows).any(|(p, &r)| p.len() != 3 * r * w) {
            return Err(WorkerError::Collective("all-to-all block is not whole q/k/v rows".into()));
        }
        let total: usize = rows.iter().sum();
        let (mut qg, mut kg, mut vg) = (Vec::with_capacity(total * w), Vec::with_capacity(total * w), Vec::with_capacity(total * w));
        for (p, &r) in got.iter().zip(&rows) {
            qg.extend_from_slice(&p[..r * w]);
            kg.extend_from_slice(&p[r * w..2 * r * w]);
            vg.extend_from_slice(&p[2 * r * w..]);
        }
        let out = self.ring_attend(&qg, &kg, &vg, local, head_dim)?;
        // Head-sharded → sequence-sharded: member i gets back its rows of these heads.
        let t = Instant::now();
        let mut start = 0;
        let back: Vec<Vec<f32>> = rows
            .iter()
            .map(|&r| {
                let p = out[start * w..(start + r) * w].to_vec();
                start += r;
                p
            })
            .collect();
        let mine = tracing::debug_span!("all_to_all", direction = "heads_to_sequence").in_scope(|| self.ulysses.all_to_all(back))?;
        since(t, &self.timings.all_to_all_ns);
        let mut o = vec![0.0f32; n * hd];
        for (j, p) in mine.iter().enumerate() {
            if p.len() != n * w {
                return Err(WorkerError::Collective(format!("all-to-all returned {} values for {n} rows of {w}", p.len())));
            }
            for (row, src) in o.chunks_exact_mut(hd).zip(p.chunks_exact(w)) {
                row[j * w..(j + 1) * w].copy_from_slice(src);
            }
        }
        Ok(o)
    }
}
