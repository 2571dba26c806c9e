//! Planning a diffusion-forcing long video (SkyReels-V2): the video is made chunk by chunk
//! ([`ChunkPlan`], the workers' own arithmetic), each chunk a sharded generation of its frames'
//! tokens under the causal block mask, running [`iterations`] model evaluations. A chunk is
//! priced by [`evaluate`] on the layout chosen for the largest chunk; the text is encoded once;
//! each chunk's new frames are decoded after it, so the first chunk's frames are ready after the
//! text, one chunk and its decode.

use super::cost::{evaluate, Evaluation, JobShape, Layout};
use super::gpu::GpuKind;
use super::model::ModelShape;
use tessera_cluster::forcing::{iterations, Chunk, ChunkPlan};
use tessera_cluster::limits::{grid_tokens, ModelFactors};

/// A diffusion-forcing job as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ForcingJob {
    /// The chunks.
    pub plan: ChunkPlan,
    /// Sampler steps of every frame.
    pub steps: u64,
    /// Iterations block b lags block b−1.
    pub ar_step: u64,
    /// Latent grid `[height, width]`.
    pub latent_hw: [u64; 2],
    /// Generated frame size `(height, width)`.
    pub size: (u64, u64),
    /// Whether classifier-free guidance is on.
    pub guidance: bool,
    /// How the model turns video into tokens (its VAE's factors and patch).
    pub factors: ModelFactors,
}

/// One chunk's cost.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkCost {
    /// The chunk.
    pub chunk: Chunk,
    /// Model evaluations (iterations of its step matrix).
    pub iterations: u64,
    /// Its cost as one job of `iterations` steps over its tokens.
    pub evaluation: Evaluation,
    /// Seconds to denoise it.
    pub denoise: f64,
    /// Seconds to decode its new frames.
    pub decode: f64,
}

/// A diffusion-forcing job's predicted cost on one layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ForcingEvaluation {
    /// The layout.
    pub layout: Layout,
    /// Every chunk.
    pub chunks: Vec<ChunkCost>,
    /// Encoding the prompts, once.
    pub text: f64,
    /// A video extension: VAE-encoding the input's last `overlap_history` frames, once, before
    /// the first chunk (0 otherwise).
    pub history: f64,
    /// Until the first chunk's frames are decoded.
    pub first_chunk: f64,
    /// The whole job.
    pub total: f64,
    /// `None` when every chunk runs; else why not (the first chunk that does not).
    pub infeasible: Option<String>,
}

impl ForcingJob {
    /// A checked diffusion-forcing job's chunks and settings (`None` for another job).
    pub fn of(spec: &tessera_cluster::JobSpec) -> Option<Self> {
        let (plan, r) = (spec.chunks()?.clone(), spec.request());
        let [_, h, w] = spec.latent_fhw();
        let (height, width) = spec.generated_size();
        Some(Self {
            plan,
            steps: r.steps.into(),
            ar_step: r.forcing?.ar_step.into(),
            latent_hw: [h as u64, w as u64],
            size: (height.into(), width.into()),
            guidance: tessera_cluster::limits::guidance_enabled(r.guidance_scale),
            factors: spec.factors(),
        })
    }

    /// The shape of chunk `c` as a job: its tokens (the model's patches), its iterations as
    /// steps, its new frames decoded, its causal blocks.
    pub fn chunk_shape(&self, c: &Chunk, first: bool) -> JobShape {
        let [h, w] = self.latent_hw;
        let new = (c.frames - c.overlap) as u64;
        JobShape {
            tokens: grid_tokens([c.frames as u64, h, w], self.factors).unwrap_or(u64::MAX),
            latent_fhw: [c.frames as u64, h, w],
            // the VAE's causal first frame: 1 + 4(n − 1) for the first chunk, 4 per latent frame after
            frames: if first { 4 * new - 3 } else { 4 * new },
            height: self.size.0,
            width: self.size.1,
            steps: iterations(self.steps as usize, c.frames, c.prefix, self.plan.block, self.ar_step as usize) as u64,
            guidance: self.guidance,
            // blocks of one frame are no mask at all (SkyReels-V2: `num_frame_per_block` 1)
            causal_blocks: if self.plan.block <= 1 { 1 } else { (c.frames / self.plan.block).max(1) as u64 },
            whole_output: true,
        }
    }

    /// The largest chunk's shape (the first): what a layout is chosen for.
    pub fn largest(&self) -> JobShape {
        self.chunk_shape(&self.plan.chunks[0], true)
    }
}

/// The cost of `job` for `model` on `layout` over `gpu` at `efficiency`.
pub fn evaluate_forcing(model: &ModelShape, job: &ForcingJob, gpu: &GpuKind, layout: Layout, efficiency: f64) -> ForcingEvaluation {
    let chunks: Vec<ChunkCost> = job
        .plan
        .chunks
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let shape = job.chunk_shape(c, k == 0);
            let evaluation = evaluate(model, &shape, gpu, layout, efficiency);
            let (denoise, decode) = (evaluation.timing.denoise, evaluation.timing.vae);
            ChunkCost { chunk: *c, iterations: shape.steps, evaluation, denoise, decode }
        })
        .collect();
    let text = chunks.first().map_or(0.0, |c| c.evaluation.timing.text);
    // Encoding the history is priced as two thirds of decoding as many frames (the encoder's share
    // of the VAE's work, as the image-to-video stage is): the first chunk's decode, per frame.
    let history = match (job.plan.repeated_frames(), chunks.first()) {
        (0, _) | (_, None) => 0.0,
        (n, Some(c)) => c.decode * 2.0 / 3.0 * n as f64 / job.chunk_shape(&c.chunk, true).frames.max(1) as f64,
    };
    let first_chunk = text + history + chunks.first().map_or(0.0, |c| c.denoise + c.decode);
    let total = text + history + chunks.iter().map(|c| c.denoise + c.decode).sum::<f64>();
    let infeasible = chunks.iter().enumerate().find_map(|(k, c)| c.evaluation.infeasible.as_ref().map(|why| format!("chunk {k}: {why}")));
    ForcingEvaluation { layout, chunks, text, history, first_chunk, total, infeasible }
}

#[cfg(test)]
mod tests {
    use super::super::gpu::gpu_kind;
    use super::super::model::preset;
    use super::*;

    fn minute_720p(ar_step: u64, block: usize) -> ForcingJob {
        // 60 s at 24 fps (1441 frames, 361 latent), chunks of 121 frames (31 latent) overlapping by 17 (5)
        let plan = ChunkPlan::new(1441, 121, Some(17), block).unwrap();
        ForcingJob { plan, steps: 30, ar_step, latent_hw: [90, 160], size: (720, 1280), guidance: true, factors: ModelFactors::WAN }
    }

    #[test]
    fn chunks_add_up_to_the_job() {
        let (m, g) = (preset("skyreels-v2-df-14b").unwrap(), gpu_kind("h100-80gb").unwrap());
        let job = minute_720p(0, 1);
        let layout = Layout { gpus: 8, ulysses: 8, ring: 1, cfg_parallel: false, vae_ranks: 1 };
        let e = evaluate_forcing(&m, &job, &g, layout, 0.35);
        assert_eq!(e.chunks.len(), job.plan.chunks.len());
        assert!(e.infeasible.is_none(), "{:?}", e.infeasible);
        // synchronous: every chunk runs S iterations; the decoded frames add up to the video
        assert!(e.chunks.iter().all(|c| c.iterations == 30 && c.evaluation.flops.attention > 0.0));
        assert_eq!(job.largest().causal_blocks, 1, "blocks of one frame: full attention");
        assert!(e.chunks.iter().all(|c| c.decode > 0.0 && c.denoise > c.decode));
        let frames: u64 = job.plan.chunks.iter().enumerate().map(|(k, c)| job.chunk_shape(c, k == 0).frames).sum();
        assert_eq!(frames, 1441);
        assert!(e.first_chunk < e.total / 5.0 && e.total > e.first_chunk);
        let sum = e.text + e.chunks.iter().map(|c| c.denoise + c.decode).sum::<f64>();
        assert!((sum - e.total).abs() < 1e-9 && e.history == 0.0);
        // Extending a video: its last 17 frames are encoded once, before the first chunk, which
        // starts from their 5 latent frames (synchronous: in the forward all the same, and every
        // chunk runs S iterations, so the chunks cost what text-to-video's do).
        let ext = ForcingJob { plan: job.plan.clone().extending(17).unwrap(), ..job.clone() };
        let x = evaluate_forcing(&m, &ext, &g, layout, 0.35);
        let per_frame = e.chunks[0].decode / 121.0;
        assert!((x.history / (per_frame * 17.0 * 2.0 / 3.0) - 1.0).abs() < 1e-9, "{} s", x.history);
        assert!(x.chunks.iter().zip(&e.chunks).all(|(a, b)| (a.denoise, a.decode) == (b.denoise, b.decode)));
        assert!((x.total - x.text - x.history - x.chunks.iter().map(|c| c.denoise + c.decode).sum::<f64>()).abs() < 1e-9);
        // asynchronous (blocks of 5 lagging 5 iterations): more iterations per chunk
        let plan = ChunkPlan::new(1397, 117, Some(17), 5).unwrap();
        let job = ForcingJob { plan, ar_step: 5, ..job };
        let e = evaluate_forcing(&m, &job, &g, layout, 0.35);
        assert_eq!(e.chunks[0].iterations, 30 + 5 * 5);
        assert_eq!(e.chunks[1].iterations, 30 + 4 * 5);
        assert_eq!(job.largest().causal_blocks, 6);
    }

    /// A chunk's tokens are its latent in the model's patches; with CFG halves each rank swaps
    /// its half's whole output every iteration (the whole-batch forward gives every rank all of
    /// it), not a rank's rows, and every forward's output is all-gathered in its sequence group.
    #[test]
    fn a_chunk_is_priced_in_the_models_patches_and_swaps_its_whole_output() {
        let (m, g) = (preset("skyreels-v2-df-14b").unwrap(), gpu_kind("h100-80gb").unwrap());
        let job = minute_720p(0, 1);
        let largest = job.largest();
        assert_eq!((largest.tokens, largest.whole_output), (31 * 45 * 80, true));
        let halves = Layout { gpus: 8, ulysses: 4, ring: 1, cfg_parallel: true, vae_ranks: 8 };
        let e = evaluate(&m, &largest, &g, halves, 0.35);
        assert_eq!(e.traffic.cfg, (31 * 45 * 80 * m.patch_out * 4) as f64);
        let rows = evaluate(&m, &JobShape { whole_output: false, ..largest }, &g, halves, 0.35);
        assert_eq!(rows.traffic.cfg * 4.0, e.traffic.cfg, "a Wan job's rank swaps its quarter of the tokens");
        // Each forward's output all-gathered over the half's 4 ranks: 3 other ranks get this
        // rank's quarter, once per step (one forward per rank with CFG halves).
        assert_eq!((e.traffic.gather, rows.traffic.gather), ((3 * 31 * 45 * 80 / 4 * m.patch_out * 4) as f64, 0.0));
        assert!(e.timing.gather > 0.0 && rows.timing.gather == 0.0 && e.timing.step > rows.timing.step);
    }
}
