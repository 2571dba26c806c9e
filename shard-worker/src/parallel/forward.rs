//! The transformer forward on one rank of a sequence-parallel group: this rank's contiguous
//! token range goes through every block (self-attention joins the other ranks), and the output
//! head's rows are all-gathered and unpatchified so every rank holds the whole velocity.

use super::attention::ShardedAttention;
use super::comm::Communicator;
use super::plan::{shard_ranges, ParallelPlan};
use super::transport::{InProcessTransport, Transport};
use crate::model::{unpatchify, WanTransformer};
use crate::{DitInputs, Result, WorkerError};
use std::sync::Arc;
use std::time::Duration;
use tessera_kernels::Tensor;

/// One rank's view of a sequence-parallel job: the world group and the attention strategy.
pub struct ShardContext {
    world: Communicator,
    plan: ParallelPlan,
    attention: ShardedAttention,
}

impl ShardContext {
    /// Sets up the Ulysses and ring groups of `plan` for this rank of `transport`.
    pub fn new(transport: Arc<dyn Transport>, plan: ParallelPlan) -> Result<Self> {
        if transport.world() != plan.ranks() {
            return Err(WorkerError::input("parallel plan", format!("plan for {} ranks on a transport of {}", plan.ranks(), transport.world())));
        }
        let world = Communicator::world(transport);
        let rank = world.rank();
        let attention = ShardedAttention::new(world.subgroup(plan.ulysses_group(rank), 1)?, world.subgroup(plan.ring_group(rank), 2)?);
        Ok(Self { world, plan, attention })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// The world communicator (byte counts include the attention groups).
    pub fn world(&self) -> &Communicator {
        &self.world
    }

    /// The sharded attention (for its timings).
    pub fn attention(&self) -> &ShardedAttention {
        &self.attention
    }

    /// The plan.
    pub fn plan(&self) -> ParallelPlan {
        self.plan
    }

    /// The model's velocity for the whole batch; every rank computes its own token range and
    /// ends with the full output. Equals [`WanTransformer::forward`] to float32 rounding.
    pub fn forward(&self, model: &WanTransformer, x: &DitInputs<'_>) -> Result<Tensor> {
        let cfg = model.config();
        if cfg.num_attention_heads % self.plan.ulysses != 0 {
            return Err(WorkerError::input("parallel plan", format!("ulysses degree {} does not divide the model's {} heads", self.plan.ulysses, cfg.num_attention_heads)));
        }
        let (b, grid) = model.check_inputs(x)?;
        let cond = model.embed_conditions(x)?;
        let ranges = shard_ranges(grid.tokens(), self.world.size());
        let mine = ranges[self.rank()].clone();
        let mut out = Vec::with_capacity(b * cfg.out_channels * grid.latent().iter().product::<usize>());
        for i in 0..b {
            let rows = model.forward_tokens(x, &cond, i, &grid, mine.clone(), &self.attention)?;
            let all: Vec<f32> = self.world.all_gather(&rows)?.concat();
            if all.len() != grid.tokens() * cfg.patch_out() {
                return Err(WorkerError::Collective(format!("gathered {} output values, expected {}", all.len(), grid.tokens() * cfg.patch_out())));
            }
            out.extend(unpatchify(&all, cfg.out_channels, &grid));
        }
        let [f, h, w] = grid.latent();
        Ok(Tensor::new([b, cfg.out_channels, f, h, w], out)?)
    }
}

/// Runs `job` on `plan.ranks()` threads of this process connected in-process, and returns each
/// rank's result in rank order (the first error, if any rank failed).
pub fn run_in_process<T: Send>(plan: ParallelPlan, job: impl Fn(&ShardContext) -> Result<T> + Sync) -> Result<Vec<T>> {
    let transports = InProcessTransport::group(plan.ranks(), Duration::from_secs(300));
    std::thread::scope(|s| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|t| {
                let job = &job;
                s.spawn(move || ShardContext::new(Arc::new(t), plan).and_then(|ctx| job(&ctx)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| WorkerError::Collective("a rank thread panicked".into()))?).collect()
    })
}
