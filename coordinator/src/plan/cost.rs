//! The cost of one job under one layout: FLOPs per step by part, per-rank peak memory by part,
//! bytes moved per step per rank and link, and the predicted seconds with their terms. Compute
//! runs at `peak × efficiency`, memory-bound work at `HBM bandwidth × efficiency`; Ulysses'
//! all-to-alls sit on the critical path, a ring hop hides behind the attention of the block
//! before it, CFG-parallel exchanges only the noise predictions, and diffusion forcing's
//! whole-batch forwards all-gather their output to every rank.

use super::gpu::GpuKind;
use super::model::{ModelShape, BF16};

/// Latency of one collective (NCCL's small-message latency is tens of microseconds).
pub const COLLECTIVE_LATENCY_S: f64 = 20e-6;

/// What the planner needs of a job: its token count and sizes (from the one checked
/// `JobSpec`), steps and whether guidance is on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobShape {
    /// Video tokens per forward.
    pub tokens: u64,
    /// Latent grid `[frames, height, width]`.
    pub latent_fhw: [u64; 3],
    /// Decoded frames.
    pub frames: u64,
    /// Generated frame height (the model's multiple).
    pub height: u64,
    /// Generated frame width.
    pub width: u64,
    /// Denoising steps.
    pub steps: u64,
    /// Whether classifier-free guidance is on.
    pub guidance: bool,
    /// Blocks of the causal block mask over the frames (diffusion forcing); 1: full attention.
    pub causal_blocks: u64,
    /// Every forward's output comes whole to every rank (diffusion forcing's whole-batch
    /// forward), so a CFG pair swaps its half's whole output, not a rank's rows.
    pub whole_output: bool,
}

impl JobShape {
    /// The shape of a checked job (of a diffusion-forcing job's largest chunk: what its layout
    /// and memory are planned for).
    pub fn of(spec: &tessera_cluster::JobSpec) -> Self {
        if let Some(forcing) = super::forcing::ForcingJob::of(spec) {
            return forcing.largest();
        }
        let (height, width) = spec.generated_size();
        let r = spec.request();
        let [f, h, w] = spec.latent_fhw();
        Self {
            tokens: spec.tokens() as u64,
            latent_fhw: [f as u64, h as u64, w as u64],
            frames: r.num_frames.into(),
            height: height.into(),
            width: width.into(),
            steps: r.steps.into(),
            guidance: tessera_cluster::limits::guidance_enabled(r.guidance_scale),
            causal_blocks: 1,
            whole_output: false,
        }
    }

    /// A Wan-factored job of `frames` × `height` × `width` with guidance and full attention:
    /// the fixture the planner's tests share.
    #[cfg(test)]
    pub(crate) fn wan(frames: u64, height: u64, width: u64, steps: u64) -> Self {
        use tessera_cluster::limits::{grid_tokens, latent_grid, ModelFactors};
        let latent_fhw = latent_grid(frames, height, width, ModelFactors::WAN);
        let tokens = grid_tokens(latent_fhw, ModelFactors::WAN).expect("a Wan-sized grid");
        Self { tokens, latent_fhw, frames, height, width, steps, guidance: true, causal_blocks: 1, whole_output: false }
    }

    /// The share of full self-attention's work the causal block mask leaves over the whole
    /// sequence: block b of B sees b + 1 blocks, (B + 1)/(2B) on average.
    pub fn mask_share(&self) -> f64 {
        let b = self.causal_blocks.max(1) as f64;
        (b + 1.0) / (2.0 * b)
    }
}

/// How a job is spread over its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Devices in all.
    pub gpus: u32,
    /// Ulysses (all-to-all) degree of each sequence-parallel group.
    pub ulysses: u32,
    /// Ring degree of each sequence-parallel group.
    pub ring: u32,
    /// Whether the devices split into a conditional and an unconditional half.
    pub cfg_parallel: bool,
    /// Ranks that decode the VAE (1: one rank decodes alone; `gpus`: each rank decodes a band of
    /// rows, as jobs do: `WanPipeline::decode_split`).
    pub vae_ranks: u32,
}

impl Layout {
    /// Ranks of one sequence-parallel group.
    pub fn sp(&self) -> u32 {
        self.ulysses * self.ring
    }

    /// `ulysses=U ring=R [cfg-parallel]`, for people.
    pub fn describe(&self) -> String {
        format!("ulysses={} ring={}{}", self.ulysses, self.ring, if self.cfg_parallel { " cfg-parallel" } else { "" })
    }
}

/// FLOPs of one denoising step, by part, over the whole group.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepFlops {
    /// Attention.
    pub attention: f64,
    /// Linear layers.
    pub linear: f64,
    /// The rest (norms, modulation, RoPE, activations).
    pub rest: f64,
}

/// Peak bytes of the busiest rank (rank 0, which also encodes the text), by part. The transformer's
/// weights stay; the text encoder is loaded from host memory for the job's encoding only, so the
/// peak is the weights plus the largest phase: encoding, denoising or decoding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Memory {
    /// Transformer weights (bf16).
    pub weights: u64,
    /// Text encoder weights, on the rank that encodes, while it encodes.
    pub text_encoder: u64,
    /// Image-to-video: the image encoder's weights, the VAE's and its working set over one
    /// full-size frame chunk, on every rank while it encodes the image (0 for other models).
    pub image_encoder: u64,
    /// Live activations of one block over the rank's tokens: the f32 residual stream plus the
    /// larger of the attention part (q, k, v, out) and the feed-forward part (norm, hidden).
    pub activations: u64,
    /// Attention workspace: log-sum-exp and the head-sharded q, k, v, out of Ulysses.
    pub attention_workspace: u64,
    /// Ring buffers: the next key/value block, double-buffered.
    pub ring_buffers: u64,
    /// Cached cross-attention keys and values of the text (and image).
    pub text_states: u64,
    /// The rank's share of the latent, its sampler history and the velocities of a step (f32):
    /// what `ShardRun` keeps on the device.
    pub latent_shard: u64,
    /// VAE weights.
    pub vae_weights: u64,
    /// The VAE decoder's working set for the rank's tile of one temporal chunk, and its latent.
    pub vae_tiles: u64,
    /// The peak: the weights plus the largest of the encoding (text, image), denoising and
    /// decoding phases.
    pub peak: u64,
}

/// Bytes one rank sends per denoising step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Ulysses all-to-alls.
    pub ulysses: f64,
    /// Ring hops.
    pub ring: f64,
    /// CFG-parallel exchange of noise predictions.
    pub cfg: f64,
    /// Diffusion forcing: every forward's output all-gathered to every rank of the sequence group
    /// ([`JobShape::whole_output`]).
    pub gather: f64,
    /// Of the above, bytes inside a node (NVLink, PCIe or memory).
    pub intra_node: f64,
    /// Of the above, bytes over the network.
    pub network: f64,
}

impl Traffic {
    /// All bytes one rank sends per step.
    pub fn total(&self) -> f64 {
        self.ulysses + self.ring + self.cfg + self.gather
    }
}

/// Predicted seconds, by term.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    /// Loading the text encoder and encoding the prompt(s), once per job.
    pub text: f64,
    /// Image-to-video: loading the image encoder, encoding the image and VAE-encoding the
    /// condition video, once per job (0 for other models).
    pub image: f64,
    /// Per step: attention compute on one rank.
    pub attention: f64,
    /// Per step: linear layers on one rank.
    pub linear: f64,
    /// Per step: the memory-bound rest on one rank.
    pub rest: f64,
    /// Per step: Ulysses all-to-alls (not overlapped).
    pub ulysses: f64,
    /// Per step: ring hops not hidden behind attention.
    pub ring_exposed: f64,
    /// Per step: merging each hop's partial attention output into the rank's f32 accumulator by
    /// log-sum-exp (memory-bound: read both, write one).
    pub ring_merge: f64,
    /// Per step: the CFG-parallel exchange.
    pub cfg: f64,
    /// Per step: the output all-gathers of diffusion forcing's whole-batch forwards.
    pub gather: f64,
    /// One step.
    pub step: f64,
    /// All steps.
    pub denoise: f64,
    /// VAE decode.
    pub vae: f64,
    /// The job.
    pub total: f64,
}

/// One layout's predicted cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The layout.
    pub layout: Layout,
    /// Video tokens per forward.
    pub tokens: u64,
    /// FLOPs per step (whole group).
    pub flops: StepFlops,
    /// Per-rank peak memory.
    pub memory: Memory,
    /// Bytes per step per rank.
    pub traffic: Traffic,
    /// The link each exchange uses: `(ulysses, ring, cfg)`.
    pub links: (&'static str, &'static str, &'static str),
    /// Predicted seconds.
    pub timing: Timing,
    /// `None` when the layout runs; else why not.
    pub infeasible: Option<String>,
}

/// Why `layout` cannot run `job` of `model`, structurally (memory aside), or `None`.
pub fn structural_problem(model: &ModelShape, job: &JobShape, layout: Layout) -> Option<String> {
    let halves = if layout.cfg_parallel { 2 } else { 1 };
    if layout.ulysses == 0 || layout.ring == 0 || layout.gpus != layout.sp() * halves {
        return Some(format!("{} devices cannot be {}", layout.gpus, layout.describe()));
    }
    if !model.heads.is_multiple_of(u64::from(layout.ulysses)) {
        return Some(format!("ulysses={} does not divide the model's {} heads", layout.ulysses, model.heads));
    }
    if layout.cfg_parallel && model.forwards_per_step(job.guidance) < 2 {
        return Some("cfg-parallel needs classifier-free guidance (a scale above 1 on a model without distilled guidance)".into());
    }
    if u64::from(layout.sp()) > job.tokens {
        return Some(format!("{} ranks for {} tokens leave some without a token", layout.sp(), job.tokens));
    }
    if layout.vae_ranks == 0 || layout.vae_ranks > layout.gpus {
        return Some(format!("vae_ranks={} must be between 1 and {}", layout.vae_ranks, layout.gpus));
    }
    None
}

/// The cost of `job` for `model` on `layout` over devices of `gpu` at achieved `efficiency`.
pub fn evaluate(model: &ModelShape, job: &JobShape, gpu: &GpuKind, layout: Layout, efficiency: f64) -> Evaluation {
    let sp = u64::from(layout.sp().max(1));
    let (u, r) = (u64::from(layout.ulysses.max(1)), u64::from(layout.ring.max(1)));
    let forwards = model.forwards_per_step(job.guidance);
    // forwards each rank runs per step: CFG-parallel halves them
    let rank_forwards = if layout.cfg_parallel { 1 } else { forwards } as f64;
    let d = model.hidden();
    let full = model.forward(job.tokens);
    // The causal block mask removes self-attention work. Ulysses splits heads, so every rank does
    // the masked share; a ring's members get contiguous spans of equal work (the workers'
    // `balanced_ranges`: longer spans where queries see fewer keys), so its busiest member does
    // the mean too.
    let work = super::model::ForwardWork { attention_flops: full.attention_flops - full.self_attention_flops * (1.0 - job.mask_share()), ..full };
    let busiest_attention = work.attention_flops;
    let flops =
        StepFlops { attention: work.attention_flops * forwards as f64, linear: work.linear_flops * forwards as f64, rest: work.rest_flops * forwards as f64 };

    // memory of rank 0
    let rank_tokens = job.tokens.div_ceil(sp) + if model.text_joint { model.text_len } else { 0 };
    let contexts = if layout.cfg_parallel { 1 } else { forwards };
    let latent_elems = job.latent_fhw.iter().product::<u64>() * model.latent_channels;
    let vae_pixels = (job.height * job.width).div_ceil(u64::from(layout.vae_ranks.max(1)));
    let mut m = Memory {
        weights: model.params * BF16,
        text_encoder: model.text_encoder_params * BF16,
        image_encoder: if model.image_encoder_params > 0 {
            (model.image_encoder_params + model.vae.params) * BF16 + model.vae_chunk_bytes(job.height * job.width)
        } else {
            0
        },
        activations: rank_tokens * (4 * d + (4 * d).max(d + model.ffn) * BF16),
        attention_workspace: rank_tokens * model.heads * 4 + if u > 1 { 4 * rank_tokens * d * BF16 } else { 0 },
        ring_buffers: if r > 1 { 2 * 2 * rank_tokens * d * BF16 } else { 0 },
        text_states: if model.text_joint { 0 } else { contexts * model.layers * 2 * (model.text_len + model.image_len) * d * BF16 },
        // the rank's rows of the latent, three of UniPC history and a velocity per forward, f32
        latent_shard: (4 + contexts) * latent_elems.div_ceil(sp) * 4,
        vae_weights: model.vae.params * BF16,
        vae_tiles: model.vae_chunk_bytes(vae_pixels) + latent_elems.div_ceil(u64::from(layout.vae_ranks.max(1))) * 4,
        peak: 0,
    };
    let denoising = m.activations + m.attention_workspace + m.ring_buffers + m.text_states + m.latent_shard;
    m.peak = m.weights + m.text_encoder.max(m.image_encoder).max(denoising).max(m.vae_weights + m.vae_tiles);

    // bytes per rank per step
    let shard_bytes = (rank_tokens * d * BF16) as f64;
    let layers = model.layers as f64;
    let ulysses_bytes = rank_forwards * layers * 4.0 * shard_bytes * (u - 1) as f64 / u as f64;
    let ring_bytes = rank_forwards * layers * (r - 1) as f64 * 2.0 * shard_bytes;
    let swapped = if job.whole_output { job.tokens } else { job.tokens.div_ceil(sp) };
    let cfg_bytes = if layout.cfg_parallel { (swapped * model.patch_out * 4) as f64 } else { 0.0 };
    // a whole-output forward sends the rank's rows to each other rank of its sequence group
    let gather_bytes = if job.whole_output { rank_forwards * ((sp - 1) * job.tokens.div_ceil(sp) * model.patch_out * 4) as f64 } else { 0.0 };
    let (u_link, r_link, c_link) = (gpu.link_bytes_per_s(layout.ulysses), gpu.link_bytes_per_s(layout.sp()), gpu.link_bytes_per_s(layout.gpus));
    let mut traffic = Traffic { ulysses: ulysses_bytes, ring: ring_bytes, cfg: cfg_bytes, gather: gather_bytes, ..Traffic::default() };
    for (bytes, ranks) in [(ulysses_bytes, layout.ulysses), (ring_bytes, layout.sp()), (cfg_bytes, layout.gpus), (gather_bytes, layout.sp())] {
        if ranks <= gpu.per_node {
            traffic.intra_node += bytes;
        } else {
            traffic.network += bytes;
        }
    }

    // seconds
    let rate = gpu.peak_flops * efficiency;
    let hbm = gpu.hbm_bytes_per_s * efficiency;
    let sp_f = sp as f64;
    let mut t = Timing {
        // the encoder's weights come from host memory, then it encodes the prompt(s)
        text: (model.text_encoder_params * BF16) as f64 / gpu.host_bytes_per_s + model.text_encode_flops() * forwards as f64 / rate,
        image: if model.image_encoder_params > 0 {
            (model.image_encoder_params * BF16) as f64 / gpu.host_bytes_per_s + model.image_encode_flops(job.frames, job.height, job.width) / rate
        } else {
            0.0
        },
        attention: rank_forwards * busiest_attention / sp_f / rate,
        linear: rank_forwards * work.linear_flops / sp_f / rate,
        rest: rank_forwards * work.rest_bytes / sp_f / hbm,
        ..Timing::default()
    };
    if u > 1 {
        t.ulysses = ulysses_bytes / u_link + rank_forwards * layers * 4.0 * COLLECTIVE_LATENCY_S;
    }
    if r > 1 {
        // per layer: r − 1 hops, each hidden behind the attention of one block
        let hop_comm = 2.0 * shard_bytes / r_link + COLLECTIVE_LATENCY_S;
        let hop_compute = work.attention_flops / layers / sp_f / r as f64 / rate;
        t.ring_exposed = rank_forwards * layers * (r - 1) as f64 * (hop_comm - hop_compute).max(0.0);
        t.ring_merge = rank_forwards * layers * (r - 1) as f64 * (rank_tokens * d * 4 * 3) as f64 / hbm;
    }
    if layout.cfg_parallel {
        t.cfg = cfg_bytes / c_link + COLLECTIVE_LATENCY_S;
    }
    if gather_bytes > 0.0 {
        t.gather = gather_bytes / r_link + rank_forwards * COLLECTIVE_LATENCY_S;
    }
    t.step = t.attention + t.linear + t.rest + t.ulysses + t.ring_exposed + t.ring_merge + t.cfg + t.gather;
    t.denoise = t.step * job.steps as f64;
    let (vae_flops, vae_bytes) = model.vae_decode_work(job.frames, job.height, job.width);
    let vae_ranks = f64::from(layout.vae_ranks.max(1));
    t.vae = (vae_flops / rate).max(vae_bytes / hbm) / vae_ranks;
    t.total = t.text + t.image + t.denoise + t.vae;

    let infeasible = structural_problem(model, job, layout).or_else(|| {
        (m.peak > gpu.usable_bytes())
            .then(|| format!("rank 0 needs {:.1} GiB at its peak; a {} offers {:.1} GiB to a job", gib(m.peak), gpu.name, gib(gpu.usable_bytes())))
    });
    Evaluation {
        layout,
        tokens: job.tokens,
        flops,
        memory: m,
        traffic,
        links: (gpu.link_name(layout.ulysses), gpu.link_name(layout.sp()), gpu.link_name(layout.gpus)),
        timing: t,
        infeasible,
    }
}

/// Bytes in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::super::gpu::gpu_kind;
    use super::super::model::preset;
    use super::*;

    fn minute_1080p() -> JobShape {
        let job = JobShape::wan(961, 1088, 1920, 50);
        assert_eq!((job.tokens, job.latent_fhw), (241 * 68 * 120, [241, 136, 240]));
        job
    }

    fn layout(gpus: u32, ulysses: u32, cfg_parallel: bool) -> Layout {
        let sp = gpus / if cfg_parallel { 2 } else { 1 };
        Layout { gpus, ulysses, ring: sp / ulysses, cfg_parallel, vae_ranks: gpus }
    }

    #[test]
    fn ulysses_bytes_follow_the_formula() {
        // parallelism.md: Ulysses moves 4·N·h/P per link per layer; a rank sends (U−1)/U of it.
        let m = preset("wan2.1-t2v-14b").unwrap();
        let job = minute_1080p();
        let e = evaluate(&m, &job, &gpu_kind("h100-80gb").unwrap(), layout(8, 8, false), 0.35);
        let per_layer = 4.0 * (job.tokens.div_ceil(8) * 5120 * 2) as f64 * 7.0 / 8.0;
        assert_eq!(e.traffic.ulysses, 2.0 * 40.0 * per_layer);
        assert_eq!(e.traffic.network, 0.0);
        // ring: 2·N·h per rank per layer in total over P−1 hops (K and V of (P−1) blocks)
        let e = evaluate(&m, &job, &gpu_kind("h100-80gb").unwrap(), layout(16, 1, false), 0.35);
        let ring = 2.0 * 40.0 * 15.0 * 2.0 * (job.tokens.div_ceil(16) * 5120 * 2) as f64;
        assert_eq!(e.traffic.ring, ring);
        assert_eq!(e.traffic.intra_node, 0.0, "a ring of 16 crosses nodes");
    }

    #[test]
    fn per_rank_latent_and_vae_memory_fall_as_one_over_n() {
        let m = preset("wan2.1-t2v-1.3b").unwrap();
        let job = minute_1080p();
        let g = gpu_kind("h200").unwrap();
        let one = evaluate(&m, &job, &g, layout(1, 1, false), 0.5).memory;
        for n in [2u32, 4] {
            let e = evaluate(&m, &job, &g, layout(n, 1, false), 0.5).memory;
            let ratio = one.latent_shard as f64 / e.latent_shard as f64;
            assert!((ratio / f64::from(n) - 1.0).abs() < 1e-3, "latent x{ratio} on {n}");
            let ratio = one.vae_tiles as f64 / e.vae_tiles as f64;
            assert!((ratio / f64::from(n) - 1.0).abs() < 0.01, "vae x{ratio} on {n}");
        }
    }

    /// An image-to-video model pays for its image stage once per job: the image encoder's load
    /// and tokens, and the VAE encoding the condition video; a text-to-video model pays nothing.
    #[test]
    fn image_to_video_adds_the_image_stage() {
        let job = JobShape::wan(81, 480, 832, 40);
        let g = gpu_kind("h100-80gb").unwrap();
        let i2v = evaluate(&preset("wan2.1-i2v-14b").unwrap(), &job, &g, layout(1, 1, false), 0.4);
        let t2v = evaluate(&preset("wan2.1-t2v-14b").unwrap(), &job, &g, layout(1, 1, false), 0.4);
        assert_eq!((t2v.memory.image_encoder, t2v.timing.image), (0, 0.0));
        // ViT-H/14 in bf16 is 1.26 GB of the image stage's memory.
        assert!(i2v.memory.image_encoder > 2 * super::super::model::VIT_H14_PARAMS);
        assert!(i2v.timing.image > 0.0 && i2v.timing.total > t2v.timing.total);
        assert!((i2v.timing.total - i2v.timing.text - i2v.timing.image - i2v.timing.denoise - i2v.timing.vae).abs() < 1e-9);
    }

    #[test]
    fn structure_is_checked() {
        let m = preset("wan2.1-t2v-1.3b").unwrap();
        let job = minute_1080p();
        let g = gpu_kind("h100-80gb").unwrap();
        let bad = |l: Layout| evaluate(&m, &job, &g, l, 0.3).infeasible.unwrap();
        assert!(bad(layout(8, 8, false)).contains("12 heads"));
        assert!(bad(Layout { gpus: 3, ulysses: 1, ring: 2, cfg_parallel: false, vae_ranks: 1 }).contains("3 devices"));
        let unguided = JobShape { guidance: false, ..job };
        assert!(evaluate(&m, &unguided, &g, layout(4, 2, true), 0.3).infeasible.unwrap().contains("guidance"));
    }

    #[test]
    fn cfg_parallel_halves_the_forwards_of_each_rank() {
        let m = preset("wan2.1-t2v-14b").unwrap();
        let job = minute_1080p();
        let g = gpu_kind("h100-80gb").unwrap();
        let plain = evaluate(&m, &job, &g, layout(8, 4, false), 0.35);
        let cfg = evaluate(&m, &job, &g, layout(8, 4, true), 0.35);
        // each rank runs one forward over twice the tokens instead of two: attention is
        // quadratic in the group's tokens but divided over half the ranks, so equal time
        assert!((cfg.timing.attention / plain.timing.attention - 1.0).abs() < 1e-9);
        // the same Ulysses bytes per rank, and no ring left: 8 = 4 x 2 rings, 4 + 4 = 4 x 1
        assert_eq!(cfg.traffic.ulysses, plain.traffic.ulysses);
        assert!(plain.traffic.ring > 0.0 && cfg.traffic.ring == 0.0);
        assert!(cfg.traffic.cfg > 0.0 && plain.traffic.cfg == 0.0);
    }

    #[test]
    fn the_causal_mask_saves_attention_on_every_rank() {
        let m = preset("skyreels-v2-df-14b").unwrap();
        let g = gpu_kind("h100-80gb").unwrap();
        let full = JobShape::wan(97, 720, 1280, 50);
        assert_eq!(full.tokens, 25 * 45 * 80);
        let causal = JobShape { causal_blocks: 5, ..full };
        assert_eq!((full.mask_share(), causal.mask_share()), (1.0, 0.6));
        let work = m.forward(full.tokens);
        let (a, b) = (evaluate(&m, &full, &g, layout(8, 8, false), 0.35), evaluate(&m, &causal, &g, layout(8, 8, false), 0.35));
        // the group's FLOPs: 40 % of the self-attention removed, the cross-attention kept
        let saved = a.flops.attention - b.flops.attention;
        assert!((saved / (2.0 * 0.4 * work.self_attention_flops) - 1.0).abs() < 1e-9, "{saved:e}");
        // Ulysses: every rank saves its share; a ring of 8 too, its spans cut for equal work
        assert!((b.timing.attention / a.timing.attention - b.flops.attention / a.flops.attention).abs() < 1e-9);
        let ring = (evaluate(&m, &full, &g, layout(8, 1, false), 0.35), evaluate(&m, &causal, &g, layout(8, 1, false), 0.35));
        assert!((ring.1.timing.attention / ring.0.timing.attention - b.flops.attention / a.flops.attention).abs() < 1e-9);
    }
}
