//! A job's output encoded in memory, as the public API returns it: one MP4 or GIF file, one PNG
//! file per frame (handed out as frames are decoded), or the raw latents as a safetensors file.

use super::executor::OutputFile;
use crate::video::{push_channel_major, write_png, FrameSink, GifOptions, GifWriter, Mp4Options, Mp4Writer, VideoSpec};
use crate::{CoordinatorError, Result};
use std::time::{Duration, Instant};
use tessera_cluster::Tensor;
use tessera_proto::v1::OutputFormat;

/// MIME type of the raw latents file.
pub const LATENTS_CONTENT_TYPE: &str = "application/vnd.tessera.safetensors";

/// The MIME type of a format's files.
pub fn content_type(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Unspecified | OutputFormat::Mp4 => "video/mp4",
        OutputFormat::Gif => "image/gif",
        OutputFormat::PngFrames => "image/png",
        OutputFormat::RawLatents => LATENTS_CONTENT_TYPE,
    }
}

/// The one static MIME type this server writes that equals `stored` (files read back from the
/// state store); anything else is reported as `application/octet-stream`.
pub fn static_content_type(stored: &str) -> &'static str {
    ["video/mp4", "image/gif", "image/png", LATENTS_CONTENT_TYPE].into_iter().find(|t| *t == stored).unwrap_or("application/octet-stream")
}

/// Collects each pushed frame as PNG bytes.
struct PngBytes {
    spec: VideoSpec,
    done: Vec<Vec<u8>>,
    frames: usize,
}

impl FrameSink for PngBytes {
    fn spec(&self) -> &VideoSpec {
        &self.spec
    }

    fn push_frame(&mut self, frame: &[f32]) -> Result<()> {
        let mut bytes = Vec::new();
        write_png(&mut bytes, &self.spec, frame)?;
        self.done.push(bytes);
        self.frames += 1;
        Ok(())
    }

    fn frames_written(&self) -> usize {
        self.frames
    }
}

enum Encoder {
    Mp4(Box<Mp4Writer<Vec<u8>>>),
    Gif(GifWriter<Vec<u8>>),
    Png(PngBytes),
}

/// Encodes decoded frames into the requested format in memory.
pub struct FrameEncoder {
    encoder: Encoder,
    busy: Duration,
}

impl FrameEncoder {
    /// An encoder for `format` (not raw latents) and frames of `spec`.
    pub fn new(format: OutputFormat, spec: VideoSpec) -> Result<Self> {
        let encoder = match format {
            OutputFormat::Unspecified | OutputFormat::Mp4 => Encoder::Mp4(Box::new(Mp4Writer::new(Vec::new(), spec, Mp4Options::default())?)),
            OutputFormat::Gif => Encoder::Gif(GifWriter::new(Vec::new(), spec, GifOptions::default())?),
            OutputFormat::PngFrames => Encoder::Png(PngBytes { spec, done: Vec::new(), frames: 0 }),
            OutputFormat::RawLatents => return Err(CoordinatorError::invalid_video("output_format", "raw latents are not encoded from frames")),
        };
        Ok(Self { encoder, busy: Duration::ZERO })
    }

    fn sink(&mut self) -> &mut dyn FrameSink {
        match &mut self.encoder {
            Encoder::Mp4(w) => w.as_mut(),
            Encoder::Gif(w) => w,
            Encoder::Png(w) => w,
        }
    }

    /// Frames encoded so far.
    pub fn frames(&self) -> usize {
        match &self.encoder {
            Encoder::Mp4(w) => w.frames_written(),
            Encoder::Gif(w) => w.frames_written(),
            Encoder::Png(w) => w.frames_written(),
        }
    }

    /// Time spent encoding so far.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    /// Adds a decoded chunk `[1, 3, n, H, W]` (values in [0, 1]); returns the files it completed
    /// (PNG frames; MP4 and GIF complete in [`Self::finish`]).
    pub fn push_chunk(&mut self, chunk: &Tensor) -> Result<Vec<OutputFile>> {
        let started = Instant::now();
        let first = self.frames();
        push_channel_major(self.sink(), chunk.data(), chunk.dim(2))?;
        let files = match &mut self.encoder {
            Encoder::Png(p) => {
                p.done.drain(..).enumerate().map(|(i, bytes)| OutputFile { content_type: "image/png", frame_index: (first + i) as u32, bytes }).collect()
            }
            _ => Vec::new(),
        };
        self.busy += started.elapsed();
        Ok(files)
    }

    /// Completes the output; returns the files not yet handed out and the total encoding time.
    pub fn finish(self) -> Result<(Vec<OutputFile>, Duration)> {
        let started = Instant::now();
        let files = match self.encoder {
            Encoder::Mp4(w) => vec![OutputFile { content_type: "video/mp4", frame_index: 0, bytes: (*w).finish()?.1 }],
            Encoder::Gif(w) => vec![OutputFile { content_type: "image/gif", frame_index: 0, bytes: w.finish()? }],
            Encoder::Png(p) if p.frames == 0 => return Err(CoordinatorError::invalid_video("frames", "no frame was decoded")),
            Encoder::Png(_) => Vec::new(),
        };
        Ok((files, self.busy + started.elapsed()))
    }
}

/// The latents `[1, C, T, h, w]` as a safetensors file holding one float32 tensor `latents`.
pub fn latents_file(latents: &Tensor) -> Result<OutputFile> {
    let bytes: Vec<u8> = latents.data().iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, latents.shape().to_vec(), &bytes)
        .map_err(|e| CoordinatorError::encode("safetensors", e))?;
    let file = safetensors::tensor::serialize([("latents", view)], None).map_err(|e| CoordinatorError::encode("safetensors", e))?;
    Ok(OutputFile { content_type: LATENTS_CONTENT_TYPE, frame_index: 0, bytes: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(frames: usize, spec: &VideoSpec) -> Tensor {
        let n = frames * spec.pixels();
        Tensor::new([1, 3, frames, spec.height as usize, spec.width as usize], (0..3 * n).map(|i| (i % 97) as f32 / 96.0).collect()).unwrap()
    }

    #[test]
    fn each_format_encodes_in_memory() {
        let spec = VideoSpec::new(32, 16, 16.0).unwrap();
        let mut mp4 = FrameEncoder::new(OutputFormat::Mp4, spec).unwrap();
        assert!(mp4.push_chunk(&chunk(1, &spec)).unwrap().is_empty());
        assert!(mp4.push_chunk(&chunk(4, &spec)).unwrap().is_empty());
        assert_eq!(mp4.frames(), 5);
        let (files, _) = mp4.finish().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].content_type, "video/mp4");
        assert_eq!(&files[0].bytes[4..8], b"ftyp");

        let mut gif = FrameEncoder::new(OutputFormat::Gif, spec).unwrap();
        gif.push_chunk(&chunk(2, &spec)).unwrap();
        let (files, _) = gif.finish().unwrap();
        assert_eq!(&files[0].bytes[..6], b"GIF89a");

        let mut png = FrameEncoder::new(OutputFormat::PngFrames, spec).unwrap();
        let a = png.push_chunk(&chunk(1, &spec)).unwrap();
        let b = png.push_chunk(&chunk(2, &spec)).unwrap();
        assert_eq!(a.iter().chain(&b).map(|f| f.frame_index).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(b.iter().all(|f| f.content_type == "image/png" && f.bytes.starts_with(b"\x89PNG")));
        assert!(png.finish().unwrap().0.is_empty());
        assert!(FrameEncoder::new(OutputFormat::PngFrames, spec).unwrap().finish().is_err(), "no frames is an error");
    }

    #[test]
    fn latents_round_trip_through_safetensors() {
        let t = Tensor::new([1, 2, 1, 2, 3], (0..12).map(|i| i as f32 * 0.5).collect()).unwrap();
        let file = latents_file(&t).unwrap();
        assert_eq!(file.content_type, LATENTS_CONTENT_TYPE);
        let st = safetensors::SafeTensors::deserialize(&file.bytes).unwrap();
        let view = st.tensor("latents").unwrap();
        assert_eq!(view.shape(), &[1, 2, 1, 2, 3]);
        let back: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(back, t.data());
    }
}
