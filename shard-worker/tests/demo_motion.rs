//! The trained `demo` model shows its prompt's motion: for every color, shape and direction, and
//! for three noise seeds, the prompt's colored shape travels at least a quarter of the frame in
//! the prompt's direction (`pipeline::demo` says how the shape is found). The model never saw
//! these videos: training drew clips, and generation starts from noise of these seeds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tessera_worker::pipeline::demo::{motion, prompts, DemoPrompt, Motion, MIN_TRAVEL};
use tessera_worker::pipeline::{FrameCollector, GenerationParams, PipelinePreset};

/// The noise seeds: 0 (`GenerationParams`' default) and two more.
const SEEDS: [u64; 3] = [0, 1, 2];

#[test]
fn the_demo_model_moves_every_shape_the_way_its_prompt_says() {
    let pipe = PipelinePreset::Demo.build(0).expect("the demo model loads (models/demo, or TESSERA_DEMO_MODEL)");
    let d = PipelinePreset::Demo.defaults();
    let videos: Vec<(u64, DemoPrompt)> = SEEDS.iter().flat_map(|&seed| prompts().into_iter().map(move |p| (seed, p))).collect();
    // The videos are independent and each one's model is too small to keep more than one core
    // busy: one generation per core at a time (the same frames as one after another). Each
    // generation runs in a one-thread pool of its own: in the shared global pool, the kernels'
    // parallel loops would fan out to the other generations' cores, and on 2 cores that made the
    // test take 344 s instead of 256 s.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(videos.len());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Option<Motion>)>> = Mutex::new(Vec::with_capacity(videos.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
            let (next, results, videos, pipe, d) = (&next, &results, &videos, &pipe, &d);
            scope.spawn(move || {
                pool.install(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(seed, p)) = videos.get(i) else { break };
                    let params = GenerationParams {
                        height: d.height,
                        width: d.width,
                        num_frames: d.num_frames,
                        num_inference_steps: d.num_inference_steps,
                        seed,
                        ..GenerationParams::new(p.text())
                    };
                    let mut frames = FrameCollector::default();
                    pipe.generate(&params, &mut frames).unwrap();
                    let m = motion(&frames.frames().unwrap(), &p);
                    results.lock().unwrap().push((i, m));
                })
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|&(i, _)| i);
    assert_eq!(results.len(), videos.len(), "every video was generated");

    let mut failed = Vec::new();
    let mut travel = Vec::new();
    for ((seed, p), (_, m)) in videos.iter().zip(&results) {
        match m {
            Some(m) => {
                eprintln!("seed {seed}  {:<32} along {:+.3}  across {:.3}  seen {}/{}", p.text(), m.along, m.across, m.frames_seen, m.frames);
                travel.push(m.along);
                if !m.passes() {
                    failed.push(format!("seed {seed}: {} travelled {:+.2} of the frame", p.text(), m.along));
                }
            }
            None => {
                eprintln!("seed {seed}  {:<32} not seen", p.text());
                failed.push(format!("seed {seed}: {} shows no {} shape", p.text(), p.color));
            }
        }
    }
    travel.sort_by(f64::total_cmp);
    if !travel.is_empty() {
        eprintln!(
            "{} videos on {threads} thread(s): travel along the prompt's direction min {:.2}, median {:.2}, max {:.2} (bar {MIN_TRAVEL})",
            travel.len(),
            travel[0],
            travel[travel.len() / 2],
            travel[travel.len() - 1]
        );
    }
    assert!(failed.is_empty(), "{} of {} videos fail:\n{}", failed.len(), videos.len(), failed.join("\n"));
}
