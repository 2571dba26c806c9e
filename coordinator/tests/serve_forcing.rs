//! Diffusion forcing through `tessera serve --preset tiny-df` (SkyReels-V2's structure, random
//! weights): a long video streams out chunk by chunk, so the first chunk's frames reach the
//! client before the second chunk is done (measured on the Generate stream); the progress counts
//! chunks; a sharded job (2 workers, Ulysses) gives the frames of one worker; a request for the
//! wrong kind of model is refused naming the field.

mod common;

use common::server::{generate, Server};
use std::time::{Duration, Instant};
use tessera_proto::v1::generate_event::Event;
use tessera_proto::v1::{DiffusionForcing, GenerateRequest, OutputFormat, Phase};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn serve(extra: &[&str]) -> Server {
    let s = Server::start_with(extra);
    s.wait_health(ServingStatus::Serving, Duration::from_secs(60)).await;
    s
}

/// 57 frames in chunks of 37 overlapping by 17 (the preset's defaults): 15 latent frames, a
/// first chunk of 10 (37 video frames) and a second of 10 whose first 5 repeat the video so far
/// (20 more frames).
fn long_request(format: OutputFormat) -> GenerateRequest {
    GenerateRequest {
        prompt: "a paper boat drifting down a stream".into(),
        width: 64,
        height: 48,
        num_frames: 57,
        steps: 3,
        seed: Some(9),
        output_format: format as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_first_chunks_frames_reach_the_client_before_the_second_chunk_is_done() {
    let server = serve(&["--preset", "tiny-df"]).await;
    let mut client = server.client().await;
    let started = Instant::now();
    let mut stream = client.generate(long_request(OutputFormat::PngFrames)).await.unwrap().into_inner();
    // Every event with the time it arrived.
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        events.push((started.elapsed(), e.event.unwrap()));
    }
    let Some((_, Event::Accepted(acc))) = events.first() else { panic!("{events:?}") };
    let df = acc.effective_request.as_ref().unwrap().diffusion_forcing.unwrap();
    assert_eq!((df.base_num_frames, df.overlap_history, df.causal_block_size, df.ar_step), (37, Some(17), 1, 0), "the preset's defaults, echoed");
    let second_done =
        events.iter().find_map(|(t, e)| matches!(e, Event::Progress(p) if p.chunks_done == 2).then_some(*t)).expect("a Progress says the second chunk is done");
    // Frames whose PNG arrived whole before that.
    let early = events.iter().filter(|(t, e)| matches!(e, Event::Chunk(c) if c.last) && *t < second_done).count();
    let firsts: Vec<(Duration, u32)> =
        events.iter().filter_map(|(t, e)| if let Event::Chunk(c) = e { c.last.then_some((*t, c.frame_index)) } else { None }).collect();
    let first_frame = firsts.first().map(|(t, _)| *t).expect("frames");
    eprintln!(
        "first chunk's first frame after {:.3} s, second chunk done after {:.3} s, {} of 57 frames by then",
        first_frame.as_secs_f64(),
        second_done.as_secs_f64(),
        early
    );
    assert!(first_frame < second_done);
    assert_eq!(early, 37, "exactly the first chunk's frames come before the second is done");
    assert_eq!(firsts.iter().map(|(_, i)| *i).collect::<Vec<_>>(), (0..57).collect::<Vec<_>>(), "every frame once, in order");
    // Progress counts the chunks; the steps are the iterations of both chunks.
    let progress: Vec<_> = events.iter().filter_map(|(_, e)| if let Event::Progress(p) = e { Some(*p) } else { None }).collect();
    assert!(progress.iter().all(|p| p.total_chunks == 2 && p.total_steps == 6), "{progress:?}");
    let chunks: Vec<u32> = progress.iter().filter(|p| p.phase == Phase::Denoising as i32).map(|p| p.chunks_done).collect();
    assert_eq!((chunks.first(), chunks.last()), (Some(&0), Some(&2)));
    let Some((_, Event::Done(done))) = events.last() else { panic!() };
    assert_eq!((done.num_frames, done.width, done.height), (57, 64, 48));

    // A Wan-only request field set for this model is fine; diffusion forcing for a model that is
    // not a DF model is refused (see the other server below), and bad settings name the field.
    let bad = GenerateRequest { diffusion_forcing: Some(DiffusionForcing { base_num_frames: 36, ..Default::default() }), ..long_request(OutputFormat::Mp4) };
    let Err(status) = client.generate(bad).await else { panic!("a chunk size that is not 4k+1 is refused") };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("diffusion_forcing.base_num_frames"), "{status:?}");
    let wan = serve(&["--preset", "tiny"]).await;
    let df_for_wan = GenerateRequest { diffusion_forcing: Some(DiffusionForcing::default()), ..long_request(OutputFormat::Mp4) };
    let Err(status) = wan.client().await.generate(df_for_wan).await else { panic!("diffusion forcing for a Wan model is refused") };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("diffusion_forcing"), "{status:?}");
}

/// Two workers (a ring of 2, as the planner lays it out) shard every chunk's forwards; the PNG frames
/// (lossless) agree with one worker's to within one 8-bit level, as for Wan jobs.
#[tokio::test]
async fn a_sharded_diffusion_forcing_job_gives_the_frames_of_one_worker() {
    let (one, two) = tokio::join!(serve(&["--preset", "tiny-df", "--workers", "1"]), serve(&["--preset", "tiny-df", "--workers", "2"]));
    let (mut c1, mut c2) = (one.client().await, two.client().await);
    let req = GenerateRequest { num_frames: 41, width: 32, height: 32, ..long_request(OutputFormat::PngFrames) };
    let (a, b) = tokio::join!(generate(&mut c1, req.clone()), generate(&mut c2, req));
    assert!(a.status.is_none() && b.status.is_none(), "{:?} {:?}\n{}", a.status, b.status, two.log());
    let Some(Event::Accepted(acc)) = &b.events[0].event else { panic!() };
    assert_eq!(acc.plan.as_ref().map(|p| p.ranks), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (a.png_frames_rgb(41, dir.path(), "one"), b.png_frames_rgb(41, dir.path(), "two"));
    assert_eq!((fa.len(), fb.len()), (41 * 32 * 32 * 3, 41 * 32 * 32 * 3));
    let max = fa.iter().zip(&fb).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let differing = fa.iter().zip(&fb).filter(|(x, y)| x != y).count();
    eprintln!("tiny-df, 41 frames: 1 worker vs 2 workers: max difference {max} levels, {differing} of {} bytes differ", fa.len());
    assert!(max <= 1, "PNG frames differ by up to {max} levels");
}
