//! The transformer's forward on one rank of a sequence-parallel group, on the backend's buffers:
//! this rank's token range goes through every block (self-attention joins the other ranks through
//! the device collectives). [`DeviceShard::forward_patches`] leaves the head's rows on the rank
//! (the denoising loop keeps its share of the latent there); [`DeviceShard::forward`] all-gathers
//! and unpatchifies them, so every rank holds the whole velocity. [`gather_rows`] brings a sharded
//! latent to rank 0.

use super::attention::ShardedDeviceAttention;
use super::comm::DeviceComm;
use crate::model::{DitInputs, PatchInputs, WanTransformer};
use crate::parallel::comm::Traffic;
use crate::parallel::plan::{balanced_ranges, shard_ranges, ParallelPlan, TokenCost};
use crate::parallel::timings::AttentionTimings;
use crate::{Result, WorkerError};
use std::ops::Range;
use tessera_kernels::backend::Ops;
use tessera_kernels::cpu::PatchGeometry;
use tessera_kernels::Tensor;

/// One rank's communicators for the device forward: the world and its two attention groups.
pub struct DeviceShard<'a, C> {
    /// The sequence-parallel group (all ranks, or this rank's CFG half): the output all-gather.
    pub world: &'a C,
    /// This rank's Ulysses group.
    pub ulysses: &'a C,
    /// This rank's ring group.
    pub ring: &'a C,
    /// The layout of the ranks.
    pub plan: ParallelPlan,
    /// Where the attention's time goes.
    pub timings: &'a AttentionTimings,
}

impl<C> DeviceShard<'_, C> {
    /// The head rows `[tokens, p·C_out]` (f32, on the device) of every sample of `x`, whose
    /// patch rows must be this rank's share of the sequence ([`shard_ranges`]).
    pub fn forward_patches<O: Ops>(&self, model: &WanTransformer<O>, x: &PatchInputs<'_, O>) -> Result<Vec<O::Buf<f32>>>
    where
        C: DeviceComm<O>,
    {
        // `world` is the sequence-parallel group (a CFG half): ranks numbered within it.
        let (p, rank, plan) = (self.world.size(), self.world.rank(), self.plan.sequence_plan());
        if p != plan.ranks() {
            return Err(WorkerError::Collective(format!("a sequence group of {p} ranks for a plan of {}", plan.ranks())));
        }
        let mine = shard_ranges(x.grid.tokens(), p)[rank].clone();
        if x.tokens != mine {
            return Err(WorkerError::input("tokens", format!("rank {rank} of {p} holds tokens {mine:?}, not {:?}", x.tokens)));
        }
        let heads = model.config().num_attention_heads;
        if !heads.is_multiple_of(plan.ulysses) {
            return Err(WorkerError::input("parallel plan", format!("ulysses degree {} does not divide the model's {heads} heads", plan.ulysses)));
        }
        tracing::Span::current().record("tokens", mine.len());
        let attention = ShardedDeviceAttention::new(self.ulysses, self.ring, plan, rank, &shard_ranges(x.grid.tokens(), p), self.timings)?;
        model.forward_patches(x, &attention)
    }

    /// The velocity `[B, C_out, F, H, W]` (f32, on the host) of `model` for the whole batch; every
    /// rank computes its token range and ends with the full output. Under a causal block mask
    /// (diffusion forcing) the ranges are cut for equal work per ring member
    /// ([`balanced_ranges`]), not equal tokens.
    pub fn forward<O: Ops>(&self, model: &WanTransformer<O>, x: &DitInputs<'_>) -> Result<Tensor>
    where
        C: DeviceComm<O>,
    {
        let (ops, cfg) = (model.ops(), model.config());
        // `world` is the sequence-parallel group (a CFG half): ranks numbered within it.
        let (p, rank, plan) = (self.world.size(), self.world.rank(), self.plan.sequence_plan());
        if p != plan.ranks() {
            return Err(WorkerError::Collective(format!("a sequence group of {p} ranks for a plan of {}", plan.ranks())));
        }
        let (b, grid) = model.check_inputs(x)?;
        let cond = model.embed_conditions(x)?;
        let cost = TokenCost { token: cfg.token_weights() as f64, key: cfg.key_weights() as f64 };
        let ranges = balanced_ranges(grid.tokens(), plan, model.visibility(&grid, x.options)?, cost);
        let mine = ranges[rank].clone();
        tracing::Span::current().record("tokens", mine.len());
        let heads = cfg.num_attention_heads;
        if !heads.is_multiple_of(plan.ulysses) {
            return Err(WorkerError::input("parallel plan", format!("ulysses degree {} does not divide the model's {heads} heads", plan.ulysses)));
        }
        let attention = ShardedDeviceAttention::new(self.ulysses, self.ring, plan, rank, &ranges, self.timings)?;
        let po = cfg.patch_out();
        let geometry = PatchGeometry { channels: cfg.out_channels, grid: grid.dims, patch: grid.patch };
        let mut all = ops.zeros::<f32>(grid.tokens() * po)?;
        let mut latent = ops.zeros::<f32>(geometry.latent_len())?;
        let mut out = Vec::with_capacity(b * geometry.latent_len());
        let send_parts = vec![0..mine.len() * po; p];
        let recv_parts: Vec<_> = ranges.iter().map(|r| r.start * po..r.end * po).collect();
        for i in 0..b {
            let rows = model.forward_tokens(x, &cond, i, &grid, mine.clone(), &attention)?;
            tracing::info_span!("all_gather", values = mine.len() * po)
                .in_scope(|| self.world.exchange(ops, Traffic::AllGather, &rows, &send_parts, &mut all, &recv_parts))?;
            ops.unpatchify(&all, &geometry, &mut latent)?;
            out.extend(ops.download(&latent)?);
        }
        let [f, h, w] = grid.latent();
        Ok(Tensor::new([b, cfg.out_channels, f, h, w], out)?)
    }
}

/// Gathers every member's `rows` (member j's are elements `parts[j]` of the whole) to member 0,
/// which gets the whole on the host; the others get `None`. Counted as [`Traffic::Gather`].
pub fn gather_rows<O: Ops, C: DeviceComm<O>>(comm: &C, ops: &O, rows: &O::Buf<f32>, parts: &[Range<usize>]) -> Result<Option<Vec<f32>>> {
    let (p, me) = (comm.size(), comm.rank());
    let contiguous = parts.first().is_some_and(|r| r.start == 0) && parts.windows(2).all(|w| w[0].end == w[1].start);
    if parts.len() != p || !contiguous {
        return Err(WorkerError::Collective(format!("a gather over {p} members of parts {parts:?}")));
    }
    let mine = parts[me].len();
    if ops.len(rows) != mine {
        return Err(WorkerError::Collective(format!("member {me} holds {} values for a part of {mine}", ops.len(rows))));
    }
    let send_parts: Vec<Range<usize>> = (0..p).map(|j| if j == 0 { 0..mine } else { 0..0 }).collect();
    if me == 0 {
        let total = parts.last().map_or(0, |r| r.end);
        let mut whole = ops.zeros::<f32>(total.max(1))?;
        comm.exchange(ops, Traffic::Gather, rows, &send_parts, &mut whole, parts)?;
        let mut host = ops.download(&whole)?;
        host.truncate(total);
        Ok(Some(host))
    } else {
        let mut nothing = ops.zeros::<f32>(1)?;
        comm.exchange(ops, Traffic::Gather, rows, &send_parts, &mut nothing, &vec![0..0; p])?;
        Ok(None)
    }
}

/// Swaps `rows` with the other member of a CFG pair (the rank of the other half holding the same
/// tokens): returns the partner's rows, as long as this member's. Counted as [`Traffic::Cfg`].
pub fn swap_with_partner<O: Ops, C: DeviceComm<O>>(comm: &C, ops: &O, rows: &O::Buf<f32>) -> Result<O::Buf<f32>> {
    let (p, me) = (comm.size(), comm.rank());
    if p != 2 {
        return Err(WorkerError::Collective(format!("a CFG pair of {p} members")));
    }
    let n = ops.len(rows);
    if n == 0 {
        // both partners hold the same (empty) tokens: nothing to swap
        return Ok(ops.zeros::<f32>(0)?);
    }
    let parts: Vec<Range<usize>> = (0..2).map(|j| if j == me { 0..0 } else { 0..n }).collect();
    let mut theirs = ops.zeros::<f32>(n)?;
    comm.exchange(ops, Traffic::Cfg, rows, &parts, &mut theirs, &parts)?;
    Ok(theirs)
}
