//! The hostile-input suite of the public API's one check, `validate`, and of the media decoders
//! admission runs after it: generated GenerateRequests (absurd sizes, NaN and infinite settings,
//! unknown enums, oversized and control-character strings, garbage media bytes behind real
//! signatures) and raw bytes decoded as requests. Nothing
//! panics; an accepted request is within the token budget with its strings bounded; a refusal is
//! INVALID_ARGUMENT naming a field, and its message does not echo a long string whole. A fixed
//! seed and a fixed number of cases: CI runs the same ones every time.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tessera_coordinator::input_image::decode;
use tessera_coordinator::request::{validate, RequestDefaults, MAX_LABEL_CHARS, MAX_MODEL_CHARS, MAX_PROMPT_CHARS};
use tessera_coordinator::server::prepare_request_video;
use tessera_coordinator::CoordinatorError;
use tessera_proto::v1::{DiffusionForcing, GenerateRequest};

/// Generated cases per property (fixed, with a fixed seed).
const CASES: u32 = 2000;
/// The token budget the requests are checked against (the default's).
const MAX_TOKENS: usize = 75_600;

fn runner() -> TestRunner {
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

fn size() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(0u32), 3 => 1u32..700, 1 => Just(u32::MAX), 1 => Just(1 << 20), 1 => any::<u32>()]
}

fn float() -> impl Strategy<Value = Option<f32>> {
    proptest::option::of(prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-1.0f32), 0.0f32..20.0, any::<f32>()])
}

/// Text, sometimes longer than any limit or full of control characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z ]{0,40}",
        1 => Just(String::new()),
        1 => proptest::collection::vec(any::<char>(), 0..80).prop_map(|c| c.into_iter().collect()),
        1 => (1usize..3).prop_map(|k| "x".repeat(MAX_PROMPT_CHARS * k + 1)),
    ]
}

/// Media bytes: nothing mostly, else a real signature (MP4, GIF, PNG, JPEG) over garbage.
fn media() -> impl Strategy<Value = Vec<u8>> {
    let signatures: [&'static [u8]; 4] = [b"\0\0\0\x18ftypisom", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"];
    prop_oneof![
        6 => Just(Vec::new()),
        1 => (0usize..4, proptest::collection::vec(any::<u8>(), 0..256)).prop_map(move |(s, tail)| [signatures[s], &tail].concat()),
    ]
}

prop_compose! {
    fn request()(
        (prompt, negative, model, label) in (text(), text(), prop_oneof![Just(String::new()), Just("tiny".to_string()), text()], text()),
        (width, height, num_frames, fps, steps) in (size(), size(), size(), size(), prop_oneof![Just(0u32), 1u32..60, any::<u32>()]),
        (guidance_scale, flow_shift, strength) in (float(), float(), float()),
        (sampler, output_format, priority) in (prop_oneof![0i32..3, any::<i32>()], prop_oneof![0i32..5, any::<i32>()], any::<i32>()),
        seed in proptest::option::of(any::<u64>()),
        forcing in proptest::option::of((size(), proptest::option::of(size()), size(), size(), float())),
        (input_video, input_image) in (media(), media()),
    ) -> GenerateRequest {
        GenerateRequest {
            prompt, negative_prompt: negative, width, height, num_frames, fps, steps, guidance_scale, flow_shift, sampler, seed,
            output_format, input_video, strength, priority, model, client_label: label,
            diffusion_forcing: forcing.map(|(b, o, a, c, n)| DiffusionForcing {
                base_num_frames: b, overlap_history: o, ar_step: a, causal_block_size: c, addnoise_condition: n,
            }),
            input_image,
        }
    }
}

/// The check of one request; true when it was accepted.
fn check(req: GenerateRequest) -> Result<bool, TestCaseError> {
    let models = ["tiny".to_string()];
    let defaults = RequestDefaults { model: "tiny".into(), ..RequestDefaults::default() };
    match validate(req, &defaults, &models, MAX_TOKENS, || 7) {
        Ok(valid) => {
            prop_assert!(valid.spec.tokens() <= MAX_TOKENS, "{} tokens past the budget", valid.spec.tokens());
            let r = &valid.request;
            prop_assert!(r.prompt.chars().count() <= MAX_PROMPT_CHARS && r.negative_prompt.chars().count() <= MAX_PROMPT_CHARS);
            prop_assert!(r.client_label.chars().count() <= MAX_LABEL_CHARS && r.model.chars().count() <= MAX_MODEL_CHARS);
            prop_assert!(r.seed.is_some(), "an accepted request has its seed");
            prop_assert!(r.guidance_scale.is_none_or(f32::is_finite) && r.flow_shift.is_none_or(f32::is_finite));
            // The media is decoded at admission, by the one decoder of each kind: garbage behind
            // a real signature is refused naming the field, never a panic.
            if let Err(e) = prepare_request_video(&valid) {
                prop_assert!(matches!(e, CoordinatorError::InvalidInputVideo { .. } | CoordinatorError::InvalidArgument { .. }), "{e}");
            }
            if !r.input_image.is_empty() {
                if let Err(e) = decode(&r.input_image) {
                    prop_assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
                }
            }
            Ok(true)
        }
        Err(e) => {
            let status = tonic::Status::from(e);
            prop_assert!(
                matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
                "a bad request is the caller's fault: {status:?}"
            );
            prop_assert!(
                status.message().len() < 2 * MAX_PROMPT_CHARS.min(1000) + 400,
                "the message echoes the request whole: {} bytes",
                status.message().len()
            );
            Ok(false)
        }
    }
}

#[test]
fn generated_requests_are_accepted_within_the_budget_or_refused_naming_a_field() {
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let plausible = (1u32..40, 1u32..40, 0u32..5, 1u32..8, text()).prop_map(|(w, h, k, steps, prompt)| GenerateRequest {
        prompt: if prompt.trim().is_empty() { "a red ball".into() } else { prompt },
        width: w * 16,
        height: h * 16,
        num_frames: 4 * k + 1,
        steps,
        ..Default::default()
    });
    runner()
        .run(&prop_oneof![1 => plausible, 3 => request()], |req| {
            let counter = if check(req)? { &accepted } else { &refused };
            counter.set(counter.get() + 1);
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!("{accepted} requests accepted, {refused} refused");
    assert!(accepted > 100 && refused > 100, "the generator reaches both sides: {accepted} accepted, {refused} refused");
}

#[test]
fn raw_bytes_decode_to_requests_that_the_check_refuses_or_bounds() {
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            if let Ok(req) = GenerateRequest::decode(bytes.as_slice()) {
                check(req)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_audits_requests_are_refused_with_their_field() {
    let field = |req: GenerateRequest| match validate(req, &RequestDefaults { model: "tiny".into(), ..Default::default() }, &["tiny".into()], MAX_TOKENS, || 1)
        .and_then(|valid| prepare_request_video(&valid))
    {
        Err(CoordinatorError::InvalidArgument { field, .. }) => field.to_string(),
        Err(CoordinatorError::InvalidInputVideo { .. }) => "input_video".into(),
        Err(e) => format!("another error: {e}"),
        Ok(_) => "accepted".into(),
    };
    let base = GenerateRequest { prompt: "a red ball".into(), width: 64, height: 64, num_frames: 9, steps: 4, ..Default::default() };
    assert_eq!(field(base.clone()), "accepted");
    assert_eq!(field(GenerateRequest { width: 1 << 20, height: 1 << 20, ..base.clone() }), "width");
    assert_eq!(field(GenerateRequest { num_frames: u32::MAX, ..base.clone() }), "num_frames");
    assert_eq!(field(GenerateRequest { guidance_scale: Some(f32::NAN), ..base.clone() }), "guidance_scale");
    assert_eq!(field(GenerateRequest { prompt: "x".repeat(MAX_PROMPT_CHARS + 1), ..base.clone() }), "prompt");
    assert_eq!(field(GenerateRequest { model: "m".repeat(MAX_MODEL_CHARS + 1), ..base.clone() }), "model");
    assert_eq!(field(GenerateRequest { input_video: b"GIF89a\x00\x00".to_vec(), ..base }), "input_video");
}
