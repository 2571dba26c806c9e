//! PNG input: a still PNG is one frame; an animated PNG (APNG) is composed frame by frame with
//! each frame's `dispose_op` and `blend_op`. Samples are reduced to 8 bits (palette, grey and
//! low bit depths expanded, 16-bit cut to 8, as PIL loads them); transparency is composed over
//! black; gamma and colour profiles are ignored (sRGB assumed). Checksums are verified and the
//! file must end properly (`IEND`), so a truncated or bit-flipped PNG is an error.

use super::canvas::{Blend, Canvas, Dispose, Rect};
use super::{corrupt, InputFormat, InputInfo, InputLimits};
use crate::error::InputVideoProblem;
use crate::{CoordinatorError, Result};
use std::io::Cursor;

const FORMAT: &str = "png";
/// The decoder's own working memory (zlib window, rows, metadata).
const DECODER_BYTES: usize = 64 << 20;

fn png_error(e: ::png::DecodingError) -> CoordinatorError {
    match e {
        ::png::DecodingError::LimitsExceeded => CoordinatorError::input_video(InputVideoProblem::TooLarge, "png: the image exceeds the decoder's memory limit"),
        e => corrupt(FORMAT, e),
    }
}

/// Frames of a PNG or APNG.
pub(super) struct PngSource<'a> {
    reader: ::png::Reader<Cursor<&'a [u8]>>,
    canvas: Canvas,
    info: InputInfo,
    animated: bool,
    /// Frames still to read.
    left: u64,
    /// The default image is not part of the animation and must be read past first.
    skip_default: bool,
    frames_drawn: usize,
    buffer: Vec<u8>,
    rgba: Vec<u8>,
}

impl<'a> PngSource<'a> {
    /// Reads the header (size checked before anything else) and the chunks up to the image data.
    pub fn open(bytes: &'a [u8], limits: &InputLimits) -> Result<Self> {
        let mut decoder = ::png::Decoder::new_with_limits(Cursor::new(bytes), ::png::Limits { bytes: DECODER_BYTES });
        decoder.set_transformations(::png::Transformations::normalize_to_color8());
        decoder.set_ignore_text_chunk(true);
        decoder.set_ignore_iccp_chunk(true);
        let header = decoder.read_header_info().map_err(png_error)?;
        let (width, height) = (header.width, header.height);
        limits.check_size("the PNG image", width as u64, height as u64)?;
        let reader = decoder.read_info().map_err(png_error)?;
        let info = reader.info();
        let (animated, frames, skip_default) = match info.animation_control {
            Some(ac) => (true, ac.num_frames as u64, info.frame_control.is_none()),
            None => (false, 1, false),
        };
        if frames == 0 {
            return Err(corrupt(FORMAT, "an animated PNG with no frames"));
        }
        let fps = match (animated, info.frame_control) {
            (true, Some(fc)) if fc.delay_num > 0 => Some(if fc.delay_den == 0 { 100.0 } else { fc.delay_den as f64 } / fc.delay_num as f64),
            _ => None,
        };
        let buffer_len =
            reader.output_buffer_size().ok_or_else(|| CoordinatorError::input_video(InputVideoProblem::TooLarge, "png: the image is too large to address"))?;
        let info = InputInfo { format: InputFormat::Png, width, height, fps, declared_frames: Some(frames as usize) };
        Ok(Self {
            reader,
            canvas: Canvas::new(width, height),
            info,
            animated,
            left: frames,
            skip_default,
            frames_drawn: 0,
            buffer: vec![0; buffer_len],
            rgba: Vec::new(),
        })
    }

    /// What the video is.
    pub fn info(&self) -> InputInfo {
        self.info
    }

    /// The next (composed) frame.
    pub fn next_frame(&mut self) -> Result<Option<Vec<f32>>> {
        if self.left == 0 {
            return Ok(None);
        }
        if self.skip_default {
            self.reader.next_frame(&mut self.buffer).map_err(png_error)?;
            self.skip_default = false;
        }
        let out = self.reader.next_frame(&mut self.buffer).map_err(png_error)?;
        let (w, h) = (out.width, out.height);
        let channels = match out.color_type {
            ::png::ColorType::Grayscale => 1,
            ::png::ColorType::GrayscaleAlpha => 2,
            ::png::ColorType::Rgb => 3,
            ::png::ColorType::Rgba => 4,
            ::png::ColorType::Indexed => return Err(corrupt(FORMAT, "palette samples were not expanded")),
        };
        if out.bit_depth != ::png::BitDepth::Eight || out.line_size < channels * w as usize || self.buffer.len() < out.line_size * h as usize {
            return Err(corrupt(FORMAT, format!("unexpected decoder output ({:?}, {} bytes a row)", out.bit_depth, out.line_size)));
        }
        self.rgba.clear();
        for row in self.buffer.chunks_exact(out.line_size).take(h as usize) {
            for p in row[..channels * w as usize].chunks_exact(channels) {
                self.rgba.extend_from_slice(&match channels {
                    1 => [p[0], p[0], p[0], 255],
                    2 => [p[0], p[0], p[0], p[1]],
                    3 => [p[0], p[1], p[2], 255],
                    _ => [p[0], p[1], p[2], p[3]],
                });
            }
        }
        let full = Rect { x: 0, y: 0, w, h };
        let (rect, blend, mut dispose) = match self.reader.info().frame_control.filter(|_| self.animated) {
            Some(fc) => {
                let dispose = match fc.dispose_op {
                    ::png::DisposeOp::None => Dispose::Keep,
                    ::png::DisposeOp::Background => Dispose::Clear,
                    ::png::DisposeOp::Previous => Dispose::Restore,
                };
                let blend = match fc.blend_op {
                    ::png::BlendOp::Source => Blend::Replace,
                    ::png::BlendOp::Over => Blend::Over,
                };
                (Rect { x: fc.x_offset, y: fc.y_offset, w, h }, blend, dispose)
            }
            None => (full, Blend::Replace, Dispose::Keep),
        };
        if self.frames_drawn == 0 && dispose == Dispose::Restore {
            // APNG: "restore to previous" on the first frame means "clear".
            dispose = Dispose::Clear;
        }
        self.canvas.draw(rect, &self.rgba, blend, dispose).map_err(|e| corrupt(FORMAT, e))?;
        self.frames_drawn += 1;
        self.left -= 1;
        if self.left == 0 {
            self.reader.finish().map_err(png_error)?;
        }
        Ok(Some(self.canvas.to_planar_rgb()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Result<(InputInfo, Vec<Vec<f32>>)> {
        let mut s = PngSource::open(bytes, &InputLimits::default())?;
        let mut frames = Vec::new();
        while let Some(f) = s.next_frame()? {
            frames.push(f);
        }
        Ok((s.info(), frames))
    }

    fn encode(width: u32, height: u32, color: ::png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = ::png::Encoder::new(&mut out, width, height);
        e.set_color(color);
        e.set_depth(::png::BitDepth::Eight);
        let mut w = e.write_header().unwrap();
        w.write_image_data(data).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn still_images_of_every_colour_type_become_rgb() {
        let grey = encode(2, 1, ::png::ColorType::Grayscale, &[0, 200]);
        let (info, frames) = read_all(&grey).unwrap();
        assert_eq!((info.width, info.height, info.fps, info.declared_frames), (2, 1, None, Some(1)));
        assert_eq!(frames.len(), 1);
        let v = 200.0 / 255.0;
        assert_eq!(frames[0], vec![0.0, v, 0.0, v, 0.0, v]);
        let rgba = encode(1, 1, ::png::ColorType::Rgba, &[255, 255, 255, 51]);
        let (_, frames) = read_all(&rgba).unwrap();
        assert!(frames[0].iter().all(|&x| (x - 0.2).abs() < 1e-6), "white at 20% over black: {:?}", frames[0]);
    }

    /// An APNG of 2×2 frames: frame 0 full red, frame 1 a 1×1 blue patch at (1, 1) with
    /// `dispose`/`blend`, frame 2 a 1×1 half-transparent green patch at (0, 0) blended over.
    fn apng(dispose: ::png::DisposeOp, blend: ::png::BlendOp) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = ::png::Encoder::new(&mut out, 2, 2);
        e.set_color(::png::ColorType::Rgba);
        e.set_depth(::png::BitDepth::Eight);
        e.set_animated(3, 0).unwrap();
        e.set_frame_delay(1, 8).unwrap();
        let mut w = e.write_header().unwrap();
        w.write_image_data(&[255, 0, 0, 255].repeat(4)).unwrap();
        w.set_frame_dimension(1, 1).unwrap();
        w.set_frame_position(1, 1).unwrap();
        w.set_dispose_op(dispose).unwrap();
        w.set_blend_op(blend).unwrap();
        w.write_image_data(&[0, 0, 255, 255]).unwrap();
        w.set_frame_position(0, 0).unwrap();
        w.set_dispose_op(::png::DisposeOp::None).unwrap();
        w.set_blend_op(::png::BlendOp::Over).unwrap();
        w.write_image_data(&[0, 255, 0, 128]).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn animated_pngs_are_composed() {
        let (info, frames) = read_all(&apng(::png::DisposeOp::Background, ::png::BlendOp::Source)).unwrap();
        assert_eq!((info.fps, info.declared_frames, frames.len()), (Some(8.0), Some(3), 3));
        let px = |f: usize, i: usize| [0, 1, 2].map(|c| (frames[f][c * 4 + i] * 255.0).round() as u8);
        assert_eq!([px(0, 0), px(0, 3)], [[255, 0, 0]; 2]);
        assert_eq!([px(1, 0), px(1, 3)], [[255, 0, 0], [0, 0, 255]]);
        assert_eq!(px(2, 3), [0, 0, 0], "the blue patch was cleared to transparent");
        assert_eq!(px(2, 0), [127, 128, 0], "half green over red");
        let (_, frames) = read_all(&apng(::png::DisposeOp::Previous, ::png::BlendOp::Source)).unwrap();
        assert_eq!((frames[2][3] * 255.0).round(), 255.0, "restored to red");
    }

    #[test]
    fn bad_pngs_are_errors() {
        let good = encode(4, 4, ::png::ColorType::Rgb, &[7; 48]);
        for cut in [8, 20, 33, good.len() - 20, good.len() - 1] {
            assert!(read_all(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[40] ^= 0x10;
        assert!(read_all(&flipped).is_err(), "the CRC catches a flipped bit");
        let small = InputLimits { max_height: 3, ..Default::default() };
        let err = PngSource::open(&good, &small).err().unwrap();
        assert!(matches!(err, CoordinatorError::InvalidInputVideo { problem: InputVideoProblem::TooLarge, .. }), "{err}");
    }
}
