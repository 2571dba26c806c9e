//! Every golden case of the implemented kinds, in the project's copy and in any root named by
//! `TESSERA_GOLDEN_ROOTS`, must pass through the same code path as `tessera golden`.

use tessera_tests::golden_roots;
use tessera_worker::golden::{discover, run_case, CaseKind, Outcome, RunOptions};

fn run_kind(kind: CaseKind) {
    let mut ran = 0;
    let mut failures = Vec::new();
    for root in golden_roots() {
        for case in discover(&root, &[kind]).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
            let outcome = run_case(&case, &RunOptions::default());
            eprintln!("{} {} {:?}", case.name, outcome.label(), outcome.worst());
            if !outcome.passed() {
                failures.push(format!("{} ({}): {:?}", case.name, root.display(), outcome));
            }
            ran += 1;
        }
    }
    assert!(ran > 0, "no {} cases found", kind.name());
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

#[test]
fn dit_cases_pass() {
    run_kind(CaseKind::Dit);
}

#[test]
fn unimplemented_kinds_are_reported_unsupported_not_passed() {
    let root = tessera_tests::project_golden_root();
    let cases = discover(&root, &[CaseKind::Vae, CaseKind::Umt5, CaseKind::Scheduler, CaseKind::Pipeline]).unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let outcome = run_case(&case, &RunOptions::default());
        assert!(matches!(outcome, Outcome::Unsupported(_)), "{}: {}", case.name, outcome.label());
    }
}
