//! `tessera generate --preset tiny-df --input-video` end to end: a diffusion-forcing model extends
//! the input video. The output is the input, as decoded at admission, then the frames that
//! continue it; the continuation depends on the input's last `overlap_history` frames only.

mod common;

use common::{moving_pattern, png_frames};
use std::path::Path;
use std::process::Command;
use tessera_coordinator::video::input::{prepare_video, FrameSelection, InputLimits};
use tessera_coordinator::video::{FrameSink, GifOptions, GifWriter, VideoSpec};

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("tessera runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Writes `frames` frames of 64×48 as GIF: the moving pattern from frame `from` on. (Each GIF
/// frame is quantised alone, so a pattern frame decodes the same in every file.)
fn write_input(path: &Path, frames: usize, from: usize) {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let mut writer = GifWriter::new(std::fs::File::create(path).unwrap(), spec, GifOptions::default()).unwrap();
    for t in from..from + frames {
        writer.push_frame(&moving_pattern(&spec, t)).unwrap();
    }
    writer.finish().unwrap();
}

/// tiny-df cuts 41 frames (11 latent) into chunks of 37 frames (10 latent) overlapping by 17 (5
/// latent). Extending a 21-frame video: the first chunk starts from the input's last 17 frames
/// re-encoded, whose decode (17 frames) repeats the input and is not served: 21 + 41 − 17 = 45
/// frames, the first 21 the input's exactly.
#[test]
fn tiny_df_extends_an_input_video() {
    let dir = tempfile::tempdir().unwrap();
    let run = |input: &Path, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut a = vec!["generate", "--preset", "tiny-df", "--prompt", "a boat", "--frames", "41", "--height", "48", "--width", "64"];
        a.extend(["--steps", "2", "--seed", "5", "--format", "png", "--input-video", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        a.extend(extra);
        let (code, stdout, stderr) = tessera(&a);
        (code, stdout, stderr, out)
    };
    let input = dir.path().join("input.gif");
    write_input(&input, 21, 8);
    let (code, stdout, stderr, out) = run(&input, "a", &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let a = png_frames(&out);
    assert_eq!(a.len(), 21 + 41 - 17, "{stderr}");
    assert!(a.iter().all(|(w, h, _)| (*w, *h) == (64, 48)));
    // The input as admission decoded it, bit for bit.
    let bytes = std::fs::read(&input).unwrap();
    let decoded = prepare_video(&bytes, 64, 48, FrameSelection::All, &InputLimits::default()).unwrap();
    assert_eq!(decoded.frames, 21);
    let frame = 64 * 48 * 3;
    for (t, (_, _, rgb)) in a[..21].iter().enumerate() {
        assert!(rgb[..] == decoded.rgb[t * frame..(t + 1) * frame], "input frame {t} is not served as decoded");
    }

    // Another start with the same last 17 frames (pattern frames 12 to 28) continues the same
    // way; other last frames continue otherwise.
    let same_tail = dir.path().join("same_tail.gif");
    write_input(&same_tail, 29, 0);
    let shifted = dir.path().join("shifted.gif");
    write_input(&shifted, 21, 14);
    let (code, _, stderr, out) = run(&same_tail, "b", &[]);
    assert_eq!(code, 0, "{stderr}");
    let b = png_frames(&out);
    assert_eq!(b.len(), 29 + 41 - 17);
    assert!(a[4..] == b[12..], "the same history and the continuation it gives, bit for bit");
    let (_, _, stderr, out) = run(&shifted, "c", &[]);
    let c = png_frames(&out);
    assert_eq!(c.len(), 45, "{stderr}");
    let moved = a[21..].iter().zip(&c[21..]).filter(|(p, q)| p.2 != q.2).count();
    assert_eq!(moved, 24, "another history, another continuation in every new frame");

    // An input shorter than the history, or a strength, is refused naming the flag.
    let short = dir.path().join("short.gif");
    write_input(&short, 13, 0);
    let (code, _, stderr, _) = run(&short, "d", &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--input-video") && stderr.contains("overlap_history = 17"), "{stderr}");
    let (code, _, stderr, _) = run(&input, "e", &["--strength", "0.5"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--strength") && stderr.contains("extends"), "{stderr}");
}
