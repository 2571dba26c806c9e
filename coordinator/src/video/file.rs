//! A video file of any supported format behind one type: opened from a path and a format,
//! fed frame by frame, finished once.

use super::{FrameSink, GifOptions, GifWriter, Mp4Options, Mp4Writer, PngFramesWriter, VideoFormat, VideoSpec};
use crate::{CoordinatorError, Result};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// An open output: MP4 or GIF file, or a folder of PNG frames.
pub struct VideoFile {
    path: PathBuf,
    inner: Output,
}

enum Output {
    /// H.264 in MP4 (boxed: the encoder's state is large).
    Mp4(Box<Mp4Writer<BufWriter<File>>>),
    /// Animated GIF.
    Gif(GifWriter<BufWriter<File>>),
    /// PNG frames in a folder.
    Png(PngFramesWriter),
}

impl VideoFile {
    /// Creates `path` (a file, or for PNG frames a folder) for frames of `spec`.
    pub fn create(format: VideoFormat, path: &Path, spec: VideoSpec) -> Result<Self> {
        let file =
            || -> Result<BufWriter<File>> { File::create(path).map(BufWriter::new).map_err(|source| CoordinatorError::Io { path: path.into(), source }) };
        let inner = match format {
            VideoFormat::Mp4 => Output::Mp4(Box::new(Mp4Writer::new(file()?, spec, Mp4Options::default())?)),
            VideoFormat::Gif => Output::Gif(GifWriter::new(file()?, spec, GifOptions::default())?),
            VideoFormat::PngFrames => Output::Png(PngFramesWriter::new(path, spec)?),
        };
        Ok(Self { path: path.to_path_buf(), inner })
    }

    /// The format a path asks for by its extension: `.mp4`, `.gif`, or none/`.png` for a folder
    /// of PNG frames.
    pub fn format_of(path: &Path) -> Option<VideoFormat> {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("mp4") => Some(VideoFormat::Mp4),
            Some("gif") => Some(VideoFormat::Gif),
            Some("png") | None => Some(VideoFormat::PngFrames),
            Some(_) => None,
        }
    }

    /// Flushes and closes the output; returns the files written (the file itself, or each frame).
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        use std::io::Write;
        let path = self.path;
        let flush = |mut w: BufWriter<File>| w.flush().map(|_| vec![path.clone()]).map_err(|source| CoordinatorError::Io { path: path.clone(), source });
        match self.inner {
            Output::Mp4(w) => flush(w.finish()?.1),
            Output::Gif(w) => flush(w.finish()?),
            Output::Png(w) => w.finish(),
        }
    }
}

impl FrameSink for VideoFile {
    fn spec(&self) -> &VideoSpec {
        match &self.inner {
            Output::Mp4(w) => w.spec(),
            Output::Gif(w) => w.spec(),
            Output::Png(w) => w.spec(),
        }
    }

    fn push_frame(&mut self, frame: &[f32]) -> Result<()> {
        match &mut self.inner {
            Output::Mp4(w) => w.push_frame(frame),
            Output::Gif(w) => w.push_frame(frame),
            Output::Png(w) => w.push_frame(frame),
        }
    }

    fn frames_written(&self) -> usize {
        match &self.inner {
            Output::Mp4(w) => w.frames_written(),
            Output::Gif(w) => w.frames_written(),
            Output::Png(w) => w.frames_written(),
        }
    }
}

/// Pushes a decoded chunk `[1, 3, n, H, W]` (channel-major, as the VAE gives it) frame by frame.
pub fn push_channel_major(sink: &mut dyn FrameSink, chunk: &[f32], frames: usize) -> Result<()> {
    let len = sink.spec().frame_len();
    if frames == 0 || chunk.len() != frames * len {
        return Err(CoordinatorError::invalid_video("frames", format!("{} values are not {frames} frames of {len}", chunk.len())));
    }
    let plane = len / 3;
    let mut frame = vec![0.0f32; len];
    for f in 0..frames {
        for c in 0..3 {
            let src = (c * frames + f) * plane;
            frame[c * plane..(c + 1) * plane].copy_from_slice(&chunk[src..src + plane]);
        }
        sink.push_frame(&frame)?;
    }
    Ok(())
}
