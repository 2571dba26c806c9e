//! A request's input video (video-to-video): decoded and resized to the size the model generates
//! at (the request's, rounded up to the model's multiple) by the coordinator, once at admission to refuse garbage with INVALID_ARGUMENT before the job is
//! accepted, and again when the job runs (queued jobs keep only the compressed bytes).

use crate::request::ValidRequest;
use crate::video::input::{prepare_video, FrameSelection, InputLimits};
use crate::CoordinatorError;
use tessera_cluster::Tensor;

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

/// [`prepare_request_video`] on a blocking thread (decoding takes a while).
pub async fn prepare_request_video_blocking(valid: &ValidRequest) -> Result<Option<Tensor>, CoordinatorError> {
    if valid.request.input_video.is_empty() {
        return Ok(None);
    }
    let valid = valid.clone();
    tokio::task::spawn_blocking(move || prepare_request_video(&valid))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("the video decoding thread failed: {e}")))?
}
