//! Video input for video-to-video: an input video's bytes — MP4 with H.264, animated GIF, PNG or
//! APNG, told apart by their leading bytes, never by a file name — decoded one frame at a time
//! into planar RGB float32 in [0, 1] ([`VideoReader`]), then prepared for the pipeline
//! ([`prepare_video`]: resized, cut to 4k+1 frames, mapped to [−1, 1], `[1, 3, F, H, W]`).
//!
//! Input may be hostile. Nothing here panics on bad bytes or allocates more than the
//! [`InputLimits`] allow: frame sides are checked before any frame is decoded (for H.264 from
//! the sequence parameter sets, which are checked again wherever they occur in the stream), at
//! most `max_frames` frames are read, and the pixels decoded in all are budgeted. Every problem is
//! a [`CoordinatorError::InvalidInputVideo`] saying what is wrong.
//!
//! Transparent pixels (GIF, PNG, APNG) are composed over black.

mod bytes;
mod canvas;
mod gif;
mod h264;
mod mp4;
mod png;
mod prepare;
mod resize;
mod sps;
mod yuv;

#[cfg(test)]
mod round_trip_tests;

pub use prepare::{frames_for, prepare_video, FrameSelection, PreparedVideo};
pub use resize::Resizer;

use crate::error::InputVideoProblem;
use crate::{CoordinatorError, Result};

/// The input formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputFormat {
    /// ISO base media file (MP4, MOV) with an H.264 video track.
    Mp4,
    /// GIF, animated or not.
    Gif,
    /// PNG, or animated PNG (APNG).
    Png,
}

impl InputFormat {
    /// Short name (`mp4`, `gif`, `png`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mp4 => "mp4",
            Self::Gif => "gif",
            Self::Png => "png",
        }
    }

    /// The format of `bytes` from their signature: `GIF87a`/`GIF89a`, the 8-byte PNG signature,
    /// or an ISO-BMFF box (`ftyp`, `moov`, `mdat`, `free`, `skip`, `wide`) at the start.
    pub fn sniff(bytes: &[u8]) -> Result<Self> {
        const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
        const BOXES: [&[u8; 4]; 6] = [b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"];
        if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Ok(Self::Gif)
        } else if bytes.starts_with(PNG) {
            Ok(Self::Png)
        } else if bytes.len() >= 8 && BOXES.iter().any(|b| &bytes[4..8] == *b) {
            Ok(Self::Mp4)
        } else if bytes.is_empty() {
            Err(CoordinatorError::input_video(InputVideoProblem::UnknownFormat, "is empty"))
        } else {
            let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(CoordinatorError::input_video(InputVideoProblem::UnknownFormat, format!("starts with {head}, which is no MP4, GIF or PNG signature")))
        }
    }
}

/// Bounds on the work and memory of decoding one input video.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputLimits {
    /// Widest frame accepted, in pixels (for H.264 the coded width).
    pub max_width: u32,
    /// Tallest frame accepted, in pixels (for H.264 the coded height).
    pub max_height: u32,
    /// Most frames read: a longer video is read up to here and no further.
    pub max_frames: usize,
    /// Most pixels decoded in all (frames × width × height), a bound on decoding time;
    /// [`prepare_video`] counts its resized frames against it too, a bound on memory, and refuses
    /// before decoding anything when the frames it needs would exceed it.
    pub max_decoded_pixels: u64,
    /// Longest the decoding of one video may take (checked before each frame and after the
    /// headers): a bound on the CPU time one request can cost.
    pub max_seconds: std::time::Duration,
}

impl Default for InputLimits {
    /// 4096×4096 frames, the default limit's frames (`Limits::max_frames`), 2³⁰ pixels in all
    /// (about 500 1080p frames or 2,600 frames of 832×480; about 4 GiB of frames in f32 at the
    /// peak), and 10 seconds.
    fn default() -> Self {
        Self {
            max_width: 4096,
            max_height: 4096,
            max_frames: crate::request::Limits::default().max_frames as usize,
            max_decoded_pixels: 1 << 30,
            max_seconds: std::time::Duration::from_secs(10),
        }
    }
}

impl InputLimits {
    /// Checks a frame size against the side limits (zero sides are corrupt).
    pub(crate) fn check_size(&self, what: &str, width: u64, height: u64) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(CoordinatorError::input_video(InputVideoProblem::Corrupt, format!("{what} is {width}x{height}")));
        }
        if width > self.max_width as u64 || height > self.max_height as u64 {
            return Err(CoordinatorError::input_video(
                InputVideoProblem::TooLarge,
                format!("{what} is {width}x{height}, at most {}x{} is accepted", self.max_width, self.max_height),
            ));
        }
        Ok(())
    }
}

/// What an input video is, known before its frames are decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputInfo {
    /// The container format.
    pub format: InputFormat,
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Frames per second, when the file says: MP4 from its sample durations, GIF from the mean
    /// frame delay, APNG from the first frame's delay; `None` for a still PNG or zero delays.
    pub fps: Option<f64>,
    /// Frames the container declares (MP4 sample count, APNG frame count, 1 for a still PNG,
    /// the frames a GIF holds); `None` for a GIF longer than `max_frames`.
    pub declared_frames: Option<usize>,
}

/// One format's frame decoder.
enum Source<'a> {
    Mp4(Box<mp4::Mp4Source<'a>>),
    Gif(Box<gif::GifSource<'a>>),
    Png(Box<png::PngSource<'a>>),
}

/// Decodes an input video frame by frame: each frame is planar RGB `[3, H, W]` in [0, 1], all of
/// [`InputInfo::width`] × [`InputInfo::height`].
pub struct VideoReader<'a> {
    info: InputInfo,
    limits: InputLimits,
    source: Source<'a>,
    frames_read: usize,
    pixels_decoded: u64,
    stopped_at_limit: bool,
    started: std::time::Instant,
}

impl<'a> VideoReader<'a> {
    /// Opens `bytes` (format sniffed): reads the headers and checks the frame size; decodes no
    /// frame yet.
    pub fn open(bytes: &'a [u8], limits: InputLimits) -> Result<Self> {
        let started = std::time::Instant::now();
        let format = InputFormat::sniff(bytes)?;
        let (source, info) = match format {
            InputFormat::Mp4 => {
                let s = mp4::Mp4Source::open(bytes, &limits)?;
                let info = s.info();
                (Source::Mp4(Box::new(s)), info)
            }
            InputFormat::Gif => {
                let s = gif::GifSource::open(bytes, &limits)?;
                let info = s.info();
                (Source::Gif(Box::new(s)), info)
            }
            InputFormat::Png => {
                let s = png::PngSource::open(bytes, &limits)?;
                let info = s.info();
                (Source::Png(Box::new(s)), info)
            }
        };
        let reader = Self { info, limits, source, frames_read: 0, pixels_decoded: 0, stopped_at_limit: false, started };
        reader.check_time()?;
        Ok(reader)
    }

    /// Refuses to go on once decoding has taken [`InputLimits::max_seconds`].
    fn check_time(&self) -> Result<()> {
        let spent = self.started.elapsed();
        if spent > self.limits.max_seconds {
            return Err(CoordinatorError::input_video(
                InputVideoProblem::TooLarge,
                format!("decoding took {:.1} s after {} frames, over the budget of {:?}", spent.as_secs_f64(), self.frames_read, self.limits.max_seconds),
            ));
        }
        Ok(())
    }

    /// What the video is.
    pub fn info(&self) -> &InputInfo {
        &self.info
    }

    /// Frames returned so far.
    pub fn frames_read(&self) -> usize {
        self.frames_read
    }

    /// Whether reading stopped at [`InputLimits::max_frames`] rather than at the end.
    pub fn stopped_at_limit(&self) -> bool {
        self.stopped_at_limit
    }

    /// The next frame, planar RGB `[3, H, W]` in [0, 1]; `None` at the end of the video or once
    /// `max_frames` frames were read. A frame beyond the pixel budget is an error.
    pub fn next_frame(&mut self) -> Result<Option<Vec<f32>>> {
        if self.frames_read >= self.limits.max_frames {
            self.stopped_at_limit = true;
            return Ok(None);
        }
        self.check_time()?;
        let pixels = self.info.width as u64 * self.info.height as u64;
        if self.pixels_decoded + pixels > self.limits.max_decoded_pixels {
            return Err(CoordinatorError::input_video(
                InputVideoProblem::TooLarge,
                format!(
                    "decoding frame {} of {}x{} would exceed the budget of {} decoded pixels",
                    self.frames_read, self.info.width, self.info.height, self.limits.max_decoded_pixels
                ),
            ));
        }
        self.pixels_decoded += pixels;
        let frame = match &mut self.source {
            Source::Mp4(s) => s.next_frame()?,
            Source::Gif(s) => s.next_frame()?,
            Source::Png(s) => s.next_frame()?,
        };
        if let Some(f) = &frame {
            let want = 3 * pixels as usize;
            if f.len() != want {
                return Err(CoordinatorError::input_video(
                    InputVideoProblem::Corrupt,
                    format!("frame {} has {} values, expected {want}", self.frames_read, f.len()),
                ));
            }
            self.frames_read += 1;
        }
        Ok(frame)
    }
}

/// The error of damaged data, prefixed with the format.
pub(crate) fn corrupt(format: &str, detail: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::input_video(InputVideoProblem::Corrupt, format!("{format}: {detail}"))
}

/// The error of content that cannot be decoded here, prefixed with the format.
pub(crate) fn unsupported(format: &str, detail: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::input_video(InputVideoProblem::Unsupported, format!("{format}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_sniffed_from_the_leading_bytes() {
        assert_eq!(InputFormat::sniff(b"GIF89a....").unwrap(), InputFormat::Gif);
        assert_eq!(InputFormat::sniff(b"GIF87a").unwrap(), InputFormat::Gif);
        assert_eq!(InputFormat::sniff(b"\x89PNG\r\n\x1a\n\0\0").unwrap(), InputFormat::Png);
        assert_eq!(InputFormat::sniff(b"\0\0\0\x20ftypisom").unwrap(), InputFormat::Mp4);
        assert_eq!(InputFormat::sniff(b"\0\0\0\x08wide\0\0").unwrap(), InputFormat::Mp4);
        for bad in [&b""[..], b"GIF8", b"\x89PNG", b"RIFF\0\0\0\0WEBPVP8 ", b"hello, world"] {
            match InputFormat::sniff(bad) {
                Err(CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::UnknownFormat, .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let err = VideoReader::open(b"not a video at all", InputLimits::default()).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("input_video") && msg.contains("no MP4, GIF or PNG signature"), "{msg}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument, "the request's fault");
    }

    #[test]
    fn sizes_are_checked_against_the_limits() {
        let limits = InputLimits { max_width: 100, max_height: 50, ..Default::default() };
        assert!(limits.check_size("frame", 100, 50).is_ok());
        let err = limits.check_size("frame", 101, 50).unwrap_err();
        assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::TooLarge, .. }), "{err}");
        assert!(err.to_string().contains("101x50"), "{err}");
        let err = limits.check_size("frame", 0, 5).unwrap_err();
        assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::Corrupt, .. }), "{err}");
    }
}
