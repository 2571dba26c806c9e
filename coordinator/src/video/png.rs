//! PNG output: one 8-bit RGB PNG per frame (`frame_00000.png`, …) in a folder, written as frames
//! arrive, and a single-frame PNG into any writer.

use super::{planar_to_rgb8, FrameSink, VideoSpec};
use crate::{CoordinatorError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

fn png_error(detail: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::encode("png", detail)
}

/// Writes one planar RGB frame `[3, H, W]` in [0, 1] as an 8-bit RGB PNG (sRGB tagged).
pub fn write_png<W: Write>(out: W, spec: &VideoSpec, frame: &[f32]) -> Result<()> {
    let rgb = planar_to_rgb8(spec, frame)?;
    let mut encoder = ::png::Encoder::new(out, spec.width, spec.height);
    encoder.set_color(::png::ColorType::Rgb);
    encoder.set_depth(::png::BitDepth::Eight);
    encoder.set_compression(::png::Compression::Fast);
    encoder.set_source_srgb(::png::SrgbRenderingIntent::Perceptual);
    let mut writer = encoder.write_header().map_err(png_error)?;
    writer.write_image_data(&rgb).map_err(png_error)?;
    writer.finish().map_err(png_error)
}

/// Streams frames into `frame_NNNNN.png` files in a folder (created if missing).
pub struct PngFramesWriter {
    spec: VideoSpec,
    dir: PathBuf,
    frames: usize,
}

impl PngFramesWriter {
    /// A writer into `dir` for frames of `spec`.
    pub fn new(dir: &Path, spec: VideoSpec) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| CoordinatorError::Io { path: dir.into(), source })?;
        Ok(Self { spec, dir: dir.into(), frames: 0 })
    }

    /// The file frame `i` goes to.
    pub fn frame_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("frame_{i:05}.png"))
    }

    /// Returns the paths written, in frame order.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        if self.frames == 0 {
            return Err(CoordinatorError::invalid_video("frames", "no frame was written"));
        }
        Ok((0..self.frames).map(|i| self.frame_path(i)).collect())
    }
}

impl FrameSink for PngFramesWriter {
    fn spec(&self) -> &VideoSpec {
        &self.spec
    }

    fn push_frame(&mut self, frame: &[f32]) -> Result<()> {
        let path = self.frame_path(self.frames);
        let io = |source| CoordinatorError::Io { path: path.clone(), source };
        let file = std::fs::File::create(&path).map_err(io)?;
        let mut out = std::io::BufWriter::new(file);
        write_png(&mut out, &self.spec, frame)?;
        out.flush().map_err(io)?;
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

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder = ::png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.color_type, info.bit_depth), (::png::ColorType::Rgb, ::png::BitDepth::Eight));
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn writes_one_lossless_png_per_frame() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("frames");
        let spec = VideoSpec::new(33, 17, 16.0).unwrap();
        let mut w = PngFramesWriter::new(&out, spec).unwrap();
        let frames: Vec<Vec<f32>> = (0..3).map(|t| moving_pattern(&spec, t)).collect();
        for f in &frames {
            w.push_frame(f).unwrap();
        }
        let paths = w.finish().unwrap();
        assert_eq!(paths.len(), 3);
        assert!(paths[2].ends_with("frame_00002.png"));
        for (p, f) in paths.iter().zip(&frames) {
            let (width, height, rgb) = decode(p);
            assert_eq!((width, height), (33, 17));
            assert_eq!(rgb, planar_to_rgb8(&spec, f).unwrap(), "PNG is lossless");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let spec = VideoSpec::new(4, 4, 16.0).unwrap();
        let mut w = PngFramesWriter::new(dir.path(), spec).unwrap();
        assert!(w.push_frame(&[0.0; 3]).unwrap_err().to_string().contains("frame"));
        assert!(w.finish().is_err());
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        assert!(PngFramesWriter::new(&blocked.join("sub"), spec).err().unwrap().to_string().contains("file"));
        let mut sink = Vec::new();
        write_png(&mut sink, &spec, &[0.5; 48]).unwrap();
        assert_eq!(&sink[1..4], b"PNG");
    }
}
