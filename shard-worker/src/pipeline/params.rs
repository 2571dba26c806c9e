//! What one generation asks for, checked against the loaded models before any work starts.

use super::limits::{check_settings, grid_tokens, latent_grid, Limits, ModelFactors, Settings};
use crate::sampler::SamplerKind;
use crate::{Result, WorkerError};
use tessera_kernels::Tensor;

/// Video-to-video input: a video already resized to the output size, and how much of the
/// denoising schedule to run on it.
#[derive(Clone, Debug)]
pub struct VideoInput {
    /// `[1, 3, F, H, W]`, values in [−1, 1], F = 4k + 1.
    pub video: Tensor,
    /// Share of the schedule that is run, in (0, 1] (upstream's default 0.8).
    pub strength: f64,
}

/// The parameters of one generation (diffusers `WanPipeline.__call__` names).
#[derive(Clone, Debug)]
pub struct GenerationParams {
    /// What the video shows.
    pub prompt: String,
    /// What it should not show (the unconditional branch of guidance); "" as upstream's default.
    pub negative_prompt: String,
    /// Frame height in pixels (a multiple of the VAE's stride times the patch: 16 for Wan).
    pub height: usize,
    /// Frame width in pixels (the same multiple).
    pub width: usize,
    /// Frames, 4k + 1.
    pub num_frames: usize,
    /// Denoising steps of the full schedule.
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; at most 1 disables guidance (one forward per step).
    pub guidance_scale: f32,
    /// σ shift; `None` keeps the scheduler config's.
    pub flow_shift: Option<f64>,
    /// Sampler; `None` keeps the scheduler config's.
    pub sampler: Option<SamplerKind>,
    /// Seed of the initial noise (a counter-based generator indexed by element position).
    pub seed: u64,
    /// Starting noise instead of the seeded one (`[1, C, T, h, w]`), e.g. to reproduce a reference.
    pub initial_noise: Option<Tensor>,
    /// Video-to-video input.
    pub video: Option<VideoInput>,
    /// Video extension (diffusion forcing): the input video's last `overlap_history` frames
    /// `[1, 3, overlap_history, H, W]` in [−1, 1], resized to the output size; the video
    /// continues from them.
    pub history: Option<Tensor>,
    /// Diffusion forcing (SkyReels-V2 DF models): the long-video settings.
    pub forcing: Option<super::forcing::ForcingParams>,
    /// Image-to-video: the image the video starts from, any size. Wan 2.1 I2V models resize it to
    /// the output size for the first frame and to the encoder's for its tokens; diffusion-forcing
    /// models resize it to the output size as the first chunk's first frame.
    pub image: Option<crate::image::RgbImage>,
}

impl GenerationParams {
    /// The defaults (`tessera_cluster::defaults`: 480×832, 81 frames, 50 steps, guidance 5) for
    /// `prompt`.
    pub fn new(prompt: impl Into<String>) -> Self {
        use tessera_cluster::defaults as d;
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            height: d::HEIGHT as usize,
            width: d::WIDTH as usize,
            num_frames: d::NUM_FRAMES as usize,
            num_inference_steps: d::STEPS as usize,
            guidance_scale: d::GUIDANCE_SCALE,
            flow_shift: None,
            sampler: None,
            seed: 0,
            initial_noise: None,
            video: None,
            history: None,
            forcing: None,
            image: None,
        }
    }

    /// Checks the sizes and settings for a model with `factors` against `limits` (the one check
    /// every path runs: [`check_settings`]), and an input video's shape against the sizes.
    pub fn validate(&self, factors: ModelFactors, limits: &Limits) -> Result<()> {
        check_settings(&self.settings(), factors, limits)?;
        if let Some(v) = &self.video {
            let want = [1, 3, self.num_frames, self.height, self.width];
            if v.video.shape() != want {
                return Err(WorkerError::input("video", format!("expected {want:?} (resized to the output size), got {:?}", v.video.shape())));
            }
            if self.image.is_some() {
                return Err(WorkerError::input("image", "an input image and an input video exclude each other"));
            }
        }
        if let Some(history) = &self.history {
            let Some(overlap) = self.forcing.as_ref().and_then(|f| f.overlap_history) else {
                return Err(WorkerError::input("video", "extending a video is diffusion forcing's, with an overlap_history"));
            };
            let want = [1, 3, overlap, self.height, self.width];
            if history.shape() != want {
                return Err(WorkerError::input("video", format!("expected its last {overlap} frames {want:?}, got {:?}", history.shape())));
            }
            if self.image.is_some() || self.video.is_some() {
                return Err(WorkerError::input("video", "a video to extend excludes an input image and a video-to-video input"));
            }
        }
        Ok(())
    }

    /// The sizes and settings as the one check reads them, named as the public request names them.
    pub fn settings(&self) -> Settings {
        Settings {
            width: self.width as u64,
            height: self.height as u64,
            num_frames: self.num_frames as u64,
            steps: self.num_inference_steps as u64,
            guidance_scale: self.guidance_scale,
            flow_shift: self.flow_shift.map(|s| s as f32),
            strength: self.video.as_ref().map(|v| v.strength as f32),
        }
    }

    /// Latent grid `[T, h, w]` for these sizes ([`latent_grid`]).
    pub fn latent_fhw(&self, factors: ModelFactors) -> [usize; 3] {
        latent_grid(self.num_frames as u64, self.height as u64, self.width as u64, factors).map(|d| d as usize)
    }

    /// Video tokens per forward for these sizes ([`grid_tokens`]; None past 2⁶⁴).
    pub fn tokens(&self, factors: ModelFactors) -> Option<usize> {
        grid_tokens(self.latent_fhw(factors).map(|d| d as u64), factors).and_then(|t| usize::try_from(t).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(p: &GenerationParams) -> &'static str {
        match p.validate(ModelFactors::WAN, &Limits::default()) {
            Err(WorkerError::InvalidInput { field, .. }) => field,
            other => panic!("expected an invalid input, got {other:?}"),
        }
    }

    #[test]
    fn sizes_and_settings_are_checked_by_name() {
        let ok = GenerationParams::new("x");
        ok.validate(ModelFactors::WAN, &Limits::default()).unwrap();
        assert_eq!(ok.latent_fhw(ModelFactors::WAN), [21, 60, 104]);
        assert_eq!(field(&GenerationParams { height: 40, ..ok.clone() }), "height");
        assert_eq!(field(&GenerationParams { width: 0, ..ok.clone() }), "width");
        assert_eq!(field(&GenerationParams { num_frames: 8, ..ok.clone() }), "num_frames");
        assert_eq!(field(&GenerationParams { num_inference_steps: 0, ..ok.clone() }), "steps");
        assert_eq!(field(&GenerationParams { guidance_scale: -1.0, ..ok.clone() }), "guidance_scale");
        assert_eq!(field(&GenerationParams { flow_shift: Some(0.0), ..ok.clone() }), "flow_shift");
        let video = Tensor::zeros([1, 3, 81, 480, 832]);
        assert_eq!(field(&GenerationParams { video: Some(VideoInput { video: video.clone(), strength: 0.0 }), ..ok.clone() }), "strength");
        assert_eq!(field(&GenerationParams { video: Some(VideoInput { video: Tensor::zeros([1, 3, 5, 480, 832]), strength: 0.5 }), ..ok.clone() }), "video");
        GenerationParams { video: Some(VideoInput { video, strength: 0.5 }), ..ok.clone() }.validate(ModelFactors::WAN, &Limits::default()).unwrap();
        // A video to extend: its last overlap_history frames, for a diffusion-forcing run only.
        let forcing = super::super::forcing::ForcingParams {
            base_num_frames: 37,
            overlap_history: Some(17),
            ar_step: 0,
            causal_block_size: Some(1),
            addnoise_condition: 20.0,
            fps: 16,
        };
        let extend = GenerationParams { history: Some(Tensor::zeros([1, 3, 17, 480, 832])), forcing: Some(forcing.clone()), ..ok.clone() };
        extend.validate(ModelFactors::WAN, &Limits::default()).unwrap();
        assert_eq!(field(&GenerationParams { history: Some(Tensor::zeros([1, 3, 13, 480, 832])), ..extend.clone() }), "video");
        assert_eq!(field(&GenerationParams { forcing: None, ..extend }), "video");
    }
}
