//! The hostile-input suite of what workers take from the wire: generated internal messages,
//! including absurd sizes, overflowing products, NaN and infinite settings and shape/byte-count
//! mismatches, go through the one check each has (`JobSpec::from_message` against a worker's
//! limits, the tensor codecs). Nothing panics; what is accepted is within the limits and means
//! what it says; what is refused names a field. The cases come from a fixed seed, a fixed number
//! of them (CI runs the same ones every time), beside regression cases from the audit.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tessera_cluster::codec;
use tessera_cluster::limits::Limits;
use tessera_cluster::{ClusterError, JobSpec};
use tessera_proto::worker::v1 as pb;

/// Generated cases per property (fixed, with a fixed seed).
const CASES: u32 = 2000;

fn runner() -> TestRunner {
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// A u32 that is often at an edge: 0, 1, small, the limits' neighbourhood, or huge.
fn size() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), 1u32..200, 200u32..5000, Just(u32::MAX), Just(1 << 20), any::<u32>()]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-f32::INFINITY), Just(0.0f32), -10.0f32..100.0, any::<f32>()]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z ]{0,40}", proptest::collection::vec(any::<char>(), 0..64).prop_map(|c| c.into_iter().collect())]
}

prop_compose! {
    fn spec()(
        prompt in text(), negative in text(),
        (width, height, num_frames, steps) in (size(), size(), size(), size()),
        (guidance, shift, strength) in (float(), proptest::option::of(float()), proptest::option::of(float())),
        sampler in prop_oneof![Just(0i32), Just(1), Just(2), Just(-1), any::<i32>()],
        (spatial, temporal) in (prop_oneof![Just(0u32), 1u32..20, any::<u32>()], prop_oneof![Just(0u32), 1u32..8, any::<u32>()]),
        patch_size in prop_oneof![Just(vec![]), Just(vec![1u32, 2, 2]), proptest::collection::vec(0u32..20, 0..5), proptest::collection::vec(any::<u32>(), 3)],
        (ranks, ulysses, cfg_parallel) in (prop_oneof![Just(0u32), 1u32..9, any::<u32>()], prop_oneof![Just(0u32), 1u32..9, any::<u32>()], any::<bool>()),
        forcing in proptest::option::of((size(), size(), size(), size(), float(), size())),
        image in proptest::option::of((size(), size())),
        (seed, extend_video) in (any::<u64>(), any::<bool>()),
    ) -> pb::JobSpec {
        pb::JobSpec {
            prompt, negative_prompt: negative, width, height, num_frames, steps,
            guidance_scale: guidance, flow_shift: shift, sampler, seed, strength, extend_video,
            spatial_factor: spatial, temporal_factor: temporal, patch_size, ranks, ulysses, cfg_parallel,
            forcing: forcing.map(|(b, o, a, c, n, f)| pb::ForcingSettings {
                base_num_frames: b, overlap_history: o, ar_step: a, causal_block_size: c, addnoise_condition: n, fps: f,
            }),
            image: image.map(|(width, height)| pb::ImageSize { width, height }),
        }
    }
}

prop_compose! {
    /// A spec a coordinator could send, with at most one field replaced by a hostile one.
    fn plausible()(
        (width, height, num_frames, steps) in (16u32..640, 16u32..640, (0u32..10).prop_map(|k| 4 * k + 1), 1u32..30),
        guidance in 0.0f32..10.0,
        sampler in 0i32..2,
        (ranks, ulysses) in prop_oneof![Just((0u32, 0u32)), Just((1, 1)), Just((2, 1)), Just((2, 2)), Just((3, 1)), Just((4, 2))],
        hostile in (0usize..12, size(), float()),
    ) -> pb::JobSpec {
        let mut m = pb::JobSpec {
            prompt: "a red ball".into(), width, height, num_frames, steps, guidance_scale: guidance, sampler,
            spatial_factor: 8, temporal_factor: 4, ranks, ulysses, ..Default::default()
        };
        let (field, n, x) = hostile;
        match field {
            0 => m.width = n,
            1 => m.height = n,
            2 => m.num_frames = n,
            3 => m.steps = n,
            4 => m.guidance_scale = x,
            5 => m.flow_shift = Some(x),
            6 => m.spatial_factor = n,
            7 => m.ranks = n,
            8 => m.ulysses = n,
            9 => m.strength = Some(x),
            10 => m.patch_size = vec![1, n, n],
            _ => {} // none
        }
        m
    }
}

/// What an accepted spec must satisfy, or what a refusal must say.
fn check_spec(m: &pb::JobSpec, limits: &Limits) -> Result<bool, TestCaseError> {
    match JobSpec::from_message(m, limits) {
        Ok(spec) => {
            prop_assert!(spec.tokens() as u64 <= limits.max_tokens, "{} tokens past {}", spec.tokens(), limits.max_tokens);
            prop_assert!(spec.tokens() > 0);
            let (h, w) = spec.generated_size();
            prop_assert!(u64::from(h) <= limits.max_side + 64 && u64::from(w) <= limits.max_side + 64, "{h}x{w}");
            prop_assert!(u64::from(m.num_frames) <= limits.max_frames && u64::from(m.steps) <= limits.max_steps);
            prop_assert!(!m.guidance_scale.is_infinite(), "an infinite guidance was taken");
            // What was accepted says the same on the wire again.
            let again = JobSpec::from_message(&spec.to_message(), limits);
            prop_assert!(again.is_ok(), "a spec's own message was refused: {:?}", again.err());
            prop_assert_eq!(again.unwrap().tokens(), spec.tokens());
            Ok(true)
        }
        Err(ClusterError::InvalidInput { field, .. }) => {
            prop_assert!(!field.is_empty());
            Ok(false)
        }
        Err(e) => Err(TestCaseError::fail(format!("a hostile spec is refused with a field, not {e}"))),
    }
}

#[test]
fn generated_specs_are_accepted_within_the_limits_or_refused_naming_a_field() {
    let limits = Limits::default();
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner()
        .run(&prop_oneof![3 => plausible(), 1 => spec()], |m| {
            let counter = if check_spec(&m, &limits)? { &accepted } else { &refused };
            counter.set(counter.get() + 1);
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!("{accepted} specs accepted, {refused} refused");
    assert!(accepted > 0 && refused > 0, "the generator reaches both sides: {accepted} accepted, {refused} refused");
}

#[test]
fn the_audits_cases_are_refused() {
    let limits = Limits::default();
    let base = pb::JobSpec {
        prompt: "x".into(),
        width: 64,
        height: 64,
        num_frames: 9,
        steps: 4,
        guidance_scale: 5.0,
        spatial_factor: 8,
        temporal_factor: 4,
        ..Default::default()
    };
    assert!(JobSpec::from_message(&base, &limits).is_ok(), "the base case is valid");
    for (what, m) in [
        ("a 1,048,576 × 1,048,576 latent", pb::JobSpec { width: 1 << 23, height: 1 << 23, ..base.clone() }),
        ("u32::MAX frames", pb::JobSpec { num_frames: u32::MAX, ..base.clone() }),
        ("a NaN guidance", pb::JobSpec { guidance_scale: f32::NAN, ..base.clone() }),
        ("an infinite shift", pb::JobSpec { flow_shift: Some(f32::INFINITY), ..base.clone() }),
        ("a zero factor", pb::JobSpec { spatial_factor: 0, ..base.clone() }),
        ("a zero patch side", pb::JobSpec { patch_size: vec![1, 0, 2], ..base.clone() }),
        ("a patch of two sides", pb::JobSpec { patch_size: vec![2, 2], ..base.clone() }),
        ("a patch past 2^32 tokens of pixels", pb::JobSpec { patch_size: vec![1, u32::MAX, u32::MAX], ..base.clone() }),
        ("ranks that overflow the plan", pb::JobSpec { ranks: u32::MAX, ulysses: u32::MAX, ..base.clone() }),
        ("an unknown sampler", pb::JobSpec { sampler: 99, ..base.clone() }),
    ] {
        assert!(matches!(JobSpec::from_message(&m, &limits), Err(ClusterError::InvalidInput { .. })), "{what} was not refused with a field");
    }
}

prop_compose! {
    fn frames_message()(
        frames in size(), width in size(), height in size(),
        len in prop_oneof![Just(0usize), 1usize..4096],
    ) -> pb::InputFrames {
        pb::InputFrames { frames, width, height, rgb: vec![7; len] }
    }
}

#[test]
fn tensor_messages_with_lying_shapes_are_refused_without_allocating_what_they_claim() {
    runner()
        .run(&(frames_message(), proptest::collection::vec(size(), 0..7), 0usize..4096), |(frames, shape, bytes)| {
            // An input video whose header claims any size, with whatever bytes came.
            if let Ok(video) = codec::input_frames_video(&frames) {
                let claimed = u64::from(frames.frames) * u64::from(frames.width) * u64::from(frames.height) * 3;
                prop_assert_eq!(video.data().len() as u64, claimed);
                prop_assert_eq!(frames.rgb.len() as u64, claimed, "accepted frames cover exactly the bytes sent");
            }
            // Latents and checkpoints of any claimed shape over `bytes` bytes.
            let latents = pb::JobLatents { shape: shape.clone(), data: vec![0; bytes] };
            if let Ok(t) = codec::latents_from_message(&latents) {
                prop_assert_eq!(t.data().len() * 4, bytes, "accepted latents cover exactly the bytes sent");
            }
            let cp = pb::CheckpointResponse { latent_shape: shape, latents: vec![0; bytes], ..Default::default() };
            if let Ok(t) = codec::checkpoint_latents(&cp) {
                prop_assert_eq!(t.data().len() * 4, bytes);
            }
            Ok(())
        })
        .unwrap();
}
