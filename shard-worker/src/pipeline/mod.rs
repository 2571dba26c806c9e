//! The Wan 2.1 text-to-video pipeline (and video-to-video) on one device, numerically what
//! diffusers' `WanPipeline` computes (reference/wan2.1.md §5.5, §6.2): prompt and negative prompt →
//! UMT5 embeddings → initial noise → guided denoising steps → VAE decode → frames in [0, 1].
//! Each stage is a public method, so that a caller (the golden runner, a shard worker) can run,
//! observe or replace any of them; [`WanPipeline::generate`] chains them.

pub mod demo;
mod denoiser;
mod device;
pub mod forcing;
/// The limits and the one check of sizes (shared with the coordinator: `tessera_cluster::limits`).
pub use tessera_cluster::limits;
mod noise;
mod params;
mod preset;
mod shard_run;
mod sharded;
mod snapshot;
mod split_decode;

pub use denoiser::Denoiser;
pub use device::resolve_pipeline_device;
pub use noise::{initial_noise, noise_rows, noise_slice, NOISE_STREAM};
pub use params::{GenerationParams, VideoInput};
pub use preset::{PipelineDefaults, PipelinePreset, WAN_DEFAULTS};
pub use shard_run::{RankGroup, ShardRun, Start};
pub use sharded::{decode_sharded, denoise_sharded, generate_sharded};
pub use snapshot::{Snapshot, SUPPORTED_PIPELINES};

use crate::image::{ImageEncoder, RgbImage};
use crate::model::DitModel;
use crate::parallel::Communicator;
use crate::sampler::{add_noise, guidance_enabled, SamplerConfig, Schedule};
use crate::text::TextEncoder;
use crate::vae::WanVae;
use crate::{Result, WorkerError};
use std::path::Path;
use tessera_kernels::cpu::resample::Filter;
use tessera_kernels::{Device, Tensor};

/// What a generation is conditioned on: the token ids and embeddings of the prompt and, with
/// guidance, of the negative prompt; for image-to-video, the image's tokens and first-frame latents.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// Token ids of the prompt (up to and including `</s>`).
    pub prompt_ids: Vec<u32>,
    /// Token ids of the negative prompt (guidance only).
    pub negative_ids: Option<Vec<u32>>,
    /// `[1, 512, text_dim]`, zero past the prompt.
    pub prompt_embeds: Tensor,
    /// `[1, 512, text_dim]`, zero past the negative prompt (guidance only).
    pub negative_embeds: Option<Tensor>,
    /// Image-to-video: the image's conditioning (the same for both guidance branches).
    pub image: Option<ImageConditioning>,
}

/// What Wan 2.1 I2V's transformer reads of the input image besides the noisy latent.
#[derive(Clone, Debug)]
pub struct ImageConditioning {
    /// The image encoder's tokens `[1, tokens, image_dim]`, for the image cross-attention.
    pub embeds: Tensor,
    /// `[1, 4 + z_dim, F', h, w]`: the first-frame mask folded into 4 channels (1 on latent frame
    /// 0), then the normalised VAE latents of the image followed by black frames. Concatenated
    /// after the noisy latent's channels at every step; never denoised.
    pub latents: Tensor,
}

/// Watches a generation stage by stage; every method may stop the run by returning an error
/// (to cancel, for instance). All methods default to doing nothing.
pub trait PipelineObserver {
    /// The prompts were tokenized and encoded.
    fn on_text(&mut self, _text: &Conditioning) -> Result<()> {
        Ok(())
    }
    /// The starting latent (noise, or noised input video) is ready.
    fn on_initial_latents(&mut self, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Step `step` (0-based, of `total` run) finished; `latents` is the sample after it.
    fn on_step(&mut self, _step: usize, _total: usize, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Decoded frames `[1, 3, n, H, W]` in [0, 1], in order, as the VAE produces them.
    fn on_frames(&mut self, _frames: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// An observer that watches nothing.
pub struct NoObserver;

impl PipelineObserver for NoObserver {}

/// A loaded pipeline: text encoder, transformer, VAE and sampler configuration, and for
/// image-to-video the image encoder.
pub struct WanPipeline {
    text: TextEncoder,
    transformer: DitModel,
    vae: WanVae,
    sampler: SamplerConfig,
    image: Option<ImageEncoder>,
}

/// Channels of the first-frame mask an image-to-video transformer reads (one per video frame of
/// a latent frame's temporal stride).
pub const I2V_MASK_CHANNELS: usize = 4;

impl WanPipeline {
    /// Loads a diffusers snapshot folder (`model_index.json`, `transformer/`, `vae/`,
    /// `text_encoder/`, `tokenizer/`, `scheduler/`; for image-to-video also `image_encoder/` and
    /// `image_processor/`).
    pub fn load(root: &Path) -> Result<Self> {
        Self::load_on(root, Device::Cpu)
    }

    /// [`Self::load`] with every model (text encoder, transformer, VAE) on `backend` (a [`Device`]
    /// or a [`tessera_kernels::backend::Backend`]); the sampler runs where the transformer does.
    pub fn load_on(root: &Path, backend: impl Into<tessera_kernels::backend::Backend>) -> Result<Self> {
        let backend = backend.into();
        let snap = Snapshot::open(root)?;
        let sampler = SamplerConfig::from_path(&snap.component("scheduler").join("scheduler_config.json"))?;
        let image = match snap.is_image_to_video() {
            true => Some(ImageEncoder::load_on(&snap.component("image_encoder"), &snap.component("image_processor"), backend)?),
            false => None,
        };
        Self::from_parts(
            TextEncoder::load_on(root, backend)?,
            DitModel::load_backend(&snap.component("transformer"), backend)?,
            WanVae::load_on(&snap.component("vae"), backend)?,
            sampler,
            image,
        )
    }

    /// The facts a worker advertises for planning (the transformer's configuration, head count,
    /// request defaults).
    pub fn model_info(&self, defaults: PipelineDefaults) -> crate::membership::ModelInfo {
        crate::membership::ModelInfo {
            attention_heads: self.transformer.config().num_attention_heads as u32,
            width: defaults.width as u32,
            height: defaults.height as u32,
            num_frames: defaults.num_frames as u32,
            steps: defaults.num_inference_steps as u32,
            factors: self.factors(),
            transformer: Some(self.transformer.config().clone()),
            text_encoder_params: self.text_encoder().encoder().config().encoder_parameter_count() as u64,
            vae_base_dim: self.vae.config().base_dim as u32,
            vae_params: self.vae.config().parameter_count() as u64,
            forcing: defaults.forcing,
            image_to_video: self.is_image_to_video(),
            image_encoder_params: self.image.as_ref().map_or(0, |e| e.model().config().parameter_count() as u64),
        }
    }

    /// Whether the pipeline makes videos by diffusion forcing (its transformer is SkyReels-V2's):
    /// then every generation is a [`forcing::ForcingRun`], never the step-by-step Wan loop.
    pub fn is_diffusion_forcing(&self) -> bool {
        self.transformer.config().is_skyreels_v2()
    }

    /// The request defaults of a snapshot of this pipeline: Wan 2.1's, or SkyReels-V2 DF's with
    /// the transformer's causal block.
    pub fn snapshot_defaults(&self) -> PipelineDefaults {
        if !self.is_diffusion_forcing() {
            return WAN_DEFAULTS;
        }
        let block = self.transformer.config().num_frame_per_block as u32;
        let forcing = preset::SKYREELS_DF_DEFAULTS.forcing.map(|f| tessera_cluster::forcing::ForcingDefaults { causal_block: block, ..f });
        PipelineDefaults { forcing, ..preset::SKYREELS_DF_DEFAULTS }
    }

    /// How the loaded model turns video into tokens: its VAE's compression factors and its
    /// transformer's patch.
    pub fn factors(&self) -> tessera_cluster::limits::ModelFactors {
        let vc = self.vae.config();
        let patch = self.transformer.config().patch_size.map(|p| p as u64);
        tessera_cluster::limits::ModelFactors { spatial: vc.spatial_factor() as u64, temporal: vc.temporal_factor() as u64, patch }
    }

    /// Assembles a pipeline from loaded components (the transformer on whatever backend it was
    /// loaded on), checking that they fit together: an image-to-video transformer comes with an
    /// image encoder whose width is its `image_dim`, and reads the noisy latent, the mask and the
    /// image's latents (`2·z_dim + 4` channels in).
    pub fn from_parts(text: TextEncoder, transformer: DitModel, vae: WanVae, sampler: SamplerConfig, image: Option<ImageEncoder>) -> Result<Self> {
        let (tc, vc) = (transformer.config(), vae.config());
        let bad = |detail: String| WorkerError::Config { path: "pipeline".into(), detail };
        let in_channels = match (&image, tc.is_i2v()) {
            (None, false) => vc.z_dim,
            (Some(enc), true) => {
                let width = enc.model().config().hidden_size;
                if tc.image_dim != Some(width) {
                    return Err(bad(format!("transformer image_dim {:?} does not match the image encoder's hidden_size {width}", tc.image_dim)));
                }
                2 * vc.z_dim + I2V_MASK_CHANNELS
            }
            (None, true) => return Err(bad("the transformer is an image-to-video model and the snapshot has no image encoder".into())),
            (Some(_), false) => return Err(bad("an image encoder was given for a text-to-video transformer (no image_dim)".into())),
        };
        if tc.in_channels != in_channels || tc.out_channels != vc.z_dim {
            return Err(bad(format!(
                "transformer channels in/out {}/{} do not match the VAE's z_dim {} (expected {in_channels}/{})",
                tc.in_channels, tc.out_channels, vc.z_dim, vc.z_dim
            )));
        }
        let d_model = text.encoder().config().d_model;
        if tc.text_dim != d_model {
            return Err(bad(format!("transformer text_dim {} does not match the text encoder's d_model {d_model}", tc.text_dim)));
        }
        Ok(Self { text, transformer, vae, sampler, image })
    }

    /// The image encoder of an image-to-video pipeline.
    pub fn image_encoder(&self) -> Option<&ImageEncoder> {
        self.image.as_ref()
    }

    /// Whether the pipeline makes videos from an image (Wan 2.1 I2V).
    pub fn is_image_to_video(&self) -> bool {
        self.image.is_some()
    }

    /// The transformer (on the device it was loaded on).
    pub fn transformer(&self) -> &DitModel {
        &self.transformer
    }

    /// The VAE.
    pub fn vae(&self) -> &WanVae {
        &self.vae
    }

    /// The text encoder.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// The scheduler configuration of the snapshot.
    pub fn sampler_config(&self) -> &SamplerConfig {
        &self.sampler
    }

    /// The sampler configuration with the request's overrides applied.
    pub fn sampler_for(&self, params: &GenerationParams) -> SamplerConfig {
        let mut cfg = self.sampler.clone();
        if let Some(kind) = params.sampler {
            cfg = cfg.with_kind(kind);
        }
        if let Some(shift) = params.flow_shift {
            cfg = cfg.with_shift(shift);
        }
        cfg
    }

    /// The schedule of a run: all steps, or for video-to-video those that `strength` keeps.
    pub fn schedule_for(&self, params: &GenerationParams) -> Result<Schedule> {
        let full = Schedule::new(&self.sampler_for(params), params.num_inference_steps)?;
        match &params.video {
            Some(v) => full.for_strength(v.strength),
            None => Ok(full),
        }
    }

    /// Stage 1: tokenizes and encodes the prompt, and the negative prompt when guidance is on.
    pub fn encode_text(&self, prompt: &str, negative_prompt: &str, guidance_scale: f32) -> Result<Conditioning> {
        let cfg = guidance_enabled(guidance_scale);
        let prompts: Vec<&str> = if cfg { vec![prompt, negative_prompt] } else { vec![prompt] };
        let tokens = self.text.tokenize(&prompts)?;
        let embeds = self.text.encode_tokenized(&tokens)?;
        let (len, d) = (embeds.dim(1), embeds.dim(2));
        let row = |i: usize| Tensor::new([1, len, d], embeds.data()[i * len * d..(i + 1) * len * d].to_vec());
        Ok(Conditioning {
            prompt_ids: tokens.tokens(0).to_vec(),
            negative_ids: cfg.then(|| tokens.tokens(1).to_vec()),
            prompt_embeds: row(0)?,
            negative_embeds: if cfg { Some(row(1)?) } else { None },
            image: None,
        })
    }

    /// Stage 1b (image-to-video): the image's conditioning for a video of `params`' size, as
    /// `WanImageToVideoPipeline` makes it: the encoder's tokens of the image as given
    /// ([`ImageEncoder::encode`]), and [`Self::image_latents`] of the image resized to the output.
    pub fn encode_image(&self, image: &RgbImage, params: &GenerationParams) -> Result<ImageConditioning> {
        self.encode_image_in(image, params, None)
    }

    /// [`encode_image`](Self::encode_image) with the VAE's encode split across `world`'s members
    /// when given (every member passes the same image; see [`encode_video_in`](Self::encode_video_in)).
    pub fn encode_image_in(&self, image: &RgbImage, params: &GenerationParams, world: Option<&Communicator>) -> Result<ImageConditioning> {
        let Some(encoder) = &self.image else {
            return Err(WorkerError::input("image", "this pipeline is text-to-video; an input image needs an image-to-video model (Wan 2.1 I2V)"));
        };
        let embeds = encoder.encode(image)?;
        let resized = image.resized(params.height, params.width, Filter::Lanczos);
        Ok(ImageConditioning { embeds, latents: self.image_latents_in(&resized.to_signed_unit()?, params.num_frames, world)? })
    }

    /// A diffusion-forcing run's image prefix, as `SkyReelsV2DiffusionForcingImageToVideoPipeline`
    /// makes it: the image resized to the video's size, VAE-encoded alone as a one-frame video
    /// (the posterior mean) and normalised: `[1, z_dim, 1, h, w]`, the first chunk's first latent
    /// frame. The encode is split across `world`'s members when given.
    pub fn image_prefix_in(&self, image: &RgbImage, params: &GenerationParams, world: Option<&Communicator>) -> Result<Tensor> {
        let unit = image.resized(params.height, params.width, Filter::Lanczos).to_signed_unit()?;
        let s = unit.shape().to_vec();
        let frame = Tensor::new([1, 3, 1, s[2], s[3]], unit.data().to_vec())?;
        self.encode_video_in(&frame, world)
    }

    /// The latent side of the image condition: `image` `[1, 3, H, W]` in [−1, 1] as frame 0 of a
    /// `num_frames` video whose other frames are 0, VAE-encoded (the posterior mean) and
    /// normalised, after the 4-channel first-frame mask: `[1, 4 + z_dim, F', h, w]`.
    pub fn image_latents(&self, image: &Tensor, num_frames: usize) -> Result<Tensor> {
        self.image_latents_in(image, num_frames, None)
    }

    /// [`image_latents`](Self::image_latents), the encode split across `world` when given.
    fn image_latents_in(&self, image: &Tensor, num_frames: usize, world: Option<&Communicator>) -> Result<Tensor> {
        let s = image.shape();
        if s.len() != 4 || s[0] != 1 || s[1] != 3 || num_frames == 0 {
            return Err(WorkerError::input("image", format!("expected [1, 3, H, W] and frames > 0, got {s:?} and {num_frames} frames")));
        }
        let plane = s[2] * s[3];
        let mut video = vec![0f32; 3 * num_frames * plane];
        for c in 0..3 {
            video[c * num_frames * plane..][..plane].copy_from_slice(&image.data()[c * plane..][..plane]);
        }
        let clean = self.encode_video_in(&Tensor::new([1, 3, num_frames, s[2], s[3]], video)?, world)?;
        let (z, f, hw) = (clean.dim(1), clean.dim(2), clean.dim(3) * clean.dim(4));
        let mut out = vec![0f32; (I2V_MASK_CHANNELS + z) * f * hw];
        for c in 0..I2V_MASK_CHANNELS {
            out[c * f * hw..][..hw].fill(1.0);
        }
        out[I2V_MASK_CHANNELS * f * hw..].copy_from_slice(clean.data());
        Ok(Tensor::new([1, I2V_MASK_CHANNELS + z, f, clean.dim(3), clean.dim(4)], out)?)
    }

    /// Stage 2: the starting latent `[1, C, T, h, w]`: the given or seeded noise; for
    /// video-to-video, the encoded, normalised input video noised to the schedule's first σ
    /// ([`Self::encode_video`] then [`Self::noise_latents`]).
    pub fn initial_latents(&self, params: &GenerationParams, schedule: &Schedule) -> Result<Tensor> {
        self.initial_latents_in(params, schedule, None)
    }

    /// [`initial_latents`](Self::initial_latents) with the input video's encode split across
    /// `world`'s members when given (every member passes the same parameters and gets the whole
    /// latent).
    pub fn initial_latents_in(&self, params: &GenerationParams, schedule: &Schedule, world: Option<&Communicator>) -> Result<Tensor> {
        let noise = self.noise_for(params)?;
        let Some(input) = &params.video else { return Ok(noise) };
        let clean = self.encode_video_in(&input.video, world)?;
        self.noise_latents(clean, &noise, schedule)
    }

    /// The noise of a run, `[1, C, T, h, w]`: `params.initial_noise` (shape checked) or drawn
    /// from `params.seed`.
    pub fn noise_for(&self, params: &GenerationParams) -> Result<Tensor> {
        let vc = self.vae.config();
        let fhw = params.latent_fhw(self.factors());
        let shape = [1, vc.z_dim, fhw[0], fhw[1], fhw[2]];
        match &params.initial_noise {
            Some(n) if n.shape() == shape => Ok(n.clone()),
            Some(n) => Err(WorkerError::input("initial_noise", format!("expected {shape:?}, got {:?}", n.shape()))),
            None => Ok(initial_noise(params.seed, NOISE_STREAM, vc.z_dim, fhw)),
        }
    }

    /// Stage 2a (video-to-video): the input video `[1, 3, F, H, W]` in [−1, 1] VAE-encoded (the
    /// posterior mean, diffusers' `sample_mode="argmax"`) and normalised with the VAE's
    /// `latents_mean`/`latents_std`: the clean latents `[1, C, T, h, w]`.
    pub fn encode_video(&self, video: &Tensor) -> Result<Tensor> {
        self.encode_video_in(video, None)
    }

    /// [`encode_video`](Self::encode_video), split by rows across `world`'s members when given:
    /// every member holds the same `video`, encodes its band and gets the whole latent
    /// (`WanVae::encode_split_held`: the one-device values).
    pub fn encode_video_in(&self, video: &Tensor, world: Option<&Communicator>) -> Result<Tensor> {
        let (mean, _logvar) = match world {
            Some(world) => self.vae.encode_split_held(video, world)?,
            None => self.vae.encode(video)?,
        };
        self.vae.normalize_latent(&mean)
    }

    /// Stage 2b (video-to-video): clean latents noised to σ of the schedule's first step,
    /// `(1 − σ)·clean + σ·noise` (diffusers' `scheduler.add_noise` at the first kept timestep).
    pub fn noise_latents(&self, mut clean: Tensor, noise: &Tensor, schedule: &Schedule) -> Result<Tensor> {
        clean.expect_shape("encoded input video", noise.shape())?;
        let first = schedule.first_step();
        let sigma = schedule.sigma(first).ok_or_else(|| WorkerError::input("schedule", format!("no σ for step {first}")))?;
        add_noise(clean.data_mut(), noise.data(), sigma)?;
        Ok(clean)
    }

    /// Stage 3: runs every step of `schedule` on `latents` in place, on this device (the latent
    /// and the sampler's history stay on the transformer's device between steps; the observer
    /// gets the latent after each).
    pub fn denoise(
        &self,
        latents: &mut Tensor,
        text: &Conditioning,
        guidance_scale: f32,
        schedule: &Schedule,
        observer: &mut dyn PipelineObserver,
    ) -> Result<()> {
        let alone = RankGroup::Alone;
        let mut run = Denoiser::new(self, alone, Start::Latents(latents), text.clone(), guidance_scale, schedule.clone())?;
        while !run.is_finished() {
            let step = tracing::info_span!("step", step = run.steps_done(), steps = run.total_steps());
            step.in_scope(|| run.step(self, alone))?;
            *latents = run.latents(self, alone)?.ok_or_else(|| WorkerError::Collective("one rank holds the whole latent".into()))?;
            observer.on_step(run.steps_done() - 1, run.total_steps(), latents)?;
        }
        Ok(())
    }

    /// Stage 4: de-normalises the latent and decodes it frame-chunk by frame-chunk, handing frames
    /// `[1, 3, n, H, W]` in [0, 1] to the observer as they come.
    pub fn decode(&self, latents: &Tensor, observer: &mut dyn PipelineObserver) -> Result<()> {
        let mut stream = FrameStream(self.vae.start_decode(latents.shape().first().copied().unwrap_or(0)));
        self.decode_more(&mut stream, latents, observer)
    }

    /// Starts decoding a video whose latents come a few frames at a time (a long video, chunk by
    /// chunk): see [`decode_more`](Self::decode_more).
    pub fn start_decode(&self) -> FrameStream {
        FrameStream(self.vae.start_decode(1))
    }

    /// Stage 4 for the next latent frames `[1, C, n, h, w]` of `stream`'s video: de-normalised
    /// and decoded with the VAE's causal caches continued, frames in [0, 1] to the observer. The
    /// frames of all calls are those of one [`decode`](Self::decode) of the whole latent.
    pub fn decode_more(&self, stream: &mut FrameStream, latents: &Tensor, observer: &mut dyn PipelineObserver) -> Result<()> {
        let z = self.vae.denormalize_latent(latents)?;
        self.vae.decode_more(&mut stream.0, &z, &mut |frames| observer.on_frames(&to_unit(frames)))
    }

    /// The whole generation; returns the final latent (frames went to the observer).
    pub fn generate(&self, params: &GenerationParams, observer: &mut dyn PipelineObserver) -> Result<Tensor> {
        params.validate(self.factors(), &limits::Limits::none())?;
        let mut text = self.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale)?;
        text.image = params.image.as_ref().map(|image| self.encode_image(image, params)).transpose()?;
        observer.on_text(&text)?;
        let schedule = self.schedule_for(params)?;
        let mut latents = self.initial_latents(params, &schedule)?;
        observer.on_initial_latents(&latents)?;
        self.denoise(&mut latents, &text, params.guidance_scale, &schedule, observer)?;
        self.decode(&latents, observer)?;
        Ok(latents)
    }
}

/// Decoded video in [−1, 1] mapped to [0, 1]: `(v + 1)·0.5`.
fn to_unit(mut frames: Tensor) -> Tensor {
    frames.data_mut().iter_mut().for_each(|v| *v = (*v + 1.0) * 0.5);
    frames
}

/// A video being decoded piece by piece ([`WanPipeline::start_decode`]).
pub struct FrameStream(crate::vae::VaeDecodeStream);

/// Collects every decoded frame chunk into one `[1, 3, F, H, W]` tensor.
#[derive(Default)]
pub struct FrameCollector {
    chunks: Vec<Tensor>,
}

impl FrameCollector {
    /// The frames so far, concatenated along time.
    pub fn frames(&self) -> Result<Tensor> {
        concat_time(&self.chunks)
    }
}

impl PipelineObserver for FrameCollector {
    fn on_frames(&mut self, frames: &Tensor) -> Result<()> {
        self.chunks.push(frames.clone());
        Ok(())
    }
}

/// Concatenates `[B, C, n_i, H, W]` tensors along the time axis.
pub fn concat_time(chunks: &[Tensor]) -> Result<Tensor> {
    let Some(first) = chunks.first() else { return Err(WorkerError::input("frames", "no frames were decoded")) };
    let s = first.shape().to_vec();
    if s.len() != 5 || chunks.iter().any(|c| c.shape().len() != 5 || c.shape()[..2] != s[..2] || c.shape()[3..] != s[3..]) {
        return Err(WorkerError::input("frames", "chunks differ in batch, channels or size"));
    }
    let frames: usize = chunks.iter().map(|c| c.dim(2)).sum();
    let plane = s[3] * s[4];
    let mut out = Vec::with_capacity(s[0] * s[1] * frames * plane);
    for bc in 0..s[0] * s[1] {
        for c in chunks {
            let n = c.dim(2) * plane;
            out.extend_from_slice(&c.data()[bc * n..(bc + 1) * n]);
        }
    }
    Ok(Tensor::new([s[0], s[1], frames, s[3], s[4]], out)?)
}
