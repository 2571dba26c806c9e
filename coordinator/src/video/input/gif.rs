//! GIF input: frames decoded by the `gif` crate (RGBA, the transparent index as alpha 0,
//! interlacing undone) and composed on the logical screen with their disposal methods.
//! "Restore to background" clears to transparent, as browsers do (the background colour index
//! is ignored); transparent areas end up black. Opening the file first walks its frames without
//! decoding their pixels, for the frame count and the frame rate (from the mean delay).

use super::canvas::{Blend, Canvas, Dispose, Rect};
use super::{corrupt, InputFormat, InputInfo, InputLimits};
use crate::error::InputVideoProblem;
use crate::{CoordinatorError, Result};
use std::num::NonZeroU64;

const FORMAT: &str = "gif";

fn gif_error(e: ::gif::DecodingError) -> CoordinatorError {
    match e {
        ::gif::DecodingError::MemoryLimit => CoordinatorError::input_video(InputVideoProblem::TooLarge, "gif: a frame exceeds the decoding memory limit"),
        e => corrupt(FORMAT, e),
    }
}

/// A frame's placement, read before its pixels.
#[derive(Clone, Copy, Debug)]
struct FrameHeader {
    rect: Rect,
    dispose: Dispose,
}

impl FrameHeader {
    fn of(f: &::gif::Frame<'_>) -> Self {
        let dispose = match f.dispose {
            ::gif::DisposalMethod::Any | ::gif::DisposalMethod::Keep => Dispose::Keep,
            ::gif::DisposalMethod::Background => Dispose::Clear,
            ::gif::DisposalMethod::Previous => Dispose::Restore,
        };
        Self { rect: Rect { x: f.left as u32, y: f.top as u32, w: f.width as u32, h: f.height as u32 }, dispose }
    }
}

/// Frames of a GIF.
pub(super) struct GifSource<'a> {
    decoder: ::gif::Decoder<&'a [u8]>,
    canvas: Canvas,
    info: InputInfo,
    limits: InputLimits,
    /// The first frame's header, read at open.
    first: Option<FrameHeader>,
    pixels: Vec<u8>,
}

/// Decoder options: RGBA output, memory bounded by one largest frame.
fn options(limits: &InputLimits) -> ::gif::DecodeOptions {
    let mut options = ::gif::DecodeOptions::new();
    options.set_color_output(::gif::ColorOutput::RGBA);
    let frame_bytes = 4 * limits.max_width as u64 * limits.max_height as u64;
    options.set_memory_limit(::gif::MemoryLimit::Bytes(NonZeroU64::new(frame_bytes.max(1)).expect("at least 1")));
    options
}

/// Walks the frames (up to `max_frames`) without decoding pixels, checking each frame's size:
/// (frames, total delay in centiseconds, whether the end was reached). Only the frames' headers
/// are read, their data skipped unread: `read_next_frame` would copy it into a buffer reserved
/// from the frame's claimed size, past the memory limit (a 1.6 KB file claiming a 65535 × 65535
/// frame reserved 1 GiB; `coordinator/tests/fuzz_media.rs` found it).
fn scan(bytes: &[u8], limits: &InputLimits) -> Result<(usize, u64, bool)> {
    let mut options = options(limits);
    options.skip_frame_decoding(true);
    let mut decoder = options.read_info(bytes).map_err(gif_error)?;
    let (mut frames, mut delay) = (0usize, 0u64);
    while frames < limits.max_frames {
        match decoder.next_frame_info().map_err(gif_error)? {
            Some(f) => {
                check_frame(f.width, f.height, limits)?;
                frames += 1;
                delay += f.delay as u64;
            }
            None => return Ok((frames, delay, true)),
        }
    }
    Ok((frames, delay, false))
}

/// A frame may overhang the screen; its own size is bounded like a screen's (in pixels).
fn check_frame(w: u16, h: u16, limits: &InputLimits) -> Result<()> {
    if w as u64 * h as u64 > limits.max_width as u64 * limits.max_height as u64 {
        return Err(CoordinatorError::input_video(InputVideoProblem::TooLarge, format!("gif: a {w}x{h} frame exceeds the size limit")));
    }
    Ok(())
}

impl<'a> GifSource<'a> {
    /// Reads the header, checks the screen size, and walks the frames for their count and rate;
    /// decodes no pixels yet.
    pub fn open(bytes: &'a [u8], limits: &InputLimits) -> Result<Self> {
        // The logical screen size follows the 6-byte signature; check it before anything else.
        if let Some(s) = bytes.get(6..10) {
            limits.check_size("the GIF screen", u16::from_le_bytes([s[0], s[1]]) as u64, u16::from_le_bytes([s[2], s[3]]) as u64)?;
        }
        let mut decoder = options(limits).read_info(bytes).map_err(gif_error)?;
        let (width, height) = (decoder.width() as u32, decoder.height() as u32);
        limits.check_size("the GIF screen", width as u64, height as u64)?;
        let (frames, delay, complete) = scan(bytes, limits)?;
        if frames == 0 {
            return Err(corrupt(FORMAT, "the file holds no frame"));
        }
        let fps = (delay > 0).then(|| 100.0 * frames as f64 / delay as f64);
        let first = decoder.next_frame_info().map_err(gif_error)?.map(FrameHeader::of).ok_or_else(|| corrupt(FORMAT, "the file holds no frame"))?;
        let info = InputInfo { format: InputFormat::Gif, width, height, fps, declared_frames: complete.then_some(frames) };
        Ok(Self { decoder, canvas: Canvas::new(width, height), info, limits: *limits, first: Some(first), pixels: Vec::new() })
    }

    /// What the video is.
    pub fn info(&self) -> InputInfo {
        self.info
    }

    /// The next composed frame.
    pub fn next_frame(&mut self) -> Result<Option<Vec<f32>>> {
        let header = match self.first.take() {
            Some(h) => h,
            None => match self.decoder.next_frame_info().map_err(gif_error)? {
                Some(f) => FrameHeader::of(f),
                None => return Ok(None),
            },
        };
        let Rect { w, h, .. } = header.rect;
        check_frame(w as u16, h as u16, &self.limits)?;
        self.pixels.clear();
        self.pixels.resize(4 * w as usize * h as usize, 0);
        self.decoder.read_into_buffer(&mut self.pixels).map_err(gif_error)?;
        self.canvas.draw(header.rect, &self.pixels, Blend::Over, header.dispose).map_err(|e| corrupt(FORMAT, e))?;
        Ok(Some(self.canvas.to_planar_rgb()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A test frame: (left, top, width, height, indices, transparent index, disposal, delay).
    type TestFrame = (u16, u16, u16, u16, Vec<u8>, Option<u8>, ::gif::DisposalMethod, u16);

    /// A GIF with a 4-colour global palette (black, red, green, blue) built frame by frame.
    fn gif(width: u16, height: u16, frames: &[TestFrame]) -> Vec<u8> {
        let palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255];
        let mut out = Vec::new();
        {
            let mut e = ::gif::Encoder::new(&mut out, width, height, &palette).unwrap();
            for (left, top, w, h, indices, transparent, dispose, delay) in frames {
                let f = ::gif::Frame {
                    left: *left,
                    top: *top,
                    width: *w,
                    height: *h,
                    buffer: Cow::Borrowed(indices),
                    transparent: *transparent,
                    dispose: *dispose,
                    delay: *delay,
                    ..Default::default()
                };
                e.write_frame(&f).unwrap();
            }
        }
        out
    }

    fn read_all(bytes: &[u8]) -> (InputInfo, Vec<Vec<f32>>) {
        let mut s = GifSource::open(bytes, &InputLimits::default()).unwrap();
        let frames = std::iter::from_fn(|| s.next_frame().unwrap()).collect();
        (s.info(), frames)
    }

    /// (r, g, b) of pixel `i` of a planar frame of `n` pixels, as 0–255.
    fn rgb(frame: &[f32], n: usize, i: usize) -> [u8; 3] {
        [0, 1, 2].map(|c| (frame[c * n + i] * 255.0).round() as u8)
    }

    #[test]
    fn frames_are_composed_with_their_disposal() {
        use ::gif::DisposalMethod::{Background, Keep, Previous};
        // 3×1 screen. Frame 0: red everywhere. Frame 1: green at x = 1, disposed to previous.
        // Frame 2: a transparent-or-blue 2-pixel frame at x = 1 (x = 1 transparent), disposed to
        // background. Frame 3: one black pixel at x = 0.
        let bytes = gif(
            3,
            1,
            &[
                (0, 0, 3, 1, vec![1, 1, 1], None, Keep, 10),
                (1, 0, 1, 1, vec![2], None, Previous, 10),
                (1, 0, 2, 1, vec![0, 3], Some(0), Background, 10),
                (0, 0, 1, 1, vec![0], None, Keep, 10),
            ],
        );
        let (info, frames) = read_all(&bytes);
        assert_eq!((info.width, info.height, info.fps, info.declared_frames), (3, 1, Some(10.0), Some(4)));
        let px = |f: usize, i: usize| rgb(&frames[f], 3, i);
        let (red, green, blue, black) = ([255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]);
        assert_eq!([px(0, 0), px(0, 1), px(0, 2)], [red, red, red]);
        assert_eq!([px(1, 0), px(1, 1), px(1, 2)], [red, green, red]);
        assert_eq!([px(2, 0), px(2, 1), px(2, 2)], [red, red, blue], "green restored; transparent shows it");
        assert_eq!([px(3, 0), px(3, 1), px(3, 2)], [black, black, black], "frame 2's area cleared to transparent (black)");
        assert_eq!(frames.len(), 4);
    }

    #[test]
    fn bad_gifs_are_errors() {
        use ::gif::DisposalMethod::Keep;
        let bytes = gif(4, 4, &[(0, 0, 4, 4, vec![1; 16], None, Keep, 0)]);
        let (info, _) = read_all(&bytes);
        assert_eq!(info.fps, None, "a zero delay gives no frame rate");
        let small = InputLimits { max_width: 3, ..Default::default() };
        let err = GifSource::open(&bytes, &small).err().unwrap();
        assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::TooLarge, .. }), "{err}");
        // No frame at all: header, screen and palette, then the trailer or nothing.
        let mut empty = gif(4, 4, &[]);
        for _ in 0..2 {
            let err = GifSource::open(&empty, &InputLimits::default()).err().unwrap();
            assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::Corrupt, .. }), "{err}");
            empty.push(b';');
        }
        // A frame far larger than the screen and the limits is refused by the walk at open, before
        // any of its data is read.
        let huge = gif(4, 4, &[(0, 0, 10, 10, vec![1; 100], None, Keep, 5)]);
        let err = GifSource::open(&huge, &InputLimits { max_width: 8, max_height: 8, ..Default::default() }).err().unwrap();
        assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::TooLarge, .. }), "{err}");
        assert!(err.to_string().contains("a 10x10 frame"), "{err}");
        // Truncated in the pixel data.
        let cut = GifSource::open(&bytes[..bytes.len() - 6], &InputLimits::default());
        assert!(cut.is_err_and(|e| e.to_string().contains("gif: ")), "the frame walk at open finds the cut");
    }
}
