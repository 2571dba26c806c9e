//! Validation of a public `GenerateRequest`: every field is checked against the limits documented
//! in `proto/tessera/v1/generate.proto`, defaults are applied, and the first problem is reported as
//! an error naming the field (mapped to gRPC `INVALID_ARGUMENT`), before any work is queued.

use crate::error::CoordinatorError;
use tessera_cluster::forcing::{ForcingDefaults, ForcingSettings};
use tessera_cluster::limits::ModelFactors;
use tessera_cluster::{ClusterError, JobRequest, JobSpec};
use tessera_proto::v1::{DiffusionForcing, GenerateRequest, OutputFormat, Sampler};

/// Longest prompt or negative prompt accepted, in characters (checked with the job spec).
pub use tessera_cluster::job::MAX_PROMPT_CHARS;
/// Longest client label, in characters.
pub const MAX_LABEL_CHARS: usize = 128;
/// Longest model name, in characters.
pub const MAX_MODEL_CHARS: usize = 256;
/// Largest input video accepted for video-to-video, in bytes.
pub const MAX_INPUT_VIDEO_BYTES: usize = 256 << 20;
/// The size limits, checked by the one check every path runs (`tessera_cluster::limits`).
pub use tessera_cluster::limits::Limits;

/// Defaults of the served model (`tessera_cluster::defaults`, or what its workers advertise).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestDefaults {
    /// Model used when the request names none.
    pub model: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Number of frames.
    pub num_frames: u32,
    /// Frames per second.
    pub fps: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Video-to-video strength.
    pub strength: f32,
    /// The served model's VAE factors, which every size is checked against.
    pub factors: ModelFactors,
    /// A diffusion-forcing model's long-video defaults (`None`: the model is not one).
    pub forcing: Option<ForcingDefaults>,
    /// Whether the model makes videos from an image: its requests need `input_image`.
    pub image_to_video: bool,
}

impl Default for RequestDefaults {
    fn default() -> Self {
        use tessera_cluster::defaults as d;
        Self {
            model: String::new(),
            width: d::WIDTH,
            height: d::HEIGHT,
            num_frames: d::NUM_FRAMES,
            fps: d::FPS,
            steps: d::STEPS,
            guidance_scale: d::GUIDANCE_SCALE,
            strength: d::STRENGTH,
            factors: ModelFactors::WAN,
            forcing: None,
            image_to_video: false,
        }
    }
}

/// A request that passed validation, with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    /// The request as it will run (defaults filled in; `seed` set): what is not the job itself
    /// (output format, priority, model name, input video) is read from here.
    pub request: GenerateRequest,
    /// The job, made once: what the workers are sent and check again.
    pub spec: JobSpec,
    /// Image-to-video: the input image, decoded once at admission
    /// ([`crate::input_image::decode_blocking`]; `validate` reads only its header, and the
    /// request keeps the bytes until then).
    pub image: Option<std::sync::Arc<crate::input_image::DecodedImage>>,
    /// Video-to-video: the input video decoded once at admission, resized to the size the model
    /// generates at, as the 8-bit frames the workers are sent
    /// ([`crate::server::prepare_request_video_blocking`]; the request's bytes are dropped then).
    pub video: Option<std::sync::Arc<tessera_proto::worker::v1::InputFrames>>,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument { field, detail: detail.into() }
}

/// Checks every field of `req` and applies `defaults`; `known_models` are the models some worker
/// serves (an empty list skips that check, for a coordinator that has not seen its workers yet),
/// `max_tokens` the largest token count the cluster accepts, and `draw_seed` supplies a seed
/// when the request has none.
pub fn validate(
    mut req: GenerateRequest,
    defaults: &RequestDefaults,
    known_models: &[String],
    max_tokens: usize,
    draw_seed: impl FnOnce() -> u64,
) -> Result<ValidRequest, CoordinatorError> {
    let or_default = |v: u32, d: u32| if v == 0 { d } else { v };
    req.width = or_default(req.width, defaults.width);
    req.height = or_default(req.height, defaults.height);
    req.num_frames = or_default(req.num_frames, defaults.num_frames);
    req.fps = or_default(req.fps, defaults.fps);
    if req.fps > 120 {
        return Err(invalid("fps", format!("{} must be between 1 and 120", req.fps)));
    }
    req.steps = or_default(req.steps, defaults.steps);
    req.guidance_scale = Some(req.guidance_scale.unwrap_or(defaults.guidance_scale));
    let Ok(sampler) = Sampler::try_from(req.sampler) else {
        return Err(invalid("sampler", format!("{} is not a known sampler", req.sampler)));
    };
    match OutputFormat::try_from(req.output_format) {
        Ok(OutputFormat::Unspecified) => req.output_format = OutputFormat::Mp4 as i32,
        Ok(_) => {}
        Err(_) => return Err(invalid("output_format", format!("{} is not a known output format", req.output_format))),
    }
    if req.input_video.is_empty() {
        if req.strength.is_some() {
            return Err(invalid("strength", "applies only to video-to-video: set input_video or leave strength unset"));
        }
    } else {
        if req.input_video.len() > MAX_INPUT_VIDEO_BYTES {
            return Err(invalid("input_video", format!("is {} bytes, at most {MAX_INPUT_VIDEO_BYTES} are accepted", req.input_video.len())));
        }
        // A Wan model transforms the input at a strength; a diffusion-forcing model extends it
        // (the spec refuses a strength for it, naming the field).
        if defaults.forcing.is_none() {
            req.strength = Some(req.strength.unwrap_or(defaults.strength));
        }
    }
    let extend = defaults.forcing.is_some() && !req.input_video.is_empty();
    // Image-to-video: an image exactly for a model that makes videos from one (Wan 2.1 I2V), or
    // optionally for a diffusion-forcing model (its first chunk starts from it); its header is
    // read and checked here, its pixels decoded once before the job is accepted.
    let takes_image = defaults.image_to_video || defaults.forcing.is_some();
    let image = match (req.input_image.is_empty(), defaults.image_to_video, takes_image) {
        (true, false, _) => None,
        (false, _, true) => Some(crate::input_image::probe(&req.input_image)?),
        (true, true, _) => return Err(invalid("input_image", "is required: this model makes videos from an image (image-to-video)")),
        (false, _, false) => {
            return Err(invalid(
                "input_image",
                "applies only to image-to-video models (Wan 2.1 I2V) and diffusion-forcing models (SkyReels-V2 DF); this model is neither",
            ))
        }
    };
    req.seed = Some(req.seed.unwrap_or_else(draw_seed));
    // Diffusion forcing: always for a DF model (its defaults), never for another.
    let forcing = match (defaults.forcing, &req.diffusion_forcing) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("diffusion_forcing", "applies only to diffusion-forcing models (SkyReels-V2 DF); this model is not one")),
        (Some(d), asked) => {
            let a = asked.unwrap_or_default();
            let f = ForcingSettings::with_defaults(d, a.base_num_frames, a.overlap_history, a.ar_step, a.causal_block_size, a.addnoise_condition, req.fps);
            req.diffusion_forcing = Some(DiffusionForcing {
                base_num_frames: f.base_num_frames,
                overlap_history: Some(f.overlap_history),
                ar_step: f.ar_step,
                causal_block_size: f.causal_block_size,
                addnoise_condition: Some(f.addnoise_condition),
            });
            Some(f)
        }
    };
    // The job spec: prompts, sizes, steps, guidance, shift, strength and the token budget, for the
    // model's factors: the one check every path runs (the workers run it again).
    let job = JobRequest {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        width: req.width,
        height: req.height,
        num_frames: req.num_frames,
        steps: req.steps,
        guidance_scale: req.guidance_scale.unwrap_or(defaults.guidance_scale),
        flow_shift: req.flow_shift,
        sampler,
        seed: req.seed.unwrap_or_default(),
        strength: req.strength,
        extend,
        forcing,
        image,
    };
    let spec = JobSpec::new(job, defaults.factors, &Limits { max_tokens: max_tokens as u64, ..Limits::default() }).map_err(|e| match e {
        ClusterError::InvalidInput { field, detail } => invalid(field, detail),
        other => CoordinatorError::Cluster(other),
    })?;
    if !(-100..=100).contains(&req.priority) {
        return Err(invalid("priority", format!("{} must be between -100 and 100", req.priority)));
    }
    if req.model.is_empty() {
        req.model = defaults.model.clone();
    }
    let n = req.model.chars().count();
    if n > MAX_MODEL_CHARS {
        return Err(invalid("model", format!("has {n} characters, at most {MAX_MODEL_CHARS} are accepted")));
    }
    if !known_models.is_empty() && !known_models.contains(&req.model) {
        return Err(invalid("model", format!("{:?} is not served here (served: {})", req.model, known_models.join(", "))));
    }
    let n = req.client_label.chars().count();
    if n > MAX_LABEL_CHARS {
        return Err(invalid("client_label", format!("has {n} characters, at most {MAX_LABEL_CHARS} are accepted")));
    }
    Ok(ValidRequest { request: req, spec, image: None, video: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_request() -> GenerateRequest {
        GenerateRequest { prompt: "a red ball".into(), ..Default::default() }
    }

    fn check(req: GenerateRequest) -> Result<ValidRequest, CoordinatorError> {
        validate(req, &RequestDefaults { model: "wan-tiny".into(), ..Default::default() }, &["wan-tiny".into()], 100_000, || 42)
    }

    fn field_of(req: GenerateRequest) -> &'static str {
        match check(req) {
            Err(CoordinatorError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_applied() {
        let v = check(ok_request()).unwrap();
        let r = &v.request;
        assert_eq!((r.width, r.height, r.num_frames, r.fps, r.steps), (832, 480, 81, 16, 50));
        assert_eq!(r.guidance_scale, Some(5.0));
        assert_eq!(r.seed, Some(42));
        assert_eq!(r.model, "wan-tiny");
        assert_eq!(r.output_format, OutputFormat::Mp4 as i32);
        assert_eq!((v.spec.latent_fhw(), v.spec.tokens()), ([21, 60, 104], 32_760));
        assert_eq!((v.spec.request().seed, v.spec.request().guidance_scale), (42, 5.0));
    }

    #[test]
    fn each_bad_field_is_named() {
        let r = ok_request;
        assert_eq!(field_of(GenerateRequest { prompt: " ".into(), ..r() }), "prompt");
        assert_eq!(field_of(GenerateRequest { prompt: "x".repeat(2001), ..r() }), "prompt");
        assert_eq!(field_of(GenerateRequest { negative_prompt: "x".repeat(2001), ..r() }), "negative_prompt");
        assert_eq!(field_of(GenerateRequest { width: 8192, ..r() }), "width");
        assert_eq!(field_of(GenerateRequest { height: 4097, ..r() }), "height");
        assert_eq!(field_of(GenerateRequest { num_frames: 8, ..r() }), "num_frames");
        assert_eq!(field_of(GenerateRequest { num_frames: 1445, ..r() }), "num_frames");
        assert_eq!(field_of(GenerateRequest { fps: 500, ..r() }), "fps");
        assert_eq!(field_of(GenerateRequest { steps: 1001, ..r() }), "steps");
        assert_eq!(field_of(GenerateRequest { guidance_scale: Some(-1.0), ..r() }), "guidance_scale");
        assert_eq!(field_of(GenerateRequest { guidance_scale: Some(f32::NAN), ..r() }), "guidance_scale");
        assert_eq!(field_of(GenerateRequest { flow_shift: Some(0.0), ..r() }), "flow_shift");
        assert_eq!(field_of(GenerateRequest { sampler: 9, ..r() }), "sampler");
        assert_eq!(field_of(GenerateRequest { output_format: 9, ..r() }), "output_format");
        assert_eq!(field_of(GenerateRequest { strength: Some(0.5), ..r() }), "strength");
        assert_eq!(field_of(GenerateRequest { input_video: vec![1, 2, 3], strength: Some(1.5), ..r() }), "strength");
        assert_eq!(field_of(GenerateRequest { priority: 101, ..r() }), "priority");
        assert_eq!(field_of(GenerateRequest { model: "nope".into(), ..r() }), "model");
        assert_eq!(field_of(GenerateRequest { client_label: "x".repeat(129), ..r() }), "client_label");
        // A long model name is refused by its length, never echoed whole.
        let long = "m".repeat(1 << 20);
        match check(GenerateRequest { model: long, ..r() }) {
            Err(CoordinatorError::InvalidArgument { field: "model", detail }) => assert!(detail.len() < 100, "{detail}"),
            other => panic!("{other:?}"),
        }
        // Image-to-video: an image only for a model that takes one, and refused garbage names the field.
        assert_eq!(field_of(GenerateRequest { input_image: vec![0x89, b'P', b'N', b'G'], ..r() }), "input_image");
        let i2v = RequestDefaults { model: "wan-tiny".into(), image_to_video: true, ..Default::default() };
        let with = |image: Vec<u8>| validate(GenerateRequest { input_image: image, ..r() }, &i2v, &[], 100_000, || 1);
        assert!(matches!(with(Vec::new()), Err(CoordinatorError::InvalidArgument { field: "input_image", .. })));
        assert!(matches!(with(b"not an image".to_vec()), Err(CoordinatorError::InvalidArgument { field: "input_image", .. })));
        // 4096 x 4096 x 1441 frames is far past the token budget.
        assert_eq!(field_of(GenerateRequest { width: 4096, height: 4096, num_frames: 1441, ..r() }), "num_frames");
    }

    /// A diffusion-forcing model's requests get its long-video defaults (echoed in the effective
    /// request), may override each, and are budgeted per chunk; another model's may not ask for
    /// diffusion forcing.
    #[test]
    fn diffusion_forcing_requests_get_the_models_defaults() {
        let df = ForcingDefaults::SKYREELS_V2;
        let defaults = RequestDefaults { model: "df".into(), width: 960, height: 544, num_frames: 257, forcing: Some(df), ..Default::default() };
        let check = |r: GenerateRequest| validate(r, &defaults, &["df".into()], 25 * 34 * 60, || 1);
        let v = check(ok_request()).unwrap();
        let f = v.request.diffusion_forcing.unwrap();
        assert_eq!((f.base_num_frames, f.overlap_history, f.ar_step, f.causal_block_size, f.addnoise_condition), (97, Some(17), 0, 1, Some(20.0)));
        assert_eq!((v.spec.tokens(), v.spec.chunks().unwrap().chunks.len()), (25 * 34 * 60, 3));
        assert!(!v.spec.request().extend);
        // An input video is extended: no strength is given it, and one asked for is refused.
        let ext = check(GenerateRequest { input_video: vec![0; 16], ..ok_request() }).unwrap();
        assert_eq!((ext.request.strength, ext.spec.request().extend, ext.spec.chunks().unwrap().chunks[0].prefix), (None, true, 5));
        match check(GenerateRequest { input_video: vec![0; 16], strength: Some(0.5), ..ok_request() }) {
            Err(CoordinatorError::InvalidArgument { field, .. }) => assert_eq!(field, "strength"),
            other => panic!("{other:?}"),
        }
        let asked = DiffusionForcing { base_num_frames: 57, overlap_history: Some(9), ar_step: 5, causal_block_size: 0, addnoise_condition: None };
        let v = check(GenerateRequest { num_frames: 961, diffusion_forcing: Some(asked), ..ok_request() }).unwrap();
        let s = v.spec.request().forcing.unwrap();
        assert_eq!((s.base_num_frames, s.overlap_history, s.ar_step, s.causal_block_size, s.addnoise_condition), (57, 9, 5, 1, 20.0));
        let bad = DiffusionForcing { base_num_frames: 96, ..Default::default() };
        match check(GenerateRequest { diffusion_forcing: Some(bad), ..ok_request() }) {
            Err(CoordinatorError::InvalidArgument { field, .. }) => assert_eq!(field, "diffusion_forcing.base_num_frames"),
            other => panic!("{other:?}"),
        }
        assert_eq!(field_of(GenerateRequest { diffusion_forcing: Some(DiffusionForcing::default()), ..ok_request() }), "diffusion_forcing");
    }

    #[test]
    fn video_to_video_gets_its_default_strength() {
        let v = check(GenerateRequest { input_video: vec![0; 16], ..ok_request() }).unwrap();
        assert_eq!(v.request.strength, Some(0.8));
        let seeded = check(GenerateRequest { seed: Some(7), ..ok_request() }).unwrap();
        assert_eq!(seeded.request.seed, Some(7));
    }
}
