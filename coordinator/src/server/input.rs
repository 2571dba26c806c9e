//! A request's input video (video-to-video): decoded and resized to the request's size by the
//! coordinator, once at admission to refuse garbage with INVALID_ARGUMENT before the job is
//! accepted, and again when the job runs (queued jobs keep only the compressed bytes).

use crate::video::input::{prepare_video, FrameSelection, InputLimits};
use crate::CoordinatorError;
use tessera_cluster::Tensor;
use tessera_proto::v1::GenerateRequest;

/// The request's input video as `[1, 3, F, H, W]` in [−1, 1] (F = the request's frame count),
/// or `None` for text-to-video. Errors name `input_video` (or `num_frames` when the video is
/// shorter than the request).
pub fn prepare_request_video(request: &GenerateRequest) -> Result<Option<Tensor>, CoordinatorError> {
    if request.input_video.is_empty() {
        return Ok(None);
    }
    let prepared = prepare_video(
        &request.input_video,
        request.width as usize,
        request.height as usize,
        FrameSelection::First(request.num_frames as usize),
        &InputLimits::default(),
    )?;
    Ok(Some(prepared.video))
}

/// [`prepare_request_video`] on a blocking thread (decoding takes a while).
pub async fn prepare_request_video_blocking(request: &GenerateRequest) -> Result<Option<Tensor>, CoordinatorError> {
    if request.input_video.is_empty() {
        return Ok(None);
    }
    let request = request.clone();
    tokio::task::spawn_blocking(move || prepare_request_video(&request))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("the video decoding thread failed: {e}")))?
}
