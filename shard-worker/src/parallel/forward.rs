//! One rank of a sequence-parallel group: its communicators (the world, its Ulysses and ring
//! groups over the job's transport, and NCCL's when the model is on a GPU) and the transformer
//! forward on them: this rank's contiguous token range goes through every block (self-attention
//! joins the other ranks), and the output head's rows are all-gathered and unpatchified so every
//! rank holds the whole velocity ([`DeviceShard`], one code for every backend).

use super::comm::{bytes_to_f32, f32_to_bytes, Communicator, Traffic};
use super::device::{gather_rows, swap_with_partner, DeviceShard, HostDeviceComm, NcclGroup};
use super::plan::ParallelPlan;
use super::tcp::{TcpOptions, TcpTransport};
use super::timings::AttentionTimings;
use super::transport::{InProcessTransport, Transport};
use crate::model::{DitInputs, DitModel, PatchInputs, WanTransformer};
use crate::{Result, WorkerError};
use std::sync::Arc;
use std::time::Duration;
use tessera_kernels::backend::{CpuOps, CudaOps, HostOps, Ops};
use tessera_kernels::Tensor;

/// One rank's view of a sequence-parallel job: the world group and the attention strategy, and
/// when the transformer runs on a GPU, the NCCL communicators of the same groups.
pub struct ShardContext {
    world: Communicator,
    sequence: Communicator,
    ulysses: Communicator,
    ring: Communicator,
    cfg: Communicator,
    plan: ParallelPlan,
    timings: AttentionTimings,
    nccl: std::sync::OnceLock<NcclGroup>,
    /// The ranks are threads of one process: a GPU model may stage its collectives through the
    /// transport instead of NCCL (every plan on one GPU, for checking, not for speed).
    in_process: bool,
}

impl ShardContext {
    /// Sets up the Ulysses and ring groups of `plan` for this rank of `transport`.
    pub fn new(transport: Arc<dyn Transport>, plan: ParallelPlan) -> Result<Self> {
        if transport.world() != plan.ranks() {
            return Err(WorkerError::input("parallel plan", format!("plan for {} ranks on a transport of {}", plan.ranks(), transport.world())));
        }
        let world = Communicator::world(transport);
        let rank = world.rank();
        let (ulysses, ring) = (world.subgroup(plan.ulysses_group(rank), 1)?, world.subgroup(plan.ring_group(rank), 2)?);
        let (sequence, cfg) = (world.subgroup(plan.sequence_group(rank), 3)?, world.subgroup(plan.cfg_group(rank), 4)?);
        Ok(Self { world, sequence, ulysses, ring, cfg, plan, timings: AttentionTimings::default(), nccl: std::sync::OnceLock::new(), in_process: false })
    }

    /// Makes the group ready to run `model` on its device: every rank states where its model runs
    /// (a group mixing kinds is refused on every rank, naming them: their collectives would not
    /// match); GPU ranks then join the job's NCCL group named by `id` (blocking until every rank
    /// has joined). Nothing more for host models. The transport stays for the step agreement and
    /// the byte counts.
    pub fn join_device_group(&self, model: &DitModel, id: Option<&tessera_kernels::cuda::nccl::NcclId>) -> Result<()> {
        const KINDS: [&str; 3] = ["the CPU (f32)", "the host emulation of the CUDA model", "a GPU"];
        let kind = match model {
            DitModel::Cpu(_) => 0usize,
            DitModel::Bf16Host(_) => 1,
            DitModel::Cuda(_) => 2,
        };
        // Also a barrier: NCCL's init waits for every rank with no timeout, the transport fails
        // promptly when a rank is gone.
        let kinds: Vec<usize> = self.world.all_gather(&[kind as f32])?.iter().map(|k| k.first().map_or(usize::MAX, |&v| v as usize)).collect();
        if kinds.iter().any(|&k| k != kind) {
            let each: Vec<String> = kinds.iter().enumerate().map(|(r, &k)| format!("rank {r} on {}", KINDS.get(k).unwrap_or(&"an unknown device"))).collect();
            return Err(WorkerError::input("group", format!("{}: a group runs its model on one kind of device", each.join(", "))));
        }
        let DitModel::Cuda(m) = model else { return Ok(()) };
        let id = id.ok_or_else(|| missing_nccl_id(model, self.plan.ranks()))?;
        if self.nccl.get().is_some() {
            return Err(WorkerError::Collective("this rank has joined its NCCL group already".into()));
        }
        let group = tracing::info_span!("nccl_init", rank = self.rank(), ranks = self.plan.ranks())
            .in_scope(|| NcclGroup::join(m.ops(), id, self.rank(), self.plan, self.world.stats_handle()))?;
        self.nccl.set(group).map_err(|_| WorkerError::Collective("this rank joined its NCCL group twice".into()))
    }

    /// Handles that abort this rank's NCCL communicators from another thread (none on the host):
    /// a released job's rank stuck waiting for a dead peer then ends.
    pub fn collective_aborts(&self) -> Vec<tessera_kernels::cuda::nccl::NcclAbort> {
        self.nccl.get().map(NcclGroup::abort_handles).unwrap_or_default()
    }

    /// Whether `model` can run sharded here: a GPU model needs the NCCL group joined.
    pub fn check_model(&self, model: &DitModel) -> Result<()> {
        match (model, self.nccl.get()) {
            (DitModel::Cuda(_), None) if self.plan.ranks() > 1 && !self.in_process => Err(missing_nccl_id(model, self.plan.ranks())),
            _ => Ok(()),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// The world communicator (byte counts include the attention groups).
    pub fn world(&self) -> &Communicator {
        &self.world
    }

    /// This rank's sequence-parallel group (its CFG half, or the world).
    pub fn sequence(&self) -> &Communicator {
        &self.sequence
    }

    /// This rank's Ulysses group (ranks exchanging heads by all-to-all).
    pub fn ulysses(&self) -> &Communicator {
        &self.ulysses
    }

    /// This rank's ring group (ranks holding the other sequence shards of the same heads).
    pub fn ring(&self) -> &Communicator {
        &self.ring
    }

    /// Where this rank's attention time went, summed over its forwards.
    pub fn timings(&self) -> &AttentionTimings {
        &self.timings
    }

    /// The plan.
    pub fn plan(&self) -> ParallelPlan {
        self.plan
    }

    /// The model's velocity for the whole batch, on whichever backend it was loaded; every rank
    /// computes its own token range and ends with the full output, equal to the one-device
    /// forward to rounding. The CUDA model keeps its data on the GPU and talks through NCCL
    /// (after [`join_device_group`](Self::join_device_group)), or, for ranks that are threads of
    /// one process ([`run_local_group`]), stages it through this context's transport; host
    /// backends (the f32 CPU model, the bf16 twin) talk through the transport in place.
    ///
    /// With CFG-parallel halves, each half runs its share of the batch (guidance's batch of 2:
    /// the conditional pass on the first half, the unconditional on the second) over its own
    /// sequence-parallel group, and each rank swaps its share with its partner in the other half,
    /// so every rank still ends with the whole batch's output. A diffusion-forcing run, whose
    /// step is one whole-batch forward, gets CFG-parallel this way.
    ///
    /// Traced as a `forward` span (INFO) with what its collectives cost in attributes
    /// (`bytes_sent`, `ring_wait_s`, `all_to_all_s`) and an `all_gather` span for the output; the
    /// per-layer collectives are DEBUG spans (`ring_attention`, `all_to_all`), thousands a job.
    pub fn forward(&self, model: &DitModel, x: &DitInputs<'_>) -> Result<Tensor> {
        self.check_model(model)?;
        let (batch, cfg) = (x.hidden_states.shape().first().copied().unwrap_or(0), self.plan.cfg);
        if cfg == 1 {
            return self.traced(batch, || self.forward_group(model, x));
        }
        if batch == 0 || !batch.is_multiple_of(cfg) || !x.timesteps.len().is_multiple_of(batch) {
            return Err(WorkerError::input(
                "parallel plan",
                format!("CFG-parallel splits a forward's batch into {cfg} halves; a batch of {batch} with {} timesteps does not split", x.timesteps.len()),
            ));
        }
        let share = batch / cfg;
        let samples = share * self.plan.half(self.rank())..share * (self.plan.half(self.rank()) + 1);
        let per_sample = x.timesteps.len() / batch;
        let rows = |name: &str, t: &Tensor| batch_rows(name, t, batch, samples.clone());
        let (hidden, context) = (rows("hidden_states", x.hidden_states)?, rows("encoder_hidden_states", x.encoder_hidden_states)?);
        let image = x.encoder_hidden_states_image.map(|t| rows("encoder_hidden_states_image", t)).transpose()?;
        let mine = DitInputs {
            hidden_states: &hidden,
            timesteps: &x.timesteps[samples.start * per_sample..samples.end * per_sample],
            encoder_hidden_states: &context,
            encoder_hidden_states_image: image.as_ref(),
            options: x.options,
        };
        let out = self.traced(share, || self.forward_group(model, &mine))?;
        // Every half's share, in the halves' order (a rank's partners are its CFG group).
        let parts = self.cfg.exchange_bytes(vec![f32_to_bytes(out.data()); cfg], Traffic::Cfg)?;
        let mut data = Vec::with_capacity(out.len() * cfg);
        for part in parts {
            let values = bytes_to_f32(&part)?;
            if values.len() != out.len() {
                return Err(WorkerError::Collective(format!("a CFG partner sent {} values for a share of {}", values.len(), out.len())));
            }
            data.extend_from_slice(&values);
        }
        let mut shape = out.shape().to_vec();
        shape[0] = batch;
        Ok(Tensor::new(shape, data)?)
    }

    /// The forward of `x` over this rank's sequence-parallel group (the world without CFG halves).
    fn forward_group(&self, model: &DitModel, x: &DitInputs<'_>) -> Result<Tensor> {
        let (plan, timings) = (self.plan, &self.timings);
        match (model, self.nccl.get()) {
            (DitModel::Cpu(m), _) => self.forward_host(m, x),
            (DitModel::Bf16Host(m), _) => self.forward_host(m, x),
            (DitModel::Cuda(m), Some(g)) => DeviceShard { world: &g.sequence, ulysses: &g.ulysses, ring: &g.ring, plan, timings }.forward(m, x),
            (DitModel::Cuda(m), None) if plan.sequence_ranks() > 1 => self.forward_host(m, x),
            (DitModel::Cuda(m), None) => m.forward(x),
        }
    }

    /// The sharded forward over this context's transport (device buffers staged through the host).
    fn forward_host<O: Ops>(&self, model: &WanTransformer<O>, x: &DitInputs<'_>) -> Result<Tensor> {
        self.with_host_shard(|shard| shard.forward(model, x))
    }

    /// Runs `f` with this rank's communicators over the transport (device buffers staged through
    /// the host).
    fn with_host_shard<R>(&self, f: impl FnOnce(&DeviceShard<'_, HostDeviceComm<'_>>) -> R) -> R {
        let (world, ulysses, ring) = (HostDeviceComm::new(&self.sequence), HostDeviceComm::new(&self.ulysses), HostDeviceComm::new(&self.ring));
        f(&DeviceShard { world: &world, ulysses: &ulysses, ring: &ring, plan: self.plan, timings: &self.timings })
    }

    /// Runs `forward` (of a batch of `batch`) in a `forward` span carrying what its collectives
    /// cost.
    pub(crate) fn traced<T>(&self, batch: usize, forward: impl FnOnce() -> Result<T>) -> Result<T> {
        use tracing::field::Empty;
        let span = tracing::info_span!(
            "forward",
            rank = self.rank(),
            ranks = self.world.size(),
            ulysses = self.plan.ulysses,
            ring = self.plan.ring,
            batch,
            tokens = Empty,
            bytes_sent = Empty,
            ring_wait_s = Empty,
            all_to_all_s = Empty
        );
        let _in = span.enter();
        let (sent, (_, ring_wait, all_to_all)) = (self.world.stats().sent(), self.timings.seconds());
        let out = forward();
        let now = self.timings.seconds();
        span.record("bytes_sent", self.world.stats().sent() - sent);
        span.record("ring_wait_s", now.1 - ring_wait);
        span.record("all_to_all_s", now.2 - all_to_all);
        out
    }
}

/// Samples `samples` of `name`, a batch-major tensor `[batch, ...]`, as a tensor of their own.
fn batch_rows(name: &str, t: &Tensor, batch: usize, samples: std::ops::Range<usize>) -> Result<Tensor> {
    if t.shape().first() != Some(&batch) || samples.end > batch {
        return Err(WorkerError::input("parallel plan", format!("{name} is {:?}, not a batch of {batch}", t.shape())));
    }
    let per = t.len() / batch;
    let mut shape = t.shape().to_vec();
    shape[0] = samples.len();
    Ok(Tensor::new(shape, t.data()[samples.start * per..samples.end * per].to_vec())?)
}

/// A backend that a sequence-parallel group can run the denoising loop on: the rank's forward on
/// its patch rows and the gather of a sharded latent, over the context's collectives (NCCL between
/// GPUs, the transport's messages otherwise). Implemented by every backend.
pub trait ShardOps: Ops {
    /// The head rows of every sample of `x` (this rank's patch rows), the model sharded over
    /// `ctx`'s ranks.
    fn forward_patches(ctx: &ShardContext, model: &WanTransformer<Self>, x: &PatchInputs<'_, Self>) -> Result<Vec<Self::Buf<f32>>> {
        ctx.with_host_shard(|shard| shard.forward_patches(model, x))
    }

    /// Every rank's `rows` in this rank's sequence-parallel group (rank j's are elements
    /// `parts[j]` of the whole) to the group's first rank, which gets the whole on the host
    /// (`None` elsewhere).
    fn gather_rows(ctx: &ShardContext, ops: &Self, rows: &Self::Buf<f32>, parts: &[std::ops::Range<usize>]) -> Result<Option<Vec<f32>>> {
        gather_rows(&HostDeviceComm::new(&ctx.sequence), ops, rows, parts)
    }

    /// The velocity rows of this rank's CFG partner (the other guidance branch, same tokens), for
    /// this rank's `rows`.
    fn swap_with_partner(ctx: &ShardContext, ops: &Self, rows: &Self::Buf<f32>) -> Result<Self::Buf<f32>> {
        swap_with_partner(&HostDeviceComm::new(&ctx.cfg), ops, rows)
    }
}

impl ShardOps for CpuOps {}

impl ShardOps for HostOps {}

/// GPUs talk through NCCL once the group has joined it; ranks that are threads of one process
/// (every plan on one GPU, for checking) stage through the transport.
impl ShardOps for CudaOps {
    fn forward_patches(ctx: &ShardContext, model: &WanTransformer<Self>, x: &PatchInputs<'_, Self>) -> Result<Vec<Self::Buf<f32>>> {
        let (plan, timings) = (ctx.plan, &ctx.timings);
        match ctx.nccl.get() {
            Some(g) => DeviceShard { world: &g.sequence, ulysses: &g.ulysses, ring: &g.ring, plan, timings }.forward_patches(model, x),
            None if ctx.in_process || plan.ranks() == 1 => ctx.with_host_shard(|shard| shard.forward_patches(model, x)),
            None => Err(missing_nccl_id_of(&model.ops().describe(), plan.ranks())),
        }
    }

    fn gather_rows(ctx: &ShardContext, ops: &Self, rows: &Self::Buf<f32>, parts: &[std::ops::Range<usize>]) -> Result<Option<Vec<f32>>> {
        match ctx.nccl.get() {
            Some(g) => gather_rows(&g.sequence, ops, rows, parts),
            None if ctx.in_process || ctx.plan.ranks() == 1 => gather_rows(&HostDeviceComm::new(&ctx.sequence), ops, rows, parts),
            None => Err(missing_nccl_id_of(&ops.describe(), ctx.plan.ranks())),
        }
    }

    fn swap_with_partner(ctx: &ShardContext, ops: &Self, rows: &Self::Buf<f32>) -> Result<Self::Buf<f32>> {
        match ctx.nccl.get() {
            Some(g) => swap_with_partner(&g.cfg, ops, rows),
            None if ctx.in_process => swap_with_partner(&HostDeviceComm::new(&ctx.cfg), ops, rows),
            None => Err(missing_nccl_id_of(&ops.describe(), ctx.plan.ranks())),
        }
    }
}

/// The error of a GPU group of `ranks` ranks without the NCCL id of the group.
pub fn missing_nccl_id(model: &DitModel, ranks: usize) -> WorkerError {
    missing_nccl_id_of(&model.describe(), ranks)
}

fn missing_nccl_id_of(device: &str, ranks: usize) -> WorkerError {
    WorkerError::input(
        "nccl_unique_id",
        format!("required: the transformer runs on {device}, and a group of {ranks} GPUs talks through NCCL (rank 0's worker makes the id, the coordinator sends it)"),
    )
}

/// How the ranks of a group that lives in one process talk to each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalTransport {
    /// Messages move between threads' mailboxes.
    #[default]
    InProcess,
    /// Real TCP connections on loopback, exactly as between worker processes.
    TcpLoopback,
}

impl LocalTransport {
    /// Parses `inproc` or `tcp`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "inproc" => Some(Self::InProcess),
            "tcp" => Some(Self::TcpLoopback),
            _ => None,
        }
    }
}

/// Runs `job` on `plan.ranks()` threads of this process connected in-process, and returns each
/// rank's result in rank order (the first error, if any rank failed).
pub fn run_in_process<T: Send>(plan: ParallelPlan, job: impl Fn(&ShardContext) -> Result<T> + Sync) -> Result<Vec<T>> {
    run_local_group(LocalTransport::InProcess, plan, job)
}

/// Runs `job` on `plan.ranks()` threads of this process connected by `transport`, and returns
/// each rank's result in rank order (the first error, if any rank failed).
pub fn run_local_group<T: Send>(transport: LocalTransport, plan: ParallelPlan, job: impl Fn(&ShardContext) -> Result<T> + Sync) -> Result<Vec<T>> {
    let ranks = plan.ranks();
    let (inproc, addrs) = match transport {
        LocalTransport::InProcess => (InProcessTransport::group(ranks, Duration::from_secs(300)), Vec::new()),
        LocalTransport::TcpLoopback => (Vec::new(), loopback_addrs(ranks)?),
    };
    let mut inproc = inproc.into_iter();
    // Each rank's spans belong to the caller's.
    let parent = &tracing::Span::current();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let job = &job;
                let t = inproc.next();
                let addrs = &addrs;
                s.spawn(move || {
                    let _in = parent.enter();
                    let t: Arc<dyn Transport> = match t {
                        Some(t) => Arc::new(t),
                        None => Arc::new(TcpTransport::establish(rank, addrs, TcpOptions::default())?),
                    };
                    ShardContext::new(t, plan).and_then(|mut ctx| {
                        ctx.in_process = true;
                        job(&ctx)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| WorkerError::Collective("a rank thread panicked".into()))?).collect()
    })
}

/// `n` loopback addresses with ports free at the time of asking.
fn loopback_addrs(n: usize) -> Result<Vec<std::net::SocketAddr>> {
    let io = |e: std::io::Error| WorkerError::Collective(format!("cannot find a free loopback port: {e}"));
    let listeners = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(io)).collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr().map_err(io)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TransformerPreset;

    /// Ranks whose models run on different kinds of device would exchange different things: the
    /// group is refused on every rank, naming each rank's device. Same kinds pass.
    #[test]
    fn a_group_mixing_devices_is_refused_on_every_rank() {
        let cpu = DitModel::preset(TransformerPreset::Tiny, 1, tessera_kernels::Device::Cpu).unwrap();
        let emulated = DitModel::emulated_preset(TransformerPreset::Tiny, 1).unwrap();
        let plan = ParallelPlan::new(2, 1, 2).unwrap();
        let errs = run_in_process(plan, |ctx| {
            let model = if ctx.rank() == 0 { &cpu } else { &emulated };
            Ok(ctx.join_device_group(model, None).err().map(|e| e.to_string()))
        })
        .unwrap();
        for e in errs {
            let e = e.expect("refused");
            assert!(e.contains("rank 0 on the CPU (f32), rank 1 on the host emulation of the CUDA model"), "{e}");
        }
        let same = run_in_process(plan, |ctx| ctx.join_device_group(&emulated, None));
        assert!(same.is_ok(), "{:?}", same.err());
    }
}
