//! H.264 for MP4 input: the `avcC` decoder configuration, sequence parameter sets (frame size,
//! chroma format, bit depth and colour description, read before OpenH264 sees a frame so that
//! a hostile size is refused first), and decoding of length-prefixed samples with OpenH264.
//!
//! OpenH264 decodes 8-bit 4:2:0 progressive streams (Constrained Baseline through High profile,
//! B-frames included); other chroma formats, bit depths and interlaced streams are refused.

use super::bytes::ByteReader;
use super::sps::{parse_sps, Sps};
use super::yuv::yuv420_to_rgb;
use super::{corrupt, unsupported, InputLimits};
use crate::Result;
use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;
use openh264::OpenH264API;
use std::collections::VecDeque;

const FORMAT: &str = "mp4/h264";
/// NAL unit type of a sequence parameter set.
const NAL_SPS: u8 = 7;
/// Longest parameter set accepted (real ones are tens to a few hundred bytes).
const MAX_PARAMETER_SET: usize = 4096;
/// The Annex B start code put before each NAL unit for the decoder.
const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// The `avcC` box: how NAL units are framed in samples, and the parameter sets.
#[derive(Debug)]
pub(super) struct AvcConfig<'a> {
    /// Bytes of the big-endian length before each NAL unit in a sample (1, 2 or 4).
    pub nal_length_size: usize,
    /// Sequence parameter sets (NAL units, header byte included).
    pub sps: Vec<&'a [u8]>,
    /// Picture parameter sets.
    pub pps: Vec<&'a [u8]>,
}

fn parameter_sets<'a>(r: &mut ByteReader<'a>, count: usize, what: &str) -> Result<Vec<&'a [u8]>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u16()? as usize;
        let nal = r.take(len)?;
        if nal.is_empty() || nal.len() > MAX_PARAMETER_SET {
            return Err(corrupt(FORMAT, format!("a {what} in `avcC` is {len} bytes")));
        }
        out.push(nal);
    }
    Ok(out)
}

/// Parses an `avcC` body (ISO/IEC 14496-15 §5.3.3.1).
pub(super) fn parse_avcc(body: &[u8]) -> Result<AvcConfig<'_>> {
    let mut r = ByteReader::new(body, FORMAT, "`avcC` box");
    let version = r.u8()?;
    if version != 1 {
        return Err(unsupported(FORMAT, format!("`avcC` version {version}")));
    }
    r.skip(3)?; // profile, compatibility, level
    let nal_length_size = (r.u8()? & 3) as usize + 1;
    if nal_length_size == 3 {
        return Err(corrupt(FORMAT, "`avcC` gives 3-byte NAL lengths, which the format does not allow"));
    }
    let sps_count = (r.u8()? & 0x1f) as usize;
    let sps = parameter_sets(&mut r, sps_count, "sequence parameter set")?;
    let pps_count = r.u8()? as usize;
    let pps = parameter_sets(&mut r, pps_count, "picture parameter set")?;
    Ok(AvcConfig { nal_length_size, sps, pps })
}

/// The NAL units of one length-prefixed sample, each checked to fit.
pub(super) fn sample_nals(sample: &[u8], nal_length_size: usize) -> impl Iterator<Item = Result<&[u8]>> {
    let mut r = ByteReader::new(sample, FORMAT, "a sample");
    std::iter::from_fn(move || {
        if r.remaining() == 0 {
            return None;
        }
        let len = match r.take(nal_length_size) {
            Ok(b) => b.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize),
            Err(e) => return Some(Err(e)),
        };
        if len == 0 {
            let _ = r.rest();
            return Some(Err(corrupt(FORMAT, "a sample holds an empty NAL unit")));
        }
        let nal = r.take(len);
        if nal.is_err() {
            let _ = r.rest();
        }
        Some(nal)
    })
}

/// The first sequence parameter set among a sample's NAL units (for `avc3` streams, whose
/// parameter sets travel in band).
pub(super) fn find_sps(sample: &[u8], nal_length_size: usize) -> Result<Option<&[u8]>> {
    for nal in sample_nals(sample, nal_length_size) {
        let nal = nal?;
        if nal[0] & 0x1f == NAL_SPS {
            return Ok(Some(nal));
        }
    }
    Ok(None)
}

/// Checks a sequence parameter set: its size against `limits`, and that OpenH264 decodes it.
pub(super) fn checked_sps(nal: &[u8], limits: &InputLimits) -> Result<Sps> {
    if nal.len() > MAX_PARAMETER_SET {
        return Err(corrupt(FORMAT, format!("a sequence parameter set is {} bytes", nal.len())));
    }
    let sps = parse_sps(nal)?;
    limits.check_size("the H.264 coded frame", sps.coded_width as u64, sps.coded_height as u64)?;
    if sps.chroma_format_idc != 1 {
        let name = ["4:0:0 (monochrome)", "4:2:0", "4:2:2", "4:4:4"].get(sps.chroma_format_idc as usize).copied().unwrap_or("unknown");
        return Err(unsupported(FORMAT, format!("chroma format {name}; only 4:2:0 is decoded")));
    }
    if sps.bit_depth_luma != 8 || sps.bit_depth_chroma != 8 {
        return Err(unsupported(FORMAT, format!("{}-bit samples; only 8-bit is decoded", sps.bit_depth_luma.max(sps.bit_depth_chroma))));
    }
    if !sps.frame_mbs_only {
        return Err(unsupported(FORMAT, "interlaced coding; only progressive streams are decoded"));
    }
    Ok(sps)
}

/// Decodes length-prefixed H.264 samples into planar RGB frames.
pub(super) struct H264Decoder {
    decoder: Decoder,
    nal_length_size: usize,
    limits: InputLimits,
    /// The active sequence parameter set's facts (size, colour).
    sps: Sps,
    annex_b: Vec<u8>,
    frames_out: usize,
}

impl H264Decoder {
    /// A decoder primed with `config`'s parameter sets; `sps` is the stream's first sequence
    /// parameter set, already checked, whose size every frame must have.
    pub fn new(config: &AvcConfig<'_>, sps: Sps, limits: &InputLimits) -> Result<Self> {
        // Frames are taken when the decoder gives them (in display order, B-frames reordered)
        // and the rest at the end, never by flushing early.
        let decoder_config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
        let decoder =
            Decoder::with_api_config(OpenH264API::from_source(), decoder_config).map_err(|e| corrupt(FORMAT, format!("the decoder did not start: {e}")))?;
        let mut this = Self { decoder, nal_length_size: config.nal_length_size, limits: *limits, sps, annex_b: Vec::new(), frames_out: 0 };
        for &nal in &config.sps {
            checked_sps(nal, limits)?;
        }
        for &nal in config.sps.iter().chain(&config.pps) {
            this.annex_b.extend_from_slice(&START_CODE);
            this.annex_b.extend_from_slice(nal);
        }
        if !this.annex_b.is_empty() {
            let out = this.decoder.decode(&this.annex_b).map_err(|e| corrupt(FORMAT, format!("the parameter sets do not decode: {e}")))?;
            if out.is_some() {
                return Err(corrupt(FORMAT, "the parameter sets produced a picture"));
            }
        }
        Ok(this)
    }

    /// The frame size every frame has.
    pub fn size(&self) -> (u32, u32) {
        (self.sps.width, self.sps.height)
    }

    /// Decodes one sample; a frame it completes is appended to `out` as planar RGB.
    pub fn decode_sample(&mut self, sample: &[u8], out: &mut VecDeque<Vec<f32>>) -> Result<()> {
        self.annex_b.clear();
        for nal in sample_nals(sample, self.nal_length_size) {
            let nal = nal?;
            if nal[0] & 0x1f == NAL_SPS {
                let sps = checked_sps(nal, &self.limits)?;
                if (sps.width, sps.height) != (self.sps.width, self.sps.height) {
                    return Err(unsupported(
                        FORMAT,
                        format!("the frame size changes mid-stream from {}x{} to {}x{}", self.sps.width, self.sps.height, sps.width, sps.height),
                    ));
                }
                self.sps = sps;
            }
            self.annex_b.extend_from_slice(&START_CODE);
            self.annex_b.extend_from_slice(nal);
        }
        if self.annex_b.is_empty() {
            return Err(corrupt(FORMAT, "an empty sample"));
        }
        let frame_no = self.frames_out;
        let decoded = self.decoder.decode(&self.annex_b).map_err(|e| corrupt(FORMAT, format!("frame data after frame {frame_no} does not decode: {e}")))?;
        if let Some(yuv) = decoded {
            out.push_back(to_rgb(&yuv, &self.sps, frame_no)?);
            self.frames_out += 1;
        }
        Ok(())
    }

    /// Takes the frames the decoder still holds (the last ones, in display order).
    pub fn flush(&mut self, out: &mut VecDeque<Vec<f32>>) -> Result<()> {
        let sps = self.sps;
        let first = self.frames_out;
        let frames = self.decoder.flush_remaining().map_err(|e| corrupt(FORMAT, format!("the last frames do not decode: {e}")))?;
        for (i, yuv) in frames.iter().enumerate() {
            out.push_back(to_rgb(yuv, &sps, first + i)?);
        }
        self.frames_out += frames.len();
        Ok(())
    }
}

/// A decoded picture as planar RGB, checked to have the stream's size.
fn to_rgb(yuv: &DecodedYUV<'_>, sps: &Sps, frame_no: usize) -> Result<Vec<f32>> {
    let (w, h) = yuv.dimensions();
    if (w, h) != (sps.width as usize, sps.height as usize) {
        return Err(corrupt(FORMAT, format!("frame {frame_no} decoded as {w}x{h}, the sequence parameter set says {}x{}", sps.width, sps.height)));
    }
    let (ys, us, vs) = yuv.strides();
    if us != vs {
        return Err(corrupt(FORMAT, "the decoder gave chroma planes of different strides"));
    }
    let mut rgb = vec![0.0f32; 3 * w * h];
    yuv420_to_rgb((yuv.y(), ys), (yuv.u(), us), yuv.v(), (w, h), sps.colour, &mut rgb).map_err(|e| corrupt(FORMAT, e))?;
    Ok(rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avcc_boxes_are_parsed_and_checked() {
        // version 1, profile 66, compat, level 30, 4-byte lengths, one 4-byte SPS, one 2-byte PPS.
        let avcc = [1, 66, 0xc0, 30, 0xff, 0xe1, 0, 4, 0x67, 1, 2, 3, 1, 0, 2, 0x68, 9];
        let c = parse_avcc(&avcc).unwrap();
        assert_eq!(c.nal_length_size, 4);
        assert_eq!(c.sps, vec![&[0x67, 1, 2, 3][..]]);
        assert_eq!(c.pps, vec![&[0x68, 9][..]]);
        for cut in 0..avcc.len() {
            assert!(parse_avcc(&avcc[..cut]).is_err(), "cut at {cut}");
        }
        let mut three = avcc;
        three[4] = 0xfe;
        assert!(parse_avcc(&three).unwrap_err().to_string().contains("3-byte"));
        let mut v2 = avcc;
        v2[0] = 2;
        assert!(parse_avcc(&v2).unwrap_err().to_string().contains("version 2"));
    }

    #[test]
    fn samples_split_into_checked_nal_units() {
        let sample = [0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x06];
        let nals: Vec<&[u8]> = sample_nals(&sample, 4).collect::<Result<_>>().unwrap();
        assert_eq!(nals, vec![&[0x65, 1][..], &[0x06][..]]);
        let long = [0, 0, 0, 9, 0x65, 1];
        let mut it = sample_nals(&long, 4);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none(), "iteration stops after an error");
        assert!(sample_nals(&[0, 0, 0, 0], 4).next().unwrap().is_err(), "empty NAL unit");
        assert!(sample_nals(&[0, 0], 4).next().unwrap().is_err(), "truncated length");
        assert_eq!(find_sps(&[0, 2, 0x06, 0, 0, 2, 0x67, 5], 2).unwrap(), Some(&[0x67, 5][..]));
    }
}
