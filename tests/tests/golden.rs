//! Every golden case of the implemented kinds, in the project's copy and in any root named by
//! `TESSERA_GOLDEN_ROOTS`, must pass through the same code path as `tessera golden`.

use tessera_kernels::backend::Backend;
use tessera_tests::golden_roots;
use tessera_worker::golden::{discover, run_case, run_case_measured, CaseKind, Outcome, Ran, RunOptions};
use tessera_worker::parallel::LocalTransport;

fn run_kind(kind: CaseKind) {
    run_kind_with(kind, &RunOptions::default());
}

/// Every case of `kind` under every root, run with `opts`, must pass; returns the worst rel-L2.
fn run_kind_with(kind: CaseKind, opts: &RunOptions) -> f64 {
    let mut ran = 0;
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for root in golden_roots() {
        for case in discover(&root, &[kind]).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
            let outcome = run_case(&case, opts);
            worst = worst.max(outcome.worst().map_or(0.0, |(_, c)| c.rel_l2));
            eprintln!("{} {} {:?}", case.name, outcome.label(), outcome.worst());
            if !outcome.passed() {
                failures.push(format!("{} ({}): {:?}", case.name, root.display(), outcome));
            }
            ran += 1;
        }
    }
    assert!(ran > 0, "no {} cases found", kind.name());
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
    worst
}

fn bf16_host() -> RunOptions {
    RunOptions { backend: Backend::Bf16Host, ..Default::default() }
}

/// The bf16 twin of the GPU path runs every transformer, text-encoder, VAE, image-encoder and pipeline case
/// within the bf16 tolerances (`golden::CUDA_BF16_TOLERANCE`, `BF16_VAE_TOLERANCE` and
/// `BF16_VIDEO_TOLERANCE` say why), and really rounds: an f32-exact result (rel_l2 at f32 level,
/// ~1e-7) would mean the bf16 data flow is gone.
#[test]
fn every_model_kind_passes_on_bf16_host() {
    for kind in [CaseKind::Dit, CaseKind::Umt5, CaseKind::Vae, CaseKind::Clip, CaseKind::Pipeline] {
        let worst = run_kind_with(kind, &bf16_host());
        eprintln!("bf16-host {}: worst rel_l2 {worst:.3e}", kind.name());
        assert!(worst > 1e-4, "{}: worst rel_l2 {worst:.3e} is f32-level: nothing was rounded to bf16", kind.name());
    }
}

/// Every transformer and pipeline case on the bf16 twin, sharded: ring over 2 and 3 ranks, USP
/// 4 = 2 × 2.
#[test]
fn dit_and_pipeline_cases_pass_sharded_on_bf16_host() {
    for (ranks, ulysses) in [(2, 1), (3, 1), (4, 2)] {
        let mut ran = 0;
        for root in golden_roots() {
            for case in discover(&root, &[CaseKind::Dit, CaseKind::Pipeline]).unwrap() {
                let (outcome, measured) = run_case_measured(&case, &RunOptions { ranks, ulysses, ..bf16_host() });
                eprintln!("bf16-host {} ranks {ranks} ulysses {ulysses}: {} {:?} {measured:?}", case.name, outcome.label(), outcome.worst());
                match outcome {
                    Outcome::Pass(_) => {
                        // the ranks asked for computed it, and exchanged bytes
                        assert!(measured.ranks == ranks && measured.moved > 0, "{}: {measured:?}", case.name);
                        ran += 1;
                    }
                    Outcome::Unsupported(why) if why.contains("does not divide") => {}
                    other => panic!("{} ranks {ranks} ulysses {ulysses}: {other:?}", case.name),
                }
            }
        }
        assert!(ran >= 5, "ranks {ranks} ulysses {ulysses}: only {ran} cases ran");
    }
}

/// The pipeline cases with CFG-parallel: two halves of one rank (f32), and two halves of two
/// ring ranks over TCP; each at the case's own tolerance, with bytes moved. Diffusion forcing
/// splits each whole-batch forward into the halves. Transformer cases run their batch split in
/// halves where it has two samples, and say they cannot where it has one.
#[test]
fn pipeline_cases_pass_cfg_parallel() {
    use tessera_worker::parallel::LocalTransport;
    for (ranks, transport) in [(2, LocalTransport::InProcess), (4, LocalTransport::TcpLoopback)] {
        let opts = RunOptions { ranks, cfg_parallel: true, transport, ..RunOptions::default() };
        let mut ran = 0;
        for root in golden_roots() {
            for case in discover(&root, &[CaseKind::Pipeline]).unwrap() {
                let (outcome, measured) = run_case_measured(&case, &opts);
                eprintln!("cfg-parallel {} over {ranks}: {} {:?} {measured:?}", case.name, outcome.label(), outcome.worst());
                assert!(outcome.passed(), "{} cfg-parallel over {ranks}: {outcome:?}", case.name);
                assert!(measured.ranks == ranks && measured.moved > 0, "{}: {measured:?}", case.name);
                ran += 1;
            }
        }
        assert!(ran >= 4, "only {ran} pipeline cases ran");
    }
    let mut split = 0;
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Dit]).unwrap() {
            let (outcome, measured) = run_case_measured(&case, &RunOptions { ranks: 2, cfg_parallel: true, ..RunOptions::default() });
            eprintln!("cfg-parallel {}: {} {:?} {measured:?}", case.name, outcome.label(), outcome.worst());
            match &outcome {
                Outcome::Unsupported(why) => assert!(why.contains("CFG-parallel splits a batch"), "{}: {outcome:?}", case.name),
                _ => {
                    assert!(outcome.passed() && measured.ranks == 2 && measured.moved > 0, "{}: {outcome:?} {measured:?}", case.name);
                    split += 1;
                }
            }
        }
    }
    assert!(split >= 1, "no transformer case has a batch of two");
}

/// Kinds that cannot run sharded say so and fail, rather than pass on one device; the VAE runs
/// split over the ranks and says so.
#[test]
fn kinds_without_sharding_refuse_more_than_one_rank() {
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Vae]).unwrap() {
            let (outcome, measured) = run_case_measured(&case, &RunOptions { ranks: 2, ..RunOptions::default() });
            assert!(outcome.passed() && measured.ranks == 2 && measured.moved > 0, "{}: {outcome:?} {measured:?}", case.name);
        }
        for case in discover(&root, &[CaseKind::Umt5, CaseKind::Clip]).unwrap() {
            let (outcome, measured) = run_case_measured(&case, &RunOptions { ranks: 2, ..RunOptions::default() });
            assert!(matches!(&outcome, Outcome::Unsupported(why) if why.contains("cannot run sharded")), "{}: {outcome:?}", case.name);
            assert!(!outcome.passed() && measured == Ran { ranks: 0, moved: 0 }, "{}", case.name);
        }
    }
}

#[test]
fn dit_cases_pass() {
    run_kind(CaseKind::Dit);
}

#[test]
fn umt5_cases_pass() {
    run_kind(CaseKind::Umt5);
}

#[test]
fn clip_cases_pass() {
    run_kind(CaseKind::Clip);
}

#[test]
fn vae_cases_pass() {
    run_kind(CaseKind::Vae);
}

#[test]
fn scheduler_cases_pass() {
    run_kind(CaseKind::Scheduler);
}

/// The sampler stepped as several contiguous slices, each with its own state (as ranks step their
/// own part of the latent), must match the reference too.
#[test]
fn scheduler_cases_pass_sliced() {
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Scheduler]).unwrap() {
            for ranks in [2, 3, 7] {
                let (outcome, measured) = run_case_measured(&case, &RunOptions { ranks, ..Default::default() });
                assert!(outcome.passed(), "{} in {ranks} slices: {outcome:?}", case.name);
                assert_eq!(measured, Ran { ranks, moved: 0 }, "{}: slices exchange nothing", case.name);
            }
        }
    }
}

/// The whole text- and video-to-video pipeline, stage by stage (token ids, embeddings, the latent after every
/// step, frames).
#[test]
fn pipeline_cases_pass() {
    run_kind(CaseKind::Pipeline);
}

/// The pipeline cases with the denoising sequence-parallel: ring over 2 and 3 ranks (3 over TCP),
/// Ulysses over 2 (the cases' transformers have 2 heads).
#[test]
fn pipeline_cases_pass_sharded() {
    let mut ran = 0;
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Pipeline]).unwrap() {
            for (ranks, ulysses, transport) in [(2, 1, LocalTransport::InProcess), (3, 1, LocalTransport::TcpLoopback), (2, 2, LocalTransport::InProcess)] {
                let outcome = run_case(&case, &RunOptions { ranks, ulysses, transport, ..Default::default() });
                eprintln!("{} ranks {ranks} ulysses {ulysses}: {} {:?}", case.name, outcome.label(), outcome.worst());
                assert!(outcome.passed(), "{} ranks {ranks} ulysses {ulysses}: {outcome:?}", case.name);
                ran += 1;
            }
        }
    }
    assert!(ran >= 6, "only {ran} sharded pipeline runs");
}

/// Every transformer case sharded over in-process ranks: ring-only with 2, 3 and 4 ranks,
/// Ulysses-only and USP (2 × 2) wherever the case's head count allows (a Ulysses degree that does
/// not divide the heads must be refused, not run).
#[test]
fn dit_cases_pass_sharded() {
    let plans = [(2, 1), (3, 1), (4, 1), (2, 2), (3, 3), (4, 2), (4, 4)];
    let mut ran = 0;
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Dit]).unwrap() {
            for &(ranks, ulysses) in &plans {
                let outcome = run_case(&case, &RunOptions { ranks, ulysses, ..Default::default() });
                eprintln!("{} ranks {ranks} ulysses {ulysses}: {} {:?}", case.name, outcome.label(), outcome.worst());
                match outcome {
                    Outcome::Pass(_) => ran += 1,
                    Outcome::Unsupported(why) if why.contains("does not divide") => {}
                    other => panic!("{} ranks {ranks} ulysses {ulysses}: {other:?}", case.name),
                }
            }
        }
    }
    // Real sockets: every case over 3 ranks talking TCP on loopback.
    for root in golden_roots() {
        for case in discover(&root, &[CaseKind::Dit]).unwrap() {
            let outcome = run_case(&case, &RunOptions { ranks: 3, ulysses: 1, transport: LocalTransport::TcpLoopback, ..Default::default() });
            assert!(outcome.passed(), "{} over TCP: {outcome:?}", case.name);
        }
    }
    // The project's four cases: 3 ring-only plans each; the three 2-head cases also run
    // (2, 2) and (4, 2); the 3-head case runs (3, 3).
    assert!(ran > 4 * 3 + 3 * 2, "only {ran} sharded runs passed");
}
