//! Video output: decoded frames (planar RGB float32 in [0, 1], the VAE's output after
//! post-processing) written as MP4 (H.264), animated GIF or one PNG per frame. Video input (for
//! video-to-video) is in [`input`].
//!
//! Every writer is streaming: frames are pushed one at a time (or a chunk of frames at a time, as
//! the VAE decodes them) through [`FrameSink`], and `finish` completes the file. Values are
//! clamped to [0, 1]; 8-bit samples are `round(255·x)` as diffusers' post-processing makes them.

mod color;
mod file;
mod gif;
pub mod input;
mod mp4;
mod png;

pub use color::{rgb_to_yuv420, ColorMatrix, Yuv420};
pub use file::{push_channel_major, VideoFile};
pub use gif::{GifOptions, GifWriter};
pub use mp4::{Mp4Options, Mp4Summary, Mp4Writer, RateControl};
pub use png::{write_png, PngFramesWriter};

use crate::{CoordinatorError, Result};

/// Frame size and rate of a video.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoSpec {
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Frames per second (Wan 2.1 renders at 16).
    pub fps: f64,
}

impl VideoSpec {
    /// Largest width or height accepted (H.264 level 5.2 / GIF limits are checked per format).
    pub const MAX_SIDE: u32 = 16384;

    /// A spec, checked: sides in 1..=[`Self::MAX_SIDE`], fps finite in (0, 1000].
    pub fn new(width: u32, height: u32, fps: f64) -> Result<Self> {
        for (field, side) in [("width", width), ("height", height)] {
            if side == 0 || side > Self::MAX_SIDE {
                return Err(CoordinatorError::invalid_video(field, format!("{side} is outside 1..={}", Self::MAX_SIDE)));
            }
        }
        if !(fps.is_finite() && fps > 0.0 && fps <= 1000.0) {
            return Err(CoordinatorError::invalid_video("fps", format!("{fps} is not a frame rate in (0, 1000]")));
        }
        Ok(Self { width, height, fps })
    }

    /// Values in one planar RGB frame: 3·H·W.
    pub fn frame_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// Pixels in one frame: H·W.
    pub fn pixels(&self) -> usize {
        self.width as usize * self.height as usize
    }
}

/// The output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VideoFormat {
    /// H.264 in MP4 (the default).
    Mp4,
    /// Animated GIF.
    Gif,
    /// One PNG per frame in a folder.
    PngFrames,
}

impl VideoFormat {
    /// Short name (`mp4`, `gif`, `png`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mp4 => "mp4",
            Self::Gif => "gif",
            Self::PngFrames => "png",
        }
    }

    /// Parses a short name.
    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Mp4, Self::Gif, Self::PngFrames].into_iter().find(|f| f.name() == s)
    }
}

/// A streaming consumer of frames.
pub trait FrameSink {
    /// The video's size and rate.
    fn spec(&self) -> &VideoSpec;

    /// Appends one frame: planar RGB `[3, H, W]`, values in [0, 1] (clamped; NaN is an error).
    fn push_frame(&mut self, frame: &[f32]) -> Result<()>;

    /// Frames accepted so far.
    fn frames_written(&self) -> usize;

    /// Appends a chunk of frames `[F, 3, H, W]` (F ≥ 0), in order.
    fn push_frames(&mut self, frames: &[f32]) -> Result<()> {
        let len = self.spec().frame_len();
        if !frames.chunks_exact(len).remainder().is_empty() {
            return Err(CoordinatorError::invalid_video("frames", format!("{} values are not a whole number of {len}-value frames", frames.len())));
        }
        frames.chunks_exact(len).try_for_each(|f| self.push_frame(f))
    }
}

/// Checks a planar frame's length and values.
pub(crate) fn check_frame(spec: &VideoSpec, frame: &[f32]) -> Result<()> {
    if frame.len() != spec.frame_len() {
        return Err(CoordinatorError::invalid_video(
            "frame",
            format!("{} values, expected 3×{}×{} = {}", frame.len(), spec.height, spec.width, spec.frame_len()),
        ));
    }
    if let Some(i) = frame.iter().position(|x| x.is_nan()) {
        return Err(CoordinatorError::invalid_video("frame", format!("value {i} is NaN")));
    }
    Ok(())
}

/// A [0, 1] value as an 8-bit sample: `round(255·clamp(x))`.
#[inline]
pub(crate) fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Planar RGB float `[3, H, W]` to interleaved 8-bit RGB `[H, W, 3]`.
pub fn planar_to_rgb8(spec: &VideoSpec, frame: &[f32]) -> Result<Vec<u8>> {
    check_frame(spec, frame)?;
    let n = spec.pixels();
    let (r, rest) = frame.split_at(n);
    let (g, b) = rest.split_at(n);
    let mut out = Vec::with_capacity(3 * n);
    for ((&r, &g), &b) in r.iter().zip(g).zip(b) {
        out.extend_from_slice(&[to_u8(r), to_u8(g), to_u8(b)]);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod test_frames {
    use super::VideoSpec;

    /// A synthetic moving pattern: smooth colour gradients plus a bright square moving right,
    /// frame `t` of a `[3, H, W]` video.
    pub fn moving_pattern(spec: &VideoSpec, t: usize) -> Vec<f32> {
        let (w, h) = (spec.width as usize, spec.height as usize);
        let mut f = vec![0.0f32; 3 * w * h];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
                f[i] = 0.2 + 0.6 * u;
                f[w * h + i] = 0.2 + 0.6 * v;
                f[2 * w * h + i] = 0.5 + 0.3 * ((u + v) * 6.0 + t as f32 * 0.5).sin();
                let (sx, sy) = (4 + 4 * t, h / 3);
                if x >= sx && x < sx + 12 && y >= sy && y < sy + 12 {
                    f[i] = 0.95;
                    f[w * h + i] = 0.9;
                    f[2 * w * h + i] = 0.1;
                }
            }
        }
        f
    }
}

/// Frames `[1, 3, n, H, W]` center-cropped to `height × width` (the size a request asked for,
/// when the model generated at the next multiple of its factor). Frames already that size come
/// back as they are.
pub fn crop_center(frames: tessera_cluster::Tensor, height: u32, width: u32) -> Result<tessera_cluster::Tensor> {
    let (h, w) = (height as usize, width as usize);
    let &[1, 3, n, fh, fw] = frames.shape() else {
        return Err(CoordinatorError::Internal(format!("frames of shape {:?} are not [1, 3, n, H, W]", frames.shape())));
    };
    if (fh, fw) == (h, w) {
        return Ok(frames);
    }
    if h > fh || w > fw {
        return Err(CoordinatorError::Internal(format!("{fw}x{fh} frames cannot be cropped to {w}x{h}")));
    }
    let (top, left) = ((fh - h) / 2, (fw - w) / 2);
    let mut out = Vec::with_capacity(3 * n * h * w);
    for plane in frames.data().chunks_exact(fh * fw) {
        for row in plane[top * fw..(top + h) * fw].chunks_exact(fw) {
            out.extend_from_slice(&row[left..left + w]);
        }
    }
    tessera_cluster::Tensor::new([1, 3, n, h, w], out).map_err(|e| CoordinatorError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_naming_the_field() {
        assert!(VideoSpec::new(64, 48, 16.0).is_ok());
        for (w, h, fps, field) in [(0, 48, 16.0, "width"), (64, 0, 16.0, "height"), (64, 48, 0.0, "fps"), (64, 48, f64::NAN, "fps"), (20000, 48, 16.0, "width")]
        {
            let err = VideoSpec::new(w, h, fps).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn frames_are_center_cropped_to_the_asked_size() {
        // One frame, 3 planes of 4 rows x 6 columns: value = plane*100 + row*10 + column.
        let data: Vec<f32> = (0..3).flat_map(|p| (0..4).flat_map(move |r| (0..6).map(move |c| (p * 100 + r * 10 + c) as f32))).collect();
        let frames = tessera_cluster::Tensor::new([1, 3, 1, 4, 6], data).unwrap();
        let cropped = crop_center(frames.clone(), 2, 3).unwrap();
        assert_eq!(cropped.shape(), &[1, 3, 1, 2, 3]);
        // Rows 1..3, columns 1..4 of each plane.
        assert_eq!(&cropped.data()[..6], &[11.0, 12.0, 13.0, 21.0, 22.0, 23.0]);
        assert_eq!(&cropped.data()[12..], &[211.0, 212.0, 213.0, 221.0, 222.0, 223.0]);
        assert_eq!(crop_center(frames.clone(), 4, 6).unwrap(), frames, "the generated size is returned as it is");
        assert!(crop_center(frames, 5, 6).is_err());
    }

    #[test]
    fn frames_become_rounded_clamped_bytes() {
        let spec = VideoSpec::new(2, 1, 16.0).unwrap();
        let rgb = planar_to_rgb8(&spec, &[0.0, 1.0, 0.5, -1.0, 2.0, 0.2]).unwrap();
        assert_eq!(rgb, vec![0, 128, 255, 255, 0, 51]);
        assert!(planar_to_rgb8(&spec, &[0.0; 5]).is_err());
        assert!(planar_to_rgb8(&spec, &[0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0]).unwrap_err().to_string().contains("NaN"));
        assert_eq!(VideoFormat::from_name("gif"), Some(VideoFormat::Gif));
    }
}
