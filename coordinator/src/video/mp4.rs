//! MP4 output: H.264 (OpenH264, constrained baseline, I420 limited range with the colour
//! description in the stream's VUI) muxed into MP4 with `moov` first, so players can start
//! before the whole file has arrived. Frame timestamps are exact multiples of 1/fps on a 90 kHz
//! clock; no frame is ever skipped by rate control.

use super::color::{rgb_to_yuv420, ColorMatrix};
use super::{FrameSink, VideoSpec};
use crate::{CoordinatorError, Result};
use muxide::api::{Muxer, MuxerBuilder, VideoCodec};
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange, RateControlMode, UsageType, VuiConfig};
use openh264::formats::YUVSlices;
use openh264::OpenH264API;
use openh264_sys2::{WelsTraceCallback, ENCODER_OPTION_TRACE_CALLBACK, WELS_LOG_ERROR};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::Write;

/// How the encoder spends bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RateControl {
    /// Every frame at this quantiser (0–51; lower is better and larger). 18–20 is visually
    /// lossless for generated video, 23 is good, 28 is small. OpenH264's rate control never goes
    /// below 12, so 0–11 give the same stream as 12.
    ConstantQp(u8),
    /// Average bitrate target in bits per second, quantiser kept within `min_qp..=max_qp`.
    Bitrate {
        /// Target bits per second.
        bps: u32,
        /// Best quantiser allowed.
        min_qp: u8,
        /// Worst quantiser allowed.
        max_qp: u8,
    },
}

/// Settings of the MP4 writer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mp4Options {
    /// Rate control (default: constant QP 23).
    pub rate_control: RateControl,
    /// Frames between keyframes (IDR); 0 = only the first frame. Default: 0, derived as two
    /// seconds' worth of frames when the writer is created.
    pub keyframe_interval: u32,
    /// Y′CbCr matrix (default BT.709).
    pub matrix: ColorMatrix,
    /// Encoder threads (0 = the encoder decides).
    pub threads: u16,
}

impl Default for Mp4Options {
    fn default() -> Self {
        Self { rate_control: RateControl::ConstantQp(23), keyframe_interval: 0, matrix: ColorMatrix::Bt709, threads: 0 }
    }
}

impl Mp4Options {
    /// Checks the ranges (QP ≤ 51, min ≤ max, bitrate > 0).
    pub fn validate(&self) -> Result<()> {
        match self.rate_control {
            RateControl::ConstantQp(qp) if qp > 51 => Err(CoordinatorError::invalid_video("qp", format!("{qp} is outside 0..=51"))),
            RateControl::Bitrate { bps: 0, .. } => Err(CoordinatorError::invalid_video("bitrate", "must be positive")),
            RateControl::Bitrate { min_qp, max_qp, .. } if min_qp > max_qp || max_qp > 51 => {
                Err(CoordinatorError::invalid_video("qp", format!("range {min_qp}..={max_qp} is not within 0..=51")))
            }
            _ => Ok(()),
        }
    }
}

/// What a finished MP4 holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mp4Summary {
    /// Frames written.
    pub frames: usize,
    /// Keyframes among them.
    pub keyframes: usize,
    /// Coded width (even).
    pub width: u32,
    /// Coded height (even).
    pub height: u32,
    /// Bytes of H.264 payload.
    pub payload_bytes: u64,
}

/// Streams frames into an H.264 MP4 written to `W` (on [`Mp4Writer::finish`]: the muxer
/// writes `moov` first, so it keeps the compressed samples until then).
pub struct Mp4Writer<W: Write> {
    spec: VideoSpec,
    options: Mp4Options,
    encoder: Encoder,
    muxer: Muxer<W>,
    frames: usize,
    keyframes: usize,
    payload_bytes: u64,
    bitstream: Vec<u8>,
}

fn mp4_error(detail: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::encode("mp4", detail)
}

impl<W: Write> Mp4Writer<W> {
    /// Coded sizes beyond this are refused (OpenH264 supports up to level 5.2).
    pub const MAX_CODED: (u32, u32) = (3840, 2160);

    /// A writer for frames of `spec`. Odd sizes are coded one pixel larger (edge repeated).
    pub fn new(out: W, spec: VideoSpec, options: Mp4Options) -> Result<Self> {
        options.validate()?;
        let (cw, ch) = (spec.width.next_multiple_of(2), spec.height.next_multiple_of(2));
        let (long, short) = (cw.max(ch), cw.min(ch));
        if long > Self::MAX_CODED.0 || short > Self::MAX_CODED.1 {
            let field = if cw >= ch { "width" } else { "height" };
            return Err(CoordinatorError::invalid_video(field, format!("{}x{} exceeds H.264 level 5.2 (3840x2160)", spec.width, spec.height)));
        }
        let keyframe_interval = if options.keyframe_interval == 0 { ((2.0 * spec.fps).round() as u32).max(1) } else { options.keyframe_interval };
        let vui = match options.matrix {
            ColorMatrix::Bt709 => VuiConfig::bt709(),
            ColorMatrix::Bt601 => VuiConfig::bt601(),
        };
        let (mode, bps, qp) = match options.rate_control {
            // Quality mode with a one-value QP range holds every frame at that QP.
            RateControl::ConstantQp(qp) => (RateControlMode::Quality, 200_000_000, QpRange::new(qp, qp)),
            RateControl::Bitrate { bps, min_qp, max_qp } => (RateControlMode::Bitrate, bps, QpRange::new(min_qp, max_qp)),
        };
        let config = EncoderConfig::new()
            // OpenH264 refuses the non-real-time camera usage; real-time camera is its full encoder.
            .usage_type(UsageType::CameraVideoRealTime)
            .rate_control_mode(mode)
            .bitrate(BitRate::from_bps(bps))
            .qp(qp)
            .skip_frames(false)
            .max_frame_rate(FrameRate::from_hz(spec.fps as f32))
            .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_interval))
            .scene_change_detect(false)
            .num_threads(options.threads)
            .vui(vui);
        let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(mp4_error)?;
        route_log(&mut encoder)?;
        let muxer = MuxerBuilder::new(out).video(VideoCodec::H264, cw, ch, spec.fps).with_fast_start(true).build().map_err(mp4_error)?;
        let options = Mp4Options { keyframe_interval, ..options };
        Ok(Self { spec, options, encoder, muxer, frames: 0, keyframes: 0, payload_bytes: 0, bitstream: Vec::new() })
    }

    /// The options in effect (keyframe interval resolved).
    pub fn options(&self) -> &Mp4Options {
        &self.options
    }

    /// Completes the MP4 and returns what it holds and the writer.
    pub fn finish(mut self) -> Result<(Mp4Summary, W)> {
        if self.frames == 0 {
            return Err(CoordinatorError::invalid_video("frames", "an MP4 needs at least one frame"));
        }
        self.muxer.finish_in_place().map_err(mp4_error)?;
        let summary = Mp4Summary {
            frames: self.frames,
            keyframes: self.keyframes,
            width: self.spec.width.next_multiple_of(2),
            height: self.spec.height.next_multiple_of(2),
            payload_bytes: self.payload_bytes,
        };
        Ok((summary, self.muxer.into_writer()))
    }
}

impl<W: Write> FrameSink for Mp4Writer<W> {
    fn spec(&self) -> &VideoSpec {
        &self.spec
    }

    fn push_frame(&mut self, frame: &[f32]) -> Result<()> {
        let yuv = rgb_to_yuv420(&self.spec, frame, self.options.matrix)?;
        let (w, h) = (yuv.width, yuv.height);
        let source = YUVSlices::new((&yuv.y, &yuv.u, &yuv.v), (w, h), (w, w / 2, w / 2));
        let encoded = self.encoder.encode(&source).map_err(mp4_error)?;
        let frame_type = encoded.frame_type();
        self.bitstream.clear();
        encoded.write_vec(&mut self.bitstream);
        if frame_type == FrameType::Skip || self.bitstream.is_empty() {
            return Err(mp4_error(format!("the encoder dropped frame {}", self.frames)));
        }
        let keyframe = frame_type == FrameType::IDR;
        let pts = self.frames as f64 / self.spec.fps;
        self.muxer.write_video(pts, &self.bitstream, keyframe).map_err(mp4_error)?;
        self.frames += 1;
        self.keyframes += usize::from(keyframe);
        self.payload_bytes += self.bitstream.len() as u64;
        Ok(())
    }

    fn frames_written(&self) -> usize {
        self.frames
    }
}

/// Sends OpenH264's log lines (printed to stdout by default: a warning as the encoder starts) to
/// `tracing`, target `openh264`: errors at WARN, the rest at DEBUG. Set before the encoder is
/// initialised (on the first frame), so nothing reaches stdout.
fn route_log(encoder: &mut Encoder) -> Result<()> {
    let callback: WelsTraceCallback = Some(openh264_log);
    // SAFETY: the encoder was created and is not initialised yet; ENCODER_OPTION_TRACE_CALLBACK
    // reads one `WelsTraceCallback` through the pointer, which is valid for the call (the library
    // copies the function pointer), and `openh264_log` lives for the whole program.
    let rc = unsafe { encoder.raw_api().set_option(ENCODER_OPTION_TRACE_CALLBACK, (&raw const callback).cast_mut().cast()) };
    if rc != 0 {
        return Err(CoordinatorError::encode("mp4", format!("OpenH264 refused its log callback ({rc})")));
    }
    Ok(())
}

/// OpenH264's trace callback: one message, as a `tracing` event.
unsafe extern "C" fn openh264_log(_context: *mut c_void, level: c_int, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: OpenH264 passes a NUL-terminated string that is valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let text = text.trim_end();
    if level <= WELS_LOG_ERROR as c_int {
        tracing::warn!(target: "openh264", "{text}");
    } else {
        tracing::debug!(target: "openh264", "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::test_frames::moving_pattern;

    fn encode(spec: VideoSpec, frames: usize, options: Mp4Options) -> (Mp4Summary, Vec<u8>) {
        let mut w = Mp4Writer::new(Vec::new(), spec, options).unwrap();
        for t in 0..frames {
            w.push_frame(&moving_pattern(&spec, t)).unwrap();
        }
        assert_eq!(w.frames_written(), frames);
        w.finish().unwrap()
    }

    #[test]
    fn writes_an_mp4_with_moov_first_and_periodic_keyframes() {
        let spec = VideoSpec::new(64, 48, 16.0).unwrap();
        let (summary, bytes) = encode(spec, 9, Mp4Options { keyframe_interval: 4, ..Default::default() });
        assert_eq!(&bytes[4..8], b"ftyp");
        let moov = bytes.windows(4).position(|w| w == b"moov").unwrap();
        let mdat = bytes.windows(4).position(|w| w == b"mdat").unwrap();
        assert!(moov < mdat, "fast start: moov before mdat");
        assert_eq!((summary.frames, summary.width, summary.height), (9, 64, 48));
        assert_eq!(summary.keyframes, 3, "IDR at frames 0, 4, 8");
        assert!(summary.payload_bytes > 0 && (summary.payload_bytes as usize) < bytes.len());
    }

    #[test]
    fn lower_qp_spends_more_bits() {
        let spec = VideoSpec::new(64, 48, 16.0).unwrap();
        let fine = encode(spec, 3, Mp4Options { rate_control: RateControl::ConstantQp(12), ..Default::default() }).0;
        let coarse = encode(spec, 3, Mp4Options { rate_control: RateControl::ConstantQp(40), ..Default::default() }).0;
        assert!(fine.payload_bytes > 2 * coarse.payload_bytes, "{fine:?} vs {coarse:?}");
        let rated = encode(spec, 3, Mp4Options { rate_control: RateControl::Bitrate { bps: 400_000, min_qp: 10, max_qp: 40 }, ..Default::default() }).0;
        assert_eq!(rated.frames, 3);
    }

    #[test]
    fn odd_sizes_are_coded_padded_to_even() {
        let spec = VideoSpec::new(33, 17, 16.0).unwrap();
        let (summary, _) = encode(spec, 2, Mp4Options::default());
        assert_eq!((summary.width, summary.height), (34, 18));
    }

    #[test]
    fn bad_settings_and_frames_are_errors() {
        let spec = VideoSpec::new(64, 48, 16.0).unwrap();
        let bad_qp = Mp4Options { rate_control: RateControl::ConstantQp(60), ..Default::default() };
        assert!(Mp4Writer::new(Vec::new(), spec, bad_qp).err().unwrap().to_string().contains("qp"));
        let big = VideoSpec::new(4096, 2160, 16.0).unwrap();
        assert!(Mp4Writer::new(Vec::new(), big, Mp4Options::default()).err().unwrap().to_string().contains("width"));
        let mut w = Mp4Writer::new(Vec::new(), spec, Mp4Options::default()).unwrap();
        assert!(w.push_frame(&[0.5; 10]).is_err());
        assert!(w.push_frames(&vec![0.5; spec.frame_len() + 1]).is_err());
        assert!(w.finish().err().unwrap().to_string().contains("at least one frame"));
    }

    #[test]
    fn default_keyframe_interval_is_two_seconds() {
        let spec = VideoSpec::new(64, 48, 16.0).unwrap();
        let w = Mp4Writer::new(Vec::new(), spec, Mp4Options::default()).unwrap();
        assert_eq!(w.options().keyframe_interval, 32);
    }
}
