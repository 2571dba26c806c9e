//! Helpers shared by the coordinator's integration tests: running ffprobe/ffmpeg, which must be
//! installed (Debian: `apt-get install -y ffmpeg`; CI installs it in .ci/run), and (`server`) a
//! `tessera serve` child process with gRPC clients.
#![allow(dead_code)]

pub mod server;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Runs a tool, failing the test with an install hint if it is missing.
pub fn run(tool: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} could not be run ({e}): install ffmpeg (`apt-get update && apt-get install -y ffmpeg`); CI installs it in .ci/run"));
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `ffprobe -count_frames -show_streams -of json` on `input` (extra args before it); returns the
/// first stream, after printing the whole answer.
pub fn probe(input: &Path, before: &[&str]) -> Value {
    let path = input.to_str().unwrap();
    let mut args = vec!["-v", "error", "-count_frames", "-show_streams", "-of", "json"];
    args.extend_from_slice(before);
    args.push(path);
    let json: Value = serde_json::from_slice(&run("ffprobe", &args)).expect("ffprobe prints JSON");
    eprintln!("ffprobe {}:\n{}", input.display(), serde_json::to_string_pretty(&json).unwrap());
    json["streams"][0].clone()
}

/// Decodes a video with ffmpeg to raw 8-bit RGB frames, concatenated.
pub fn decode_rgb24(input: &Path) -> Vec<u8> {
    run("ffmpeg", &["-v", "error", "-i", input.to_str().unwrap(), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
}

/// Decoded 8-bit RGB frames of a PNG folder, with their size.
pub fn png_frames(dir: &Path) -> Vec<(u32, u32, Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let mut reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap())).read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            (info.width, info.height, buf)
        })
        .collect()
}

/// A synthetic moving pattern, frame `t` as planar RGB `[3, H, W]` in [0, 1]: colour gradients,
/// a drifting sine in blue, and a yellow square moving right 4 pixels per frame.
pub fn moving_pattern(spec: &tessera_coordinator::video::VideoSpec, t: usize) -> Vec<f32> {
    let (w, h) = (spec.width as usize, spec.height as usize);
    let mut f = vec![0.0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            let in_square = (4 + 4 * t..16 + 4 * t).contains(&x) && (h / 3..h / 3 + 12).contains(&y);
            let (r, g, b) = if in_square { (0.95, 0.9, 0.1) } else { (0.2 + 0.6 * u, 0.2 + 0.6 * v, 0.5 + 0.3 * ((u + v) * 6.0 + t as f32 * 0.5).sin()) };
            f[i] = r;
            f[w * h + i] = g;
            f[2 * w * h + i] = b;
        }
    }
    f
}
