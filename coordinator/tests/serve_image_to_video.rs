//! Image-to-video through `tessera serve --preset tiny-i2v` (Wan 2.1 I2V's structure, random
//! weights): the request's `input_image` is decoded once at admission, never echoed, and sent to
//! every rank; a sharded job (2 workers) gives the frames of one worker; a missing, hostile or
//! misplaced image is refused with INVALID_ARGUMENT naming `input_image`.

mod common;

use common::server::{generate, Server};
use std::time::Duration;
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::{GenerateRequest, OutputFormat};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn serve(extra: &[&str]) -> Server {
    let s = Server::start_with(extra);
    s.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    s
}

/// A 90×150 PNG: a yellow square on dark blue.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(150, 90, |x, y| image::Rgb(if (20..60).contains(&x) && (25..65).contains(&y) { [240, 220, 20] } else { [10, 20, 70] }));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn request(image: Vec<u8>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a yellow square sliding left".into(),
        width: 32,
        height: 32,
        num_frames: 9,
        steps: 3,
        seed: Some(4),
        output_format: OutputFormat::PngFrames as i32,
        input_image: image,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_sharded_image_to_video_job_gives_the_frames_of_one_worker() {
    let (one, two) = tokio::join!(serve(&["--preset", "tiny-i2v", "--workers", "1"]), serve(&["--preset", "tiny-i2v", "--workers", "2"]));
    let (mut c1, mut c2) = (one.client().await, two.client().await);
    let (a, b) = tokio::join!(generate(&mut c1, request(png())), generate(&mut c2, request(png())));
    assert!(a.status.is_none() && b.status.is_none(), "{:?} {:?}\n{}", a.status, b.status, two.log());
    let Some(Event::Accepted(acc)) = &b.events[0].event else { panic!() };
    assert_eq!(acc.plan.as_ref().map(|p| p.ranks), Some(2));
    let echoed = acc.effective_request.as_ref().unwrap();
    assert!(echoed.input_image.is_empty(), "the image's bytes are not echoed");
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (a.png_frames_rgb(9, dir.path(), "one"), b.png_frames_rgb(9, dir.path(), "two"));
    assert_eq!((fa.len(), fb.len()), (9 * 32 * 32 * 3, 9 * 32 * 32 * 3));
    let max = fa.iter().zip(&fb).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    eprintln!("tiny-i2v, 9 frames: 1 worker vs 2 workers: max difference {max} levels");
    assert!(max <= 1, "PNG frames differ by up to {max} levels");
}

#[tokio::test]
async fn missing_hostile_or_misplaced_images_are_refused_naming_the_field() {
    let i2v = serve(&["--preset", "tiny-i2v"]).await;
    let mut client = i2v.client().await;
    let mut wide = png();
    // IHDR's width (bytes 16..20) made 100,000, its checksum left wrong: refused either way.
    wide[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    let cut = png()[..60].to_vec();
    for (image, says) in [(Vec::new(), "required"), (b"GIF89a\x01\x00\x01\x00".to_vec(), "PNG, JPEG and WebP"), (wide, "png"), (cut, "png")] {
        let Err(status) = client.generate(request(image)).await else { panic!("refused: {says}") };
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("input_image") && status.message().contains(says), "{status:?}");
    }
    let t2v = serve(&["--preset", "tiny"]).await;
    let Err(status) = t2v.client().await.generate(request(png())).await else { panic!("an image for a text-to-video model is refused") };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("input_image"), "{status:?}");
}
