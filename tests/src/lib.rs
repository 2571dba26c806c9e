//! Helpers shared by Tessera's cross-crate tests: where the golden data lives.

use std::path::PathBuf;

/// The project's own copy of the golden cases (`tests/golden`, laid out like `shared/golden`).
pub fn project_golden_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// Extra golden roots given at run time: `TESSERA_GOLDEN_ROOTS`, comma-separated.
pub fn extra_golden_roots() -> Vec<PathBuf> {
    std::env::var("TESSERA_GOLDEN_ROOTS").map(|v| v.split(',').filter(|s| !s.is_empty()).map(PathBuf::from).collect()).unwrap_or_default()
}

/// The project's root plus any extra roots.
pub fn golden_roots() -> Vec<PathBuf> {
    let mut roots = vec![project_golden_root()];
    roots.extend(extra_golden_roots());
    roots
}
