//! MP4 (ISO base media file format, ISO/IEC 14496-12) demuxing for H.264 input: the first video
//! track's sample description, timing and sample tables, read straight from the input bytes.
//!
//! Written here rather than taken from a crate because the input is untrusted: every table is a
//! borrowed slice whose declared entry count is checked against its box before use, nothing is
//! allocated from a count in the file, and samples are located lazily, so a hostile table costs
//! no more than its own bytes. Fragmented MP4 (`moof`), edit lists and codecs other than H.264
//! (`avc1`, `avc3`) are not supported; samples are decoded in file (decode) order and the
//! decoder puts them in display order.

use super::bytes::{u32_at, u64_at, ByteReader};
use super::h264::{checked_sps, find_sps, parse_avcc, H264Decoder};
use super::{corrupt, unsupported, InputFormat, InputInfo, InputLimits};
use crate::Result;
use std::collections::VecDeque;

const FORMAT: &str = "mp4";

/// A box type as text (printable ASCII, else hex).
fn fourcc(kind: [u8; 4]) -> String {
    if kind.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(&kind).into_owned()
    } else {
        format!("0x{}", kind.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

/// The boxes in `data`, in order, as (type, body); an error ends the iteration.
fn boxes(data: &[u8]) -> impl Iterator<Item = Result<([u8; 4], &[u8])>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= data.len() {
            return None;
        }
        let item = next_box(&data[pos..]);
        match &item {
            Ok((consumed, _, _)) => pos += consumed,
            Err(_) => pos = data.len(),
        }
        Some(item.map(|(_, kind, body)| (kind, body)))
    })
}

/// The box at the start of `data`: (bytes it spans, type, body).
fn next_box(data: &[u8]) -> Result<(usize, [u8; 4], &[u8])> {
    let mut r = ByteReader::new(data, FORMAT, "a box header");
    let size32 = r.u32()?;
    let kind: [u8; 4] = r.take(4)?.try_into().expect("4 bytes");
    let (size, header) = match size32 {
        0 => (data.len() as u64, 8),
        1 => (r.u64()?, 16),
        n => (n as u64, 8),
    };
    if size < header {
        return Err(corrupt(FORMAT, format!("box `{}` claims {size} bytes, less than its header", fourcc(kind))));
    }
    if size > data.len() as u64 {
        return Err(corrupt(FORMAT, format!("truncated: box `{}` needs {size} bytes, {} remain", fourcc(kind), data.len())));
    }
    Ok((size as usize, kind, &data[header as usize..size as usize]))
}

/// The body of the first child box of type `kind`.
fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<Option<&'a [u8]>> {
    for item in boxes(data) {
        let (k, body) = item?;
        if &k == kind {
            return Ok(Some(body));
        }
    }
    Ok(None)
}

/// The body of a child box that must be there.
fn required<'a>(data: &'a [u8], kind: &[u8; 4], parent: &str) -> Result<&'a [u8]> {
    child(data, kind)?.ok_or_else(|| corrupt(FORMAT, format!("`{parent}` has no `{}` box", fourcc(*kind))))
}

/// Per-sample byte sizes (`stsz`).
#[derive(Clone, Copy, Debug)]
enum SampleSizes<'a> {
    /// Every sample has this size.
    Constant(u32),
    /// One big-endian u32 per sample.
    Table(&'a [u8]),
}

/// Chunk offsets (`stco` or `co64`).
#[derive(Clone, Copy, Debug)]
enum ChunkOffsets<'a> {
    /// 32-bit offsets.
    Short(&'a [u8]),
    /// 64-bit offsets.
    Long(&'a [u8]),
}

impl ChunkOffsets<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Short(t) => t.len() / 4,
            Self::Long(t) => t.len() / 8,
        }
    }

    /// Offset of chunk `i` (0-based).
    fn get(&self, i: usize) -> Option<u64> {
        match self {
            Self::Short(t) => u32_at(t, i).map(u64::from),
            Self::Long(t) => u64_at(t, i),
        }
    }
}

/// The first video track of a movie.
#[derive(Clone, Copy, Debug)]
struct VideoTrack<'a> {
    /// Ticks per second of the track's times.
    timescale: u32,
    /// The sample entry's codec (`avc1`, `avc3`).
    codec: [u8; 4],
    /// The `avcC` box body.
    avcc: &'a [u8],
    /// `stts` entries: (sample count, duration), 8 bytes each.
    stts: &'a [u8],
    /// `stsc` entries: (first chunk, samples per chunk, description index), 12 bytes each.
    stsc: &'a [u8],
    sample_count: u32,
    sizes: SampleSizes<'a>,
    chunks: ChunkOffsets<'a>,
}

impl VideoTrack<'_> {
    /// Frames per second from the total duration of all samples, when plausible.
    fn fps(&self) -> Option<f64> {
        let (mut samples, mut ticks) = (0u64, 0u128);
        for e in self.stts.chunks_exact(8) {
            let count = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as u64;
            let delta = u32::from_be_bytes([e[4], e[5], e[6], e[7]]) as u128;
            samples += count;
            ticks += count as u128 * delta;
        }
        if samples == 0 || ticks == 0 || self.timescale == 0 {
            return None;
        }
        let fps = samples as f64 * self.timescale as f64 / ticks as f64;
        (fps.is_finite() && fps > 0.0 && fps <= 1000.0).then_some(fps)
    }
}

/// Finds the first video track of the movie in `file`.
fn video_track(file: &[u8]) -> Result<VideoTrack<'_>> {
    let mut moov = None;
    for item in boxes(file) {
        let (kind, body) = item?;
        match &kind {
            b"moov" if moov.is_none() => moov = Some(body),
            b"moof" => return Err(unsupported(FORMAT, "fragmented MP4 (`moof` boxes)")),
            _ => {}
        }
    }
    let moov = moov.ok_or_else(|| corrupt(FORMAT, "no `moov` box (an incomplete file?)"))?;
    for item in boxes(moov) {
        let (kind, trak) = item?;
        if &kind != b"trak" {
            continue;
        }
        let mdia = required(trak, b"mdia", "trak")?;
        let hdlr = required(mdia, b"hdlr", "mdia")?;
        let mut r = ByteReader::new(hdlr, FORMAT, "`hdlr` box");
        r.skip(8)?;
        if r.take(4)? == b"vide" {
            return parse_track(mdia);
        }
    }
    Err(unsupported(FORMAT, "no video track"))
}

/// Reads a video track's `mdia` box.
fn parse_track(mdia: &[u8]) -> Result<VideoTrack<'_>> {
    let mdhd = required(mdia, b"mdhd", "mdia")?;
    let mut r = ByteReader::new(mdhd, FORMAT, "`mdhd` box");
    let version = r.u8()?;
    r.skip(3 + if version == 1 { 16 } else { 8 })?;
    let timescale = r.u32()?;
    let stbl = required(required(mdia, b"minf", "mdia")?, b"stbl", "minf")?;

    let stsd = required(stbl, b"stsd", "stbl")?;
    let mut r = ByteReader::new(stsd, FORMAT, "`stsd` box");
    r.skip(4)?;
    if r.u32()? == 0 {
        return Err(corrupt(FORMAT, "`stsd` describes no sample format"));
    }
    let (codec, entry) = boxes(r.rest()).next().ok_or_else(|| corrupt(FORMAT, "`stsd` is empty"))??;
    let avcc = match &codec {
        b"avc1" | b"avc3" => {
            // VisualSampleEntry: 78 bytes of fixed fields, then boxes.
            let fields = entry.get(78..).ok_or_else(|| corrupt(FORMAT, "the `avc1` sample entry is truncated"))?;
            required(fields, b"avcC", "avc1")?
        }
        b"encv" => return Err(unsupported(FORMAT, "encrypted video")),
        other => {
            let name = match other {
                b"hvc1" | b"hev1" => " (H.265)",
                b"av01" => " (AV1)",
                b"vp08" | b"vp09" => " (VP8/VP9)",
                b"mp4v" => " (MPEG-4 Part 2)",
                _ => "",
            };
            return Err(unsupported(FORMAT, format!("codec `{}`{name}; only H.264 (`avc1`, `avc3`) is decoded", fourcc(*other))));
        }
    };

    let table = |kind: &[u8; 4], entry: usize| -> Result<&[u8]> {
        let body = required(stbl, kind, "stbl")?;
        let mut r = ByteReader::new(body, FORMAT, "a sample table");
        r.skip(4)?;
        let count = r.u32()?;
        r.table(count, entry)
    };
    let stts = table(b"stts", 8)?;
    let stsc = table(b"stsc", 12)?;
    let chunks = match child(stbl, b"stco")? {
        Some(_) => ChunkOffsets::Short(table(b"stco", 4)?),
        None if child(stbl, b"co64")?.is_some() => ChunkOffsets::Long(table(b"co64", 8)?),
        None => return Err(corrupt(FORMAT, "`stbl` has neither `stco` nor `co64`")),
    };
    let (sample_count, sizes) = match child(stbl, b"stsz")? {
        Some(body) => {
            let mut r = ByteReader::new(body, FORMAT, "`stsz` box");
            r.skip(4)?;
            let size = r.u32()?;
            let count = r.u32()?;
            (count, if size == 0 { SampleSizes::Table(r.table(count, 4)?) } else { SampleSizes::Constant(size) })
        }
        None if child(stbl, b"stz2")?.is_some() => return Err(unsupported(FORMAT, "compact sample sizes (`stz2`)")),
        None => return Err(corrupt(FORMAT, "`stbl` has no `stsz` box")),
    };
    Ok(VideoTrack { timescale, codec, avcc, stts, stsc, sample_count, sizes, chunks })
}

/// Walks a track's samples in file order, locating each in the file; lazy, so that a table
/// declaring billions of samples costs nothing until they are asked for.
struct Samples<'a> {
    file: &'a [u8],
    track: VideoTrack<'a>,
    /// Next sample (0-based).
    sample: u32,
    /// Current `stsc` entry.
    entry: usize,
    /// Current chunk (1-based; 0 before the first).
    chunk: u64,
    /// Samples left in the current chunk.
    left_in_chunk: u64,
    /// File offset of the next sample.
    offset: u64,
}

impl<'a> Samples<'a> {
    fn new(file: &'a [u8], track: VideoTrack<'a>) -> Self {
        Self { file, track, sample: 0, entry: 0, chunk: 0, left_in_chunk: 0, offset: 0 }
    }

    /// `stsc` entry `i`: (first chunk, samples per chunk).
    fn stsc(&self, i: usize) -> Result<Option<(u64, u64)>> {
        let (Some(first), Some(per_chunk), Some(description)) =
            (u32_at(self.track.stsc, 3 * i), u32_at(self.track.stsc, 3 * i + 1), u32_at(self.track.stsc, 3 * i + 2))
        else {
            return Ok(None);
        };
        if description != 1 {
            return Err(unsupported(FORMAT, format!("samples use sample description {description}; only one is supported")));
        }
        Ok(Some((first as u64, per_chunk as u64)))
    }

    /// Moves to the next chunk that holds samples.
    fn next_chunk(&mut self) -> Result<()> {
        loop {
            self.chunk += 1;
            if self.chunk > self.track.chunks.len() as u64 {
                return Err(corrupt(FORMAT, format!("the chunks hold {} samples, the sample table lists {}", self.sample, self.track.sample_count)));
            }
            let Some((first, mut per_chunk)) = self.stsc(self.entry)? else {
                return Err(corrupt(FORMAT, "`stsc` is empty"));
            };
            if self.chunk == 1 && first != 1 {
                return Err(corrupt(FORMAT, format!("`stsc` starts at chunk {first}, not 1")));
            }
            if let Some((next_first, next_per_chunk)) = self.stsc(self.entry + 1)? {
                if next_first <= first {
                    return Err(corrupt(FORMAT, "`stsc` chunk numbers do not increase"));
                }
                if self.chunk >= next_first {
                    self.entry += 1;
                    per_chunk = next_per_chunk;
                }
            }
            self.left_in_chunk = per_chunk;
            self.offset = self.track.chunks.get(self.chunk as usize - 1).ok_or_else(|| corrupt(FORMAT, "a chunk offset is missing"))?;
            if per_chunk > 0 {
                return Ok(());
            }
        }
    }

    /// The next sample's bytes.
    fn next_sample(&mut self) -> Result<Option<&'a [u8]>> {
        if self.sample >= self.track.sample_count {
            return Ok(None);
        }
        if self.left_in_chunk == 0 {
            self.next_chunk()?;
        }
        let size = match self.track.sizes {
            SampleSizes::Constant(s) => s,
            SampleSizes::Table(t) => u32_at(t, self.sample as usize).ok_or_else(|| corrupt(FORMAT, "`stsz` is shorter than its count"))?,
        } as u64;
        if size == 0 {
            return Err(corrupt(FORMAT, format!("sample {} is empty", self.sample)));
        }
        let end = self.offset.saturating_add(size);
        if end > self.file.len() as u64 {
            return Err(corrupt(
                FORMAT,
                format!("sample {} at bytes {}..{end} lies outside the {}-byte file (truncated?)", self.sample, self.offset, self.file.len()),
            ));
        }
        let bytes = &self.file[self.offset as usize..end as usize];
        self.offset = end;
        self.left_in_chunk -= 1;
        self.sample += 1;
        Ok(Some(bytes))
    }
}

/// Frames of an MP4's H.264 video track.
pub(super) struct Mp4Source<'a> {
    samples: Samples<'a>,
    decoder: H264Decoder,
    ready: VecDeque<Vec<f32>>,
    flushed: bool,
    info: InputInfo,
}

impl<'a> Mp4Source<'a> {
    /// Reads the movie's structure and the stream's parameter sets; decodes nothing yet.
    pub fn open(file: &'a [u8], limits: &InputLimits) -> Result<Self> {
        let track = video_track(file)?;
        let config = parse_avcc(track.avcc)?;
        let fps = track.fps();
        let (codec, sample_count) = (track.codec, track.sample_count);
        let samples = Samples::new(file, track);
        let sps_nal = match config.sps.first() {
            Some(&nal) => nal,
            // `avc3` may carry its parameter sets only in band, in the first sample.
            None if &codec == b"avc3" => {
                let mut probe = Samples::new(file, track);
                let first = probe.next_sample()?.ok_or_else(|| corrupt(FORMAT, "the track has no samples"))?;
                find_sps(first, config.nal_length_size)?.ok_or_else(|| corrupt(FORMAT, "no sequence parameter set in `avcC` or the first sample"))?
            }
            None => return Err(corrupt(FORMAT, "`avcC` holds no sequence parameter set")),
        };
        let sps = checked_sps(sps_nal, limits)?;
        let decoder = H264Decoder::new(&config, sps, limits)?;
        let (width, height) = decoder.size();
        let info = InputInfo { format: InputFormat::Mp4, width, height, fps, declared_frames: Some(sample_count as usize) };
        Ok(Self { samples, decoder, ready: VecDeque::new(), flushed: false, info })
    }

    /// What the video is.
    pub fn info(&self) -> InputInfo {
        self.info
    }

    /// The next frame in display order.
    pub fn next_frame(&mut self) -> Result<Option<Vec<f32>>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(Some(frame));
            }
            if self.flushed {
                return Ok(None);
            }
            match self.samples.next_sample()? {
                Some(sample) => self.decoder.decode_sample(sample, &mut self.ready)?,
                None => {
                    self.decoder.flush(&mut self.ready)?;
                    self.flushed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn boxes_are_bounds_checked() {
        let data = [bx(b"ftyp", b"isom"), bx(b"free", b"")].concat();
        let kinds: Vec<[u8; 4]> = boxes(&data).map(|b| b.unwrap().0).collect();
        assert_eq!(kinds, vec![*b"ftyp", *b"free"]);
        let mut long = bx(b"mdat", b"abcd");
        long[3] = 200;
        assert!(boxes(&long).next().unwrap().unwrap_err().to_string().contains("truncated: box `mdat` needs 200 bytes"));
        let mut short = bx(b"mdat", b"abcd");
        short[3] = 4;
        assert!(boxes(&short).next().unwrap().unwrap_err().to_string().contains("less than its header"));
        // size 1: a 64-bit size follows; size 0: to the end.
        let mut large = vec![0, 0, 0, 1];
        large.extend_from_slice(b"mdat");
        large.extend_from_slice(&20u64.to_be_bytes());
        large.extend_from_slice(b"wxyz");
        assert_eq!(boxes(&large).next().unwrap().unwrap().1, b"wxyz");
        let open_ended = [&[0u8, 0, 0, 0][..], b"mdat", b"rest"].concat();
        assert_eq!(boxes(&open_ended).next().unwrap().unwrap().1, b"rest");
        assert!(boxes(&[0, 0, 0]).next().unwrap().is_err());
        assert_eq!(fourcc(*b"avc1"), "avc1");
        assert_eq!(fourcc([0, 1, 2, 3]), "0x00010203");
    }

    /// A track whose tables are given directly.
    fn track<'a>(stsc: &'a [u8], sizes: SampleSizes<'a>, count: u32, chunks: &'a [u8]) -> VideoTrack<'a> {
        VideoTrack { timescale: 90_000, codec: *b"avc1", avcc: &[], stts: &[], stsc, sample_count: count, sizes, chunks: ChunkOffsets::Short(chunks) }
    }

    fn words(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    #[test]
    fn samples_are_located_through_the_chunk_tables() {
        let file: Vec<u8> = (0..100u8).collect();
        // Chunks at 10 and 50: chunk 1 holds 2 samples, chunk 2 holds 3.
        let stsc = words(&[1, 2, 1, 2, 3, 1]);
        let sizes = words(&[3, 4, 5, 6, 7]);
        let chunks = words(&[10, 50]);
        let mut s = Samples::new(&file, track(&stsc, SampleSizes::Table(&sizes), 5, &chunks));
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| s.next_sample().unwrap().map(|b| b.to_vec())).collect();
        assert_eq!(got, vec![vec![10, 11, 12], vec![13, 14, 15, 16], vec![50, 51, 52, 53, 54], (55..61).collect(), (61..68).collect()]);
        // More samples than the chunks hold, a sample past the end, bad stsc.
        let mut s = Samples::new(&file, track(&stsc, SampleSizes::Constant(1), 6, &chunks));
        assert!((0..6).map(|_| s.next_sample()).any(|r| r.is_err_and(|e| e.to_string().contains("chunks hold 5 samples"))));
        let mut s = Samples::new(&file, track(&stsc, SampleSizes::Constant(40), 5, &chunks));
        assert!((0..5).map(|_| s.next_sample()).any(|r| r.is_err_and(|e| e.to_string().contains("outside the 100-byte file"))));
        let bad = words(&[2, 2, 1]);
        assert!(Samples::new(&file, track(&bad, SampleSizes::Constant(1), 1, &chunks)).next_sample().unwrap_err().to_string().contains("starts at chunk 2"));
        let two = words(&[1, 2, 2]);
        assert!(Samples::new(&file, track(&two, SampleSizes::Constant(1), 1, &chunks)).next_sample().unwrap_err().to_string().contains("sample description 2"));
        let backwards = words(&[1, 1, 1, 1, 1, 1]);
        assert!(Samples::new(&file, track(&backwards, SampleSizes::Constant(1), 2, &chunks))
            .next_sample()
            .unwrap_err()
            .to_string()
            .contains("do not increase"));
        // A billion samples declared with a constant size: nothing is allocated, the walk stops
        // at the first sample outside the file.
        let huge = words(&[1, u32::MAX, 1]);
        let mut s = Samples::new(&file, track(&huge, SampleSizes::Constant(40), 1 << 30, &chunks));
        assert!(s.next_sample().unwrap().is_some() && s.next_sample().unwrap().is_some());
        assert!(s.next_sample().is_err());
    }

    #[test]
    fn frame_rate_comes_from_the_sample_durations() {
        let stts = words(&[8, 5625, 1, 5625]);
        let t = VideoTrack { stts: &stts, ..track(&[], SampleSizes::Constant(1), 9, &[]) };
        assert_eq!(t.fps(), Some(16.0));
        let t = VideoTrack { stts: &[], ..track(&[], SampleSizes::Constant(1), 9, &[]) };
        assert_eq!(t.fps(), None);
    }
}
