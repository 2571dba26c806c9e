//! `tessera generate --image` end to end: the tiny image-to-video preset and a Wan 2.1 I2V
//! diffusers snapshot write playable MP4s from PNG, JPEG and WebP inputs (ffprobe counts the
//! frames); the image conditions the video; hostile or mismatched images are refused naming the
//! flag, header-level refusals before anything starts.

mod common;

use common::probe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("tessera runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A 200×320 picture (a red disc on blue), saved in `format` under `dir`.
fn picture(dir: &Path, name: &str, format: image::ImageFormat, invert: bool) -> PathBuf {
    let img = image::RgbImage::from_fn(320, 200, |x, y| {
        let inside = (x as i64 - 80).pow(2) + (y as i64 - 100).pow(2) < 40 * 40;
        let p = if inside { [230, 40, 30] } else { [30, 60, 120] };
        image::Rgb(if invert { p.map(|v| 255 - v) } else { p })
    });
    let path = dir.join(name);
    img.save_with_format(&path, format).unwrap();
    path
}

/// A PNG whose header says `width`×`height` over a few bytes of data (a decompression bomb's
/// shape), with valid chunk checksums.
fn bomb_png(dir: &Path, width: u32, height: u32) -> PathBuf {
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut crc = !0u32;
        for &b in &body {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        [&(data.len() as u32).to_be_bytes()[..], &body, &(!crc).to_be_bytes()].concat()
    }
    let mut ihdr = [width.to_be_bytes(), height.to_be_bytes()].concat();
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let bytes =
        [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]), &chunk(b"IEND", &[])].concat();
    let path = dir.join(format!("bomb-{width}x{height}.png"));
    std::fs::write(&path, bytes).unwrap();
    path
}

const SMALL: [&str; 8] = ["--frames", "9", "--height", "64", "--width", "96", "--steps", "3"];

#[test]
fn tiny_i2v_writes_a_playable_mp4_from_png_jpeg_and_webp() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let run = |image: &Path, file: &str| {
        let (image, file_out) = (image.display().to_string(), out(file));
        let args =
            [&["generate", "--preset", "tiny-i2v", "--image", &image, "--prompt", "a red ball rolling", "--seed", "3", "--quiet", "-o", &file_out][..], &SMALL]
                .concat();
        let (code, stdout, stderr) = tessera(&args);
        assert_eq!(code, 0, "{stdout}{stderr}");
        std::fs::read(dir.path().join(file)).unwrap()
    };
    let png = run(&picture(dir.path(), "in.png", image::ImageFormat::Png, false), "png.mp4");
    let s = probe(&dir.path().join("png.mp4"), &[]);
    assert_eq!(s["nb_read_frames"].as_str(), Some("9"), "{s}");
    assert_eq!((s["width"].as_u64(), s["height"].as_u64()), (Some(96), Some(64)), "{s}");
    assert_eq!(run(&picture(dir.path(), "again.png", image::ImageFormat::Png, false), "again.mp4"), png, "same image and seed, same file");
    assert_ne!(run(&picture(dir.path(), "inverted.png", image::ImageFormat::Png, true), "inverted.mp4"), png, "the image conditions the video");
    for (name, format) in [("in.jpg", image::ImageFormat::Jpeg), ("in.webp", image::ImageFormat::WebP)] {
        run(&picture(dir.path(), name, format, false), &format!("{name}.mp4"));
        assert_eq!(probe(&dir.path().join(format!("{name}.mp4")), &[])["nb_read_frames"].as_str(), Some("9"), "{name}");
    }
}

#[test]
fn a_wan_i2v_snapshot_folder_runs() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/i2v-a");
    let image = picture(dir.path(), "in.png", image::ImageFormat::Png, false);
    let out = dir.path().join("out.mp4");
    let args = [
        "generate",
        "--model",
        &snapshot.display().to_string(),
        "--image",
        &image.display().to_string(),
        "--prompt",
        "a cat walking along a sunny beach",
        "--frames",
        "9",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "3",
        "--quiet",
        "-o",
        &out.display().to_string(),
    ];
    let (code, stdout, stderr) = tessera(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(probe(&out, &[])["nb_read_frames"].as_str(), Some("9"));
}

#[test]
fn bad_images_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4").display().to_string();
    let refuse = |preset: &str, image: Option<&Path>| {
        let path = image.map(|p| p.display().to_string());
        let mut args = vec!["generate", "--preset", preset, "--prompt", "x", "-o", &out];
        args.extend(SMALL);
        if let Some(p) = &path {
            args.extend(["--image", p.as_str()]);
        }
        let start = Instant::now();
        let (code, stdout, stderr) = tessera(&args);
        assert_ne!(code, 0, "{stdout}{stderr}");
        assert!(stderr.contains("--image"), "{stderr}");
        (stderr, start.elapsed())
    };
    // Refused from the header, before any model is built: well within a second.
    for (bomb, says) in [(bomb_png(dir.path(), 100_000, 1), "100000x1"), (bomb_png(dir.path(), 60_000, 60_000), "60000x60000")] {
        let (stderr, took) = refuse("tiny-i2v", Some(&bomb));
        assert!(stderr.contains(says), "{stderr}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }
    let gif = dir.path().join("in.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    assert!(refuse("tiny-i2v", Some(&gif)).0.contains("PNG, JPEG and WebP"));
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image at all").unwrap();
    assert!(refuse("tiny-i2v", Some(&junk)).0.contains("signature"));
    // A truncated PNG: its header is whole, its pixels are not; refused at admission.
    let png = picture(dir.path(), "whole.png", image::ImageFormat::Png, false);
    let cut = dir.path().join("cut.png");
    std::fs::write(&cut, &std::fs::read(&png).unwrap()[..60]).unwrap();
    assert!(refuse("tiny-i2v", Some(&cut)).0.contains("input_image"));
    // The image and the model must go together.
    assert!(refuse("tiny", Some(&png)).0.contains("image-to-video"));
    assert!(refuse("tiny-i2v", None).0.contains("required"));
}

/// Diffusion forcing from an image (`tiny-df`: SkyReels-V2's structure, random weights): the image
/// is the first chunk's first latent frame, so the video's first frame follows the image (another
/// image, another first frame; none, another again) while the run still goes chunk by chunk to
/// every frame. Two workers (the image encoded in bands, each forward sharded or split in CFG
/// halves, as the planner lays it out) give one worker's frames to within one 8-bit level. Blocks
/// of more than one latent frame cannot hold the one-frame image: refused naming the flag's field.
#[test]
fn tiny_df_starts_a_long_video_from_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["generate", "--preset", "tiny-df", "--prompt", "a boat", "--frames", "57", "--height", "48", "--width", "64", "--steps", "2", "--seed", "3"];
    let run = |image: Option<&Path>, name: &str, workers: &str| {
        let out = dir.path().join(name);
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend(["--format", "png", "--workers", workers, "-o"].map(String::from));
        a.push(out.display().to_string());
        if let Some(p) = image {
            a.extend(["--image".into(), p.display().to_string()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = tessera(&a);
        assert_eq!(code, 0, "{stdout}{stderr}");
        common::png_frames(&out)
    };
    let disc = picture(dir.path(), "disc.png", image::ImageFormat::Png, false);
    let inverted = picture(dir.path(), "inverted.png", image::ImageFormat::Png, true);
    let (a, b, none) = (run(Some(&disc), "a", "1"), run(Some(&inverted), "b", "1"), run(None, "none", "1"));
    assert!(a.len() == 57 && b.len() == 57 && none.len() == 57);
    assert!(a.iter().all(|(w, h, _)| (*w, *h) == (64, 48)));
    assert_ne!(a[0].2, b[0].2, "the first frame follows the image");
    assert_ne!(a[0].2, none[0].2, "and differs from the text-only run's");
    let two = run(Some(&disc), "two", "2");
    let max = a.iter().zip(&two).flat_map(|(x, y)| x.2.iter().zip(&y.2).map(|(p, q)| p.abs_diff(*q))).max().unwrap();
    assert!(two.len() == 57 && max <= 1, "2 workers: frames differ by up to {max} levels");
    let mut blocks: Vec<&str> = args.to_vec();
    blocks.extend(["--causal-block", "5", "--image", disc.to_str().unwrap(), "-o", "unused.mp4"]);
    let (code, _, stderr) = tessera(&blocks);
    assert_ne!(code, 0);
    assert!(stderr.contains("causal") && stderr.contains("blocks of 1"), "{stderr}");
}
