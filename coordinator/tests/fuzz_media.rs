//! Structure-aware fuzzing of the input-video demuxers and decoders (the hand-written MP4 demuxer
//! with the H.264 decoder behind it, GIF, PNG and APNG): seed files written by Tessera's own
//! writers are mutated where their structure lives (MP4 box sizes, types and sample-table counts;
//! PNG chunk lengths and fields with the checksum made right again, so the damage reaches the
//! decoder; bytes at any depth; splices, duplicated and dropped boxes) and decoded under tight
//! [`InputLimits`]. Every input must end in frames or an `InvalidInputVideo` error, within the
//! limits' time budget, and without allocating more than the limits allow: a counting global
//! allocator measures each case's peak (Rust-side allocations; the H.264 decoder's own C heap is
//! bounded by the frame size checked from its parameter sets before any picture is decoded).
//!
//! A fixed seed and a fixed number of cases: CI runs the same inputs every time, and proptest
//! reports a failing input's mutation list, shrunk.

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};
use tessera_coordinator::video::input::{InputLimits, VideoReader};
use tessera_coordinator::video::{write_png, FrameSink, GifOptions, GifWriter, Mp4Options, Mp4Writer, RateControl, VideoSpec};
use tessera_coordinator::CoordinatorError;

thread_local! {
    /// Bytes this thread holds (allocated here minus freed here).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The most [`LIVE`] has been since the last [`measure`] began.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system allocator, counting each thread's live bytes and their peak.
struct Counting;

fn count(delta: isize) {
    // During a thread's teardown the counters may be gone: those bytes are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to `System` with the caller's layout unchanged; the counters
// are plain thread-local cells (const-initialised, no destructor), so counting never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on to `System`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through here).
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc` for `ptr` and `layout`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the most bytes it held at once on this thread.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// The limits every case is decoded under: frames up to 256 × 256, 16 of them, one second.
fn limits() -> InputLimits {
    InputLimits { max_width: 256, max_height: 256, max_frames: 16, max_decoded_pixels: 256 * 256 * 16, max_seconds: Duration::from_secs(1) }
}

/// The most a case may hold at once. A decoded frame at the limits is 256 × 256 × 3 f32 (768 KiB);
/// the reader, the H.264 reorder queue (at most 16 frames) and the YUV planes stay under 16 such
/// frames (12 MiB). Twice that leaves room for buffers; a table, count or size taken from the
/// file and trusted would allocate gigabytes.
const MAX_CASE_BYTES: usize = 24 << 20;

/// The most one case may take: the time budget (checked between frames) plus one frame's decode
/// at the limits, with a margin for a busy machine.
const MAX_CASE_TIME: Duration = Duration::from_secs(4);

/// What decoding one input gave: frames read, or the error's text.
fn decode(bytes: &[u8]) -> Result<usize, String> {
    let mut reader = VideoReader::open(bytes, limits()).map_err(checked)?;
    let mut frames = 0;
    while let Some(frame) = reader.next_frame().map_err(checked)? {
        let info = reader.info();
        assert_eq!(frame.len(), 3 * info.width as usize * info.height as usize);
        frames += 1;
    }
    Ok(frames)
}

/// An error must be the input's fault, and say so.
fn checked(e: CoordinatorError) -> String {
    assert!(matches!(e, CoordinatorError::InvalidInputVideo { .. }), "not an input-video error: {e}");
    let text = e.to_string();
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument, "{text}");
    text
}

/// Decodes `bytes` under the bounds; the outcome, for counting.
fn bounded(bytes: &[u8]) -> Result<Result<usize, String>, TestCaseError> {
    let started = Instant::now();
    let (out, peak) = measure(|| decode(bytes));
    let spent = started.elapsed();
    prop_assert!(peak <= MAX_CASE_BYTES, "{} bytes in: {peak} bytes held at once, more than {MAX_CASE_BYTES}", bytes.len());
    prop_assert!(spent <= MAX_CASE_TIME, "{} bytes in: {spent:?}, more than {MAX_CASE_TIME:?}", bytes.len());
    Ok(out)
}

// ---- Seeds ----

fn mp4_seed(width: u32, height: u32, frames: usize, options: Mp4Options) -> Vec<u8> {
    let spec = VideoSpec::new(width, height, 16.0).unwrap();
    let mut w = Mp4Writer::new(Vec::new(), spec, options).unwrap();
    (0..frames).for_each(|t| w.push_frame(&common::moving_pattern(&spec, t)).unwrap());
    w.finish().unwrap().1
}

fn gif_seed(frames: usize) -> Vec<u8> {
    let spec = VideoSpec::new(40, 24, 10.0).unwrap();
    let mut w = GifWriter::new(Vec::new(), spec, GifOptions::default()).unwrap();
    (0..frames).for_each(|t| w.push_frame(&common::moving_pattern(&spec, t)).unwrap());
    w.finish().unwrap()
}

fn png_seed() -> Vec<u8> {
    let spec = VideoSpec::new(40, 24, 16.0).unwrap();
    let mut out = Vec::new();
    write_png(&mut out, &spec, &common::moving_pattern(&spec, 2)).unwrap();
    out
}

/// An animated PNG of `frames` frames, assembled from single PNGs: their IHDR, an `acTL`, and per
/// frame an `fcTL` with the image data (`IDAT` for the first, `fdAT` after it).
fn apng_seed(frames: usize) -> Vec<u8> {
    let spec = VideoSpec::new(40, 24, 16.0).unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut sequence = 0u32;
    for t in 0..frames {
        let mut one = Vec::new();
        write_png(&mut one, &spec, &common::moving_pattern(&spec, t)).unwrap();
        for (kind, data) in png_chunks(&one) {
            match &kind {
                b"IHDR" if t == 0 => {
                    push_chunk(&mut out, b"IHDR", &data);
                    push_chunk(&mut out, b"acTL", &[(frames as u32).to_be_bytes(), 0u32.to_be_bytes()].concat());
                }
                b"IDAT" => {
                    if data.is_empty() {
                        continue;
                    }
                    let mut fctl = sequence.to_be_bytes().to_vec();
                    sequence += 1;
                    for v in [40u32, 24, 0, 0] {
                        fctl.extend_from_slice(&v.to_be_bytes());
                    }
                    fctl.extend_from_slice(&[0, 1, 0, 16, 0, 0]);
                    push_chunk(&mut out, b"fcTL", &fctl);
                    if t == 0 {
                        push_chunk(&mut out, b"IDAT", &data);
                    } else {
                        let body = [sequence.to_be_bytes().to_vec(), data].concat();
                        sequence += 1;
                        push_chunk(&mut out, b"fdAT", &body);
                    }
                }
                _ => {}
            }
        }
    }
    push_chunk(&mut out, b"IEND", &[]);
    out
}

// ---- PNG structure ----

/// The chunks of a PNG after its signature, as (type, data); stops at the first malformed one.
fn png_chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 12).checked_add(len).filter(|&e| e <= png.len()) else { break };
        out.push((png[at + 4..at + 8].try_into().unwrap(), png[at + 8..at + 8 + len].to_vec()));
        at = end;
    }
    out
}

/// Where each chunk starts, for chunks whose length fits the file.
fn png_chunk_starts(png: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        match (at + 12).checked_add(len).filter(|&e| e <= png.len()) {
            Some(end) => {
                out.push((at, len));
                at = end;
            }
            None => break,
        }
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Makes the checksum of the chunk at `at` (length `len`) right again.
fn fix_crc(png: &mut [u8], at: usize, len: usize) {
    if at + 12 + len <= png.len() {
        let crc = crc32(&png[at + 4..at + 8 + len]);
        png[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
    }
}

// ---- MP4 structure ----

/// A box of an MP4: where it starts, its header's length, the size it claims, its type, and the
/// boxes it is inside (their indices).
#[derive(Clone, Debug)]
struct Mp4Box {
    start: usize,
    header: usize,
    size: usize,
    kind: [u8; 4],
    parents: Vec<usize>,
}

/// Boxes holding boxes, and where in their body the children start.
fn children_at(kind: &[u8; 4]) -> Option<usize> {
    match kind {
        b"moov" | b"trak" | b"mdia" | b"minf" | b"stbl" | b"dinf" | b"edts" | b"udta" => Some(0),
        b"stsd" => Some(8),
        b"avc1" | b"avc3" => Some(78),
        _ => None,
    }
}

/// Every box whose header and claimed size fit, depth first.
fn mp4_boxes(data: &[u8]) -> Vec<Mp4Box> {
    fn walk(data: &[u8], from: usize, to: usize, parents: &[usize], out: &mut Vec<Mp4Box>) {
        let mut at = from;
        while at + 8 <= to {
            let size32 = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = data[at + 4..at + 8].try_into().unwrap();
            let (size, header) = match size32 {
                0 => (to - at, 8),
                1 if at + 16 <= to => (u64::from_be_bytes(data[at + 8..at + 16].try_into().unwrap()).min(usize::MAX as u64) as usize, 16),
                1 => return,
                n => (n, 8),
            };
            if size < header || at.checked_add(size).is_none_or(|end| end > to) {
                return;
            }
            let index = out.len();
            out.push(Mp4Box { start: at, header, size, kind, parents: parents.to_vec() });
            if let Some(skip) = children_at(&kind) {
                let inner = [parents, &[index]].concat();
                walk(data, at + header + skip, at + size, &inner, out);
            }
            at += size;
        }
    }
    let mut out = Vec::new();
    walk(data, 0, data.len(), &[], &mut out);
    out
}

/// Where a full box's first count sits: after version and flags (and `stsz`'s sample size).
fn count_at(b: &Mp4Box) -> Option<usize> {
    let skip = match &b.kind {
        b"stts" | b"stsc" | b"stco" | b"co64" | b"stss" | b"ctts" | b"stsd" => 4,
        b"stsz" => 8,
        _ => return None,
    };
    Some(b.start + b.header + skip)
}

fn put_u32(data: &mut [u8], at: usize, v: u32) {
    if at + 4 <= data.len() {
        data[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
}

/// Adds `delta` to the 32-bit size of every box in `indices` (ancestors of an edit), so the
/// structure around an inserted or removed box still parses.
fn resize(data: &mut [u8], boxes: &[Mp4Box], indices: &[usize], delta: isize) {
    for &i in indices {
        let b = &boxes[i];
        if b.header == 8 && b.size >= 8 {
            put_u32(data, b.start, (b.size as isize + delta).max(8) as u32);
        }
    }
}

/// Values that find edge cases: zero, one, the largest, signs' edges, powers of two.
fn interesting(pick: u32, near: u32) -> u32 {
    match pick % 12 {
        0 => 0,
        1 => 1,
        2 => u32::MAX,
        3 => 0x7fff_ffff,
        4 => 0x8000_0000,
        5 => near.wrapping_add(1),
        6 => near.wrapping_sub(1),
        7 => near.wrapping_mul(2),
        8 => 0x0001_0000,
        9 => 0x4000_0000,
        10 => near / 2,
        _ => pick.rotate_left(7),
    }
}

// ---- Mutations ----

/// One mutation, its parameters as raw numbers that each mutation reads as it needs (so that
/// proptest can shrink a failing list).
#[derive(Clone, Debug)]
struct Mutation {
    kind: u8,
    a: u32,
    b: u32,
    c: u32,
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(kind, a, b, c)| Mutation { kind, a, b, c }), 1..5)
}

/// Byte-level edits, for any format: a bit flip (most near the start, where headers are), an
/// interesting 32-bit value, a truncation, a run of one byte, a splice of the file into itself.
fn mutate_bytes(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        return;
    }
    let n = data.len();
    let near_start = |v: u32| if v & 1 == 0 { (v >> 1) as usize % n.min(256) } else { (v >> 1) as usize % n };
    match m.kind % 5 {
        0 => {
            let at = near_start(m.a);
            data[at] ^= 1 << (m.b % 8);
        }
        1 => {
            let at = near_start(m.a);
            let old = data.get(at..at + 4).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()));
            put_u32(data, at, interesting(m.b, old));
        }
        2 => data.truncate(m.a as usize % n),
        3 => {
            let at = m.a as usize % n;
            let end = (at + 1 + m.b as usize % 64).min(n);
            data[at..end].fill(m.c as u8);
        }
        _ => {
            let (from, to) = (m.a as usize % n, m.b as usize % n);
            let len = (m.c as usize % 256).min(n - from);
            let piece = data[from..from + len].to_vec();
            data.splice(to..to, piece);
        }
    }
}

/// MP4 edits at the level of its boxes: a size, a sample-table count, a type, a byte in a box's
/// body; a box duplicated or dropped with its ancestors' sizes kept consistent.
fn mutate_mp4(data: &mut Vec<u8>, m: &Mutation) {
    let boxes = mp4_boxes(data);
    if boxes.is_empty() || m.kind % 8 == 7 {
        return mutate_bytes(data, &Mutation { kind: m.kind / 8, ..m.clone() });
    }
    let i = m.a as usize % boxes.len();
    let b = boxes[i].clone();
    match m.kind % 8 {
        0 => put_u32(data, b.start, interesting(m.b, b.size as u32)),
        1 => {
            let tables: Vec<&Mp4Box> = boxes.iter().filter(|b| count_at(b).is_some()).collect();
            if let Some(t) = tables.get(m.a as usize % tables.len().max(1)) {
                let at = count_at(t).unwrap();
                let old = data.get(at..at + 4).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()));
                put_u32(data, at, interesting(m.b, old));
            }
        }
        2 => {
            const KINDS: [&[u8; 4]; 12] = [b"moov", b"moof", b"trak", b"mdia", b"stco", b"co64", b"stsz", b"stz2", b"avc1", b"hvc1", b"encv", b"free"];
            data[b.start + 4..b.start + 8].copy_from_slice(KINDS[m.b as usize % KINDS.len()]);
        }
        3 | 4 => {
            let body = b.size - b.header;
            if body > 0 {
                let at = b.start + b.header + m.b as usize % body;
                let old = data.get(at..at + 4).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()));
                if m.kind % 8 == 3 {
                    put_u32(data, at, interesting(m.c, old));
                } else {
                    data[at] ^= 1 << (m.c % 8);
                }
            }
        }
        5 => {
            let copy = data[b.start..b.start + b.size].to_vec();
            resize(data, &boxes, &b.parents, b.size as isize);
            data.splice(b.start + b.size..b.start + b.size, copy);
        }
        _ => {
            resize(data, &boxes, &b.parents, -(b.size as isize));
            data.drain(b.start..b.start + b.size);
        }
    }
}

/// PNG edits at the level of its chunks: a length, a field in a chunk's data (IHDR's sizes, acTL's
/// counts, fcTL's offsets), with the checksum made right so that the decoder reads it; a chunk
/// duplicated or dropped.
fn mutate_png(data: &mut Vec<u8>, m: &Mutation) {
    let chunks = png_chunk_starts(data);
    if chunks.is_empty() || m.kind % 5 == 4 {
        return mutate_bytes(data, &Mutation { kind: m.kind / 5, ..m.clone() });
    }
    let (at, len) = chunks[m.a as usize % chunks.len()];
    match m.kind % 5 {
        0 => put_u32(data, at, interesting(m.b, len as u32)),
        1 => {
            if len > 0 {
                let field = at + 8 + (m.b as usize % len) / 4 * 4;
                let old = data.get(field..field + 4).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()));
                if field + 4 <= at + 8 + len {
                    put_u32(data, field, interesting(m.c, old));
                } else {
                    data[field] ^= m.c as u8 | 1;
                }
                fix_crc(data, at, len);
            }
        }
        2 => {
            let copy = data[at..at + 12 + len].to_vec();
            data.splice(at + 12 + len..at + 12 + len, copy);
        }
        _ => {
            data.drain(at..at + 12 + len);
        }
    }
}

/// Runs `cases` mutated inputs of `seeds` through the decoders; returns (frames, errors).
fn fuzz(name: &str, seeds: &[Vec<u8>], cases: u32, mutate: fn(&mut Vec<u8>, &Mutation)) -> (usize, usize) {
    for (i, seed) in seeds.iter().enumerate() {
        let out = bounded(seed).unwrap_or_else(|e| panic!("{name} seed {i}: {e}"));
        assert!(matches!(out, Ok(n) if n > 0), "{name} seed {i} decodes: {out:?}");
    }
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let (decoded, refused) = (Cell::new(0), Cell::new(0));
    runner
        .run(&(0..seeds.len(), mutations()), |(seed, list)| {
            let mut bytes = seeds[seed].clone();
            for m in &list {
                mutate(&mut bytes, m);
            }
            match bounded(&bytes)? {
                Ok(_) => decoded.set(decoded.get() + 1),
                Err(_) => refused.set(refused.get() + 1),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (decoded, refused) = (decoded.get(), refused.get());
    eprintln!("{name}: {cases} mutated inputs, {decoded} decoded, {refused} refused");
    (decoded, refused)
}

/// The MP4 demuxer and the H.264 decoder behind it: 20,000 mutated files of three seeds (a single
/// keyframe, keyframes every 4 frames, a bitrate-controlled stream).
#[test]
fn mutated_mp4_files_end_in_frames_or_an_input_error_within_bounds() {
    let seeds = [
        mp4_seed(48, 32, 5, Mp4Options::default()),
        mp4_seed(64, 48, 9, Mp4Options { keyframe_interval: 4, ..Mp4Options::default() }),
        mp4_seed(32, 32, 6, Mp4Options { rate_control: RateControl::Bitrate { bps: 200_000, min_qp: 10, max_qp: 40 }, ..Mp4Options::default() }),
    ];
    let (decoded, refused) = fuzz("mp4", &seeds, 20_000, mutate_mp4);
    assert!(refused > 2000 && decoded > 1000, "the mutations reach both outcomes: {decoded} decoded, {refused} refused");
}

/// PNG and APNG: 8000 mutated files, checksums kept right so the damage reaches the decoder.
#[test]
fn mutated_png_and_apng_files_end_in_frames_or_an_input_error_within_bounds() {
    let seeds = [png_seed(), apng_seed(4)];
    let (decoded, refused) = fuzz("png", &seeds, 8000, mutate_png);
    assert!(refused > 800 && decoded > 400, "the mutations reach both outcomes: {decoded} decoded, {refused} refused");
}

/// GIF: 8000 mutated files (byte-level: its blocks are small and dense). The first run of this
/// test found a 1.6 KB file whose frame walk reserved 1 GiB (`video/input/gif.rs`, `scan`).
#[test]
fn mutated_gif_files_end_in_frames_or_an_input_error_within_bounds() {
    let seeds = [gif_seed(1), gif_seed(5)];
    let (decoded, refused) = fuzz("gif", &seeds, 8000, mutate_bytes);
    assert!(refused > 800 && decoded > 400, "the mutations reach both outcomes: {decoded} decoded, {refused} refused");
}

/// The counting allocator sees what it should: a 1 MiB buffer is a peak of at least 1 MiB, so the
/// bound above is a real measurement.
#[test]
fn the_allocation_counter_measures() {
    let ((), peak) = measure(|| drop(std::hint::black_box(vec![1u8; 1 << 20])));
    assert!(peak >= 1 << 20, "{peak}");
}
