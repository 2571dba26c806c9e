//! Sequence-parallel self-attention on the backend's buffers: Ulysses (all-to-all from sequence-
//! to head-sharding and back), ring (key/value blocks passed around the ring group with the next
//! hop in flight while flash attention runs on the current block, partial results merged by
//! log-sum-exp in f32, the result stored as `Act` once) and both together (USP). Written once for
//! every backend and every communicator. Under a block-causal mask each query attends only its
//! visible prefix of every block, and a block no query of this rank sees is passed on without
//! being computed.

use super::comm::DeviceComm;
use crate::model::{visible_flash, QkvRows, SelfAttention, Visibility};
use crate::parallel::comm::Traffic;
use crate::parallel::plan::ParallelPlan;
use crate::parallel::timings::{AttentionTimings, Phase};
use crate::{Result, WorkerError};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Mutex;
use tessera_kernels::backend::{at, at_mut, ActBuf, At, Ops};
use tessera_kernels::cpu::AttentionShape;

/// Attention of one rank's token rows over the whole sequence, through its Ulysses and ring groups.
pub struct ShardedDeviceAttention<'a, O: Ops, C: DeviceComm<O>> {
    ulysses: &'a C,
    ring: &'a C,
    /// Token rows of every member of the Ulysses group, in group order.
    ulysses_rows: Vec<usize>,
    /// Token rows each member of the ring group attends after its all-to-all (the rows of its
    /// Ulysses group), in ring order.
    ring_rows: Vec<usize>,
    /// The global index of the first of those rows, per ring member (Ulysses groups are
    /// consecutive ranks, so their rows are a contiguous range of the sequence).
    ring_starts: Vec<usize>,
    timings: &'a AttentionTimings,
    /// Buffers reused from layer to layer (the calls of one rank are sequential).
    scratch: Mutex<Scratch<O>>,
    ops: PhantomData<fn(&O)>,
}

/// The `Act` buffers of one attention call.
#[derive(Clone, Copy)]
enum ActSlot {
    Send,
    Got,
    Group,
    HeadsOut,
    Back,
    Kv,
    Next,
}

/// The f32 buffers of one attention call.
#[derive(Clone, Copy)]
enum F32Slot {
    Acc,
    AccLse,
    Part,
    PartLse,
    Lse,
}

/// Buffers an attention call takes and puts back: every layer of a forward (and every step of a
/// job) has the same shapes, so after the first layer no buffer is allocated. Nothing relies on a
/// buffer's old contents: each is written before it is read.
struct Scratch<O: Ops> {
    act: [Option<ActBuf<O>>; 7],
    f32s: [Option<O::Buf<f32>>; 5],
    /// Buffers allocated so far.
    allocations: usize,
}

impl<O: Ops> Scratch<O> {
    fn new() -> Self {
        Self { act: std::array::from_fn(|_| None), f32s: std::array::from_fn(|_| None), allocations: 0 }
    }

    /// The slot's buffer if it has `len` elements, else a new one.
    fn act(&mut self, ops: &O, slot: ActSlot, len: usize) -> Result<ActBuf<O>> {
        match self.act[slot as usize].take() {
            Some(b) if ops.len(&b) == len => Ok(b),
            _ => {
                self.allocations += 1;
                Ok(ops.zeros(len)?)
            }
        }
    }

    fn put_act(&mut self, slot: ActSlot, buf: ActBuf<O>) {
        self.act[slot as usize] = Some(buf);
    }

    /// The slot's buffer if it has `len` elements, else a new one.
    fn f32(&mut self, ops: &O, slot: F32Slot, len: usize) -> Result<O::Buf<f32>> {
        match self.f32s[slot as usize].take() {
            Some(b) if ops.len(&b) == len => Ok(b),
            _ => {
                self.allocations += 1;
                Ok(ops.zeros(len)?)
            }
        }
    }

    fn put_f32(&mut self, slot: F32Slot, buf: O::Buf<f32>) {
        self.f32s[slot as usize] = Some(buf);
    }
}

/// Prefix sums: where each part starts when the parts are laid end to end.
fn starts(sizes: &[usize]) -> Vec<usize> {
    sizes.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect()
}

/// `sizes` as consecutive ranges, each scaled by `unit`, from `base`.
fn ranges(sizes: &[usize], unit: usize, base: usize) -> Vec<Range<usize>> {
    starts(sizes).iter().zip(sizes).map(|(&s, &n)| base + s * unit..base + (s + n) * unit).collect()
}

impl<'a, O: Ops, C: DeviceComm<O>> ShardedDeviceAttention<'a, O, C> {
    /// Attention for global rank `rank` of `plan` over a sequence cut into `shards` (every rank's
    /// contiguous range, in rank order: [`shard_ranges`](crate::parallel::shard_ranges) or
    /// [`balanced_ranges`](crate::parallel::plan::balanced_ranges)); `ulysses` and `ring` are
    /// this rank's groups; time spent is added to `timings`.
    pub fn new(ulysses: &'a C, ring: &'a C, plan: ParallelPlan, rank: usize, shards: &[Range<usize>], timings: &'a AttentionTimings) -> Result<Self> {
        let contiguous = shards.first().is_none_or(|r| r.start == 0) && shards.windows(2).all(|w| w[0].end == w[1].start);
        if shards.len() != plan.ranks() || !contiguous {
            return Err(WorkerError::Collective(format!("a sequence cut {shards:?} for a plan of {} ranks", plan.ranks())));
        }
        if ulysses.size() != plan.ulysses || ring.size() != plan.ring || rank >= plan.ranks() {
            return Err(WorkerError::Collective(format!(
                "rank {rank} of a {}x{} plan with groups of {} and {}",
                plan.ulysses,
                plan.ring,
                ulysses.size(),
                ring.size()
            )));
        }
        let sizes: Vec<usize> = shards.iter().map(|r| r.len()).collect();
        let group_rows = |r: usize| plan.ulysses_group(r).iter().map(|&g| sizes[g]).sum::<usize>();
        let group_start = |r: usize| plan.ulysses_group(r).first().map_or(0, |&g| shards[g].start);
        Ok(Self {
            ulysses,
            ring,
            ulysses_rows: plan.ulysses_group(rank).iter().map(|&g| sizes[g]).collect(),
            ring_rows: plan.ring_group(rank).iter().map(|&g| group_rows(g)).collect(),
            ring_starts: plan.ring_group(rank).iter().map(|&g| group_start(g)).collect(),
            timings,
            scratch: Mutex::new(Scratch::new()),
            ops: PhantomData,
        })
    }

    /// Ring attention of `nq` query rows (`q`, rows `q_stride` apart) over the key/value blocks of
    /// every ring member; `own_kv` holds this member's rows `[k | v]`, `2·heads·head_dim` apart, in
    /// a buffer long enough for the largest block. Returns the f32 output `[nq, heads·head_dim]`
    /// (the caller puts it back into the scratch's `Acc` slot).
    #[allow(clippy::too_many_arguments)]
    fn ring_attend(
        &self,
        ops: &O,
        sc: &mut Scratch<O>,
        q: At<'_, O::Buf<O::Act>>,
        q_stride: usize,
        nq: usize,
        heads: usize,
        head_dim: usize,
        own_kv: O::Buf<O::Act>,
        visibility: Visibility,
    ) -> Result<O::Buf<f32>> {
        let (wd, r, me) = (heads * head_dim, self.ring.size(), self.ring.rank());
        let scale = 1.0 / (head_dim as f32).sqrt();
        // After `s` hops this member holds the block of ring member `me - s`.
        let owner = |s: usize| (me + r - s % r) % r;
        let rows_at = |s: usize| self.ring_rows[owner(s)];
        let q_first = self.ring_starts[me];
        let max_rows = self.ring_rows.iter().copied().max().unwrap_or(0);
        let (mut cur, mut next) = (own_kv, sc.act(ops, ActSlot::Next, max_rows * 2 * wd)?);
        let (mut acc, mut acc_lse) = (sc.f32(ops, F32Slot::Acc, nq * wd)?, sc.f32(ops, F32Slot::AccLse, heads * nq)?);
        let mut part = if r > 1 { Some((sc.f32(ops, F32Slot::Part, nq * wd)?, sc.f32(ops, F32Slot::PartLse, heads * nq)?)) } else { None };
        for s in 0..r {
            let rows = rows_at(s);
            // Hand the current block on before computing on it.
            if s + 1 < r {
                self.ring.ring_start(ops, &cur, rows * 2 * wd, &mut next, rows_at(s + 1) * 2 * wd)?;
            }
            let shape = AttentionShape { heads, head_dim, q_len: nq, kv_len: rows, q_stride, kv_stride: 2 * wd };
            let (k, v, firsts) = (at(&cur, 0), at(&cur, wd), (q_first, self.ring_starts[owner(s)]));
            let computed = self.timings.time(Phase::Compute, || -> Result<()> {
                match (s, part.as_mut()) {
                    (0, _) | (_, None) => {
                        // A member's own block holds every query's own key: never empty.
                        if !visible_flash(ops, q, k, v, shape, scale, at_mut(&mut acc, 0), wd, &mut acc_lse, visibility, firsts)? {
                            return Err(WorkerError::Collective("no query of this rank sees its own keys".into()));
                        }
                    }
                    (_, Some((out, lse))) => {
                        if visible_flash(ops, q, k, v, shape, scale, at_mut(out, 0), wd, lse, visibility, firsts)? {
                            ops.merge_partials(&mut acc, &mut acc_lse, out, lse, nq, heads, head_dim)?;
                        }
                    }
                }
                Ok(())
            });
            if s + 1 < r {
                // The hop in flight reads `cur` and writes `next`: wait for it even when the
                // compute failed, so neither buffer is freed under a running transfer.
                let waited = self.timings.time(Phase::RingWait, || self.ring.ring_wait(ops, &mut next, rows_at(s + 1) * 2 * wd));
                computed?;
                waited?;
                std::mem::swap(&mut cur, &mut next);
            } else {
                computed?;
            }
        }
        // `cur` and `next` have the same length whichever holds which block.
        sc.put_act(ActSlot::Kv, cur);
        sc.put_act(ActSlot::Next, next);
        sc.put_f32(F32Slot::AccLse, acc_lse);
        if let Some((out, lse)) = part {
            sc.put_f32(F32Slot::Part, out);
            sc.put_f32(F32Slot::PartLse, lse);
        }
        Ok(acc)
    }

    /// Attention of `nq` rows whose q, k and v (`heads` heads each, `w = heads·head_dim` wide) sit
    /// at columns 0, w and 2w of rows `stride` apart in `buf`, over the rows of the whole ring
    /// group, each seeing its visible keys; written to `out` as packed `Act` rows of `w`.
    #[allow(clippy::too_many_arguments)]
    fn attend_heads(
        &self,
        ops: &O,
        sc: &mut Scratch<O>,
        buf: &O::Buf<O::Act>,
        stride: usize,
        nq: usize,
        heads: usize,
        head_dim: usize,
        out: &mut O::Buf<O::Act>,
        visibility: Visibility,
    ) -> Result<()> {
        let w = heads * head_dim;
        if self.ring.size() == 1 {
            let shape = AttentionShape { heads, head_dim, q_len: nq, kv_len: nq, q_stride: stride, kv_stride: stride };
            let mut lse = sc.f32(ops, F32Slot::Lse, heads * nq)?;
            let scale = 1.0 / (head_dim as f32).sqrt();
            let first = self.ring_starts[0];
            let done = self.timings.time(Phase::Compute, || {
                visible_flash(ops, at(buf, 0), at(buf, w), at(buf, 2 * w), shape, scale, at_mut(out, 0), w, &mut lse, visibility, (first, first))
            });
            sc.put_f32(F32Slot::Lse, lse);
            return done.map(|_| ());
        }
        let max_rows = self.ring_rows.iter().copied().max().unwrap_or(0);
        let mut kv = sc.act(ops, ActSlot::Kv, max_rows * 2 * w)?;
        // k and v are adjacent in each row: one 2-D copy packs the block.
        ops.copy_rows(at(buf, w), stride, at_mut(&mut kv, 0), 2 * w, 2 * w, nq)?;
        // Per layer: DEBUG (RUST_LOG=tessera_worker::parallel=debug), or a job's trace would hold thousands.
        let acc = tracing::debug_span!("ring_attention", hops = self.ring.size() - 1)
            .in_scope(|| self.ring_attend(ops, sc, at(buf, 0), stride, nq, heads, head_dim, kv, visibility))?;
        let narrowed = ops.narrow(at(&acc, 0), at_mut(out, 0), nq * w);
        sc.put_f32(F32Slot::Acc, acc);
        Ok(narrowed?)
    }
}

impl<O: Ops, C: DeviceComm<O>> SelfAttention<O> for ShardedDeviceAttention<'_, O, C> {
    fn attend(&self, ops: &O, qkv: QkvRows<'_, O::Buf<O::Act>>, out: &mut O::Buf<O::Act>, _lse: &mut O::Buf<f32>) -> Result<()> {
        let QkvRows { buf, rows: n, stride, heads, head_dim, visibility } = qkv;
        let (u, me) = (self.ulysses.size(), self.ulysses.rank());
        if n != self.ulysses_rows[me] {
            return Err(WorkerError::Collective(format!("{n} token rows on a rank whose shard has {}", self.ulysses_rows[me])));
        }
        let mut scratch = self.scratch.lock().map_err(|_| WorkerError::Collective("attention scratch lock poisoned".into()))?;
        let sc = &mut *scratch;
        if u == 1 {
            return self.attend_heads(ops, sc, buf, stride, n, heads, head_dim, out, visibility);
        }
        if !heads.is_multiple_of(u) {
            return Err(WorkerError::input("parallel plan", format!("ulysses degree {u} does not divide {heads} heads")));
        }
        let (d, local) = (heads * head_dim, heads / u);
        let w = local * head_dim;
        // Sequence-sharded → head-sharded: member j gets [q | k | v] of this shard's rows for its
        // heads, each a packed [n, w] block.
        let mut send = sc.act(ops, ActSlot::Send, u * 3 * n * w)?;
        for j in 0..u {
            for x in 0..3 {
                ops.copy_rows(at(buf, x * d + j * w), stride, at_mut(&mut send, (3 * j + x) * n * w), w, w, n)?;
            }
        }
        let rows = &self.ulysses_rows;
        let total: usize = rows.iter().sum();
        let mut got = sc.act(ops, ActSlot::Got, 3 * total * w)?;
        let (send_parts, recv_parts) = (ranges(&vec![3 * n; u], w, 0), ranges(&rows.iter().map(|r| 3 * r).collect::<Vec<_>>(), w, 0));
        tracing::debug_span!("all_to_all", direction = "sequence_to_heads")
            .in_scope(|| self.timings.time(Phase::AllToAll, || self.ulysses.exchange(ops, Traffic::AllToAll, &send, &send_parts, &mut got, &recv_parts)))?;
        sc.put_act(ActSlot::Send, send);
        // Rows of the whole group for these heads, [q | k | v] per row, in sequence order.
        let mut group = sc.act(ops, ActSlot::Group, total * 3 * w)?;
        for (&start, &ri) in starts(rows).iter().zip(rows) {
            for x in 0..3 {
                ops.copy_rows(at(&got, 3 * start * w + x * ri * w), w, at_mut(&mut group, start * 3 * w + x * w), 3 * w, w, ri)?;
            }
        }
        sc.put_act(ActSlot::Got, got);
        let mut heads_out = sc.act(ops, ActSlot::HeadsOut, total * w)?;
        self.attend_heads(ops, sc, &group, 3 * w, total, local, head_dim, &mut heads_out, visibility)?;
        sc.put_act(ActSlot::Group, group);
        // Head-sharded → sequence-sharded: member i gets back its rows of these heads.
        let mut back = sc.act(ops, ActSlot::Back, u * n * w)?;
        let (send_parts, recv_parts) = (ranges(rows, w, 0), ranges(&vec![n; u], w, 0));
        tracing::debug_span!("all_to_all", direction = "heads_to_sequence").in_scope(|| {
            self.timings.time(Phase::AllToAll, || self.ulysses.exchange(ops, Traffic::AllToAll, &heads_out, &send_parts, &mut back, &recv_parts))
        })?;
        sc.put_act(ActSlot::HeadsOut, heads_out);
        for j in 0..u {
            ops.copy_rows(at(&back, j * n * w), w, at_mut(out, j * w), d, w, n)?;
        }
        sc.put_act(ActSlot::Back, back);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer put back is the one taken next time (no allocation); another length allocates.
    #[test]
    fn scratch_reuses_buffers_of_the_same_length() {
        let ops = tessera_kernels::backend::CpuOps;
        let mut sc = Scratch::new();
        let a = sc.act(&ops, ActSlot::Send, 10).unwrap();
        let ptr = a.as_ptr();
        sc.put_act(ActSlot::Send, a);
        let again = sc.act(&ops, ActSlot::Send, 10).unwrap();
        assert_eq!((again.as_ptr(), sc.allocations), (ptr, 1));
        sc.put_act(ActSlot::Send, again);
        assert_eq!(sc.act(&ops, ActSlot::Send, 12).unwrap().len(), 12);
        let f = sc.f32(&ops, F32Slot::Acc, 4).unwrap();
        sc.put_f32(F32Slot::Acc, f);
        sc.f32(&ops, F32Slot::Acc, 4).unwrap();
        assert_eq!(sc.allocations, 3);
    }

    #[test]
    fn parts_laid_end_to_end() {
        assert_eq!(starts(&[3, 0, 2]), vec![0, 3, 3]);
        assert_eq!(ranges(&[3, 0, 2], 4, 1), vec![1..13, 13..13, 13..21]);
    }
}
