//! Built-in pipelines: `demo`, a small trained model (what `tessera generate` and `serve` run when
//! no model folder is given), and the `tiny` family with deterministic random weights, what tests
//! and load benchmarks use, the way serving engines offer dummy weights. The tiny video is
//! structured noise, but every stage (tokenizer, UMT5, transformer, sampler, VAE, encoder) runs
//! the real code at a small size.

use super::WanPipeline;
use crate::model::DitModel;
use crate::sampler::SamplerConfig;
use crate::text::{PromptTokenizer, TextEncoder, Umt5Config, Umt5EncoderModel, TEXT_LEN};
use crate::transformer_config::TransformerPreset;
use crate::vae::{VaeConfig, VaePreset, WanVae};
use crate::weights::RandomWeights;
use crate::{Result, WorkerError};
use std::path::PathBuf;
use tessera_cluster::forcing::ForcingDefaults;
use tessera_kernels::Device;

/// The `demo` model's snapshot folder in the repository this binary was built from.
const DEMO_SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/demo");
/// The environment variable naming the `demo` snapshot folder elsewhere (an installed binary, a
/// container image).
pub const DEMO_MODEL_ENV: &str = "TESSERA_DEMO_MODEL";

/// A small Unigram tokenizer of UMT5's kind (72 pieces), built into the binary.
const TINY_TOKENIZER: &[u8] = include_bytes!("../../assets/tiny-pipeline/tokenizer.json");
/// A 2-layer, 32-wide UMT5 encoder configuration matching that tokenizer.
const TINY_TEXT_ENCODER: &str = include_str!("../../assets/tiny-pipeline/text_encoder_config.json");

/// The built-in pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelinePreset {
    /// A small Wan 2.1 trained on drawn clips (`train/`): `a {color} {shape} moving {direction}`
    /// makes that shape move that way, 17 frames of 64×64. A diffusers snapshot (`models/demo`),
    /// loaded by the same code as a downloaded model; [`demo_snapshot`] says where it is.
    Demo,
    /// Every component tiny (transformer 2×16 wide, UMT5 32 wide, VAE base 4 with Wan's 16 latent
    /// channels): a 17-frame 128×128 video takes seconds on a laptop.
    Tiny,
    /// [`Self::Tiny`] with SkyReels-V2's diffusion-forcing transformer (fps embedding, per-frame
    /// timesteps): long videos chunk by chunk, 37 frames per chunk overlapping by 17.
    TinyDf,
    /// [`Self::Tiny`] as Wan 2.1 I2V (the structure of Wan2.1-I2V-14B-480P): a CLIP image encoder
    /// of ViT-H/14's shape at 32 wide (224 pixels, 257 tokens, exact GELU, the penultimate layer's
    /// output), its processor, and a transformer reading the first-frame condition.
    TinyI2v,
}

/// The tiny image encoder: ViT-H/14's geometry (224 pixels in 14-pixel patches, 257 tokens) at
/// width 32, 4 heads, 4 layers.
fn tiny_clip_config() -> crate::image::ClipVisionConfig {
    crate::image::ClipVisionConfig {
        hidden_size: 32,
        intermediate_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        image_size: 224,
        patch_size: 14,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: "gelu".into(),
    }
}

/// Wan 2.1 I2V's `CLIPImageProcessor`: short side to 224 (bicubic), center crop 224, CLIP's
/// mean and std.
fn clip_processor_224() -> crate::image::ClipProcessorConfig {
    crate::image::ClipProcessorConfig {
        shortest_edge: 224,
        filter: tessera_kernels::cpu::resample::Filter::Bicubic,
        crop: 224,
        rescale_factor: Some(1.0 / 255.0),
        normalize: Some(([0.481_454_66, 0.457_827_5, 0.408_210_73], [0.268_629_54, 0.261_302_6, 0.275_777_1])),
    }
}

/// Generation defaults that suit a pipeline (upstream's for real models; small ones for presets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PipelineDefaults {
    /// Frame height.
    pub height: usize,
    /// Frame width.
    pub width: usize,
    /// Frames.
    pub num_frames: usize,
    /// Denoising steps.
    pub num_inference_steps: usize,
    /// A diffusion-forcing pipeline's long-video defaults (`None` for the others).
    pub forcing: Option<ForcingDefaults>,
}

/// Upstream Wan 2.1 defaults (480×832, 81 frames, 50 steps).
pub const WAN_DEFAULTS: PipelineDefaults = {
    use tessera_cluster::defaults as d;
    PipelineDefaults {
        height: d::HEIGHT as usize,
        width: d::WIDTH as usize,
        num_frames: d::NUM_FRAMES as usize,
        num_inference_steps: d::STEPS as usize,
        forcing: None,
    }
};

/// Upstream SkyReels-V2 diffusion-forcing defaults (the 540P models' example: 544×960, 30 steps,
/// 257 frames in chunks of 97 overlapping by 17, `addnoise_condition` 20); the causal block is the
/// transformer's (`num_frame_per_block`), filled in by [`WanPipeline::snapshot_defaults`].
pub const SKYREELS_DF_DEFAULTS: PipelineDefaults =
    PipelineDefaults { height: 544, width: 960, num_frames: 257, num_inference_steps: 30, forcing: Some(ForcingDefaults::SKYREELS_V2) };

impl PipelinePreset {
    /// Every preset with its name.
    pub const ALL: [(&'static str, PipelinePreset); 4] = [("demo", Self::Demo), ("tiny", Self::Tiny), ("tiny-df", Self::TinyDf), ("tiny-i2v", Self::TinyI2v)];

    /// The preset `generate` and `serve` run when neither a model folder nor a preset is named.
    pub const DEFAULT: Self = Self::Demo;

    /// Looks a preset up by name.
    pub fn from_name(name: &str) -> Result<Self> {
        crate::transformer_config::preset_by_name(&Self::ALL, name, "built-in pipeline")
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        crate::transformer_config::preset_name(&Self::ALL, self)
    }

    /// Sizes and steps that suit the preset.
    pub fn defaults(self) -> PipelineDefaults {
        match self {
            // what it was trained on: 17 frames (1 s at 16 fps) of 64×64
            Self::Demo => PipelineDefaults { height: 64, width: 64, num_frames: 17, num_inference_steps: 30, forcing: None },
            Self::Tiny | Self::TinyI2v => PipelineDefaults { height: 128, width: 128, num_frames: 17, num_inference_steps: 20, forcing: None },
            Self::TinyDf => PipelineDefaults {
                height: 128,
                width: 128,
                num_frames: 57,
                num_inference_steps: 10,
                forcing: Some(ForcingDefaults { base_num_frames: 37, overlap_history: 17, causal_block: 1, addnoise_condition: 20.0 }),
            },
        }
    }

    /// Builds the pipeline; a random preset's weights depend only on `seed` and the tensor names
    /// (the trained `demo` loads its own).
    pub fn build(self, seed: u64) -> Result<WanPipeline> {
        self.build_on(seed, Device::Cpu)
    }

    /// [`Self::build`] with the transformer on `device` (the same weights on every device).
    pub fn build_on(self, seed: u64, device: Device) -> Result<WanPipeline> {
        match self.transformer_preset() {
            Some(preset) => self.build_with(seed, DitModel::preset(preset, seed, device)?),
            None => WanPipeline::load_on(&demo_snapshot()?, device),
        }
    }

    /// The transformer configuration of a random preset (`None` for the trained `demo`, whose
    /// configuration is its snapshot's).
    pub fn transformer_preset(self) -> Option<TransformerPreset> {
        match self {
            Self::Demo => None,
            Self::Tiny => Some(TransformerPreset::Tiny),
            Self::TinyDf => Some(TransformerPreset::TinyDf),
            Self::TinyI2v => Some(TransformerPreset::TinyI2v),
        }
    }

    /// [`Self::build`] around a transformer built elsewhere (e.g. the emulated CUDA model of
    /// [`Self::transformer_preset`]); the other components are the preset's, from `seed`, the
    /// text encoder and the VAE on the transformer's backend.
    pub fn build_with(self, seed: u64, transformer: DitModel) -> Result<WanPipeline> {
        match self {
            Self::Demo => {
                Err(WorkerError::Config { path: "demo".into(), detail: "the demo model is trained: it loads its own transformer from its snapshot".into() })
            }
            Self::Tiny | Self::TinyDf | Self::TinyI2v => {
                let tokenizer = PromptTokenizer::from_json_bytes(TINY_TOKENIZER, Some("<pad>"), TEXT_LEN, "built-in tiny tokenizer")?;
                let cfg = Umt5Config::from_json(TINY_TEXT_ENCODER)?;
                let encoder = Umt5EncoderModel::from_source_on(cfg, &RandomWeights::new(seed ^ 0x7465_7874), transformer.backend())?;
                let vae_cfg = VaeConfig { base_dim: 4, ..VaePreset::Wan21.config() };
                let vae = WanVae::from_source_on(vae_cfg, &RandomWeights::new(seed ^ 0x7661_6500), transformer.backend())?;
                let image = match self {
                    Self::TinyI2v => {
                        let clip =
                            crate::image::ClipVisionModel::from_source_on(tiny_clip_config(), &RandomWeights::new(seed ^ 0x636c_6970), transformer.backend())?;
                        Some(crate::image::ImageEncoder::from_parts(clip_processor_224(), clip)?)
                    }
                    _ => None,
                };
                WanPipeline::from_parts(TextEncoder::new(tokenizer, encoder), transformer, vae, SamplerConfig::unipc(3.0), image)
            }
        }
    }
}

/// The `demo` model's snapshot folder: `TESSERA_DEMO_MODEL` when set, else the repository's
/// `models/demo` (where `train/train.py` exports it). Missing, the error names both.
pub fn demo_snapshot() -> Result<PathBuf> {
    let dir = std::env::var_os(DEMO_MODEL_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEMO_SNAPSHOT));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    Err(WorkerError::Config {
        path: dir.display().to_string(),
        detail: format!(
            "the demo model's snapshot is not here; set {DEMO_MODEL_ENV} to a copy of the repository's models/demo, or name a model (--model DIR) or a random preset (--preset tiny)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{FrameCollector, GenerationParams};

    /// The pipeline driving the CUDA model's bf16 data flow (emulated on the host) denoises to
    /// the CPU pipeline's latents within bf16 tolerance: the seam `--device cuda` uses.
    #[test]
    fn the_cuda_models_data_flow_drives_the_pipeline_to_the_cpu_result() {
        let cpu = PipelinePreset::Tiny.build(3).unwrap();
        let emulated = PipelinePreset::Tiny.build_with(3, DitModel::emulated_preset(TransformerPreset::Tiny, 3).unwrap()).unwrap();
        assert!(emulated.transformer().describe().contains("emulating"));
        let params = GenerationParams { height: 32, width: 48, num_frames: 5, num_inference_steps: 4, seed: 7, ..GenerationParams::new("a red ball bouncing") };
        let latents = |pipe: &WanPipeline| {
            let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale).unwrap();
            let schedule = pipe.schedule_for(&params).unwrap();
            let mut lat = pipe.initial_latents(&params, &schedule).unwrap();
            pipe.denoise(&mut lat, &text, params.guidance_scale, &schedule, &mut crate::pipeline::NoObserver).unwrap();
            lat
        };
        let (a, b) = (latents(&cpu), latents(&emulated));
        let num: f64 = a.data().iter().zip(b.data()).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = a.data().iter().map(|x| (*x as f64).powi(2)).sum();
        let rel_l2 = (num / den).sqrt();
        eprintln!("tiny pipeline, 4 steps: emulated CUDA model vs CPU model, latents rel_l2 {rel_l2:.2e}");
        assert!(rel_l2 < crate::golden::CUDA_BF16_TOLERANCE.rel_l2, "rel_l2 {rel_l2}");
        assert!(rel_l2 > 0.0, "bf16 must differ from f32 somewhere");
    }

    #[test]
    fn tiny_i2v_pipeline_starts_from_the_image() {
        let pipe = PipelinePreset::TinyI2v.build(1).unwrap();
        assert!(pipe.is_image_to_video());
        // A 40×60 image with a bright square left of center, resized to 32×48 for the first frame.
        let (h, w) = (40, 60);
        let data: Vec<u8> =
            (0..h * w).flat_map(|i| if (10..30).contains(&(i / w)) && (10..30).contains(&(i % w)) { [250, 240, 20] } else { [20, 30, 60] }).collect();
        let image = crate::image::RgbImage::new(h, w, data).unwrap();
        let params = GenerationParams {
            height: 32,
            width: 48,
            num_frames: 5,
            num_inference_steps: 3,
            seed: 11,
            image: Some(image.clone()),
            ..GenerationParams::new("a yellow square")
        };
        let run = |p: &GenerationParams| {
            let mut frames = FrameCollector::default();
            pipe.generate(p, &mut frames).map(|_| frames.frames().unwrap())
        };
        let a = run(&params).unwrap();
        assert_eq!(a.shape(), &[1, 3, 5, 32, 48]);
        assert!(a.data().iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        assert_eq!(run(&params).unwrap().data(), a.data(), "same seed and image, same video");
        let other = crate::image::RgbImage::new(h, w, image.data.iter().map(|v| 255 - v).collect()).unwrap();
        assert_ne!(run(&GenerationParams { image: Some(other), ..params.clone() }).unwrap().data(), a.data(), "the image conditions the video");
        // An image-to-video model needs its image; a text-to-video one refuses it.
        let err = run(&GenerationParams { image: None, ..params.clone() }).unwrap_err().to_string();
        assert!(err.contains("image"), "{err}");
        let t2v = PipelinePreset::Tiny.build(1).unwrap();
        let err = t2v.generate(&params, &mut FrameCollector::default()).unwrap_err().to_string();
        assert!(err.contains("image-to-video"), "{err}");
    }

    #[test]
    fn tiny_pipeline_generates_finite_frames_deterministically() {
        let pipe = PipelinePreset::Tiny.build(1).unwrap();
        let params =
            GenerationParams { height: 32, width: 48, num_frames: 5, num_inference_steps: 3, seed: 11, ..GenerationParams::new("a red ball bouncing") };
        let run = || {
            let mut frames = FrameCollector::default();
            pipe.generate(&params, &mut frames).unwrap();
            frames.frames().unwrap()
        };
        let a = run();
        assert_eq!(a.shape(), &[1, 3, 5, 32, 48]);
        assert!(a.data().iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        let spread = a.data().iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(spread.1 - spread.0 > 1e-3, "frames are constant: {spread:?}");
        assert_eq!(run().data(), a.data(), "same seed, same video");
        assert!(PipelinePreset::from_name("huge").is_err());
    }
}
