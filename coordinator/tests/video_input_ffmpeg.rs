//! The input readers against files made by another tool: ffmpeg encodes its test pattern as
//! H.264 MP4 (x264 High profile with B-frames and a cropped odd size; full-range; BT.709-tagged),
//! as an optimised GIF (sub-rectangles and transparency between frames) and as APNG, and decodes
//! each to RGB itself; the project's readers must give the same frames, in the same order.
//! Needs `ffmpeg` on PATH (Debian: `apt-get install -y ffmpeg`; CI installs it).

mod common;

use common::run;
use std::path::Path;
use tessera_coordinator::video::input::{InputFormat, InputLimits, VideoReader};

/// Makes `name` in `dir` from ffmpeg's moving `testsrc2` pattern (`frames` frames of `size`),
/// with encoder arguments `args`; returns its path.
fn make(dir: &Path, name: &str, size: &str, frames: usize, args: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    // A finite source: filters such as palettegen wait for its end.
    let src = format!("testsrc2=size={size}:rate=25:duration={:.2}", frames as f64 / 25.0);
    let n = frames.to_string();
    let mut all = vec!["-v", "error", "-y", "-f", "lavfi", "-i", &src, "-frames:v", &n];
    all.extend_from_slice(args);
    all.push(out.to_str().unwrap());
    run("ffmpeg", &all);
    out
}

/// ffmpeg's decoding of `path` as 8-bit RGB frames (extra input options first).
fn ffmpeg_rgb(path: &Path, input_opts: &[&str], frame_bytes: usize) -> Vec<Vec<u8>> {
    let mut args = vec!["-v", "error"];
    args.extend_from_slice(input_opts);
    args.extend_from_slice(&["-i", path.to_str().unwrap(), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    let raw = run("ffmpeg", &args);
    assert_eq!(raw.len() % frame_bytes, 0);
    raw.chunks_exact(frame_bytes).map(<[u8]>::to_vec).collect()
}

/// The reader's frames of `path`, as interleaved 8-bit RGB.
fn ours(path: &Path) -> (tessera_coordinator::video::input::InputInfo, Vec<Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let mut r = VideoReader::open(&bytes, InputLimits::default()).unwrap();
    let info = *r.info();
    let n = (info.width * info.height) as usize;
    let mut frames = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        frames.push((0..n).flat_map(|i| [0, 1, 2].map(|c| (f[c * n + i].clamp(0.0, 1.0) * 255.0).round() as u8)).collect());
    }
    (info, frames)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

/// Checks that frame t matches ffmpeg's frame t to `bound` dB, and better than its neighbours
/// (so the order is right, B-frames included).
fn same_frames(name: &str, ours: &[Vec<u8>], theirs: &[Vec<u8>], bound: f64) {
    assert_eq!(ours.len(), theirs.len(), "{name}: frame count");
    let mut worst = f64::INFINITY;
    for t in 0..ours.len() {
        let p = psnr(&theirs[t], &ours[t]);
        worst = worst.min(p);
        for u in [t.wrapping_sub(1), t + 1] {
            if let Some(other) = theirs.get(u) {
                assert!(p > psnr(other, &ours[t]), "{name}: frame {t} looks more like ffmpeg's frame {u}");
            }
        }
    }
    eprintln!("{name}: {} frames, worst PSNR against ffmpeg's decoding {worst:.2} dB", ours.len());
    assert!(worst > bound, "{name}: {worst:.2} dB");
}

#[test]
fn x264_mp4_decodes_like_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    let high = ["-c:v", "libx264", "-profile:v", "high", "-bf", "3", "-crf", "18"];
    // Grey content (neutral chroma) isolates the decoder: 100×60 is coded as 112×64 and cropped,
    // High profile with CABAC and B-frames. Pixels must match ffmpeg's to rounding (measured:
    // at most 1 step, 51.2 dB).
    let grey = make(dir.path(), "grey.mp4", "100x60", 17, &[&["-vf", "format=gray,format=yuv420p"][..], &high].concat());
    let (info, frames) = ours(&grey);
    assert_eq!((info.format, info.width, info.height, info.fps, info.declared_frames), (InputFormat::Mp4, 100, 60, Some(25.0), Some(17)));
    let theirs = ffmpeg_rgb(&grey, &[], 100 * 60 * 3);
    same_frames("grey x264 high, B-frames", &frames, &theirs, 48.0);
    let max = frames.iter().zip(&theirs).flat_map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y))).max().unwrap();
    assert!(max <= 1, "largest difference {max}");
    // Colour, limited and full range, untagged (BT.601 assumed at this size) and BT.709-tagged.
    // The pattern is blurred so that chroma siting (ffmpeg: left, ours: centre) matters little;
    // ffmpeg is asked to interpolate chroma too. Measured 42.3 dB; a wrong matrix or range
    // costs over 10 dB.
    let sws = ["-sws_flags", "bilinear+full_chroma_int+full_chroma_inp+accurate_rnd+bitexact"];
    let cases: [(&str, &[&str]); 3] = [
        ("limited.mp4", &["-pix_fmt", "yuv420p"]),
        ("full-range.mp4", &["-pix_fmt", "yuvj420p"]),
        ("bt709.mp4", &["-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"]),
    ];
    for (name, args) in cases {
        let path = make(dir.path(), name, "100x60", 9, &[&["-vf", "gblur=sigma=3"][..], &high, args].concat());
        let (_, frames) = ours(&path);
        let mut ffmpeg = vec!["-v", "error", "-i", path.to_str().unwrap()];
        ffmpeg.extend_from_slice(&sws);
        ffmpeg.extend_from_slice(&["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
        let theirs: Vec<Vec<u8>> = run("ffmpeg", &ffmpeg).chunks_exact(100 * 60 * 3).map(<[u8]>::to_vec).collect();
        same_frames(name, &frames, &theirs, 40.0);
    }
}

#[test]
fn ffmpeg_gif_and_apng_compose_like_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    // ffmpeg's GIF encoder writes changed sub-rectangles with transparency after the first frame.
    let gif = make(dir.path(), "pattern.gif", "96x64", 12, &["-filter_complex", "split[a][b];[a]palettegen[p];[b][p]paletteuse"]);
    let mut decoder = gif::DecodeOptions::new().read_info(std::fs::File::open(&gif).unwrap()).unwrap();
    let mut partial = 0;
    while let Some(f) = decoder.next_frame_info().unwrap() {
        partial += usize::from((f.width, f.height) != (96, 64) || f.transparent.is_some());
        decoder.read_next_frame().unwrap();
    }
    assert!(partial > 0, "the GIF should exercise composition");
    let (info, frames) = ours(&gif);
    assert_eq!((info.format, info.width, info.height, info.declared_frames), (InputFormat::Gif, 96, 64, Some(12)));
    let theirs = ffmpeg_rgb(&gif, &[], 96 * 64 * 3);
    same_frames("gif", &frames, &theirs, 60.0);
    // APNG: ffmpeg picks dispose and blend operations per frame.
    let apng = make(dir.path(), "pattern.png", "96x64", 12, &["-f", "apng", "-plays", "0"]);
    let mut reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&apng).unwrap())).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let mut partial = 0;
    for _ in 0..12 {
        reader.next_frame(&mut buf).unwrap();
        let fc = reader.info().frame_control.unwrap();
        partial += usize::from((fc.width, fc.height) != (96, 64) || fc.dispose_op != png::DisposeOp::None || fc.blend_op != png::BlendOp::Source);
    }
    assert!(partial > 0, "the APNG should exercise composition");
    let (info, frames) = ours(&apng);
    assert_eq!((info.format, info.declared_frames, info.fps), (InputFormat::Png, Some(12), Some(25.0)));
    let theirs = ffmpeg_rgb(&apng, &["-f", "apng"], 96 * 64 * 3);
    same_frames("apng", &frames, &theirs, 60.0);
}
