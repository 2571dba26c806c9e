//! An input video prepared for the Wan video-to-video pipeline, as diffusers'
//! `WanVideoToVideoPipeline` preprocesses it: every frame resized to the output size (stretched,
//! Lanczos-3 as PIL, see [`super::Resizer`]) and rounded to 8 bits, as the resized PIL images
//! are; the frames are kept as interleaved 8-bit RGB, the form they travel to the workers in
//! (each frame is rounded as soon as it is resized, so the peak is the 8-bit video).
//!
//! Frame count: the VAE takes 4k+1 frames. Either the caller asks for exactly F frames (the first
//! F of the input, which must have that many), or the longest 4k+1 prefix of the input is used
//! (the largest 4k+1 not above the frames available; the rest are dropped), or every frame (a
//! video to extend, which is served whole before its continuation). Frames are taken in order at
//! the input's own rate: there is no temporal resampling.

use super::{InputInfo, InputLimits, Resizer, VideoReader};
use crate::error::InputVideoProblem;
use crate::video::VideoSpec;
use crate::{CoordinatorError, Result};

/// Which frames of the input to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameSelection {
    /// The first `n` frames; the input must have at least `n`.
    First(usize),
    /// The longest prefix of 4k+1 frames (at most [`InputLimits::max_frames`] are read).
    Longest,
    /// Every frame; a video longer than [`InputLimits::max_frames`] is refused.
    All,
}

/// An input video ready to be sent to the workers (`InputFrames`).
#[derive(Clone, Debug)]
pub struct PreparedVideo {
    /// F frames of `height` rows of `width` RGB pixels, interleaved, 8 bits each.
    pub rgb: Vec<u8>,
    /// F.
    pub frames: usize,
    /// What the input was.
    pub source: InputInfo,
    /// Frames decoded from the input (at least F).
    pub frames_read: usize,
}

/// The largest 4k+1 not above `available` (`None` for no frame).
pub fn frames_for(available: usize) -> Option<usize> {
    (available >= 1).then(|| (available - 1) / 4 * 4 + 1)
}

fn too_few(detail: String) -> CoordinatorError {
    CoordinatorError::input_video(InputVideoProblem::TooFewFrames, detail)
}

/// Decodes `bytes` (format sniffed), takes the frames `selection` asks for, resizes each to
/// `width`×`height` and rounds it to 8-bit interleaved RGB.
pub fn prepare_video(bytes: &[u8], width: usize, height: usize, selection: FrameSelection, limits: &InputLimits) -> Result<PreparedVideo> {
    for (field, side) in [("width", width), ("height", height)] {
        if side == 0 || side > VideoSpec::MAX_SIDE as usize {
            return Err(CoordinatorError::InvalidArgument { field, detail: format!("{side} is outside 1..={}", VideoSpec::MAX_SIDE) });
        }
    }
    if selection == FrameSelection::First(0) {
        return Err(CoordinatorError::InvalidArgument { field: "num_frames", detail: "at least one frame is needed".into() });
    }
    let mut reader = VideoReader::open(bytes, *limits)?;
    let source = *reader.info();
    let wanted = match selection {
        FrameSelection::First(n) => {
            if let Some(declared) = source.declared_frames.filter(|&d| d < n) {
                return Err(too_few(format!("the {} declares {declared} frames, {n} are needed", source.format.name())));
            }
            n
        }
        FrameSelection::Longest | FrameSelection::All => limits.max_frames,
    };
    // What the needed frames cost, known from the headers: a video whose decoding would blow the
    // budget is refused before a single frame is decoded (a GIF of a few hundred bytes can
    // declare hundreds of 4096x4096 frames).
    let needed = source.declared_frames.map_or(wanted, |d| d.min(wanted)) as u64;
    let decoded = needed.saturating_mul(source.width as u64 * source.height as u64);
    if decoded > limits.max_decoded_pixels {
        return Err(CoordinatorError::input_video(
            InputVideoProblem::TooLarge,
            format!("{needed} frames of {}x{} would decode {decoded} pixels, over the budget of {}", source.width, source.height, limits.max_decoded_pixels),
        ));
    }
    let resizer = Resizer::new(source.width as usize, source.height as usize, width, height)?;
    let plane = width * height;
    let mut rgb = Vec::new();
    let mut frames_read = 0;
    while frames_read < wanted {
        // The resized frames count against the same pixel budget as the decoded ones.
        if (frames_read as u64 + 1) * plane as u64 > limits.max_decoded_pixels {
            return Err(CoordinatorError::input_video(
                InputVideoProblem::TooLarge,
                format!("{} frames of {width}x{height} exceed the budget of {} pixels", frames_read + 1, limits.max_decoded_pixels),
            ));
        }
        let Some(frame) = reader.next_frame()? else { break };
        let resized = resizer.resize(&frame)?;
        // Rounded to 8 bits, as the resized PIL images upstream's pipeline normalises (and as
        // the frames travel to the workers): every path sees the same input.
        rgb.reserve(3 * plane);
        for p in 0..plane {
            for c in 0..3 {
                rgb.push((resized[c * plane + p].clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        frames_read += 1;
    }
    let f = match selection {
        FrameSelection::First(n) if frames_read < n => {
            let why = if reader.stopped_at_limit() { format!(" (at most {} frames are read)", limits.max_frames) } else { String::new() };
            return Err(too_few(format!("{frames_read} frames could be read, {n} are needed{why}")));
        }
        FrameSelection::First(n) => n,
        FrameSelection::Longest => frames_for(frames_read).ok_or_else(|| too_few("the video has no frame".into()))?,
        FrameSelection::All if reader.stopped_at_limit() && source.declared_frames.is_none_or(|d| d > frames_read) => {
            return Err(CoordinatorError::input_video(
                InputVideoProblem::TooLarge,
                format!("has more than {frames_read} frames, the most read; it is used whole, so it must not be longer"),
            ));
        }
        FrameSelection::All if frames_read == 0 => return Err(too_few("the video has no frame".into())),
        FrameSelection::All => frames_read,
    };
    rgb.truncate(3 * f * plane);
    rgb.shrink_to_fit();
    Ok(PreparedVideo { rgb, frames: f, source, frames_read })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counts_follow_the_4k_plus_1_rule() {
        let cases =
            [(0, None), (1, Some(1)), (4, Some(1)), (5, Some(5)), (8, Some(5)), (9, Some(9)), (12, Some(9)), (81, Some(81)), (84, Some(81)), (85, Some(85))];
        for (available, want) in cases {
            assert_eq!(frames_for(available), want, "{available}");
        }
    }
}
