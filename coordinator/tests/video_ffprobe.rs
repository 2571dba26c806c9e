//! The video writers' files, checked by a real decoder: ffprobe must see exactly the frames, size
//! and rate written, and ffmpeg must decode them back to pixels close to the input.
//! Needs `ffprobe` and `ffmpeg` on PATH (Debian: `apt-get install -y ffmpeg`; CI installs it).

mod common;

use common::{probe, run};
use std::path::Path;
use tessera_coordinator::video::{planar_to_rgb8, FrameSink, GifOptions, GifWriter, Mp4Options, Mp4Writer, PngFramesWriter, VideoSpec};

const FRAMES: usize = 9;

/// Decodes `input` with ffmpeg to 8-bit RGB (extra filter arguments before the output).
fn decode_rgb(input: &Path, filter: &[&str]) -> Vec<u8> {
    let mut args = vec!["-v", "error", "-i", input.to_str().unwrap()];
    args.extend_from_slice(filter);
    args.extend_from_slice(&["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    run("ffmpeg", &args)
}

/// PSNR in dB of `got` against `want` (8-bit).
fn psnr(want: &[u8], got: &[u8]) -> f64 {
    let mse = want.iter().zip(got).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / want.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

fn frames(spec: &VideoSpec) -> Vec<Vec<f32>> {
    (0..FRAMES).map(|t| common::moving_pattern(spec, t)).collect()
}

/// Per-frame PSNR of decoded RGB against the frames written.
fn frame_psnrs(spec: &VideoSpec, input: &[Vec<f32>], decoded: &[u8]) -> Vec<f64> {
    let frame_bytes = 3 * spec.pixels();
    assert_eq!(decoded.len(), input.len() * frame_bytes, "decoded byte count");
    input.iter().zip(decoded.chunks_exact(frame_bytes)).map(|(f, d)| psnr(&planar_to_rgb8(spec, f).unwrap(), d)).collect()
}

#[test]
fn mp4_decodes_with_the_frames_size_and_rate_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pattern.mp4");
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let input = frames(&spec);
    let mut writer = Mp4Writer::new(std::fs::File::create(&path).unwrap(), spec, Mp4Options::default()).unwrap();
    // Fed in chunks the way the VAE decodes them: 1 frame, then 4 at a time.
    writer.push_frame(&input[0]).unwrap();
    for chunk in input[1..].chunks(4) {
        writer.push_frames(&chunk.concat()).unwrap();
    }
    let (summary, _) = writer.finish().unwrap();
    assert_eq!(summary.frames, FRAMES);

    let stream = probe(&path, &[]);
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["width"], 64);
    assert_eq!(stream["height"], 48);
    assert_eq!(stream["pix_fmt"], "yuv420p");
    assert_eq!(stream["nb_read_frames"], FRAMES.to_string(), "decoded frame count");
    assert_eq!(stream["nb_frames"], FRAMES.to_string(), "frames in the container");
    assert_eq!(stream["r_frame_rate"], "16/1");
    assert_eq!(stream["avg_frame_rate"], "16/1");
    assert_eq!(stream["color_space"], "bt709", "VUI matrix");
    assert_eq!(stream["color_range"], "tv", "VUI range");

    // Back to RGB with the matrix and range the stream declares.
    let decoded = decode_rgb(&path, &["-vf", "scale=in_color_matrix=bt709:in_range=tv"]);
    let psnrs = frame_psnrs(&spec, &input, &decoded);
    eprintln!("MP4 (QP 23) per-frame PSNR, dB: {psnrs:.1?}");
    // Bound: 4:2:0 chroma subsampling of the sharp-edged square plus QP 23 quantisation; a wrong
    // matrix, range or frame order lands far below.
    assert!(psnrs.iter().all(|&p| p >= 33.0), "PSNR below 33 dB: {psnrs:.1?}");
}

#[test]
fn gif_decodes_with_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pattern.gif");
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let input = frames(&spec);
    let mut writer = GifWriter::new(std::fs::File::create(&path).unwrap(), spec, GifOptions::default()).unwrap();
    writer.push_frames(&input.concat()).unwrap();
    writer.finish().unwrap();

    let stream = probe(&path, &[]);
    assert_eq!(stream["codec_name"], "gif");
    assert_eq!(stream["width"], 64);
    assert_eq!(stream["height"], 48);
    assert_eq!(stream["nb_read_frames"], FRAMES.to_string(), "decoded frame count");

    // ffmpeg's GIF demuxer would resample to its own rate: keep every frame as stored.
    let decoded = decode_rgb(&path, &["-fps_mode", "passthrough"]);
    let psnrs = frame_psnrs(&spec, &input, &decoded);
    eprintln!("GIF per-frame PSNR, dB: {psnrs:.1?}");
    assert!(psnrs.iter().all(|&p| p >= 28.0), "PSNR below 28 dB: {psnrs:.1?}");
}

#[test]
fn png_frames_decode_losslessly_as_an_image_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let input = frames(&spec);
    let mut writer = PngFramesWriter::new(&dir.path().join("frames"), spec).unwrap();
    writer.push_frames(&input.concat()).unwrap();
    assert_eq!(writer.finish().unwrap().len(), FRAMES);

    let pattern_path = dir.path().join("frames/frame_%05d.png");
    let stream = probe(&pattern_path, &["-f", "image2", "-framerate", "16"]);
    assert_eq!(stream["codec_name"], "png");
    assert_eq!(stream["nb_read_frames"], FRAMES.to_string());
    let decoded = run("ffmpeg", &["-v", "error", "-f", "image2", "-i", pattern_path.to_str().unwrap(), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    let want: Vec<u8> = input.iter().flat_map(|f| planar_to_rgb8(&spec, f).unwrap()).collect();
    assert!(decoded == want, "PNG frames must decode to exactly the bytes written");
}
