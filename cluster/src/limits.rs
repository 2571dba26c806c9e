//! The limits every generation is held to, and the one check of a generation's sizes and settings
//! against them: the coordinator's request validation, `tessera generate` and a worker's
//! PrepareJob all call [`check_settings`], so a request is refused with the same message wherever it
//! enters, before anything is allocated. Products of sizes use checked arithmetic: a hostile
//! request cannot overflow them into a small number.

use crate::{ClusterError, Result};

/// How a model turns video into tokens: its VAE compresses each side `spatial`× and time
/// `temporal`× after the first frame, and its transformer cuts the latent into `patch` cells
/// (`[frames, height, width]`; Wan's 1×2×2). A worker advertises them in its `ModelInfo`; every
/// size check and formula takes them from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelFactors {
    /// VAE compression of each frame side.
    pub spatial: u64,
    /// VAE compression in time (after the first frame).
    pub temporal: u64,
    /// The transformer's patch `[frames, height, width]` in latent cells (records written before
    /// the field name none: theirs is Wan's).
    #[serde(default = "wan_patch")]
    pub patch: [u64; 3],
}

/// Largest VAE factor a model may advertise.
pub const MAX_FACTOR: u64 = 64;

/// Largest patch side a model may advertise (in latent cells).
pub const MAX_PATCH: u64 = 16;

fn wan_patch() -> [u64; 3] {
    ModelFactors::WAN.patch
}

impl ModelFactors {
    /// Wan 2.1's (and SkyReels-V2's): a VAE of ÷8 in space and ÷4 in time, patches of 1×2×2.
    pub const WAN: Self = Self { spatial: 8, temporal: 4, patch: [1, 2, 2] };

    /// Frame sides must be multiples of these, `[height, width]`: the VAE's stride times the
    /// patch's side.
    pub fn side_multiples(self) -> [u64; 2] {
        [self.spatial.saturating_mul(self.patch[1]), self.spatial.saturating_mul(self.patch[2])]
    }

    /// Refuses factors from a hostile record (zero, which would be divided by, or absurd) naming
    /// `model_factors`.
    pub fn check(self) -> Result<Self> {
        let vae = [self.spatial, self.temporal].iter().all(|f| (1..=MAX_FACTOR).contains(f));
        if !vae || !self.patch.iter().all(|p| (1..=MAX_PATCH).contains(p)) {
            let detail = format!("{self:?}: each VAE factor must be from 1 to {MAX_FACTOR}, each patch side from 1 to {MAX_PATCH}");
            return Err(invalid("model_factors", detail));
        }
        Ok(self)
    }
}

impl Default for ModelFactors {
    fn default() -> Self {
        Self::WAN
    }
}

/// Whether guidance runs at all: diffusers enables the unconditional pass only for `g > 1` (a
/// guided step is two transformer forwards).
pub fn guidance_enabled(scale: f32) -> bool {
    scale > 1.0
}

/// The latent grid `[frames, height, width]` of `num_frames` frames of `height × width` pixels for
/// a model with `factors`: the one formula of the grid.
pub fn latent_grid(num_frames: u64, height: u64, width: u64, factors: ModelFactors) -> [u64; 3] {
    [num_frames.saturating_sub(1) / factors.temporal + 1, height / factors.spatial, width / factors.spatial]
}

/// Video tokens of a latent grid cut into the model's patches (None past 2⁶⁴): the one formula of
/// the token count.
pub fn grid_tokens([f, h, w]: [u64; 3], factors: ModelFactors) -> Option<u64> {
    let [pf, ph, pw] = factors.patch.map(|p| p.max(1));
    (f / pf).checked_mul(h / ph)?.checked_mul(w / pw)
}

/// What a deployment accepts; the defaults are the documented limits of
/// `proto/tessera/v1/generate.proto`. `tessera serve --max-tokens` sets the token budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest frame side, in pixels.
    pub max_side: u64,
    /// Most frames in one video (90 s at 16 fps).
    pub max_frames: u64,
    /// Most denoising steps.
    pub max_steps: u64,
    /// Largest classifier-free guidance scale.
    pub max_guidance: f32,
    /// Largest σ shift.
    pub max_flow_shift: f32,
    /// Most video tokens per forward (patches of the latent grid; Wan's are 1×2×2).
    pub max_tokens: u64,
}

/// The token budget when none is configured: 1280×720 with 81 frames (21 × 45 × 80 tokens).
pub const DEFAULT_MAX_TOKENS: u64 = 75_600;

/// A worker's own token budget when none is configured (`tessera-worker serve --max-tokens`):
/// 2²¹, about a minute of 1080p. It guards a worker against hostile internal requests; the
/// coordinator's budget (usually smaller) decides what a cluster accepts.
pub const DEFAULT_WORKER_MAX_TOKENS: u64 = 1 << 21;

impl Default for Limits {
    fn default() -> Self {
        Self { max_side: 4096, max_frames: 1441, max_steps: 1000, max_guidance: 50.0, max_flow_shift: 100.0, max_tokens: DEFAULT_MAX_TOKENS }
    }
}

impl Limits {
    /// No deployment limit, only sanity (positive sizes and steps, finite settings, products that
    /// fit in 64 bits): for library entry points whose callers applied their own limits.
    pub fn none() -> Self {
        Self { max_side: u64::MAX, max_frames: u64::MAX, max_steps: u64::MAX, max_guidance: f32::MAX, max_flow_shift: f32::MAX, max_tokens: u64::MAX }
    }
}

/// The sizes and settings of a generation, defaults applied, as the public request names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Frame width in pixels.
    pub width: u64,
    /// Frame height in pixels.
    pub height: u64,
    /// Frames.
    pub num_frames: u64,
    /// Denoising steps.
    pub steps: u64,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// σ shift, if set.
    pub flow_shift: Option<f32>,
    /// Video-to-video strength, if the generation has an input video.
    pub strength: Option<f32>,
}

/// What the check derives from valid settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Latent grid `[frames, height, width]` after the VAE (the model's factors).
    pub latent_fhw: [usize; 3],
    /// Video tokens per forward (patches of the latent grid).
    pub tokens: usize,
}

fn invalid(field: &'static str, detail: String) -> ClusterError {
    ClusterError::input(field, detail)
}

/// Checks `s` against `limits` for a model with `factors`, naming the first field at fault;
/// returns the latent grid and the token count (computed with checked arithmetic, compared with
/// `limits.max_tokens`).
pub fn check_settings(s: &Settings, factors: ModelFactors, limits: &Limits) -> Result<Checked> {
    // Factors come from a worker's record: a zero or absurd one is refused, never divided by.
    factors.check()?;
    let [high, wide] = factors.side_multiples();
    for (field, v, side) in [("width", s.width, wide), ("height", s.height, high)] {
        if v == 0 || v % side != 0 || v > limits.max_side {
            return Err(invalid(field, format!("{v} must be a multiple of {side} between {side} and {}", limits.max_side)));
        }
    }
    let t = factors.temporal;
    if s.num_frames % t != 1 % t || s.num_frames == 0 || s.num_frames > limits.max_frames {
        return Err(invalid("num_frames", format!("{} must be {t}k+1 (1, {}, {}, ... {})", s.num_frames, t + 1, 2 * t + 1, limits.max_frames)));
    }
    let pf = factors.patch[0];
    if !(s.num_frames.saturating_sub(1) / t + 1).is_multiple_of(pf) {
        return Err(invalid("num_frames", format!("{} must be {t}k+1 with k+1 a multiple of the patch's {pf} frames", s.num_frames)));
    }
    if s.steps == 0 || s.steps > limits.max_steps {
        return Err(invalid("steps", format!("{} must be between 1 and {}", s.steps, limits.max_steps)));
    }
    let g = s.guidance_scale;
    if !g.is_finite() || !(0.0..=limits.max_guidance).contains(&g) {
        return Err(invalid("guidance_scale", format!("{g} must be between 0 and {}", limits.max_guidance)));
    }
    if let Some(f) = s.flow_shift {
        if !f.is_finite() || f <= 0.0 || f > limits.max_flow_shift {
            return Err(invalid("flow_shift", format!("{f} must be greater than 0 and at most {}", limits.max_flow_shift)));
        }
    }
    if let Some(st) = s.strength {
        if !st.is_finite() || st <= 0.0 || st > 1.0 {
            return Err(invalid("strength", format!("{st} must be in (0, 1]")));
        }
    }
    // Every size is bounded above, but a configured limit may be huge: the products are checked.
    let fhw = latent_grid(s.num_frames, s.height, s.width, factors);
    let tokens = grid_tokens(fhw, factors);
    let too_many = |n: String| {
        invalid("num_frames", format!("{}x{} with {} frames is {n} tokens; at most {} are accepted", s.width, s.height, s.num_frames, limits.max_tokens))
    };
    let tokens = match tokens {
        Some(t) if t <= limits.max_tokens => t,
        Some(t) => return Err(too_many(t.to_string())),
        None => return Err(too_many("more than 2^64".into())),
    };
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| invalid("num_frames", format!("{v} does not fit this machine's address space")));
    Ok(Checked { latent_fhw: [usize_of(fhw[0])?, usize_of(fhw[1])?, usize_of(fhw[2])?], tokens: usize_of(tokens)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Settings {
        Settings { width: 832, height: 480, num_frames: 81, steps: 50, guidance_scale: 5.0, flow_shift: None, strength: None }
    }

    fn field(s: Settings, limits: &Limits) -> &'static str {
        match check_settings(&s, ModelFactors::WAN, limits) {
            Err(ClusterError::InvalidInput { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn valid_settings_give_the_grid_and_the_tokens() {
        assert_eq!(check_settings(&ok(), ModelFactors::WAN, &Limits::default()).unwrap(), Checked { latent_fhw: [21, 60, 104], tokens: 32_760 });
    }

    #[test]
    fn each_limit_names_its_field() {
        let l = Limits::default();
        assert_eq!(field(Settings { width: 100, ..ok() }, &l), "width");
        assert_eq!(field(Settings { height: 0, ..ok() }, &l), "height");
        assert_eq!(field(Settings { width: 8192, ..ok() }, &l), "width");
        assert_eq!(field(Settings { num_frames: 18, ..ok() }, &l), "num_frames");
        assert_eq!(field(Settings { num_frames: 2001, ..ok() }, &l), "num_frames");
        assert_eq!(field(Settings { steps: 5000, ..ok() }, &l), "steps");
        assert_eq!(field(Settings { steps: 0, ..ok() }, &l), "steps");
        assert_eq!(field(Settings { guidance_scale: 80.0, ..ok() }, &l), "guidance_scale");
        assert_eq!(field(Settings { guidance_scale: f32::NAN, ..ok() }, &l), "guidance_scale");
        assert_eq!(field(Settings { flow_shift: Some(0.0), ..ok() }, &l), "flow_shift");
        assert_eq!(field(Settings { strength: Some(1.5), ..ok() }, &l), "strength");
        assert_eq!(field(Settings { width: 4096, height: 4096, num_frames: 1441, ..ok() }, &l), "num_frames");
    }

    /// The sizes follow the model's factors; factors from a hostile record are refused.
    #[test]
    fn the_models_factors_set_the_multiples_and_the_grid() {
        let l = Limits::default();
        let other = ModelFactors { spatial: 16, temporal: 8, ..ModelFactors::WAN };
        assert!(check_settings(&Settings { width: 848, ..ok() }, ModelFactors::WAN, &l).is_ok());
        let err = check_settings(&Settings { width: 848, ..ok() }, other, &l).unwrap_err();
        assert!(matches!(err, ClusterError::InvalidInput { field: "width", .. }), "848 is a multiple of 16, not of 32: {err}");
        let s = Settings { width: 832, height: 480, num_frames: 81, ..ok() };
        assert_eq!(check_settings(&s, other, &l).unwrap().latent_fhw, [11, 30, 52]);
        let err = check_settings(&Settings { num_frames: 85, ..s }, other, &l).unwrap_err().to_string();
        assert!(err.contains("must be 8k+1"), "{err}");
        let w = ModelFactors::WAN;
        let bad = [
            ModelFactors { spatial: 0, ..w },
            ModelFactors { temporal: 0, ..w },
            ModelFactors { spatial: 1 << 40, ..w },
            ModelFactors { patch: [1, 0, 2], ..w },
            ModelFactors { patch: [1, 2, 1 << 40], ..w },
        ];
        for bad in bad {
            assert!(matches!(check_settings(&ok(), bad, &l), Err(ClusterError::InvalidInput { field: "model_factors", .. })), "{bad:?}");
        }
    }

    /// The transformer's patch sets the side multiples and the token count: a 1×4×4 patch over Wan's
    /// VAE wants sides of 32 and has a quarter of Wan's tokens; a 2-frame patch wants an even
    /// number of latent frames.
    #[test]
    fn the_patch_sets_the_multiples_and_the_tokens() {
        let l = Limits::default();
        let demo = ModelFactors { patch: [1, 4, 4], ..ModelFactors::WAN };
        assert_eq!(demo.side_multiples(), [32, 32]);
        let stride_4 = ModelFactors { spatial: 4, ..demo };
        assert_eq!(stride_4.side_multiples(), [16, 16], "the demo model's");
        let s = Settings { width: 64, height: 64, num_frames: 17, ..ok() };
        assert_eq!(check_settings(&s, demo, &l).unwrap(), Checked { latent_fhw: [5, 8, 8], tokens: 20 });
        assert_eq!(check_settings(&s, ModelFactors::WAN, &l).unwrap().tokens, 80);
        let err = check_settings(&Settings { width: 80, ..s }, demo, &l).unwrap_err().to_string();
        assert!(err.contains("width") && err.contains("multiple of 32"), "{err}");
        let wide = ModelFactors { patch: [1, 2, 4], ..ModelFactors::WAN };
        assert_eq!(wide.side_multiples(), [16, 32]);
        assert!(check_settings(&Settings { height: 48, ..s }, wide, &l).is_ok());
        let pairs = ModelFactors { patch: [2, 2, 2], ..ModelFactors::WAN };
        assert_eq!(check_settings(&Settings { num_frames: 13, ..s }, pairs, &l).unwrap(), Checked { latent_fhw: [4, 8, 8], tokens: 32 });
        let err = check_settings(&s, pairs, &l).unwrap_err().to_string();
        assert!(err.contains("num_frames") && err.contains("multiple of the patch's 2 frames"), "{err}");
    }

    /// Membership records written before the patch was advertised read as Wan's.
    #[test]
    fn records_without_a_patch_read_as_wans() {
        let old: ModelFactors = serde_json::from_str(r#"{"spatial":8,"temporal":4}"#).unwrap();
        assert_eq!(old, ModelFactors::WAN);
    }

    /// A configured limit far past any real size cannot let a product wrap around.
    #[test]
    fn hostile_sizes_cannot_overflow() {
        let open = Limits { max_side: u64::MAX, max_frames: u64::MAX, max_tokens: u64::MAX, ..Limits::default() };
        let huge = Settings { width: 1 << 63, height: 1 << 63, num_frames: (1 << 62) + 1, ..ok() };
        let err = check_settings(&huge, ModelFactors::WAN, &open).unwrap_err().to_string();
        assert!(err.contains("num_frames") && err.contains("more than 2^64"), "{err}");
        // The internal API's example: a 1,048,576 × 1,048,576 latent (8,388,608-pixel sides).
        let wide = Settings { width: 8 << 20, height: 8 << 20, num_frames: 1, ..ok() };
        assert_eq!(field(wide, &Limits::default()), "width");
    }
}
