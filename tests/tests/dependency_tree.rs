//! The coordinator's server build links no model code: `tessera-coordinator` without its
//! `embedded` feature (the coordinator image, `deploy/Dockerfile.coordinator`) has neither the
//! worker crate nor the kernels, CUDA (cudarc), the CPU GEMM (gemm) or the tokenizer in its
//! dependency tree, and the default build (the `tessera` command with in-process workers) has
//! them. Read from `cargo tree` on the lock file, offline.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages in the normal (non-dev, non-build) dependency tree of the coordinator.
fn packages(features: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--manifest-path", manifest, "-p", "tessera-coordinator", "-e", "normal", "--locked", "--offline", "--prefix", "none"])
        .args(["--format", "{p}"])
        .args(features)
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

#[test]
fn the_coordinator_server_build_links_no_model_cuda_or_tokenizer_code() {
    let model_code = ["tessera-worker", "tessera-kernels", "cudarc", "gemm", "tokenizers"];
    let server = packages(&["--no-default-features"]);
    for name in ["tessera-cluster", "tessera-proto", "tonic", "etcd-client", "openh264"] {
        assert!(server.contains(name), "the server build needs {name}: {server:?}");
    }
    let linked: Vec<_> = model_code.iter().filter(|n| server.contains(**n)).collect();
    assert!(linked.is_empty(), "the coordinator server build links {linked:?}");
    // The check can fail: the default build (in-process workers) has every one of them.
    let full = packages(&[]);
    let missing: Vec<_> = model_code.iter().filter(|n| !full.contains(**n)).collect();
    assert!(missing.is_empty(), "the default build lacks {missing:?}");
    println!("coordinator server build: {} packages; with in-process workers: {}", server.len(), full.len());
}
