//! `--backend` of `tessera golden` and `--device` of `tessera bench dit`: `cuda` without a usable GPU is refused
//! with the reason the device check gives, `auto` falls back to the CPU, bad values are named;
//! `generate` refuses several ranks on one GPU.
//! (With a GPU, `bench/gpu_suite.sh` runs the CUDA side.)

use std::path::PathBuf;
use std::process::Command;

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).env_remove("TESSERA_DEVICE").env_remove("TESSERA_GOLDEN_ROOTS").output().expect("tessera runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn dit_cases() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit").display().to_string()
}

fn gpu_usable() -> bool {
    tessera_kernels::cuda::cuda_status(0).is_ok()
}

#[test]
fn golden_device_cuda_without_a_gpu_is_refused_and_auto_runs_the_cpu() {
    let cases = dit_cases();
    if gpu_usable() {
        eprintln!("a usable GPU is present: the refusal is for machines without one");
    } else {
        let (code, out, err) = tessera(&["golden", "--backend", "cuda", &cases]);
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("--backend cuda") && err.contains("CUDA unavailable"), "{err}");
        let (code, out, err) = tessera(&["golden", "--backend", "auto", &cases]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("5 passed, 0 failed") && out.contains("backend cpu: f32") && !out.contains("in bf16"), "{out}");
    }
    let (code, _, err) = tessera(&["golden", "--backend", "tpu", &cases]);
    assert_ne!(code, 0);
    assert!(err.contains("--backend tpu") && err.contains("expected auto, cpu, cuda or cuda:N") && err.contains("bf16-host"), "{err}");
}

/// The bf16 twin of the CUDA path runs every transformer case at the bf16 tolerance, and says so.
#[test]
fn golden_backend_bf16_host_runs_every_dit_case_in_bf16() {
    let (code, out, err) = tessera(&["golden", "--backend", "bf16-host", "--kind", "dit", &dit_cases()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("backend bf16-host: every model in bf16") && out.contains("transformer and text-encoder cases are held to rel_l2 <= 2e-2"), "{out}");
    assert!(out.contains("5 passed, 0 failed"), "{out}");
}

#[test]
fn bench_dit_device_is_checked() {
    let tiny = ["bench", "dit", "--preset", "tiny", "--latent", "16,1,4,4", "--text-len", "4", "--warmup", "0", "--iters", "1"];
    let run = |extra: &[&str]| tessera(&[&tiny[..], extra].concat());
    if !gpu_usable() {
        let (code, _, err) = run(&["--device", "cuda"]);
        assert_ne!(code, 0);
        assert!(err.contains("--device cuda") && err.contains("CUDA unavailable"), "{err}");
        let (code, out, err) = run(&["--device", "auto"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("on cpu (f32)"), "{out}");
    }
    let (code, _, err) = run(&["--device", "cuda:x"]);
    assert_ne!(code, 0);
    assert!(err.contains("--device cuda:x"), "{err}");
}

/// GPUs for several workers need a process per GPU: `generate` refuses to put in-process workers
/// on one GPU, and says what to run instead — before loading anything, GPU or not.
#[test]
fn generate_refuses_several_workers_on_one_gpu() {
    let (code, _, err) = tessera(&["generate", "--workers", "2", "--device", "cuda", "--prompt", "x", "-o", "/nonexistent/x.mp4"]);
    assert_ne!(code, 0);
    assert!(err.contains("--device cuda with --workers 2") && err.contains("NCCL needs a GPU per rank") && err.contains("deploy/local-cluster.sh"), "{err}");
}
