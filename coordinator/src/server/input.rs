//! A request's input video (Wan's video-to-video: its first `num_frames` frames; a
//! diffusion-forcing extension: every frame, served before the continuation, whose last
//! `overlap_history` go to the workers): decoded and resized to the size the model generates at
//! (the request's, rounded up to the model's multiple) by the coordinator, once, at admission:
//! after the queue-full check and before the job is queued, within the decoding budgets of
//! [`InputLimits`] and with at most [`MAX_CONCURRENT_DECODES`] videos decoding at once. The job
//! keeps the 8-bit frames it sends the workers, not the compressed bytes.

use super::queue::Admit;
use crate::request::ValidRequest;
use crate::video::input::{prepare_video, FrameSelection, InputLimits};
use crate::CoordinatorError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tessera_proto::worker::v1::InputFrames;

/// Input videos decoded at once (each on a blocking thread, its memory bounded by the budget):
/// a burst of requests waits its turn instead of multiplying the coordinator's peak memory.
pub const MAX_CONCURRENT_DECODES: usize = 2;

/// The request's input video as the job keeps it (at the generated size: for Wan's
/// video-to-video the request's frame count, for an extension every frame), or `None` without
/// one. Errors name `input_video` (or `num_frames` when the video is shorter than the request).
pub fn prepare_request_video(valid: &ValidRequest) -> Result<Option<InputFrames>, CoordinatorError> {
    if valid.request.input_video.is_empty() {
        return Ok(None);
    }
    decode(&valid.request.input_video, frame_size(valid)).map(Some)
}

/// What the frames are decoded to: the size the model generates at (the output is cropped back
/// to the request's), the frames wanted, and the fewest an extension needs (its history).
#[derive(Clone, Copy)]
struct FrameSize {
    width: u32,
    height: u32,
    selection: FrameSelection,
    history: u32,
}

fn frame_size(valid: &ValidRequest) -> FrameSize {
    let (height, width) = valid.spec.generated_size();
    match valid.spec.extension_history() {
        Some(history) => FrameSize { width, height, selection: FrameSelection::All, history },
        None => FrameSize { width, height, selection: FrameSelection::First(valid.spec.request().num_frames as usize), history: 0 },
    }
}

fn decode(bytes: &[u8], size: FrameSize) -> Result<InputFrames, CoordinatorError> {
    let prepared = prepare_video(bytes, size.width as usize, size.height as usize, size.selection, &InputLimits::default())?;
    if prepared.frames < size.history as usize {
        return Err(CoordinatorError::input_video(
            crate::error::InputVideoProblem::TooFewFrames,
            format!("has {} frames; it is extended from its last overlap_history = {} frames", prepared.frames, size.history),
        ));
    }
    Ok(InputFrames { frames: prepared.frames as u32, width: size.width, height: size.height, rgb: prepared.rgb })
}

/// What the workers are sent of the job's input `frames`: all of them (Wan's video-to-video), or
/// an extension's history, its last `overlap_history` frames.
pub fn frames_for_workers(spec: &tessera_cluster::JobSpec, frames: &InputFrames) -> InputFrames {
    match spec.extension_history() {
        Some(history) => {
            let keep = history.min(frames.frames);
            let frame = 3 * frames.width as usize * frames.height as usize;
            let rgb = frames.rgb[(frames.frames - keep) as usize * frame..].to_vec();
            InputFrames { frames: keep, width: frames.width, height: frames.height, rgb }
        }
        None => frames.clone(),
    }
}

/// Decodes the request's input video (if any) into `valid.video`, on a blocking thread once one
/// of the [`MAX_CONCURRENT_DECODES`] permits is free, and takes its bytes out of the request:
/// they are returned (empty without a video), for the state store to keep or for dropping.
pub async fn prepare_request_video_blocking(valid: &mut ValidRequest, permits: &tokio::sync::Semaphore) -> Result<Vec<u8>, CoordinatorError> {
    if valid.request.input_video.is_empty() {
        return Ok(Vec::new());
    }
    let _permit = permits.acquire().await.map_err(|_| CoordinatorError::Unavailable("the server is shutting down".into()))?;
    // The bytes move to the decoding thread (no copy); the request keeps none of them.
    let (bytes, size) = (std::mem::take(&mut valid.request.input_video), frame_size(valid));
    let (frames, bytes) = tokio::task::spawn_blocking(move || (decode(&bytes, size), bytes))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("the video decoding thread failed: {e}")))?;
    valid.video = Some(Arc::new(frames?));
    Ok(bytes)
}

/// The decoded input frames that accepted jobs hold (queued or running), bounded in bytes: past
/// the bound a new video job is refused with RESOURCE_EXHAUSTED (retry later) instead of
/// growing the coordinator's memory with its queue.
#[derive(Debug)]
pub struct HeldInput {
    bytes: AtomicU64,
    limit: u64,
}

/// One job's share of [`HeldInput`], given back when dropped (when its driver ends).
#[derive(Debug)]
pub struct HeldShare {
    pool: Arc<HeldInput>,
    bytes: u64,
}

impl HeldInput {
    /// A pool of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { bytes: AtomicU64::new(0), limit })
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Takes `bytes` for a job. A video larger than the whole pool can never run here: that is
    /// the request's fault (INVALID_ARGUMENT naming `input_video`); a full pool is RESOURCE_EXHAUSTED.
    /// A job accepted before (resumed after a restart) takes its bytes whatever the pool holds:
    /// it held them before the restart, and nothing accepted is lost.
    pub fn take(self: &Arc<Self>, bytes: u64, admit: Admit) -> Result<HeldShare, CoordinatorError> {
        if admit != Admit::New {
            self.bytes.fetch_add(bytes, Ordering::SeqCst);
            return Ok(HeldShare { pool: self.clone(), bytes });
        }
        if bytes > self.limit {
            return Err(CoordinatorError::input_video(
                crate::error::InputVideoProblem::TooLarge,
                format!("its frames take {bytes} bytes decoded; this server holds at most {} bytes of input frames", self.limit),
            ));
        }
        self.bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| (held + bytes <= self.limit).then_some(held + bytes))
            .map_err(|held| CoordinatorError::InputFramesFull { held, wanted: bytes, limit: self.limit })?;
        Ok(HeldShare { pool: self.clone(), bytes })
    }
}

impl Drop for HeldShare {
    fn drop(&mut self) {
        self.pool.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_frames_are_bounded_and_given_back() {
        let pool = HeldInput::new(100);
        let a = pool.take(60, Admit::New).unwrap();
        let full = pool.take(50, Admit::New).unwrap_err();
        assert!(matches!(full, CoordinatorError::InputFramesFull { held: 60, wanted: 50, limit: 100 }), "{full}");
        assert_eq!(tonic::Status::from(full).code(), tonic::Code::ResourceExhausted);
        let never = pool.take(101, Admit::New).unwrap_err();
        assert_eq!(tonic::Status::from(never).code(), tonic::Code::InvalidArgument, "a video larger than the pool is the request's fault");
        drop(a);
        assert_eq!(pool.held(), 0);
        let b = pool.take(100, Admit::New).unwrap();
        assert_eq!(pool.held(), 100);
        // A job accepted before a restart takes its frames past the bound; they count, and are
        // given back.
        let resumed = pool.take(150, Admit::Accepted).unwrap();
        assert_eq!(pool.held(), 250);
        assert!(pool.take(1, Admit::New).is_err(), "new jobs still wait for room");
        drop((b, resumed));
        assert_eq!(pool.held(), 0);
    }
}
