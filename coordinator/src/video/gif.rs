//! Animated GIF output: each frame gets its own 256-colour palette chosen by NeuQuant (a
//! neural-network quantiser that tracks the frame's actual colours far better than a fixed
//! palette), optionally with Floyd–Steinberg error diffusion; frame delays in centiseconds are
//! rounded cumulatively so the average rate stays exact (16 fps → 6, 6, 7, 6 … cs). Loops forever.

use super::{planar_to_rgb8, FrameSink, VideoSpec};
use crate::{CoordinatorError, Result};
use color_quant::NeuQuant;
use std::borrow::Cow;
use std::io::Write;

/// Settings of the GIF writer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GifOptions {
    /// NeuQuant sampling factor, 1 (best, slowest) to 30 (fastest). Default 10.
    pub quantizer_speed: i32,
    /// Floyd–Steinberg dithering: smoother gradients, but grain that shimmers between frames and
    /// larger files. Default off.
    pub dither: bool,
}

impl Default for GifOptions {
    fn default() -> Self {
        Self { quantizer_speed: 10, dither: false }
    }
}

/// Streams frames into an animated GIF written to `W` as they arrive.
pub struct GifWriter<W: Write> {
    spec: VideoSpec,
    options: GifOptions,
    encoder: ::gif::Encoder<W>,
    frames: usize,
}

fn gif_error(detail: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::encode("gif", detail)
}

impl<W: Write> GifWriter<W> {
    /// A writer for frames of `spec` (sides up to 65535).
    pub fn new(out: W, spec: VideoSpec, options: GifOptions) -> Result<Self> {
        for (field, side) in [("width", spec.width), ("height", spec.height)] {
            if side > u16::MAX as u32 {
                return Err(CoordinatorError::invalid_video(field, format!("{side} exceeds the GIF limit of 65535")));
            }
        }
        if !(1..=30).contains(&options.quantizer_speed) {
            return Err(CoordinatorError::invalid_video("quantizer_speed", format!("{} is outside 1..=30", options.quantizer_speed)));
        }
        let mut encoder = ::gif::Encoder::new(out, spec.width as u16, spec.height as u16, &[]).map_err(gif_error)?;
        encoder.set_repeat(::gif::Repeat::Infinite).map_err(gif_error)?;
        Ok(Self { spec, options, encoder, frames: 0 })
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(self) -> Result<W> {
        if self.frames == 0 {
            return Err(CoordinatorError::invalid_video("frames", "a GIF needs at least one frame"));
        }
        self.encoder.into_inner().map_err(gif_error)
    }

    /// Centiseconds frame `i` is shown: the difference of rounded cumulative times.
    fn delay(&self, i: usize) -> u16 {
        let at = |k: usize| (k as f64 * 100.0 / self.spec.fps).round();
        (at(i + 1) - at(i)).clamp(1.0, u16::MAX as f64) as u16
    }
}

/// Maps RGB pixels to palette indices of `nq`, with Floyd–Steinberg diffusion if `dither`.
fn quantize(nq: &NeuQuant, rgb: &[u8], width: usize, dither: bool) -> Vec<u8> {
    let pixels = rgb.len() / 3;
    if !dither {
        return rgb.chunks_exact(3).map(|p| nq.index_of(&[p[0], p[1], p[2], 255]) as u8).collect();
    }
    let palette = nq.color_map_rgb();
    let mut err = vec![[0.0f32; 3]; pixels];
    let mut out = Vec::with_capacity(pixels);
    for i in 0..pixels {
        let want: [f32; 3] = std::array::from_fn(|c| (rgb[3 * i + c] as f32 + err[i][c]).clamp(0.0, 255.0));
        let idx = nq.index_of(&[want[0].round() as u8, want[1].round() as u8, want[2].round() as u8, 255]);
        out.push(idx as u8);
        let (x, y) = (i % width, i / width);
        let height = pixels / width;
        for c in 0..3 {
            let e = want[c] - palette[3 * idx + c] as f32;
            let mut spread = |dx: isize, dy: usize, weight: f32| {
                let nx = x as isize + dx;
                if nx >= 0 && (nx as usize) < width && y + dy < height {
                    err[(y + dy) * width + nx as usize][c] += e * weight;
                }
            };
            spread(1, 0, 7.0 / 16.0);
            spread(-1, 1, 3.0 / 16.0);
            spread(0, 1, 5.0 / 16.0);
            spread(1, 1, 1.0 / 16.0);
        }
    }
    out
}

impl<W: Write> FrameSink for GifWriter<W> {
    fn spec(&self) -> &VideoSpec {
        &self.spec
    }

    fn push_frame(&mut self, frame: &[f32]) -> Result<()> {
        let rgb = planar_to_rgb8(&self.spec, frame)?;
        let rgba: Vec<u8> = rgb.chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        // NeuQuant learns from pixels/speed samples: small frames need every pixel to place 256
        // colours well, so the factor never leaves fewer than ~100 samples per colour.
        let speed = self.options.quantizer_speed.min((self.spec.pixels() / 25_600).max(1) as i32);
        let nq = NeuQuant::new(speed, 256, &rgba);
        let indices = quantize(&nq, &rgb, self.spec.width as usize, self.options.dither);
        let gif_frame = ::gif::Frame {
            width: self.spec.width as u16,
            height: self.spec.height as u16,
            delay: self.delay(self.frames),
            palette: Some(nq.color_map_rgb()),
            buffer: Cow::Owned(indices),
            ..Default::default()
        };
        self.encoder.write_frame(&gif_frame).map_err(gif_error)?;
        self.frames += 1;
        Ok(())
    }

    fn frames_written(&self) -> usize {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::test_frames::moving_pattern;

    /// Decodes a GIF with the `gif` crate: (frame delays, RGB of each frame).
    fn decode(bytes: &[u8]) -> (Vec<u16>, Vec<Vec<u8>>) {
        let mut opts = ::gif::DecodeOptions::new();
        opts.set_color_output(::gif::ColorOutput::RGBA);
        let mut d = opts.read_info(bytes).unwrap();
        let (mut delays, mut frames) = (Vec::new(), Vec::new());
        while let Some(f) = d.read_next_frame().unwrap() {
            delays.push(f.delay);
            frames.push(f.buffer.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect());
        }
        (delays, frames)
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
    }

    #[test]
    fn writes_every_frame_with_exact_average_timing_and_good_colours() {
        let spec = VideoSpec::new(64, 48, 16.0).unwrap();
        for dither in [false, true] {
            let mut w = GifWriter::new(Vec::new(), spec, GifOptions { dither, ..Default::default() }).unwrap();
            let frames: Vec<Vec<f32>> = (0..9).map(|t| moving_pattern(&spec, t)).collect();
            w.push_frames(&frames.concat()).unwrap();
            let bytes = w.finish().unwrap();
            assert_eq!(&bytes[..6], b"GIF89a");
            let (delays, decoded) = decode(&bytes);
            assert_eq!(delays, vec![6, 7, 6, 6, 6, 7, 6, 6, 6], "16 fps in centiseconds");
            for (f, d) in frames.iter().zip(&decoded) {
                let p = psnr(&planar_to_rgb8(&spec, f).unwrap(), d);
                // Measured 29.7–30.5 dB plain and 27.1–27.8 dB dithered (dithering trades PSNR
                // for smoother gradients) on this deliberately colourful pattern.
                let bound = if dither { 25.0 } else { 28.0 };
                assert!(p > bound, "dither {dither}: PSNR {p:.1} dB");
            }
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        let huge = VideoSpec { width: 70000, height: 4, fps: 16.0 };
        assert!(GifWriter::new(Vec::new(), huge, GifOptions::default()).err().unwrap().to_string().contains("width"));
        let spec = VideoSpec::new(8, 8, 16.0).unwrap();
        let bad = GifOptions { quantizer_speed: 0, ..Default::default() };
        assert!(GifWriter::new(Vec::new(), spec, bad).err().unwrap().to_string().contains("quantizer_speed"));
        let w = GifWriter::new(Vec::new(), spec, GifOptions::default()).unwrap();
        assert!(w.finish().is_err());
    }
}
