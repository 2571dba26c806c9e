//! `tessera generate` end to end: the project's own pipeline output written as MP4/GIF/PNG and
//! checked by a real decoder (ffprobe must count the requested frames, size and rate), with the
//! built-in model and with a diffusers snapshot folder; same seed, same file; bad flags named.

mod common;

use common::probe;
use std::path::Path;
use std::process::Command;

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("tessera runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn snapshot() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/t2v-a").display().to_string()
}

fn check_stream(file: &Path, frames: usize, width: u64, height: u64, rate: &str) {
    let s = probe(file, &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some(frames.to_string().as_str()), "{s}");
    assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(width), Some(height)), "{s}");
    assert_eq!(s["r_frame_rate"].as_str(), Some(rate), "{s}");
}

#[test]
fn built_in_model_writes_a_playable_mp4_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let common =
        ["generate", "--prompt", "a red ball bouncing on a wooden floor", "--frames", "9", "--height", "64", "--width", "96", "--steps", "4", "--quiet"];
    let (code, stdout, stderr) = tessera(&[&common[..], &["--seed", "5", "-o", &out("a.mp4")]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("wrote") && stdout.contains("9 frames") && stdout.contains("denoise"), "{stdout}");
    // The encoder's own log goes to `tracing` (target openh264), not to the terminal.
    assert!(!stdout.contains("OpenH264") && !stderr.contains("OpenH264"), "{stdout}{stderr}");
    check_stream(&dir.path().join("a.mp4"), 9, 96, 64, "16/1");
    let (code, _, stderr) = tessera(&[&common[..], &["--seed", "5", "-o", &out("b.mp4")]].concat());
    assert_eq!(code, 0, "{stderr}");
    let (a, b) = (std::fs::read(dir.path().join("a.mp4")).unwrap(), std::fs::read(dir.path().join("b.mp4")).unwrap());
    assert_eq!(a, b, "same seed and request must give the same file");
    let (code, _, stderr) = tessera(&[&common[..], &["--seed", "6", "-o", &out("c.mp4")]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(a, std::fs::read(dir.path().join("c.mp4")).unwrap(), "another seed must give another video");
    // GIF and PNG frames, at another frame rate.
    let (code, _, stderr) = tessera(&[&common[..], &["--seed", "5", "--fps", "8", "-o", &out("a.gif")]].concat());
    assert_eq!(code, 0, "{stderr}");
    check_stream(&dir.path().join("a.gif"), 9, 96, 64, "8/1");
    let (code, _, stderr) = tessera(&[&common[..], &["--seed", "5", "-o", &out("frames")]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path().join("frames")).unwrap().count(), 9);
}

#[test]
fn a_built_in_model_without_a_prompt_runs_its_example_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let common = ["generate", "--frames", "5", "--steps", "2", "--seed", "4", "--quiet"];
    let (code, _, stderr) = tessera(&[&common[..], &["-o", &out("default.mp4")]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(r#"no --prompt: the built-in model's example prompt, "a red ball moving right""#), "{stderr}");
    // The same video as asking for that prompt.
    let (code, _, stderr) = tessera(&[&common[..], &["--prompt", "a red ball moving right", "-o", &out("asked.mp4")]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("no --prompt"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("default.mp4")).unwrap(), std::fs::read(dir.path().join("asked.mp4")).unwrap());
    // A model of one's own, or a server's, has no example: the prompt is required, by name.
    for (flag, value) in [("--model", snapshot()), ("--server", "127.0.0.1:9".to_string())] {
        let (code, _, stderr) = tessera(&[&common[..], &[flag, &value, "-o", &out("x.mp4")]].concat());
        assert_ne!(code, 0, "{flag}: {stderr}");
        assert!(stderr.contains(&format!("--prompt is required with {flag}")), "{flag}: {stderr}");
    }
}

#[test]
fn a_diffusers_snapshot_folder_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.mp4");
    let (code, stdout, stderr) = tessera(&[
        "generate",
        "--model",
        &snapshot(),
        "--prompt",
        "a red ball",
        "--frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "3",
        "--seed",
        "1",
        "--quiet",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    check_stream(&file, 5, 32, 32, "16/1");
}

#[test]
fn bad_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4").display().to_string();
    for (flags, named) in [
        (vec!["--frames", "8"], "--frames"),
        (vec!["--height", "4100"], "--height"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--guidance", "-2"], "--guidance"),
        (vec!["--sampler", "ddim"], "--sampler"),
        (vec!["--fps", "0"], "--fps"),
        (vec!["--preset", "huge"], "--preset"),
        (vec!["--model", "/nonexistent/snapshot"], "--model"),
        (vec!["--device", "tpu"], "--device"),
        (vec!["--format", "avi"], "--format"),
    ] {
        let args: Vec<&str> = ["generate", "--prompt", "x", "--quiet", "-o", &out].into_iter().chain(flags.iter().copied()).collect();
        let (code, _, stderr) = tessera(&args);
        assert_ne!(code, 0, "{flags:?} was accepted");
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
    let (code, _, stderr) = tessera(&["generate", "--prompt", "x", "--quiet", "-o", &dir.path().join("x.avi").display().to_string()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--output"), "{stderr}");
}

/// A local run is held to the same limits as a server, with the server's words (the one check of
/// `pipeline::limits`): `--frames 2001`, `--steps 5000` and `--guidance 80` were accepted locally
/// before, and a size past the token budget is refused before anything is allocated.
#[test]
fn local_runs_get_the_servers_limits_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4").display().to_string();
    for (flags, want) in [
        (vec!["--frames", "2001"], "--frames: INVALID_ARGUMENT: invalid num_frames: 2001 must be 4k+1 (1, 5, 9, ... 1441)"),
        (vec!["--frames", "18"], "--frames: INVALID_ARGUMENT: invalid num_frames: 18 must be 4k+1 (1, 5, 9, ... 1441)"),
        (vec!["--steps", "5000"], "--steps: INVALID_ARGUMENT: invalid steps: 5000 must be between 1 and 1000"),
        (vec!["--guidance", "80"], "--guidance: INVALID_ARGUMENT: invalid guidance_scale: 80 must be between 0 and 50"),
        (vec!["--height", "18446744073709551600"], "'--height <HEIGHT>': number too large to fit in target type"),
        (vec!["--steps", "0"], "--steps 0: must be at least 1"),
        // an operator's token budget still refuses before anything is planned (Wan's factors: the
        // tiny preset's VAE ÷8 and 1×2×2 patches)
        (
            vec!["--preset", "tiny", "--height", "4096", "--width", "4096", "--frames", "1441", "--max-tokens", "75600"],
            "--frames: INVALID_ARGUMENT: invalid num_frames: 4096x4096 with 1441 frames is 23658496 tokens; at most 75600 are accepted",
        ),
    ] {
        let args: Vec<&str> = ["generate", "--prompt", "x", "--quiet", "-o", &out].into_iter().chain(flags.iter().copied()).collect();
        let (code, _, stderr) = tessera(&args);
        assert_ne!(code, 0, "{flags:?} was accepted");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    assert!(!dir.path().join("x.mp4").exists());
    // With no budget the job is planned: past what the worker's memory holds it is refused with
    // the numbers (FAILED_PRECONDITION); past the worker's own budget (2^21 tokens) the worker
    // checks the spec again with the same code before allocating, and the flag is still named
    // (the tiny preset: a small model, so the job passes the memory check and meets the budget).
    let args = ["generate", "--preset", "tiny", "--prompt", "x", "--quiet", "-o", &out, "--height", "4096", "--width", "4096", "--frames", "129"];
    let (code, _, stderr) = tessera(&args);
    assert_ne!(code, 0);
    assert!(stderr.contains("--frames: INVALID_ARGUMENT") && stderr.contains("spec.num_frames") && stderr.contains("at most 2097152 are accepted"), "{stderr}");
}

/// On a machine without a GPU (CI), `--device cuda` is refused with the reason; `auto` runs.
#[test]
fn device_cuda_without_a_gpu_is_a_clear_error() {
    if Path::new("/dev/nvidia0").exists() {
        eprintln!("a GPU is present: this check is for machines without one");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4").display().to_string();
    let base = ["generate", "--prompt", "x", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--quiet", "-o", &out];
    let (code, _, stderr) = tessera(&[&base[..], &["--device", "cuda"]].concat());
    assert_ne!(code, 0);
    assert!(stderr.contains("--device cuda") && stderr.contains("CUDA"), "{stderr}");
    let (code, _, stderr) = tessera(&[&base[..], &["--device", "auto"]].concat());
    assert_eq!(code, 0, "{stderr}");
}

/// Sizes as users ask for them: 72x40 is not a multiple of 16 (Wan's factor: the tiny preset), so
/// the model generates 80x48 and the frames are center-cropped back; they are exactly the middle
/// of an 80x48 run with the same seed (same latent grid), and the run says what it did. The demo
/// model's multiple is its VAE's stride 4 times its patch's 4.
#[test]
fn sizes_that_are_not_multiples_of_16_are_generated_larger_and_cropped_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["generate", "--preset", "tiny", "--prompt", "a red ball", "--frames", "5", "--steps", "2", "--seed", "3", "--format", "png", "--quiet"];
    let (asked, full) = (dir.path().join("asked"), dir.path().join("full"));
    let (code, stdout, stderr) = tessera(&[&base[..], &["--width", "72", "--height", "40", "-o", asked.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("generated at 80x48 (the model's multiple), center-cropped to 72x40"), "{stderr}");
    assert!(stdout.contains("wrote") && stdout.contains("72x40"), "{stdout}");
    let (code, stdout, stderr) = tessera(&[&base[..], &["--width", "80", "--height", "48", "-o", full.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stderr.contains("center-cropped"), "{stderr}");
    let (a, f) = (common::png_frames(&asked), common::png_frames(&full));
    assert_eq!((a.len(), f.len()), (5, 5));
    for ((w, h, got), (fw, fh, whole)) in a.iter().zip(&f) {
        assert_eq!((*w, *h, *fw, *fh), (72, 40, 80, 48));
        let middle: Vec<u8> = (4..44).flat_map(|row| whole[(row * 80 + 4) * 3..(row * 80 + 76) * 3].to_vec()).collect();
        assert!(got == &middle, "the 72x40 frame is the middle of the 80x48 one");
    }
    // The default demo model: a VAE of stride 4 and 1×4×4 patches, so a multiple of 16 too, but
    // not Wan's 8 × 2 (sides of 8 more than a multiple were refused when rounding assumed patch 2).
    let demo = dir.path().join("demo");
    let args = ["generate", "--prompt", "a red ball moving right", "--frames", "5", "--steps", "2", "--format", "png", "--quiet"];
    let (code, stdout, stderr) = tessera(&[&args[..], &["--width", "56", "--height", "40", "-o", demo.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("generated at 64x48 (the model's multiple), center-cropped to 56x40"), "{stderr}");
    assert!(stderr.contains(" 24 tokens"), "2 latent frames of 12 × 16 cells in 4 × 4 patches: {stderr}");
    assert!(common::png_frames(&demo).iter().all(|(w, h, _)| (*w, *h) == (56, 40)));
}
