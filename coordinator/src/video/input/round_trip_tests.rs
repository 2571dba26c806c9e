//! Input tests against the project's own writers: a synthetic moving pattern written as MP4, GIF
//! and PNG and read back (frame count, size, rate, PSNR), the limits, v2v preparation, and
//! hostile input: every truncation tried and many single-bit flips of each writer's files must
//! give errors or frames, never a panic.

use super::*;
use crate::video::test_frames::moving_pattern;
use crate::video::{planar_to_rgb8, write_png, FrameSink, GifOptions, GifWriter, Mp4Options, Mp4Writer, RateControl, VideoSpec};

fn mp4(spec: VideoSpec, frames: usize, options: Mp4Options) -> Vec<u8> {
    let mut w = Mp4Writer::new(Vec::new(), spec, options).unwrap();
    (0..frames).for_each(|t| w.push_frame(&moving_pattern(&spec, t)).unwrap());
    w.finish().unwrap().1
}

fn gif(spec: VideoSpec, frames: usize) -> Vec<u8> {
    let mut w = GifWriter::new(Vec::new(), spec, GifOptions::default()).unwrap();
    (0..frames).for_each(|t| w.push_frame(&moving_pattern(&spec, t)).unwrap());
    w.finish().unwrap()
}

fn png(spec: VideoSpec, t: usize) -> Vec<u8> {
    let mut out = Vec::new();
    write_png(&mut out, &spec, &moving_pattern(&spec, t)).unwrap();
    out
}

/// All frames, or the first error.
fn read_all(bytes: &[u8], limits: InputLimits) -> Result<(InputInfo, Vec<Vec<f32>>)> {
    let mut r = VideoReader::open(bytes, limits)?;
    let mut frames = Vec::new();
    while let Some(f) = r.next_frame()? {
        frames.push(f);
    }
    Ok((*r.info(), frames))
}

/// PSNR in dB of two [0, 1] frames, over their 8-bit values.
fn psnr(spec: &VideoSpec, a: &[f32], b: &[f32]) -> f64 {
    let (a, b) = (planar_to_rgb8(spec, a).unwrap(), planar_to_rgb8(spec, b).unwrap());
    let mse = a.iter().zip(&b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

fn problem(e: &CoordinatorError) -> Option<InputVideoProblem> {
    match e {
        CoordinatorError::InvalidInputVideo { problem, .. } => Some(*problem),
        _ => None,
    }
}

/// What 4:2:0 alone leaves of a frame: the writer's BT.709 conversion and this module's
/// conversion back, with no codec between them.
fn through_yuv420(spec: &VideoSpec, frame: &[f32]) -> Vec<f32> {
    let yuv = crate::video::rgb_to_yuv420(spec, frame, crate::video::ColorMatrix::Bt709).unwrap();
    let mut out = vec![0.0; frame.len()];
    let colour = super::yuv::YuvColour::from_matrix_coefficients(1, spec.height, false);
    super::yuv::yuv420_to_rgb((&yuv.y, yuv.width), (&yuv.u, yuv.width / 2), &yuv.v, (spec.width as usize, spec.height as usize), colour, &mut out).unwrap();
    out
}

#[test]
fn mp4_round_trip_keeps_frames_size_rate_and_pixels() {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    // Worst frames measured: against the source 31.7 dB (QP 12) and 30.9 dB (QP 23), bounded by
    // 4:2:0 chroma on this colourful pattern (conversion alone: 33.7 dB); against the codec-free
    // 4:2:0 reconstruction 45.6 and 37.9 dB, the decoder's own accuracy.
    for (qp, source_bound, yuv_bound) in [(12u8, 30.0, 44.0), (23, 29.5, 36.0)] {
        let bytes = mp4(spec, 11, Mp4Options { rate_control: RateControl::ConstantQp(qp), keyframe_interval: 4, ..Default::default() });
        let (info, frames) = read_all(&bytes, InputLimits::default()).unwrap();
        assert_eq!(info, InputInfo { format: InputFormat::Mp4, width: 64, height: 48, fps: Some(16.0), declared_frames: Some(11) });
        assert_eq!(frames.len(), 11);
        let worst = |f: &dyn Fn(usize) -> f64| (0..11).map(f).fold(f64::INFINITY, f64::min);
        let vs_source = worst(&|t| psnr(&spec, &moving_pattern(&spec, t), &frames[t]));
        let vs_yuv = worst(&|t| psnr(&spec, &through_yuv420(&spec, &moving_pattern(&spec, t)), &frames[t]));
        eprintln!("mp4 qp {qp}: worst frame PSNR {vs_source:.2} dB against the source, {vs_yuv:.2} dB against 4:2:0 without the codec");
        assert!(vs_source > source_bound && vs_yuv > yuv_bound, "qp {qp}: {vs_source:.2} / {vs_yuv:.2} dB");
    }
    // Odd sizes are coded one pixel larger (edge repeated) and read back at the coded size.
    let odd = VideoSpec::new(33, 17, 16.0).unwrap();
    let (info, frames) = read_all(&mp4(odd, 2, Mp4Options::default()), InputLimits::default()).unwrap();
    assert_eq!((info.width, info.height, frames.len()), (34, 18, 2));
}

#[test]
fn gif_round_trip_keeps_frames_size_rate_and_pixels() {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let (info, frames) = read_all(&gif(spec, 9), InputLimits::default()).unwrap();
    // The writer's delays are 6, 7, 6, 6, 6, 7, 6, 6, 6 centiseconds: 9 frames in 0.56 s.
    assert_eq!((info.format, info.width, info.height, info.declared_frames), (InputFormat::Gif, 64, 48, Some(9)));
    assert!((info.fps.unwrap() - 900.0 / 56.0).abs() < 1e-9, "{:?}", info.fps);
    assert_eq!(frames.len(), 9);
    let worst = (0..9).map(|t| psnr(&spec, &moving_pattern(&spec, t), &frames[t])).fold(f64::INFINITY, f64::min);
    eprintln!("gif: worst frame PSNR {worst:.2} dB");
    // The 256-colour palette bounds the quality (the writer's own test measures 29.7–30.5 dB).
    assert!(worst > 28.0, "{worst:.2} dB");
}

#[test]
fn png_round_trip_is_exact_to_8_bits() {
    let spec = VideoSpec::new(33, 17, 16.0).unwrap();
    let (info, frames) = read_all(&png(spec, 3), InputLimits::default()).unwrap();
    assert_eq!(info, InputInfo { format: InputFormat::Png, width: 33, height: 17, fps: None, declared_frames: Some(1) });
    assert_eq!(frames.len(), 1);
    let want = planar_to_rgb8(&spec, &moving_pattern(&spec, 3)).unwrap();
    assert_eq!(planar_to_rgb8(&spec, &frames[0]).unwrap(), want);
}

#[test]
fn limits_bound_size_frames_and_decoded_pixels() {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    for bytes in [mp4(spec, 6, Mp4Options::default()), gif(spec, 6), png(spec, 0)] {
        let narrow = InputLimits { max_width: 32, ..Default::default() };
        let err = VideoReader::open(&bytes, narrow).err().unwrap();
        assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
        assert!(err.to_string().contains("64x48"), "{err}");
    }
    for bytes in [mp4(spec, 6, Mp4Options::default()), gif(spec, 6)] {
        let mut r = VideoReader::open(&bytes, InputLimits { max_frames: 4, ..Default::default() }).unwrap();
        let n = std::iter::from_fn(|| r.next_frame().unwrap()).count();
        assert_eq!((n, r.frames_read(), r.stopped_at_limit()), (4, 4, true));
        let budget = InputLimits { max_decoded_pixels: 3 * 64 * 48, ..Default::default() };
        let mut r = VideoReader::open(&bytes, budget).unwrap();
        for _ in 0..3 {
            assert!(r.next_frame().unwrap().is_some());
        }
        let err = r.next_frame().unwrap_err();
        assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
    }
}

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn huge_declared_sizes_are_refused_before_decoding() {
    // A GIF whose logical screen is 65535×65535, and nothing else.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0]);
    let err = VideoReader::open(&gif, InputLimits::default()).err().unwrap();
    assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
    // A PNG header of 100000×100000 RGB.
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let err = VideoReader::open(&png, InputLimits::default()).err().unwrap();
    assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
    assert!(err.to_string().contains("100000x100000"), "{err}");
}

#[test]
fn unsupported_mp4_content_is_named() {
    let spec = VideoSpec::new(32, 32, 16.0).unwrap();
    let good = mp4(spec, 2, Mp4Options::default());
    // The same file claiming H.265: the sample entry's type is the codec.
    let mut hevc = good.clone();
    let at = hevc.windows(4).position(|w| w == b"avc1").unwrap();
    hevc[at..at + 4].copy_from_slice(b"hvc1");
    let err = VideoReader::open(&hevc, InputLimits::default()).err().unwrap();
    assert_eq!(problem(&err), Some(InputVideoProblem::Unsupported), "{err}");
    assert!(err.to_string().contains("`hvc1` (H.265)"), "{err}");
    // No video track: the handler says sound.
    let mut audio = good.clone();
    let at = audio.windows(4).position(|w| w == b"vide").unwrap();
    audio[at..at + 4].copy_from_slice(b"soun");
    assert!(VideoReader::open(&audio, InputLimits::default()).err().unwrap().to_string().contains("no video track"));
    // Without its `moov` (renamed), it is not a movie.
    let mut bare = good;
    let at = bare.windows(4).position(|w| w == b"moov").unwrap();
    bare[at..at + 4].copy_from_slice(b"junk");
    assert!(VideoReader::open(&bare, InputLimits::default()).err().unwrap().to_string().contains("no `moov` box"));
}

/// Reads `bytes` to the end; returns whether that failed. A panic fails the test.
fn fails(bytes: &[u8]) -> bool {
    read_all(bytes, InputLimits::default()).is_err()
}

#[test]
fn truncated_files_are_errors() {
    let spec = VideoSpec::new(48, 32, 16.0).unwrap();
    for (name, bytes) in [("mp4", mp4(spec, 5, Mp4Options::default())), ("gif", gif(spec, 5)), ("png", png(spec, 1))] {
        let step = (bytes.len() / 300).max(1);
        let cuts: Vec<usize> = (0..bytes.len()).step_by(step).chain(bytes.len().saturating_sub(64)..bytes.len()).collect();
        for &cut in &cuts {
            assert!(fails(&bytes[..cut]), "{name}: cut at {cut} of {} decoded without error", bytes.len());
        }
        assert!(!fails(&bytes), "{name}: the whole file decodes");
        eprintln!("{name}: {} truncations of {} bytes, all errors", cuts.len(), bytes.len());
    }
}

#[test]
fn bit_flipped_files_never_panic() {
    let spec = VideoSpec::new(48, 32, 16.0).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (name, bytes) in [("mp4", mp4(spec, 5, Mp4Options::default())), ("gif", gif(spec, 5)), ("png", png(spec, 1))] {
        let (mut errors, tries) = (0, 400);
        for _ in 0..tries {
            let mut b = bytes.clone();
            // Half the flips in the first 512 bytes, where the headers and tables are.
            let r = next();
            let at = if r & 1 == 0 { (r >> 1) as usize % bytes.len().min(512) } else { (r >> 1) as usize % bytes.len() };
            b[at] ^= 1 << (next() % 8);
            let failed = fails(&b);
            // PNG: checksums catch every flip but those in the ancillary `sRGB` chunk (bytes
            // 33..46, after the signature and IHDR), which the decoder skips when damaged.
            assert!(failed || name != "png" || (33..46).contains(&at), "png: a flip at byte {at} went unnoticed");
            errors += failed as usize;
        }
        eprintln!("{name}: {errors} of {tries} single-bit flips were errors, the rest decoded");
    }
}

#[test]
fn garbage_is_an_error() {
    let mut state = 7u32;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    for prefix in [&b""[..], b"\0\0\0\x18ftypisom", b"GIF89a", b"\x89PNG\r\n\x1a\n"] {
        let bytes = [prefix, &noise[..]].concat();
        assert!(fails(&bytes), "{prefix:?} + noise");
    }
}

#[test]
fn prepared_video_follows_the_frame_rules() {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let bytes = mp4(spec, 11, Mp4Options { rate_control: RateControl::ConstantQp(12), ..Default::default() });
    let limits = InputLimits::default();
    let p = prepare_video(&bytes, 32, 16, FrameSelection::Longest, &limits).unwrap();
    assert_eq!((p.frames, p.frames_read, p.rgb.len()), (9, 11, 9 * 16 * 32 * 3));
    // Frame t is q(resize(decoded frame t)), q rounding to 8 bits; and close to the resized
    // pattern.
    let (_, decoded) = read_all(&bytes, limits).unwrap();
    let resizer = Resizer::new(64, 48, 32, 16).unwrap();
    let small = VideoSpec::new(32, 16, 16.0).unwrap();
    for t in [0, 4, 8] {
        let want: Vec<f32> = resizer.resize(&decoded[t]).unwrap().iter().map(|x| (x.clamp(0.0, 1.0) * 255.0).round() / 255.0).collect();
        let rgb = &p.rgb;
        let got: Vec<f32> = (0..3).flat_map(|c| (0..512).map(move |i| rgb[(t * 512 + i) * 3 + c] as f32 / 255.0)).collect();
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-6), "frame {t}");
        let pattern = resizer.resize(&moving_pattern(&spec, t)).unwrap();
        assert!(psnr(&small, &pattern, &got) > 35.0, "frame {t}");
    }
    let p = prepare_video(&bytes, 64, 48, FrameSelection::First(5), &limits).unwrap();
    assert_eq!((p.frames, p.frames_read), (5, 5));
    let err = prepare_video(&bytes, 64, 48, FrameSelection::First(13), &limits).unwrap_err();
    assert_eq!(problem(&err), Some(InputVideoProblem::TooFewFrames), "{err}");
    assert!(err.to_string().contains("declares 11 frames, 13 are needed"), "{err}");
    let err = prepare_video(&bytes, 64, 48, FrameSelection::First(9), &InputLimits { max_frames: 6, ..limits }).unwrap_err();
    assert!(err.to_string().contains("at most 6 frames are read"), "{err}");
    // A still PNG is one frame; GIF frames follow the same rule.
    let p = prepare_video(&png(spec, 0), 16, 16, FrameSelection::Longest, &limits).unwrap();
    assert_eq!((p.frames, p.rgb.len()), (1, 16 * 16 * 3));
    let p = prepare_video(&gif(spec, 7), 16, 16, FrameSelection::Longest, &limits).unwrap();
    assert_eq!(p.frames, 5);
    assert!(prepare_video(&bytes, 0, 16, FrameSelection::Longest, &limits).unwrap_err().to_string().contains("width"));
    assert!(prepare_video(&bytes, 16, 20_000, FrameSelection::Longest, &limits).unwrap_err().to_string().contains("height"));
    let budget = InputLimits { max_decoded_pixels: 4 * 256 * 256, ..limits };
    let err = prepare_video(&bytes, 256, 256, FrameSelection::Longest, &budget).unwrap_err();
    assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
    assert!(prepare_video(&bytes, 16, 16, FrameSelection::First(0), &limits).is_err());
}

/// A GIF of a few hundred bytes declaring 4096x4096 frames: refused from its headers, before
/// any frame is decoded (it used to cost seconds of CPU and hundreds of MB).
#[test]
fn a_tiny_gif_declaring_huge_frames_is_refused_before_decoding() {
    let mut bytes = Vec::new();
    {
        let mut e = ::gif::Encoder::new(&mut bytes, 4096, 4096, &[0, 0, 0, 255, 255, 255]).unwrap();
        for i in 0..200u16 {
            let frame = ::gif::Frame { left: i % 4000, top: i % 4000, width: 1, height: 1, buffer: std::borrow::Cow::Borrowed(&[1u8]), ..Default::default() };
            e.write_frame(&frame).unwrap();
        }
    }
    assert!(bytes.len() < 8 << 10, "{} bytes", bytes.len());
    let started = std::time::Instant::now();
    let err = prepare_video(&bytes, 832, 480, FrameSelection::First(81), &InputLimits::default()).unwrap_err();
    assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
    assert!(err.to_string().contains("81 frames of 4096x4096 would decode"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "refused only after {:?}", started.elapsed());
}

/// Decoding stops at the time budget, with the reason.
#[test]
fn decoding_stops_at_its_time_budget() {
    let spec = VideoSpec::new(64, 48, 16.0).unwrap();
    let no_time = InputLimits { max_seconds: std::time::Duration::ZERO, ..Default::default() };
    for bytes in [mp4(spec, 3, Mp4Options::default()), gif(spec, 3), png(spec, 0)] {
        let err = prepare_video(&bytes, 64, 48, FrameSelection::First(1), &no_time).unwrap_err();
        assert_eq!(problem(&err), Some(InputVideoProblem::TooLarge), "{err}");
        assert!(err.to_string().contains("over the budget of 0ns"), "{err}");
    }
}
