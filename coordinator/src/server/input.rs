//! A request's input video (video-to-video): decoded and resized to the size the model generates
//! at (the request's, rounded up to the model's multiple) by the coordinator, once, at admission:
//! after the queue-full check and before the job is queued, within the decoding budgets of
//! [`InputLimits`] and with at most [`MAX_CONCURRENT_DECODES`] videos decoding at once. The job
//! keeps the 8-bit frames it sends the workers, not the compressed bytes.

use crate::request::ValidRequest;
use crate::video::input::{prepare_video, FrameSelection, InputLimits};
use crate::CoordinatorError;
use std::sync::Arc;
use tessera_cluster::{codec, Tensor};

/// Input videos decoded at once (each on a blocking thread, its memory bounded by the budget):
/// a burst of requests waits its turn instead of multiplying the coordinator's peak memory.
pub const MAX_CONCURRENT_DECODES: usize = 2;

/// The request's input video as `[1, 3, F, H, W]` in [−1, 1] (F = the request's frame count),
/// or `None` for text-to-video. Errors name `input_video` (or `num_frames` when the video is
/// shorter than the request).
pub fn prepare_request_video(valid: &ValidRequest) -> Result<Option<Tensor>, CoordinatorError> {
    let request = &valid.request;
    if request.input_video.is_empty() {
        return Ok(None);
    }
    // Resized to the size the model generates at (the output is cropped back to the request's).
    let (height, width) = valid.spec.generated_size();
    let prepared =
        prepare_video(&request.input_video, width as usize, height as usize, FrameSelection::First(request.num_frames as usize), &InputLimits::default())?;
    Ok(Some(prepared.video))
}

/// Decodes the request's input video (if any) into `valid.video`, on a blocking thread once one
/// of the [`MAX_CONCURRENT_DECODES`] permits is free, and drops its bytes from the request.
pub async fn prepare_request_video_blocking(valid: &mut ValidRequest, permits: &tokio::sync::Semaphore) -> Result<(), CoordinatorError> {
    if valid.request.input_video.is_empty() {
        return Ok(());
    }
    let _permit = permits.acquire().await.map_err(|_| CoordinatorError::Unavailable("the server is shutting down".into()))?;
    let job = valid.clone();
    let frames = tokio::task::spawn_blocking(move || {
        prepare_request_video(&job)?.map(|video| codec::input_frames_message(&video).map_err(CoordinatorError::from)).transpose()
    })
    .await
    .map_err(|e| CoordinatorError::Internal(format!("the video decoding thread failed: {e}")))??;
    valid.video = frames.map(Arc::new);
    valid.request.input_video = Vec::new();
    Ok(())
}
