//! `tessera generate --input-video` end to end: an MP4 written by the project's own writer goes
//! through video-to-video with the built-in model, and ffprobe checks the result's frame count
//! (following the input's, after the 4k+1 rule, or --frames), size and rate; bad flags named.
//! Needs `ffprobe` on PATH (Debian: `apt-get install -y ffmpeg`; CI installs it).

mod common;

use common::probe;
use std::path::Path;
use std::process::Command;
use tessera_coordinator::video::{FrameSink, Mp4Options, Mp4Writer, VideoSpec};

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("tessera runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Writes `frames` frames of a moving gradient with a bright square, `width`×`height`, as MP4.
fn write_input(path: &Path, width: u32, height: u32, frames: usize) {
    let spec = VideoSpec::new(width, height, 24.0).unwrap();
    let (w, h) = (width as usize, height as usize);
    let mut writer = Mp4Writer::new(std::fs::File::create(path).unwrap(), spec, Mp4Options::default()).unwrap();
    for t in 0..frames {
        let mut f = vec![0.0f32; 3 * w * h];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let square = (3 * t..3 * t + 10).contains(&x) && (h / 4..h / 4 + 10).contains(&y);
                let (r, g, b) = if square { (0.95, 0.9, 0.1) } else { (x as f32 / w as f32, y as f32 / h as f32, 0.4) };
                f[i] = r;
                f[w * h + i] = g;
                f[2 * w * h + i] = b;
            }
        }
        writer.push_frame(&f).unwrap();
    }
    writer.finish().unwrap();
}

fn check_stream(file: &Path, frames: usize, width: u64, height: u64) {
    let s = probe(file, &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some(frames.to_string().as_str()), "{s}");
    assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(width), Some(height)), "{s}");
    assert_eq!(s["r_frame_rate"].as_str(), Some("16/1"), "{s}");
}

#[test]
fn an_input_mp4_becomes_a_video_of_its_frame_count() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.mp4");
    // 11 frames of 80×56: the output takes the first 9 (the largest 4k+1), resized to 96×64.
    write_input(&input, 80, 56, 11);
    let out = dir.path().join("v2v.mp4");
    let base = [
        "generate",
        "--prompt",
        "a yellow square sliding right",
        "--input-video",
        input.to_str().unwrap(),
        "--height",
        "64",
        "--width",
        "96",
        "--steps",
        "4",
        "--seed",
        "7",
        "--quiet",
    ];
    let (code, stdout, stderr) = tessera(&[&base[..], &["--strength", "0.6", "-o", out.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("input ") && stderr.contains("11 frames; --frames 9") && stderr.contains("strength 0.6"), "{stderr}");
    assert!(stdout.contains("wrote") && stdout.contains("9 frames"), "{stdout}");
    check_stream(&out, 9, 96, 64);
    // The input matters: another strength, or no input at all, gives another video.
    let other = dir.path().join("other.mp4");
    let (code, _, stderr) = tessera(&[&base[..], &["--strength", "0.3", "-o", other.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(&other).unwrap());
    // Sequence-parallel denoising takes the same input.
    let sharded = dir.path().join("sharded.mp4");
    let (code, stdout, stderr) = tessera(&[&base[..], &["--strength", "0.6", "--workers", "2", "-o", sharded.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("plan: 2 ranks"), "{stderr}");
    check_stream(&sharded, 9, 96, 64);
    // --frames takes the first frames (the default strength, 0.8, applies).
    let five = dir.path().join("five.mp4");
    let (code, _, stderr) = tessera(&[&base[..], &["--frames", "5", "-o", five.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("strength 0.8"), "{stderr}");
    check_stream(&five, 5, 96, 64);
}

/// The same text-to-video and video-to-video generations on one in-process worker (the default)
/// and on 2 sharing the denoising sequence-parallel: the same frames.
#[test]
fn two_workers_give_the_frames_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.mp4");
    write_input(&input, 80, 56, 11);
    let t2v = [
        "generate",
        "--prompt",
        "a yellow square sliding right",
        "--height",
        "64",
        "--width",
        "96",
        "--frames",
        "9",
        "--steps",
        "4",
        "--seed",
        "7",
        "--quiet",
        "--format",
        "png",
    ];
    let v2v = [&t2v[..], &["--input-video", input.to_str().unwrap(), "--strength", "0.6"]].concat();
    for (name, base) in [("t2v", t2v.to_vec()), ("v2v", v2v)] {
        let one = dir.path().join(format!("{name}-one"));
        let workers = dir.path().join(format!("{name}-workers"));
        let (code, stdout, stderr) = tessera(&[&base[..], &["-o", one.to_str().unwrap()]].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        let (code, stdout, stderr) = tessera(&[&base[..], &["--workers", "2", "-o", workers.to_str().unwrap()]].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stderr.contains("plan: 2 ranks"), "{stderr}");
        let (a, b) = (common::png_frames(&one), common::png_frames(&workers));
        assert_eq!((a.len(), b.len()), (9, 9), "{name}");
        let worst = a.iter().zip(&b).map(|(x, y)| x.2.iter().zip(&y.2).map(|(p, q)| p.abs_diff(*q)).max().unwrap()).max().unwrap();
        eprintln!("{name}: 1 vs 2 in-process workers: largest difference {worst} levels");
        assert!(worst <= 1, "{name}: 1 and 2 workers differ by {worst} levels");
    }
}

#[test]
fn bad_video_to_video_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.mp4");
    write_input(&input, 48, 32, 6);
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, b"this is not a video, whatever its name says").unwrap();
    let truncated = dir.path().join("truncated.mp4");
    let bytes = std::fs::read(&input).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("x.mp4").display().to_string();
    let (input, garbage, truncated) = (input.to_str().unwrap(), garbage.to_str().unwrap(), truncated.to_str().unwrap());
    for (flags, named, why) in [
        (vec!["--strength", "0.5"], "--strength", "applies only to video-to-video"),
        (vec!["--input-video", input, "--strength", "1.5"], "--strength", "1.5 must be in (0, 1]"),
        (vec!["--input-video", input, "--strength", "0"], "--strength", "0 must be in (0, 1]"),
        (vec!["--input-video", input, "--frames", "9"], "--input-video", "too few frames"),
        (vec!["--input-video", input, "--frames", "4"], "--frames", "4k+1"),
        (vec!["--input-video", garbage], "--input-video", "unknown format"),
        (vec!["--input-video", truncated], "--input-video", "truncated"),
        (vec!["--input-video", "/nonexistent/input.mp4"], "--input-video", "/nonexistent/input.mp4"),
    ] {
        let args: Vec<&str> = ["generate", "--prompt", "x", "--height", "32", "--width", "32", "--steps", "2", "--quiet", "-o", &out]
            .into_iter()
            .chain(flags.iter().copied())
            .collect();
        let (code, _, stderr) = tessera(&args);
        assert_ne!(code, 0, "{flags:?} was accepted");
        assert!(stderr.contains(named) && stderr.contains(why), "{flags:?}: {stderr}");
    }
}
