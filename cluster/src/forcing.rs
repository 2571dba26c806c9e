//! How a diffusion-forcing long video is cut into chunks (diffusers'
//! `SkyReelsV2DiffusionForcingPipeline`, long-video mode), and how many iterations each chunk
//! runs: chunks of at most `base_num_frames` (latent: Bf), each after the first starting with the
//! last `overlap_history` frames (latent: ov) of the video so far as its clean prefix. The first
//! chunk starts from noise, from an image's latent frame (image-to-video), or from an input
//! video's last `overlap_history` frames re-encoded (video extension). Pure arithmetic, shared by
//! the workers that run the chunks and the planner that prices them.

use crate::{ClusterError as WorkerError, Result};

/// One chunk of a long video, in latent frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Latent frames of the chunk (prefix included).
    pub frames: usize,
    /// Leading frames copied from the video so far (clean, never updated).
    pub prefix: usize,
    /// Leading frames dropped when the chunk is appended to the video (the overlap).
    pub overlap: usize,
}

impl Chunk {
    /// Frames the chunk adds to the video.
    pub fn new_frames(&self) -> usize {
        self.frames - self.overlap
    }
}

/// What a diffusion-forcing run's first chunk starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Noise (text-to-video).
    Noise,
    /// An image's latent frame, the first chunk's clean prefix, which stays in the video as its
    /// first frame (diffusers' `SkyReelsV2DiffusionForcingImageToVideoPipeline`).
    Image,
    /// The last `overlap_history` frames of an input video, re-encoded: the first chunk's clean
    /// prefix (diffusers' `SkyReelsV2DiffusionForcingVideoToVideoPipeline`). Their decode repeats
    /// frames the input already has ([`ChunkPlan::repeated_frames`]).
    Video,
}

/// The chunks of a video of `latent_frames` latent frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Latent frames of the whole video (N), a prefix from an input included.
    pub latent_frames: usize,
    /// Latent frames per causal block (c).
    pub block: usize,
    /// The chunks in order.
    pub chunks: Vec<Chunk>,
    /// What the first chunk starts from.
    pub start: Start,
}

/// Latent frames of `frames` video frames (the VAE's temporal factor 4: `(frames − 1)/4 + 1`).
fn latent(frames: usize) -> usize {
    frames.saturating_sub(1) / 4 + 1
}

impl ChunkPlan {
    /// Iterations of every chunk, each frame stepped `steps` times, blocks lagging by `ar_step`:
    /// the steps of the whole run.
    pub fn total_iterations(&self, steps: usize, ar_step: usize) -> usize {
        self.chunks.iter().map(|c| iterations(steps, c.frames, c.prefix, self.block, ar_step)).sum()
    }

    /// The plan of `num_frames` video frames, chunks of `base_num_frames`, overlapping by
    /// `overlap_history` (`None`: one chunk), causal blocks of `block` latent frames. Refused
    /// (naming the field) where upstream would silently compute something else: a chunk or an
    /// overlap that is not whole blocks.
    pub fn new(num_frames: usize, base_num_frames: usize, overlap_history: Option<usize>, block: usize) -> Result<Self> {
        let n = latent(num_frames);
        if block == 0 {
            return Err(WorkerError::input("causal_block_size", "must be positive"));
        }
        let whole = |field: &'static str, frames: usize| -> Result<()> {
            if frames.is_multiple_of(block) {
                Ok(())
            } else {
                Err(WorkerError::input(field, format!("{frames} latent frames are not whole causal blocks of {block}")))
            }
        };
        if let Some(overlap) = overlap_history {
            let (bf, ov) = (latent(base_num_frames), latent(overlap));
            if num_frames > base_num_frames && ov >= bf {
                return Err(WorkerError::input(
                    "overlap_history",
                    format!("{overlap} frames ({ov} latent) must be fewer than base_num_frames {base_num_frames} ({bf} latent)"),
                ));
            }
            whole("overlap_history", ov)?;
        }
        let cut = |frames: usize| cut(frames, base_num_frames, overlap_history);
        let chunks = cut(num_frames);
        whole("base_num_frames", chunks[0].frames)?;
        let misfit = |chunks: &[Chunk]| chunks.iter().find(|c| !c.frames.is_multiple_of(block)).copied();
        if let Some(last) = misfit(&chunks) {
            // Upstream would leave the last frames of such a chunk pure noise.
            let fits = (num_frames + 4..num_frames + 4 * latent(base_num_frames) * block).step_by(4).find(|&f| misfit(&cut(f)).is_none());
            let hint = fits.map_or(String::new(), |f| format!("; {f} frames fit"));
            return Err(WorkerError::input(
                "num_frames",
                format!("{num_frames} frames leave a chunk of {} latent frames, not whole causal blocks of {block}{hint}", last.frames),
            ));
        }
        debug_assert_eq!(chunks.iter().map(Chunk::new_frames).sum::<usize>(), n);
        Ok(Self { latent_frames: n, block, chunks, start: Start::Noise })
    }

    /// The plan of an image-to-video run (diffusers' `SkyReelsV2DiffusionForcingImageToVideoPipeline`):
    /// the image's latent frame is the first chunk's clean prefix, never stepped, and stays in the
    /// video as its first frame. The image is one latent frame, so the causal blocks must be one
    /// frame too (upstream counts a one-frame prefix in larger blocks as no block, and denoises the
    /// image's frame as noise).
    pub fn with_image(mut self) -> Result<Self> {
        if self.block != 1 {
            return Err(WorkerError::input(
                "causal_block_size",
                format!("{} latent frames per block; image-to-video needs blocks of 1 (the image is one latent frame)", self.block),
            ));
        }
        match self.chunks.first_mut() {
            Some(first) if first.frames > 1 => first.prefix = 1,
            _ => return Err(WorkerError::input("num_frames", "image-to-video makes frames after the image: at least 5 frames (2 latent)")),
        }
        self.start = Start::Image;
        Ok(self)
    }

    /// The plan of a video extension (diffusers' `SkyReelsV2DiffusionForcingVideoToVideoPipeline`)
    /// continuing an input video from its last `overlap_history` frames: their latent frames (ov,
    /// whole causal blocks) are the first chunk's clean prefix, never stepped, and stay in the video
    /// (the chunks are those of text-to-video: the video's `num_frames` count the history). The
    /// first chunk must make frames after them: `num_frames` > `overlap_history`.
    pub fn extending(mut self, overlap_history: usize) -> Result<Self> {
        let ov = latent(overlap_history);
        if !ov.is_multiple_of(self.block) {
            return Err(WorkerError::input("overlap_history", format!("{ov} latent frames are not whole causal blocks of {}", self.block)));
        }
        match self.chunks.first_mut() {
            Some(first) if first.frames > ov => first.prefix = ov,
            _ => {
                return Err(WorkerError::input(
                    "num_frames",
                    format!("extending a video makes frames after its last {overlap_history} ({ov} latent): at least {} frames", 4 * ov + 1),
                ))
            }
        }
        self.start = Start::Video;
        Ok(self)
    }

    /// Latent frames the first chunk starts from (an image's or an input video's), 0 from noise.
    pub fn input_prefix(&self) -> usize {
        match self.start {
            Start::Noise => 0,
            _ => self.chunks.first().map_or(0, |c| c.prefix),
        }
    }

    /// Video frames at the start of the decoded video that repeat the input: a video extension's
    /// re-encoded history decodes to `4·ov − 3` frames (the causal VAE's first latent frame is one
    /// frame, every other four), which the input video already has; 0 otherwise. Diffusers returns
    /// them twice (the input, then their decode); Tessera serves the input, then the new frames.
    pub fn repeated_frames(&self) -> usize {
        match self.start {
            Start::Video => (4 * self.input_prefix()).saturating_sub(3),
            _ => 0,
        }
    }
}

/// What a diffusion-forcing model advertises (its workers' `ModelInfo`): its causal block, and the
/// long-video settings a request gets when it leaves them out.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForcingDefaults {
    /// Video frames per chunk (97 for the 540P models, 121 for the 720P ones).
    pub base_num_frames: u32,
    /// Video frames each chunk repeats from the video so far (17 upstream).
    pub overlap_history: u32,
    /// Latent frames per causal block: the transformer's `num_frame_per_block`.
    pub causal_block: u32,
    /// Noise mixed into each chunk's prefix, in thousandths (20 upstream for long videos).
    pub addnoise_condition: f32,
}

impl ForcingDefaults {
    /// Upstream SkyReels-V2's settings (its 540P models' examples): chunks of 97 frames overlapping
    /// by 17, `addnoise_condition` 20, causal blocks of one latent frame (a transformer's own
    /// `num_frame_per_block` replaces it). The 720P models' examples use chunks of 121 frames.
    pub const SKYREELS_V2: Self = Self { base_num_frames: 97, overlap_history: 17, causal_block: 1, addnoise_condition: 20.0 };
}

/// The diffusion-forcing settings of a job, every default applied (a request's
/// `diffusion_forcing`); [`ForcingSettings::check`] is their one validation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForcingSettings {
    /// Video frames per chunk, 4k+1.
    pub base_num_frames: u32,
    /// Video frames each chunk after the first repeats from the video so far, 4k+1, fewer than
    /// `base_num_frames`.
    pub overlap_history: u32,
    /// Iterations block b lags block b−1 (0: synchronous).
    pub ar_step: u32,
    /// Latent frames per causal block.
    pub causal_block_size: u32,
    /// Noise mixed into the prefix, in thousandths, in [0, 1000).
    pub addnoise_condition: f32,
    /// Frames per second of the video, 1 to 120: the model's fps embedding tells 16 from any
    /// other rate.
    pub fps: u32,
}

impl ForcingSettings {
    /// `defaults` where the request leaves a setting out (`0` for the counts, `None` for the
    /// overlap and the noise).
    pub fn with_defaults(
        defaults: ForcingDefaults,
        base_num_frames: u32,
        overlap_history: Option<u32>,
        ar_step: u32,
        causal_block_size: u32,
        addnoise_condition: Option<f32>,
        fps: u32,
    ) -> Self {
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Self {
            base_num_frames: or(base_num_frames, defaults.base_num_frames),
            overlap_history: overlap_history.unwrap_or(defaults.overlap_history),
            ar_step,
            causal_block_size: or(causal_block_size, defaults.causal_block),
            addnoise_condition: addnoise_condition.unwrap_or(defaults.addnoise_condition),
            fps,
        }
    }

    /// Checks the settings for a video of `num_frames` frames and `steps` steps, at most
    /// `max_frames` frames, whose first chunk starts from `start`, naming the field at fault
    /// (`diffusion_forcing.FIELD`); returns the chunks.
    pub fn check(&self, num_frames: u32, steps: u32, max_frames: u64, start: Start) -> Result<ChunkPlan> {
        let four_k_plus_one = |field: &'static str, v: u32| -> Result<()> {
            if v == 0 || v % 4 != 1 || u64::from(v) > max_frames {
                return Err(WorkerError::input(field, format!("{v} must be 4k+1 (1, 5, 9, ... {max_frames})")));
            }
            Ok(())
        };
        four_k_plus_one("diffusion_forcing.base_num_frames", self.base_num_frames)?;
        four_k_plus_one("diffusion_forcing.overlap_history", self.overlap_history)?;
        if self.ar_step > steps {
            return Err(WorkerError::input("diffusion_forcing.ar_step", format!("{} must be at most the {steps} steps", self.ar_step)));
        }
        let chunk = latent(self.base_num_frames as usize);
        if self.causal_block_size == 0 || self.causal_block_size as usize > chunk {
            return Err(WorkerError::input(
                "diffusion_forcing.causal_block_size",
                format!("{} must be from 1 to a chunk's {chunk} latent frames", self.causal_block_size),
            ));
        }
        let a = self.addnoise_condition;
        if !(a.is_finite() && (0.0..1000.0).contains(&a)) {
            return Err(WorkerError::input("diffusion_forcing.addnoise_condition", format!("{a} must be at least 0 and below 1000")));
        }
        if !(1..=120).contains(&self.fps) {
            return Err(WorkerError::input("fps", format!("{} must be between 1 and 120", self.fps)));
        }
        let plan = ChunkPlan::new(num_frames as usize, self.base_num_frames as usize, Some(self.overlap_history as usize), self.causal_block_size as usize);
        let plan = match start {
            Start::Noise => plan,
            Start::Image => plan.and_then(ChunkPlan::with_image),
            Start::Video => plan.and_then(|p| p.extending(self.overlap_history as usize)),
        };
        plan.map_err(|e| match e {
            WorkerError::InvalidInput { field, detail } => WorkerError::InvalidInput { field: public_field(field), detail },
            other => other,
        })
    }
}

/// [`ChunkPlan::new`]'s field as the request names it.
fn public_field(field: &'static str) -> &'static str {
    match field {
        "base_num_frames" => "diffusion_forcing.base_num_frames",
        "overlap_history" => "diffusion_forcing.overlap_history",
        "causal_block_size" => "diffusion_forcing.causal_block_size",
        other => other,
    }
}

/// Iterations of a chunk of `frames` latent frames whose first `prefix` are done, in causal blocks
/// of `block`, each frame stepped `steps` times, block b starting `ar_step` iterations after block
/// b−1 (or when b−1 finishes, if sooner): `S + (blocks − 1)·min(ar_step, S)` over its new blocks.
/// (The worker's step matrix has exactly this many rows; its tests check it.)
pub fn iterations(steps: usize, frames: usize, prefix: usize, block: usize, ar_step: usize) -> usize {
    let blocks = frames.saturating_sub(prefix) / block.max(1);
    if blocks == 0 {
        return 0;
    }
    steps + (blocks - 1) * ar_step.min(steps)
}

/// The chunks of `num_frames` (sizes only; [`ChunkPlan::new`] checks them).
fn cut(num_frames: usize, base_num_frames: usize, overlap_history: Option<usize>) -> Vec<Chunk> {
    let n = latent(num_frames);
    match overlap_history {
        Some(overlap) if num_frames > base_num_frames && n > latent(base_num_frames) => {
            let (bf, ov) = (latent(base_num_frames), latent(overlap));
            let iterations = 1 + (n - bf - 1) / (bf - ov) + 1;
            let mut chunks = vec![Chunk { frames: bf, prefix: 0, overlap: 0 }];
            for k in 1..iterations {
                chunks.push(Chunk { frames: (n + ov - (k * (bf - ov) + ov)).min(bf), prefix: ov, overlap: ov });
            }
            chunks
        }
        _ => vec![Chunk { frames: n, prefix: 0, overlap: 0 }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worked_example_and_one_chunk() {
        // pipeline/df-a: 45 frames → 12 latent, chunks of 21 (6), overlap 5 (2), blocks of 2.
        let p = ChunkPlan::new(45, 21, Some(5), 2).unwrap();
        let c = |frames, prefix| Chunk { frames, prefix, overlap: prefix };
        assert_eq!(p.chunks, vec![c(6, 0), c(6, 2), c(4, 2)]);
        assert_eq!(p.latent_frames, 12);
        // README-df.md: 7, 5 and 3 iterations (3 steps, ar_step 2).
        assert_eq!(p.chunks.iter().map(|c| iterations(3, c.frames, c.prefix, 2, 2)).collect::<Vec<_>>(), vec![7, 5, 3]);
        // No overlap, or a video no longer than a chunk: one chunk of every latent frame.
        assert_eq!(ChunkPlan::new(45, 21, None, 1).unwrap().chunks, vec![c(12, 0)]);
        assert_eq!(ChunkPlan::new(17, 21, Some(5), 1).unwrap().chunks, vec![c(5, 0)]);
    }

    #[test]
    fn chunks_cover_the_video_and_misfits_are_refused() {
        for (frames, base, overlap, block) in [(257, 97, 17, 1), (961, 97, 17, 1), (257, 97, 17, 5), (77, 37, 13, 2)] {
            let p = ChunkPlan::new(frames, base, Some(overlap), block).unwrap();
            assert_eq!(p.chunks.iter().map(Chunk::new_frames).sum::<usize>(), p.latent_frames, "{frames} {base} {overlap}");
            assert!(p.chunks.iter().all(|c| c.frames <= latent(base) && c.frames > c.overlap));
        }
        assert!(ChunkPlan::new(45, 21, Some(5), 4).unwrap_err().to_string().contains("overlap_history"));
        assert!(ChunkPlan::new(45, 21, Some(21), 1).unwrap_err().to_string().contains("overlap_history"));
        assert!(ChunkPlan::new(45, 17, Some(5), 5).is_err());
        // A minute at 16 fps with SkyReels' async settings leaves a last chunk of 21 latent
        // frames: refused, naming the frame count that fits.
        let err = ChunkPlan::new(961, 97, Some(17), 5).unwrap_err().to_string();
        assert!(err.contains("num_frames") && err.contains("21 latent frames") && err.contains("977 frames fit"), "{err}");
        assert!(ChunkPlan::new(977, 97, Some(17), 5).is_ok());
    }

    /// Image-to-video: the first chunk's first latent frame is the image's, a prefix that stays
    /// in the video (no overlap), so the first chunk runs the iterations of one frame fewer; the
    /// later chunks are unchanged. Blocks of more than one frame are refused.
    #[test]
    fn an_image_is_the_first_chunks_prefix() {
        let plain = ChunkPlan::new(257, 97, Some(17), 1).unwrap();
        let image = plain.clone().with_image().unwrap();
        assert_eq!((image.start, plain.start, image.input_prefix(), plain.input_prefix()), (Start::Image, Start::Noise, 1, 0));
        assert_eq!(image.repeated_frames(), 0, "the image's frame is the video's first");
        assert_eq!(image.chunks[0], Chunk { frames: 25, prefix: 1, overlap: 0 });
        assert_eq!(image.chunks[1..], plain.chunks[1..]);
        assert_eq!(image.chunks.iter().map(Chunk::new_frames).sum::<usize>(), image.latent_frames, "the image's frame is a frame of the video");
        assert_eq!(iterations(30, 25, 1, 1, 5), 30 + 23 * 5);
        assert_eq!(image.total_iterations(30, 5) + 5, plain.total_iterations(30, 5));
        let err = ChunkPlan::new(257, 97, Some(17), 5).unwrap().with_image().unwrap_err().to_string();
        assert!(err.contains("causal_block_size") && err.contains("blocks of 1"), "{err}");
        assert!(ChunkPlan::new(1, 97, Some(17), 1).unwrap().with_image().unwrap_err().to_string().contains("num_frames"));
        assert_eq!(ChunkPlan::new(5, 97, Some(17), 1).unwrap().with_image().unwrap().chunks, vec![Chunk { frames: 2, prefix: 1, overlap: 0 }]);
    }

    /// Video extension, as diffusers' video-to-video pipeline cuts it (pipeline/df-v2v-a: 37
    /// frames, chunks of 21 overlapping by 5, blocks of 2): the chunks of text-to-video, the first
    /// starting from the history's 2 latent frames, which stay in the video; its decode's first
    /// 5 frames repeat the input's last 5.
    #[test]
    fn an_input_videos_history_is_the_first_chunks_prefix() {
        let plain = ChunkPlan::new(37, 21, Some(5), 2).unwrap();
        let ext = plain.clone().extending(5).unwrap();
        assert_eq!(ext.chunks, vec![Chunk { frames: 6, prefix: 2, overlap: 0 }, Chunk { frames: 6, prefix: 2, overlap: 2 }]);
        assert_eq!((ext.start, ext.input_prefix(), ext.repeated_frames(), ext.latent_frames), (Start::Video, 2, 5, 10));
        assert_eq!(ext.chunks.iter().map(Chunk::new_frames).sum::<usize>(), ext.latent_frames, "the history's latent frames stay in the video");
        assert_eq!(ext.total_iterations(3, 2), 5 + 5, "README-df.md: 2 new blocks, 3 + 2 iterations each chunk");
        // SkyReels' own settings: a minute continued from 17 frames (5 latent), one frame per block.
        let minute = ChunkPlan::new(961, 97, Some(17), 1).unwrap().extending(17).unwrap();
        assert_eq!((minute.chunks[0].prefix, minute.repeated_frames()), (5, 17));
        // The first chunk must make frames after the history; the history must be whole blocks.
        let short = ChunkPlan::new(17, 97, Some(17), 1).unwrap().extending(17).unwrap_err().to_string();
        assert!(short.contains("num_frames") && short.contains("at least 21 frames"), "{short}");
        assert!(ChunkPlan::new(21, 97, Some(17), 1).unwrap().extending(17).is_ok());
        assert!(ChunkPlan::new(37, 21, Some(5), 2).unwrap().extending(9).unwrap_err().to_string().contains("overlap_history"));
        let settings = ForcingSettings { base_num_frames: 21, overlap_history: 5, ar_step: 2, causal_block_size: 2, addnoise_condition: 20.0, fps: 24 };
        assert_eq!(settings.check(37, 3, 1000, Start::Video).unwrap(), ext);
        let err = settings.check(5, 3, 1000, Start::Video).unwrap_err().to_string();
        assert!(err.contains("num_frames"), "{err}");
    }
}
