//! The denoising run of one rank, written once over the backend: the rank's share of the latent
//! (the patch rows of its contiguous token range, f32) and the sampler's history for those rows
//! stay on the rank's device from the first step to the last. A step runs the transformer on the
//! rows (sharded attention joins the other ranks), combines guidance and applies the sampler there;
//! nothing of the latent crosses to the host or to another rank. The whole latent exists only
//! when asked for ([`ShardRun::gather`]: raw output, a checkpoint), gathered to rank 0; the split
//! decode takes each rank's rows as they are ([`ShardRun::patch_shard`]).
//!
//! Every update is element-wise, so stepping rows gives the latent of stepping the whole tensor,
//! bit for bit, whatever the sharding.

use super::Conditioning;
use crate::model::{LocalAttention, PatchGrid, PatchInputs, WanTransformer};
use crate::parallel::{shard_ranges, ShardContext, ShardOps};
use crate::sampler::{guidance_enabled, history_from_parts, SamplerHistory, SamplerState, Schedule};
use crate::vae::PatchShard;
use crate::{Result, WorkerError};
use std::ops::Range;
use tessera_kernels::backend::{at, at_mut};
use tessera_kernels::cpu::{self, PatchGeometry};
use tessera_kernels::Tensor;

/// Where a rank stands in its group: alone (the model's local attention), or a rank of a
/// sequence-parallel context.
#[derive(Clone, Copy)]
pub enum RankGroup<'a> {
    /// One device, every token.
    Alone,
    /// A rank of `ctx`'s group.
    Sharded(&'a ShardContext),
}

impl<'a> RankGroup<'a> {
    /// The group's communicator (`None` alone): what stages split across the ranks run over.
    pub fn world(self) -> Option<&'a crate::parallel::Communicator> {
        match self {
            Self::Alone => None,
            Self::Sharded(ctx) => Some(ctx.world()),
        }
    }
}

/// A rank's place: its share of the tokens among the ranks of its sequence-parallel group, and
/// its CFG half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    /// Place in the sequence-parallel group.
    rank: usize,
    /// Ranks of the sequence-parallel group.
    ranks: usize,
    /// CFG half (0: the conditional pass; always 0 without CFG-parallel).
    half: usize,
    /// CFG-parallel degree (1 or 2).
    cfg: usize,
}

impl RankGroup<'_> {
    fn position(&self) -> Position {
        match self {
            Self::Alone => Position { rank: 0, ranks: 1, half: 0, cfg: 1 },
            Self::Sharded(ctx) => {
                let (plan, rank) = (ctx.plan(), ctx.rank());
                Position { rank: plan.sequence_rank(rank), ranks: plan.sequence_ranks(), half: plan.half(rank), cfg: plan.cfg }
            }
        }
    }
}

/// Where a run's latent starts.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// The whole starting latent `[1, C, F, H, W]` on the host; each rank cuts its rows.
    Latents(&'a Tensor),
    /// Seeded noise of shape `[1, C, F, H, W]` ([`super::initial_noise`]): each rank draws only
    /// its own rows, and the whole latent never exists on any host.
    Noise {
        /// The generation's seed.
        seed: u64,
        /// The generator stream.
        stream: u64,
        /// The latent's shape.
        shape: [usize; 5],
    },
}

impl Start<'_> {
    fn shape(&self) -> &[usize] {
        match self {
            Self::Latents(t) => t.shape(),
            Self::Noise { shape, .. } => shape,
        }
    }

    /// This rank's rows (tokens `tokens` of the latent's patch geometry `g`).
    fn rows(&self, g: &PatchGeometry, tokens: Range<usize>) -> Result<Vec<f32>> {
        match self {
            Self::Latents(t) => Ok(cpu::patchify(t.data(), g, tokens)?),
            Self::Noise { seed, stream, .. } => super::noise_rows(*seed, *stream, g, tokens),
        }
    }
}

/// One rank's run of the denoising loop on backend `O`.
pub struct ShardRun<O: ShardOps> {
    grid: PatchGrid,
    geometry: PatchGeometry,
    /// Every rank's elements of the patch-row layout (rank j: tokens × features).
    parts: Vec<Range<usize>>,
    tokens: Range<usize>,
    position: Position,
    rows: O::Buf<f32>,
    state: SamplerState<O>,
    schedule: Schedule,
    /// The text states of the batch: the prompt's, then with guidance the negative prompt's (with
    /// CFG-parallel, this half's branch alone).
    context: Tensor,
    /// Image-to-video: what the transformer reads besides the noisy latent.
    image: Option<ImageRows<O>>,
    guidance_scale: f32,
    done: usize,
}

/// An image-to-video run's fixed inputs on this rank's device.
struct ImageRows<O: ShardOps> {
    /// The condition's patch rows of this rank's tokens (mask and image latents, `[tokens, cf]`).
    condition: O::Buf<f32>,
    /// The transformer's input rows `[tokens, lf + cf]`: each step's latent rows, then the
    /// condition's (channels concatenate, and a patch row is channel-major).
    input: O::Buf<f32>,
    /// The image tokens, once per sample of the batch `[B, tokens, image_dim]`.
    context: Tensor,
}

impl<O: ShardOps> ShardRun<O> {
    /// A run from the starting latent `start` `[1, C, F, H, W]`, of which this rank of `group`
    /// keeps its tokens' rows.
    pub fn new(model: &WanTransformer<O>, group: RankGroup<'_>, start: Start<'_>, text: Conditioning, guidance_scale: f32, schedule: Schedule) -> Result<Self> {
        let kind = schedule.config().kind;
        Self::build(model, group, start, &text, guidance_scale, schedule, 0, |ops, _, len| SamplerState::new(ops, kind, len))
    }

    /// Resumes from a checkpoint: the whole latent after `steps_done` steps and the whole
    /// sampler history then (both in the latent's layout, whatever group wrote them).
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        model: &WanTransformer<O>,
        group: RankGroup<'_>,
        latents: &Tensor,
        history: &SamplerHistory,
        steps_done: usize,
        text: Conditioning,
        guidance_scale: f32,
        schedule: Schedule,
    ) -> Result<Self> {
        let total = schedule.num_steps() - schedule.first_step();
        if steps_done > total || history.len != latents.len() || history.kind != schedule.config().kind {
            return Err(WorkerError::input(
                "checkpoint",
                format!(
                    "{steps_done} steps done of {total}, a {} history of {} values for a {} run on a latent of {}",
                    history.kind.name(),
                    history.len,
                    schedule.config().kind.name(),
                    latents.len()
                ),
            ));
        }
        // Checks the history's buffers, then cuts this rank's rows of each.
        let whole = SamplerState::from_history(&tessera_kernels::backend::CpuOps, history)?;
        Self::build(model, group, Start::Latents(latents), &text, guidance_scale, schedule, steps_done, |ops, cut, len| {
            let buffers = whole.buffers().iter().map(|b| cut(b)).collect::<Result<Vec<_>>>()?;
            SamplerState::from_buffers(ops, history.kind, len, history.next_step, buffers)
        })
    }

    /// The run of this rank of `group` from `start` after `done` steps, its sampler
    /// state made by `state` (given the backend, what cuts this rank's rows out of a whole
    /// latent-shaped buffer, and the rows' length).
    #[allow(clippy::too_many_arguments)]
    fn build(
        model: &WanTransformer<O>,
        group: RankGroup<'_>,
        start: Start<'_>,
        text: &Conditioning,
        guidance_scale: f32,
        schedule: Schedule,
        done: usize,
        state: impl FnOnce(&O, &dyn Fn(&[f32]) -> Result<O::Buf<f32>>, usize) -> Result<SamplerState<O>>,
    ) -> Result<Self> {
        if model.config().is_skyreels_v2() {
            return Err(WorkerError::input(
                "model",
                "a SkyReels-V2 transformer denoises with a timestep per frame, chunk by chunk (pipeline::forcing); this step-by-step loop runs Wan 2.1",
            ));
        }
        let position = group.position();
        let RowLayout { grid, geometry, parts, tokens } = layout(model, start.shape(), position.rank, position.ranks)?;
        let ops = model.ops();
        let cut = |values: &[f32]| -> Result<O::Buf<f32>> { Ok(ops.upload_vec(cpu::patchify(values, &geometry, tokens.clone())?)?) };
        let rows = ops.upload_vec(start.rows(&geometry, tokens.clone())?)?;
        let state = state(ops, &cut, parts[position.rank].len())?;
        let context = batch_context(text, guidance_scale, position)?;
        let image = image_rows(model, text, &geometry, tokens.clone(), context.dim(0))?;
        Ok(Self { grid, geometry, parts, tokens, position, rows, state, schedule, context, image, guidance_scale, done })
    }

    /// Steps in the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.num_steps() - self.schedule.first_step()
    }

    /// Steps completed.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// This rank's tokens.
    pub fn tokens(&self) -> Range<usize> {
        self.tokens.clone()
    }

    /// Runs the next step: the model on this rank's rows (sharded over `group`), guidance, and
    /// the sampler, all on the device.
    pub fn step(&mut self, model: &WanTransformer<O>, group: RankGroup<'_>) -> Result<()> {
        if self.done == self.total_steps() {
            return Err(WorkerError::input("step", format!("all {} steps have run", self.total_steps())));
        }
        if group.position() != self.position {
            return Err(WorkerError::input("rank", format!("a run made as {:?} stepped as {:?}", self.position, group.position())));
        }
        let i = self.schedule.first_step() + self.done;
        let t = self.schedule.timesteps().get(i).ok_or_else(|| WorkerError::input("step", format!("{i} is past the schedule")))?;
        let timesteps = vec![t; self.context.dim(0)];
        let ops = model.ops();
        if let Some(image) = &mut self.image {
            let (n, lf) = (self.tokens.len(), self.geometry.features());
            let width = model.config().patch_in();
            ops.copy_rows(at(&self.rows, 0), lf, at_mut(&mut image.input, 0), width, lf, n)?;
            ops.copy_rows(at(&image.condition, 0), width - lf, at_mut(&mut image.input, lf), width, width - lf, n)?;
        }
        let x = PatchInputs {
            patches: self.image.as_ref().map_or(&self.rows, |i| &i.input),
            grid: self.grid,
            tokens: self.tokens.clone(),
            timesteps: &timesteps,
            encoder_hidden_states: &self.context,
            encoder_hidden_states_image: self.image.as_ref().map(|i| &i.context),
            options: Default::default(),
        };
        let batch = timesteps.len();
        let mut out = match group {
            RankGroup::Sharded(ctx) if self.position.ranks > 1 => ctx.traced(batch, || O::forward_patches(ctx, model, &x))?,
            _ => tracing::info_span!("forward", rank = 0, ranks = 1, batch, tokens = self.tokens.len())
                .in_scope(|| model.forward_patches(&x, &LocalAttention))?,
        };
        let mut v = out.swap_remove(0);
        if let Some(uncond) = out.first() {
            ops.guide(&mut v, uncond, self.guidance_scale)?;
        }
        if let (RankGroup::Sharded(ctx), 2) = (group, self.position.cfg) {
            // CFG-parallel: this half ran one branch; the partner (same tokens, other half) the
            // other. Both combine them in the same order and step the same state.
            let theirs = O::swap_with_partner(ctx, ops, &v)?;
            if self.position.half == 0 {
                ops.guide(&mut v, &theirs, self.guidance_scale)?;
            } else {
                let mut cond = theirs;
                ops.guide(&mut cond, &v, self.guidance_scale)?;
                v = cond;
            }
        }
        self.state.step(ops, &self.schedule, i, &v, &mut self.rows)?;
        self.done += 1;
        Ok(())
    }

    /// The whole latent `[1, C, F, H, W]` on rank 0 (`None` on the others): a collective, every
    /// rank of the group calls it (the ranks of a second CFG half hold copies of the first's
    /// shares and take no part).
    pub fn gather(&self, model: &WanTransformer<O>, group: RankGroup<'_>) -> Result<Option<Tensor>> {
        self.gather_buf(model, group, &self.rows)
    }

    /// This rank's share of the latent on the host, as patch rows, with every member of the
    /// group's tokens (a member of a second CFG half, which holds a copy of a first-half rank's
    /// rows, is given none): what a split decode reads in place of the whole latent. Local: no
    /// rank waits on another.
    pub fn patch_shard(&self, model: &WanTransformer<O>, group: RankGroup<'_>) -> Result<PatchShard> {
        // Each sequence rank's tokens, from its elements of the row layout.
        let features = self.geometry.features();
        let shares: Vec<Range<usize>> = self.parts.iter().map(|p| p.start / features..p.end / features).collect();
        let tokens = match group {
            RankGroup::Sharded(ctx) => {
                let plan = ctx.plan();
                (0..plan.ranks()).map(|r| if plan.half(r) == 0 { shares[plan.sequence_rank(r)].clone() } else { 0..0 }).collect()
            }
            RankGroup::Alone => shares,
        };
        let rows = if self.position.half == 0 { model.ops().download(&self.rows)? } else { Vec::new() };
        Ok(PatchShard { geometry: self.geometry, tokens, rows })
    }

    /// The whole latent and the whole sampler history (in the latent's layout) on rank 0 (`None`
    /// on the others): a collective, every rank of the group calls it.
    pub fn checkpoint(&self, model: &WanTransformer<O>, group: RankGroup<'_>) -> Result<Option<(Tensor, SamplerHistory)>> {
        let latents = self.gather(model, group)?;
        let mut history = Vec::new();
        for b in self.state.buffers() {
            if let Some(whole) = self.gather_buf(model, group, b)? {
                history.push(whole.into_data());
            }
        }
        Ok(latents.map(|l| {
            let len = l.len();
            (l, history_from_parts(self.state.kind(), len, self.state.next_step(), history))
        }))
    }

    /// `buf` (rows of this rank) as the whole latent-shaped tensor on rank 0.
    fn gather_buf(&self, model: &WanTransformer<O>, group: RankGroup<'_>, buf: &O::Buf<f32>) -> Result<Option<Tensor>> {
        if self.position.half != 0 {
            return Ok(None);
        }
        let ops = model.ops();
        let rows = match group {
            RankGroup::Sharded(ctx) if self.position.ranks > 1 => O::gather_rows(ctx, ops, buf, &self.parts)?,
            _ => Some(ops.download(buf)?),
        };
        let Some(rows) = rows else { return Ok(None) };
        let g = &self.geometry;
        let [f, h, w] = g.latent_fhw();
        Ok(Some(Tensor::new([1, g.channels, f, h, w], cpu::unpatchify(&rows, g)?)?))
    }
}

/// How a latent is laid out as patch rows over a group.
struct RowLayout {
    grid: PatchGrid,
    geometry: PatchGeometry,
    /// Every rank's elements of the row layout.
    parts: Vec<Range<usize>>,
    /// This rank's tokens.
    tokens: Range<usize>,
}

/// The patch geometry of a latent of shape `s` `[1, C, F, H, W]` (C: the model's output channels)
/// for `model`, every rank's element range of the row layout, and `rank`'s tokens.
fn layout<O: ShardOps>(model: &WanTransformer<O>, s: &[usize], rank: usize, ranks: usize) -> Result<RowLayout> {
    let c = model.config();
    if s.len() != 5 || s[0] != 1 || s[1] != c.out_channels || c.in_channels < c.out_channels {
        return Err(WorkerError::input(
            "latents",
            format!("expected [1, {}, F, H, W] for a model of {} in and {} out channels, got {s:?}", c.out_channels, c.in_channels, c.out_channels),
        ));
    }
    let grid = PatchGrid::new([s[2], s[3], s[4]], c.patch_size)?;
    let geometry = PatchGeometry { channels: c.out_channels, grid: grid.dims, patch: grid.patch };
    if rank >= ranks {
        return Err(WorkerError::input("rank", format!("{rank} is outside a group of {ranks}")));
    }
    let tokens = shard_ranges(grid.tokens(), ranks);
    let features = geometry.features();
    let parts = tokens.iter().map(|r| r.start * features..r.end * features).collect();
    Ok(RowLayout { grid, geometry, parts, tokens: tokens[rank].clone() })
}

/// An image-to-video run's condition rows for `tokens` and its image tokens for a batch of
/// `batch`, or `None` for a model that reads only the latent; an image given to a model without
/// room for it, or missing for one that has, is refused.
fn image_rows<O: ShardOps>(
    model: &WanTransformer<O>,
    text: &Conditioning,
    latent: &PatchGeometry,
    tokens: Range<usize>,
    batch: usize,
) -> Result<Option<ImageRows<O>>> {
    let c = model.config();
    let extra = c.in_channels - c.out_channels;
    let image = match (&text.image, extra) {
        (None, 0) => return Ok(None),
        (Some(image), n) if n > 0 => image,
        (None, n) => return Err(WorkerError::input("image", format!("an image-to-video model reads {n} condition channels: the input image is required"))),
        (Some(_), _) => return Err(WorkerError::input("image", "given to a text-to-video model")),
    };
    let [f, h, w] = latent.latent_fhw();
    image.latents.expect_shape("image condition latents", &[1, extra, f, h, w])?;
    let embeds = &image.embeds;
    if embeds.shape().len() != 3 || embeds.dim(0) != 1 {
        return Err(WorkerError::input("image", format!("image tokens must be [1, tokens, dim], got {:?}", embeds.shape())));
    }
    let geometry = PatchGeometry { channels: extra, ..*latent };
    let ops = model.ops();
    let condition = ops.upload_vec(cpu::patchify(image.latents.data(), &geometry, tokens.clone())?)?;
    let input = ops.zeros::<f32>(tokens.len() * c.patch_in())?;
    let mut shape = embeds.shape().to_vec();
    shape[0] = batch;
    let context = Tensor::new(shape, embeds.data().repeat(batch))?;
    Ok(Some(ImageRows { condition, input, context }))
}

/// The text states of a step's batch: the prompt's `[1, L, D]`, and with guidance the negative
/// prompt's after it (`[2, L, D]`: the conditional and unconditional passes in one batch). A
/// CFG-parallel half runs its own branch alone: the prompt's (half 0) or the negative prompt's.
fn batch_context(text: &Conditioning, guidance_scale: f32, position: Position) -> Result<Tensor> {
    let a = &text.prompt_embeds;
    let negative = text.negative_embeds.as_ref().filter(|_| guidance_enabled(guidance_scale));
    if position.cfg == 2 {
        return match (position.half, negative) {
            (0, _) => Ok(a.clone()),
            (_, Some(b)) => Ok(b.clone()),
            (_, None) => Err(WorkerError::input("cfg_parallel", "CFG-parallel needs classifier-free guidance (a scale above 1)")),
        };
    }
    let Some(b) = negative else { return Ok(a.clone()) };
    b.expect_shape("negative_prompt_embeds", a.shape())?;
    let mut shape = a.shape().to_vec();
    shape[0] = 2;
    let mut data = Vec::with_capacity(a.len() * 2);
    data.extend_from_slice(a.data());
    data.extend_from_slice(b.data());
    Ok(Tensor::new(shape, data)?)
}
