//! Flow-matching samplers as the Wan 2.1 pipelines run them (reference/wan2.1.md §5, §6.2):
//! diffusers' `UniPCMultistepScheduler` with flow sigmas (Wan's default) and
//! `FlowMatchEulerDiscreteScheduler`, classifier-free guidance, and noising for video-to-video.
//!
//! The work is split so that each sequence-parallel rank can step only its own contiguous slice of
//! the flattened latent:
//! - a [`Schedule`] (σ grid, model timesteps and every step's scalar coefficients, in the exact
//!   float32 arithmetic of diffusers) is computed once from a [`SamplerConfig`] and shared;
//! - a [`SamplerState`] holds the per-element history (previous data estimates, last corrected
//!   sample) of one slice in the backend's buffers and applies [`SamplerState::step`] to it with
//!   the backend's `sampler_step` (bit for bit the same on every backend). Every update is
//!   elementwise, so stepping slices one by one gives bit-for-bit the result of stepping the whole
//!   latent, in any layout (a rank steps its tokens' patch rows).

mod config;
mod euler;
mod guidance;
mod noising;
mod schedule;
mod state;
mod unipc;

pub use config::{FinalSigmas, SamplerConfig, SolverType, UniPcOptions};
pub use guidance::{apply_guidance, guidance_enabled};
pub use noising::{add_noise, first_step_for_strength};
pub use schedule::{Schedule, StepCoefficients, Timesteps};
pub use state::{history_from_parts, SamplerHistory, SamplerState};
pub use unipc::{UniPcCorrector, UniPcPredictor, UniPcStep};

/// Which update rule a sampler applies (and which diffusers scheduler it reproduces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SamplerKind {
    /// `UniPCMultistepScheduler` (bh2 predictor-corrector, data prediction): Wan's default.
    UniPc,
    /// `FlowMatchEulerDiscreteScheduler`: first-order Euler on the velocity.
    Euler,
}

impl SamplerKind {
    /// The diffusers class name (`_class_name` in `scheduler_config.json`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Euler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// Short name used on command lines and in requests: `unipc` or `euler`.
    pub fn name(self) -> &'static str {
        match self {
            Self::UniPc => "unipc",
            Self::Euler => "euler",
        }
    }

    /// Parses a short name (`unipc`, `euler`) or a diffusers class name.
    pub fn from_name(s: &str) -> Option<Self> {
        [Self::UniPc, Self::Euler].into_iter().find(|k| k.name() == s || k.class_name() == s)
    }
}

/// Below this many elements a noising update runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;
/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;
