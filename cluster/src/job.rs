//! The job spec: one generation as the cluster runs it. The coordinator makes it once from a
//! public request (the CLI's flags become one) with the served model's factors and the configured
//! limits; it travels to every worker in PrepareJob, and each worker checks it again with the same
//! constructor, against its own limits, before it allocates anything.

use crate::forcing::{ChunkPlan, ForcingSettings, Start};
use crate::limits::{check_settings, grid_tokens, Limits, ModelFactors, Settings};
use crate::{ClusterError, Result};
use tessera_proto::v1::Sampler;
use tessera_proto::worker::v1 as pb;

/// Longest prompt or negative prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 2_000;

/// Most sequence-parallel ranks one job may have.
pub const MAX_RANKS: u32 = 4096;

/// How a job is spread: `ranks` ranks, split into two halves when `cfg_parallel` (one runs the
/// conditional pass of guidance, the other the unconditional), each half (or the whole group) a
/// sequence-parallel group of `ulysses` ranks exchanging heads (all-to-all) times rings passing
/// keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPlan {
    /// Ranks of the group.
    pub ranks: u32,
    /// Ulysses degree (divides a sequence-parallel group; the workers check it also divides
    /// their heads).
    pub ulysses: u32,
    /// Whether the guidance passes run on two halves of the group.
    pub cfg_parallel: bool,
}

impl JobPlan {
    /// Ranks of one sequence-parallel group: `ranks`, or half of them with CFG-parallel.
    pub fn sequence_ranks(self) -> u32 {
        self.ranks / if self.cfg_parallel { 2 } else { 1 }
    }

    /// Ring degree: the sequence-parallel group over `ulysses`.
    pub fn ring(self) -> u32 {
        self.sequence_ranks() / self.ulysses.max(1)
    }
}

/// Widest or tallest input image accepted (image-to-video), in pixels.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// The size of an image-to-video job's input image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSize {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

impl ImageSize {
    /// Checks the sides (1 to [`MAX_IMAGE_SIDE`]), naming `field`.
    pub fn check(self, field: &'static str) -> Result<Self> {
        for v in [self.width, self.height] {
            if v == 0 || v > MAX_IMAGE_SIDE {
                return Err(ClusterError::input(field, format!("is {}x{}; each side must be between 1 and {MAX_IMAGE_SIDE}", self.width, self.height)));
            }
        }
        Ok(self)
    }

    /// Bytes of the image as 8-bit RGB.
    pub fn rgb_bytes(self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// What a job asks for, every default applied; not yet checked.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    /// What the video shows.
    pub prompt: String,
    /// What it should not show.
    pub negative_prompt: String,
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Frames.
    pub num_frames: u32,
    /// Denoising steps of the full schedule.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// σ shift; `None` keeps the model's scheduler config.
    pub flow_shift: Option<f32>,
    /// Sampler (`Unspecified`: the model's scheduler config).
    pub sampler: Sampler,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Video-to-video strength (set exactly when a Wan job has an input video).
    pub strength: Option<f32>,
    /// Video extension (set exactly when a diffusion-forcing job has an input video): the video
    /// continues the input from its last `overlap_history` frames; `num_frames` counts them.
    pub extend: bool,
    /// Diffusion forcing (set exactly when the model is a SkyReels-V2 DF model): the video is
    /// made chunk by chunk.
    pub forcing: Option<ForcingSettings>,
    /// Image-to-video: the input image's size (set exactly when the job has an input image: a Wan
    /// 2.1 I2V model requires one; a diffusion-forcing model starts its first chunk from it).
    pub image: Option<ImageSize>,
}

impl JobRequest {
    /// The sizes and settings as the one check reads them, at the size the model generates: the
    /// asked sides rounded up to multiples of the model's side factor.
    pub fn generated_settings(&self, factors: ModelFactors) -> Settings {
        let [high, wide] = factors.side_multiples().map(|m| m.max(1));
        let up = |v: u32, side: u64| u64::from(v).div_ceil(side) * side;
        Settings { width: up(self.width, wide), height: up(self.height, high), ..self.settings() }
    }

    /// The sizes and settings as asked.
    pub fn settings(&self) -> Settings {
        Settings {
            width: self.width.into(),
            height: self.height.into(),
            num_frames: self.num_frames.into(),
            steps: self.steps.into(),
            guidance_scale: self.guidance_scale,
            flow_shift: self.flow_shift,
            strength: self.strength,
        }
    }
}

/// A job that passed the one check: its request, the model factors it was checked against, and
/// what the check derived (the latent grid and the token count, from checked products).
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    request: JobRequest,
    factors: ModelFactors,
    latent_fhw: [usize; 3],
    tokens: usize,
    chunks: Option<ChunkPlan>,
    plan: Option<JobPlan>,
}

impl JobSpec {
    /// Checks `request` for a model with `factors` against `limits`, naming the first field at
    /// fault: the prompts (present, bounded, no NUL), then every size and setting
    /// ([`check_settings`]), then the diffusion-forcing settings ([`ForcingSettings::check`]).
    /// A diffusion-forcing job's token budget is per forward: its largest chunk's tokens.
    pub fn new(request: JobRequest, factors: ModelFactors, limits: &Limits) -> Result<Self> {
        if request.prompt.trim().is_empty() {
            return Err(ClusterError::input("prompt", "is required and must not be blank"));
        }
        for (field, text) in [("prompt", &request.prompt), ("negative_prompt", &request.negative_prompt)] {
            let n = text.chars().count();
            if n > MAX_PROMPT_CHARS {
                return Err(ClusterError::input(field, format!("has {n} characters, at most {MAX_PROMPT_CHARS} are accepted")));
            }
            if text.contains('\0') {
                return Err(ClusterError::input(field, "contains a NUL character"));
            }
        }
        let factors = factors.check()?;
        // Sides as asked: any size up to the limit. The model generates at the next multiple of its
        // side factor, and the frames are center-cropped back (`generated_size`).
        for (field, v) in [("width", request.width), ("height", request.height)] {
            if v == 0 || u64::from(v) > limits.max_side {
                return Err(ClusterError::input(field, format!("{v} must be between 1 and {}", limits.max_side)));
            }
        }
        let generated = request.generated_settings(factors);
        for (field, v) in [("width", generated.width), ("height", generated.height)] {
            if u32::try_from(v).is_err() {
                return Err(ClusterError::input(field, format!("{v} (rounded up to the model's multiple) does not fit 32 bits")));
            }
        }
        if let Some(image) = request.image {
            image.check("input_image")?;
            if request.strength.is_some() || request.extend {
                return Err(ClusterError::input("input_image", "an input image and an input video exclude each other"));
            }
        }
        if request.extend && request.forcing.is_none() {
            return Err(ClusterError::input("input_video", "extending a video is diffusion forcing's (SkyReels-V2 DF); a Wan model takes a strength"));
        }
        let Some(forcing) = request.forcing else {
            let checked = check_settings(&generated, factors, limits)?;
            return Ok(Self { request, factors, latent_fhw: checked.latent_fhw, tokens: checked.tokens, chunks: None, plan: None });
        };
        // The whole video is checked for sizes; the budget applies to one chunk's forward.
        let checked = check_settings(&generated, factors, &Limits { max_tokens: u64::MAX, ..limits.clone() })?;
        if request.strength.is_some() {
            return Err(ClusterError::input(
                "strength",
                "applies to Wan's video-to-video; a diffusion-forcing model extends an input video from its last overlap_history frames",
            ));
        }
        if factors != ModelFactors::WAN {
            return Err(ClusterError::input("model_factors", format!("{factors:?}: diffusion forcing is defined for Wan's VAE (8, 4) and patches (1×2×2)")));
        }
        let start = match (request.image, request.extend) {
            (Some(_), _) => Start::Image,
            (None, true) => Start::Video,
            (None, false) => Start::Noise,
        };
        let chunks = forcing.check(request.num_frames, request.steps, limits.max_frames, start)?;
        let [_, h, w] = checked.latent_fhw;
        let largest = chunks.chunks.iter().map(|c| c.frames).max().unwrap_or(0);
        let tokens = grid_tokens([largest as u64, h as u64, w as u64], factors).filter(|&t| t <= limits.max_tokens).ok_or_else(|| {
            ClusterError::input(
                "diffusion_forcing.base_num_frames",
                format!("a chunk of {largest} latent frames of {h}x{w} is more than the {} tokens accepted per forward", limits.max_tokens),
            )
        })?;
        Ok(Self { request, factors, latent_fhw: checked.latent_fhw, tokens: tokens as usize, chunks: Some(chunks), plan: None })
    }

    /// The frame size the model generates at, `(height, width)`: the asked size rounded up to
    /// multiples of the model's side factor (equal to it for sizes that are multiples already).
    /// The decoded frames are center-cropped back to [`JobRequest`]'s size.
    pub fn generated_size(&self) -> (u32, u32) {
        let s = self.request.generated_settings(self.factors);
        (s.height as u32, s.width as u32)
    }

    /// The spec with its plan, once the group is chosen: at least one rank and at most
    /// [`MAX_RANKS`], no more sequence-parallel ranks than tokens, a Ulysses degree dividing them;
    /// CFG-parallel only for a guided job on an even group.
    pub fn planned(mut self, plan: JobPlan) -> Result<Self> {
        if plan.cfg_parallel && (!plan.ranks.is_multiple_of(2) || self.forwards_per_step() != 2) {
            return Err(ClusterError::input(
                "cfg_parallel",
                format!("CFG-parallel needs an even group ({} ranks) and classifier-free guidance (scale {})", plan.ranks, self.request.guidance_scale),
            ));
        }
        if plan.ranks == 0 || plan.ranks > MAX_RANKS || plan.sequence_ranks() as usize > self.tokens {
            let most = MAX_RANKS.min(u32::try_from(self.tokens).unwrap_or(u32::MAX));
            return Err(ClusterError::input("ranks", format!("{} must be between 1 and {most} (the job has {} tokens)", plan.ranks, self.tokens)));
        }
        if plan.ulysses == 0 || !plan.sequence_ranks().is_multiple_of(plan.ulysses) {
            return Err(ClusterError::input(
                "ulysses",
                format!("{} must be positive and divide the {} sequence-parallel ranks", plan.ulysses, plan.sequence_ranks()),
            ));
        }
        self.plan = Some(plan);
        Ok(self)
    }

    /// The plan, once the coordinator has chosen the group.
    pub fn plan(&self) -> Option<JobPlan> {
        self.plan
    }

    /// What the job asks for.
    pub fn request(&self) -> &JobRequest {
        &self.request
    }

    /// The model factors the sizes were checked against.
    pub fn factors(&self) -> ModelFactors {
        self.factors
    }

    /// Latent grid `[frames, height, width]`.
    pub fn latent_fhw(&self) -> [usize; 3] {
        self.latent_fhw
    }

    /// Video tokens per transformer forward (a diffusion-forcing job's largest chunk's).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// A diffusion-forcing job's chunks.
    pub fn chunks(&self) -> Option<&ChunkPlan> {
        self.chunks.as_ref()
    }

    /// A video extension's history: the input's last frames its first chunk starts from
    /// (`overlap_history`); `None` for any other job.
    pub fn extension_history(&self) -> Option<u32> {
        self.request.forcing.filter(|_| self.request.extend).map(|f| f.overlap_history)
    }

    /// Frames of the served video when the job's input video has `input_frames` frames: a video
    /// extension serves the input, then the frames after the history ([`ChunkPlan::repeated_frames`]
    /// of its decode repeat the input's last ones); any other job its `num_frames`.
    pub fn served_frames(&self, input_frames: u32) -> u64 {
        let n = u64::from(self.request.num_frames);
        match &self.chunks {
            Some(c) if self.request.extend => u64::from(input_frames) + n - c.repeated_frames() as u64,
            _ => n,
        }
    }

    /// Model evaluations of the run as planned: the steps, or a diffusion-forcing job's
    /// iterations over every chunk (a video-to-video run's strength shortens it; the workers
    /// report the exact count).
    pub fn planned_steps(&self) -> u32 {
        let r = &self.request;
        match (&self.chunks, r.forcing) {
            (Some(c), Some(f)) => c.total_iterations(r.steps as usize, f.ar_step as usize) as u32,
            _ => r.steps,
        }
    }

    /// Transformer forwards per denoising step: 2 with classifier-free guidance, else 1.
    pub fn forwards_per_step(&self) -> u32 {
        if crate::limits::guidance_enabled(self.request.guidance_scale) {
            2
        } else {
            1
        }
    }

    /// The spec on the internal API.
    pub fn to_message(&self) -> pb::JobSpec {
        let r = &self.request;
        pb::JobSpec {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width: r.width,
            height: r.height,
            num_frames: r.num_frames,
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            flow_shift: r.flow_shift,
            sampler: r.sampler as i32,
            seed: r.seed,
            strength: r.strength,
            extend_video: r.extend,
            spatial_factor: self.factors.spatial as u32,
            temporal_factor: self.factors.temporal as u32,
            patch_size: self.factors.patch.map(|p| p as u32).to_vec(),
            ranks: self.plan.map_or(0, |p| p.ranks),
            ulysses: self.plan.map_or(0, |p| p.ulysses),
            cfg_parallel: self.plan.is_some_and(|p| p.cfg_parallel),
            forcing: r.forcing.map(|f| pb::ForcingSettings {
                base_num_frames: f.base_num_frames,
                overlap_history: f.overlap_history,
                ar_step: f.ar_step,
                causal_block_size: f.causal_block_size,
                addnoise_condition: f.addnoise_condition,
                fps: f.fps,
            }),
            image: r.image.map(|i| pb::ImageSize { width: i.width, height: i.height }),
        }
    }

    /// A spec from the internal API, checked with the same constructor against `limits` (a
    /// worker's own): hostile sizes, settings, prompts or factors are refused naming the field.
    pub fn from_message(m: &pb::JobSpec, limits: &Limits) -> Result<Self> {
        let sampler = Sampler::try_from(m.sampler).map_err(|_| ClusterError::input("sampler", format!("{} is not a known sampler", m.sampler)))?;
        let patch = match *m.patch_size {
            [] => ModelFactors::WAN.patch,
            [f, h, w] => [f, h, w].map(u64::from),
            _ => return Err(ClusterError::input("model_factors", format!("patch_size has {} sides; it has 3 or none (Wan's)", m.patch_size.len()))),
        };
        let factors = ModelFactors { spatial: m.spatial_factor.into(), temporal: m.temporal_factor.into(), patch }.check()?;
        let request = JobRequest {
            prompt: m.prompt.clone(),
            negative_prompt: m.negative_prompt.clone(),
            width: m.width,
            height: m.height,
            num_frames: m.num_frames,
            steps: m.steps,
            guidance_scale: m.guidance_scale,
            flow_shift: m.flow_shift,
            sampler,
            seed: m.seed,
            strength: m.strength,
            extend: m.extend_video,
            forcing: m.forcing.as_ref().map(|f| ForcingSettings {
                base_num_frames: f.base_num_frames,
                overlap_history: f.overlap_history,
                ar_step: f.ar_step,
                causal_block_size: f.causal_block_size,
                addnoise_condition: f.addnoise_condition,
                fps: f.fps,
            }),
            image: m.image.map(|i| ImageSize { width: i.width, height: i.height }),
        };
        let spec = Self::new(request, factors, limits)?;
        match (m.ranks, m.ulysses) {
            (0, 0) => Ok(spec),
            (ranks, ulysses) => spec.planned(JobPlan { ranks, ulysses, cfg_parallel: m.cfg_parallel }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> JobRequest {
        JobRequest {
            prompt: "a red ball".into(),
            negative_prompt: String::new(),
            width: 832,
            height: 480,
            num_frames: 81,
            steps: 50,
            guidance_scale: 5.0,
            flow_shift: None,
            sampler: Sampler::Unspecified,
            seed: 7,
            strength: None,
            extend: false,
            forcing: None,
            image: None,
        }
    }

    fn field(r: Result<JobSpec>) -> &'static str {
        match r {
            Err(ClusterError::InvalidInput { field, .. }) => field,
            other => panic!("expected a refused field, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_gives_the_grid_and_round_trips_through_the_wire() {
        let spec = JobSpec::new(request(), ModelFactors::WAN, &Limits::default()).unwrap();
        assert_eq!((spec.latent_fhw(), spec.tokens(), spec.forwards_per_step()), ([21, 60, 104], 32_760, 2));
        assert_eq!(JobSpec::from_message(&spec.to_message(), &Limits::default()).unwrap(), spec);
        let planned = spec.clone().planned(JobPlan { ranks: 4, ulysses: 2, cfg_parallel: false }).unwrap();
        assert_eq!(planned.plan().map(JobPlan::ring), Some(2));
        assert_eq!(JobSpec::from_message(&planned.to_message(), &Limits::default()).unwrap(), planned);
        // The patch travels with the VAE factors; a spec without one (an older coordinator's) is Wan's.
        let demo = ModelFactors { patch: [1, 4, 4], ..ModelFactors::WAN };
        let quarter = JobSpec::new(JobRequest { width: 100, height: 50, ..request() }, demo, &Limits::default()).unwrap();
        assert_eq!((quarter.generated_size(), quarter.latent_fhw(), quarter.tokens()), ((64, 128), [21, 8, 16], 21 * 2 * 4));
        assert_eq!(JobSpec::from_message(&quarter.to_message(), &Limits::default()).unwrap(), quarter);
        let older = pb::JobSpec { patch_size: vec![], ..spec.to_message() };
        assert_eq!(JobSpec::from_message(&older, &Limits::default()).unwrap(), spec);
        // CFG-parallel: two halves of 2 Ulysses ranks; only on an even group of a guided job
        let halves = spec.clone().planned(JobPlan { ranks: 4, ulysses: 2, cfg_parallel: true }).unwrap();
        assert_eq!(halves.plan().map(|p| (p.sequence_ranks(), p.ring())), Some((2, 1)));
        assert_eq!(JobSpec::from_message(&halves.to_message(), &Limits::default()).unwrap(), halves);
        assert_eq!(field(spec.clone().planned(JobPlan { ranks: 3, ulysses: 1, cfg_parallel: true })), "cfg_parallel");
        assert_eq!(field(spec.clone().planned(JobPlan { ranks: 4, ulysses: 4, cfg_parallel: true })), "ulysses");
        let unguided = JobSpec::new(JobRequest { guidance_scale: 1.0, ..request() }, ModelFactors::WAN, &Limits::default()).unwrap();
        assert_eq!(field(unguided.planned(JobPlan { ranks: 2, ulysses: 1, cfg_parallel: true })), "cfg_parallel");
    }

    /// Sizes as users ask for them: 1080 rows are generated as 1088 (a multiple of 16) and
    /// cropped back; the grid and the tokens are the generated size's.
    #[test]
    fn sizes_that_are_not_multiples_are_generated_at_the_next_one() {
        let hd = JobRequest { width: 1920, height: 1080, num_frames: 961, ..request() };
        let spec = JobSpec::new(hd, ModelFactors::WAN, &Limits::none()).unwrap();
        assert_eq!((spec.request().height, spec.generated_size()), (1080, (1088, 1920)));
        assert_eq!((spec.latent_fhw(), spec.tokens()), ([241, 136, 240], 241 * 68 * 120));
        let exact = JobSpec::new(request(), ModelFactors::WAN, &Limits::default()).unwrap();
        assert_eq!(exact.generated_size(), (480, 832));
        let l = Limits::default();
        assert_eq!(field(JobSpec::new(JobRequest { width: 4097, ..request() }, ModelFactors::WAN, &l)), "width");
        assert_eq!(field(JobSpec::new(JobRequest { height: 0, ..request() }, ModelFactors::WAN, &l)), "height");
        assert_eq!(JobSpec::new(JobRequest { width: 1, height: 17, ..request() }, ModelFactors::WAN, &l).unwrap().generated_size(), (32, 16));
    }

    #[test]
    fn prompts_are_checked_with_the_sizes() {
        let l = Limits::default();
        assert_eq!(field(JobSpec::new(JobRequest { prompt: "  ".into(), ..request() }, ModelFactors::WAN, &l)), "prompt");
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        assert_eq!(field(JobSpec::new(JobRequest { negative_prompt: long, ..request() }, ModelFactors::WAN, &l)), "negative_prompt");
        assert_eq!(field(JobSpec::new(JobRequest { prompt: "a\0b".into(), ..request() }, ModelFactors::WAN, &l)), "prompt");
        assert_eq!(field(JobSpec::new(JobRequest { num_frames: 18, ..request() }, ModelFactors::WAN, &l)), "num_frames");
    }

    /// A diffusion-forcing job: the whole video is checked for sizes, its chunks for the token
    /// budget (a minute of 540P passes a budget that one chunk fits), every setting names its
    /// field, and the settings travel to the workers.
    #[test]
    fn diffusion_forcing_jobs_are_budgeted_per_chunk() {
        let df = ForcingSettings { base_num_frames: 97, overlap_history: 17, ar_step: 0, causal_block_size: 1, addnoise_condition: 20.0, fps: 24 };
        let minute = JobRequest { width: 960, height: 544, num_frames: 961, forcing: Some(df), ..request() };
        let l = Limits { max_tokens: 25 * 34 * 60, ..Limits::default() };
        let spec = JobSpec::new(minute.clone(), ModelFactors::WAN, &l).unwrap();
        assert_eq!((spec.latent_fhw(), spec.tokens()), ([241, 68, 120], 25 * 34 * 60));
        let chunks = spec.chunks().unwrap();
        assert_eq!((chunks.chunks.len(), chunks.latent_frames, spec.planned_steps()), (12, 241, 12 * 50));
        assert_eq!(JobSpec::from_message(&spec.to_message(), &l).unwrap(), spec);
        // From an image: the first chunk's first frame is the image's, never stepped (synchronous,
        // the chunk still runs 50 iterations); blocks of 5 cannot hold a one-frame image.
        let image = Some(ImageSize { width: 640, height: 360 });
        let from_image = JobSpec::new(JobRequest { image, ..minute.clone() }, ModelFactors::WAN, &l).unwrap();
        let first = from_image.chunks().unwrap().chunks[0];
        assert_eq!((first.prefix, first.overlap, from_image.planned_steps()), (1, 0, 12 * 50));
        assert_eq!(JobSpec::from_message(&from_image.to_message(), &l).unwrap(), from_image);
        let blocks = ForcingSettings { causal_block_size: 5, ..df };
        let err = JobSpec::new(JobRequest { image, num_frames: 977, forcing: Some(blocks), ..minute.clone() }, ModelFactors::WAN, &l);
        assert!(JobSpec::new(JobRequest { num_frames: 977, forcing: Some(blocks), ..minute.clone() }, ModelFactors::WAN, &l).is_ok());
        assert_eq!(field(err), "diffusion_forcing.causal_block_size");
        assert_eq!(field(JobSpec::new(JobRequest { forcing: None, ..minute.clone() }, ModelFactors::WAN, &l)), "num_frames");
        let with = |f: ForcingSettings| JobSpec::new(JobRequest { forcing: Some(f), ..minute.clone() }, ModelFactors::WAN, &l);
        assert_eq!(field(with(ForcingSettings { base_num_frames: 121, ..df })), "diffusion_forcing.base_num_frames", "31 latent frames per chunk");
        assert_eq!(field(with(ForcingSettings { base_num_frames: 96, ..df })), "diffusion_forcing.base_num_frames");
        assert_eq!(field(with(ForcingSettings { overlap_history: 97, ..df })), "diffusion_forcing.overlap_history");
        assert_eq!(field(with(ForcingSettings { overlap_history: 0, ..df })), "diffusion_forcing.overlap_history");
        assert_eq!(field(with(ForcingSettings { ar_step: 51, ..df })), "diffusion_forcing.ar_step");
        assert_eq!(field(with(ForcingSettings { causal_block_size: 0, ..df })), "diffusion_forcing.causal_block_size");
        assert_eq!(field(with(ForcingSettings { causal_block_size: 26, ..df })), "diffusion_forcing.causal_block_size");
        assert_eq!(field(with(ForcingSettings { causal_block_size: 5, ..df })), "num_frames", "961 frames leave a chunk that is not whole blocks of 5");
        assert_eq!(field(with(ForcingSettings { addnoise_condition: f32::NAN, ..df })), "diffusion_forcing.addnoise_condition");
        assert_eq!(field(with(ForcingSettings { addnoise_condition: 1000.0, ..df })), "diffusion_forcing.addnoise_condition");
        assert_eq!(field(with(ForcingSettings { fps: 0, ..df })), "fps");
        // An input video is extended, not transformed at a strength: the minute continues the
        // input's last 17 frames (5 latent, the first chunk's prefix; their decode repeats them).
        assert_eq!(field(JobSpec::new(JobRequest { strength: Some(0.8), ..minute.clone() }, ModelFactors::WAN, &l)), "strength");
        let extend = JobSpec::new(JobRequest { extend: true, ..minute.clone() }, ModelFactors::WAN, &l).unwrap();
        let first = extend.chunks().unwrap().chunks[0];
        assert_eq!((first.prefix, first.overlap, extend.chunks().unwrap().repeated_frames()), (5, 0, 17));
        assert_eq!((extend.extension_history(), spec.extension_history()), (Some(17), None));
        assert_eq!((extend.served_frames(100), spec.served_frames(100)), (100 + 961 - 17, 961));
        assert_eq!(JobSpec::from_message(&extend.to_message(), &l).unwrap(), extend);
        let short = JobSpec::new(JobRequest { extend: true, num_frames: 17, ..minute.clone() }, ModelFactors::WAN, &l);
        assert_eq!(field(short), "num_frames", "17 frames are all history");
        assert_eq!(field(JobSpec::new(JobRequest { extend: true, image, ..minute.clone() }, ModelFactors::WAN, &l)), "input_image");
        assert_eq!(field(JobSpec::new(JobRequest { extend: true, forcing: None, num_frames: 81, ..minute.clone() }, ModelFactors::WAN, &l)), "input_video");
        // Both guidance passes, or one per CFG half: diffusion forcing splits its batch like any job.
        let halves = spec.clone().planned(JobPlan { ranks: 4, ulysses: 2, cfg_parallel: true }).unwrap();
        assert_eq!(JobSpec::from_message(&halves.to_message(), &l).unwrap(), halves);
        assert!(spec.planned(JobPlan { ranks: 4, ulysses: 2, cfg_parallel: false }).is_ok());
    }

    /// A worker given a hostile spec refuses it naming the field, before anything is allocated:
    /// a 1,048,576 × 1,048,576 latent, sizes whose products overflow, an unknown sampler, factors
    /// or patches that would divide by zero or that do not fit.
    #[test]
    fn hostile_specs_are_refused_by_the_same_check() {
        let worker = Limits { max_tokens: 1 << 21, ..Limits::default() };
        let ok = JobSpec::new(request(), ModelFactors::WAN, &worker).unwrap().to_message();
        let cases: [(pb::JobSpec, &str); 13] = [
            (pb::JobSpec { ranks: 3, ulysses: 2, ..ok.clone() }, "ulysses"),
            (pb::JobSpec { ranks: 2, ulysses: 0, ..ok.clone() }, "ulysses"),
            (pb::JobSpec { ranks: u32::MAX, ulysses: 1, ..ok.clone() }, "ranks"),
            (pb::JobSpec { ranks: 0, ulysses: 1, ..ok.clone() }, "ranks"),
            (pb::JobSpec { width: 8 << 20, height: 8 << 20, ..ok.clone() }, "width"),
            (pb::JobSpec { width: u32::MAX, height: u32::MAX, num_frames: u32::MAX, ..ok.clone() }, "width"),
            (pb::JobSpec { sampler: 99, ..ok.clone() }, "sampler"),
            (pb::JobSpec { spatial_factor: 0, ..ok.clone() }, "model_factors"),
            (pb::JobSpec { temporal_factor: u32::MAX, ..ok.clone() }, "model_factors"),
            (pb::JobSpec { patch_size: vec![1, 0, 2], ..ok.clone() }, "model_factors"),
            (pb::JobSpec { patch_size: vec![1, 2, 2, 2], ..ok.clone() }, "model_factors"),
            (pb::JobSpec { patch_size: vec![1, 1 << 20, 2], ..ok.clone() }, "model_factors"),
            (pb::JobSpec { width: 4096, height: 4096, num_frames: 1441, ..ok.clone() }, "num_frames"),
        ];
        for (m, want) in cases {
            assert_eq!(field(JobSpec::from_message(&m, &worker)), want, "{m:?}");
        }
        // With no deployment limits the products still cannot wrap: 2^30 x 2^28 x 2^28 tokens.
        let huge = pb::JobSpec { width: u32::MAX - 15, height: u32::MAX - 15, num_frames: u32::MAX - 2, ..ok.clone() };
        let err = JobSpec::from_message(&huge, &Limits::none()).unwrap_err().to_string();
        assert!(err.contains("num_frames") && err.contains("more than 2^64"), "{err}");
        // A side that rounds up past 32 bits is refused, never wrapped to 0.
        let wraps = pb::JobSpec { width: u32::MAX, ..ok };
        assert_eq!(field(JobSpec::from_message(&wraps, &Limits::none())), "width");
    }
}
