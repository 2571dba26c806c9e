//! One sample's activations inside the VAE, `[C, T, H, W]` channel-major (PyTorch's layout with
//! the batch dimension taken off) in a buffer of the backend, and the frame operations the causal
//! blocks need: cutting frames out, joining runs of frames in time, the convolutions' frame cache.

use crate::{Result, WorkerError};
use tessera_kernels::backend::{at, at_mut, ActBuf, Elem, Ops, Piece};
use tessera_kernels::Tensor;

/// A layout mistake inside the VAE (a bug, reported rather than a panic).
fn layout_err(detail: String) -> WorkerError {
    tessera_kernels::KernelError::Shape { op: "vae clip", detail }.into()
}

/// A `[C, T, H, W]` block of frames on the backend `O`, stored as `O::Act`.
pub(crate) struct Clip<O: Ops> {
    pub c: usize,
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub buf: ActBuf<O>,
}

impl<O: Ops> Clip<O> {
    /// Wraps `buf`, which must hold at least `c·t·h·w` elements.
    pub fn new(ops: &O, shape: [usize; 4], buf: ActBuf<O>) -> Result<Self> {
        let [c, t, h, w] = shape;
        let need = c * t * h * w;
        if ops.len(&buf) < need {
            return Err(layout_err(format!("a clip of shape {shape:?} in a buffer of {} elements", ops.len(&buf))));
        }
        Ok(Self { c, t, h, w, buf })
    }

    /// A clip of zeros.
    pub fn zeros(ops: &O, shape: [usize; 4]) -> Result<Self> {
        Self::new(ops, shape, ops.zeros(shape.iter().product())?)
    }

    /// f32 host values, stored as `O::Act` on the backend.
    pub fn upload(ops: &O, shape: [usize; 4], data: Vec<f32>) -> Result<Self> {
        Self::new(ops, shape, ops.upload_vec(O::Act::vec_from_f32(data))?)
    }

    /// The values, widened to f32 on the host.
    pub fn download(&self, ops: &O) -> Result<Vec<f32>> {
        let mut v = ops.download(&self.buf)?;
        v.truncate(self.len());
        Ok(O::Act::vec_to_f32(v))
    }

    /// `[C, T, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.c, self.t, self.h, self.w]
    }

    /// Elements of one frame plane (H·W).
    pub fn plane(&self) -> usize {
        self.h * self.w
    }

    /// Positions per channel (T·H·W).
    pub fn positions(&self) -> usize {
        self.t * self.h * self.w
    }

    /// Elements (C·T·H·W).
    pub fn len(&self) -> usize {
        self.c * self.positions()
    }

    /// The frames as a convolution's input piece.
    pub fn piece(&self) -> Piece<'_, ActBuf<O>> {
        Piece { buf: &self.buf, frames: self.t }
    }

    /// Frames `start .. end` (copied).
    pub fn frames(&self, ops: &O, start: usize, end: usize) -> Result<Self> {
        debug_assert!(start <= end && end <= self.t);
        let (p, n) = (self.plane(), end - start);
        let mut out = Self::zeros(ops, [self.c, n, self.h, self.w])?;
        if n * p * self.c > 0 {
            ops.copy_rows(at(&self.buf, start * p), self.t * p, at_mut(&mut out.buf, 0), n * p, n * p, self.c)?;
        }
        Ok(out)
    }

    /// A copy of the whole clip.
    pub fn duplicate(&self, ops: &O) -> Result<Self> {
        self.frames(ops, 0, self.t)
    }

    /// The clips one after the other in time (same channels and frame size).
    pub fn concat_time(ops: &O, parts: &[&Self]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| layout_err("no frames to join".into()))?;
        let (c, h, w) = (first.c, first.h, first.w);
        if let Some(p) = parts.iter().find(|p| (p.c, p.h, p.w) != (c, h, w)) {
            return Err(layout_err(format!("joining frames of {:?} to frames of {:?}", p.shape(), first.shape())));
        }
        let t: usize = parts.iter().map(|p| p.t).sum();
        let plane = h * w;
        let mut out = Self::zeros(ops, [c, t, h, w])?;
        let mut off = 0;
        for p in parts {
            if p.len() > 0 {
                ops.copy_rows(at(&p.buf, 0), p.t * plane, at_mut(&mut out.buf, off * plane), t * plane, p.t * plane, c)?;
            }
            off += p.t;
        }
        Ok(out)
    }

    /// Rows `start .. end` of every frame (copied): `[C, T, end − start, W]`.
    pub fn rows(&self, ops: &O, start: usize, end: usize) -> Result<Self> {
        if start > end || end > self.h {
            return Err(layout_err(format!("rows {start}..{end} of frames {} high", self.h)));
        }
        let n = (end - start) * self.w;
        let mut out = Self::zeros(ops, [self.c, self.t, end - start, self.w])?;
        if n * self.c * self.t > 0 {
            ops.copy_rows(at(&self.buf, start * self.w), self.plane(), at_mut(&mut out.buf, 0), n, n, self.c * self.t)?;
        }
        Ok(out)
    }

    /// The clips one above the other in every frame (same channels, frames and width).
    pub fn concat_rows(ops: &O, parts: &[&Self]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| layout_err("no rows to join".into()))?;
        let (c, t, w) = (first.c, first.t, first.w);
        if let Some(p) = parts.iter().find(|p| (p.c, p.t, p.w) != (c, t, w)) {
            return Err(layout_err(format!("joining rows of {:?} to rows of {:?}", p.shape(), first.shape())));
        }
        let h: usize = parts.iter().map(|p| p.h).sum();
        let mut out = Self::zeros(ops, [c, t, h, w])?;
        let mut top = 0;
        for p in parts {
            if p.len() > 0 {
                ops.copy_rows(at(&p.buf, 0), p.plane(), at_mut(&mut out.buf, top * w), h * w, p.plane(), c * t)?;
            }
            top += p.h;
        }
        Ok(out)
    }

    /// Sample `b` of a host `[B, C, T, H, W]` tensor, frames `start .. end`, on the backend.
    pub fn from_batch(ops: &O, x: &Tensor, b: usize, start: usize, end: usize) -> Result<Self> {
        let s = x.shape();
        let (c, t, h, w) = (s[1], s[2], s[3], s[4]);
        let (p, n) = (h * w, end - start);
        let sample = &x.data()[b * c * t * p..(b + 1) * c * t * p];
        let mut data = Vec::with_capacity(c * n * p);
        for ch in 0..c {
            data.extend_from_slice(&sample[(ch * t + start) * p..(ch * t + end) * p]);
        }
        Self::upload(ops, [c, n, h, w], data)
    }
}

/// Stacks one host sample `[C, T, H, W]` per batch entry into a `[B, C, T, H, W]` tensor.
pub(crate) fn stack(shape: [usize; 4], samples: Vec<Vec<f32>>) -> Result<Tensor> {
    let mut data = Vec::with_capacity(samples.len() * shape.iter().product::<usize>());
    let batch = samples.len();
    for s in samples {
        data.extend_from_slice(&s);
    }
    Ok(Tensor::new([batch, shape[0], shape[1], shape[2], shape[3]], data)?)
}

/// The last input frames a causal convolution has seen (at most [`CACHE_T`]), read before the
/// next chunk so that chunked processing equals one pass over the whole sequence. Each frame has
/// its own buffer: a new frame takes over the buffer of the frame it evicts, so a full cache
/// allocates nothing and never holds more than its frames.
pub(crate) struct FrameCache<O: Ops> {
    frames: Vec<Clip<O>>,
}

impl<O: Ops> Default for FrameCache<O> {
    fn default() -> Self {
        Self { frames: Vec::new() }
    }
}

/// Frames kept per causal convolution (upstream's `CACHE_T`).
pub(crate) const CACHE_T: usize = 2;

impl<O: Ops> FrameCache<O> {
    /// The cached frames, oldest first, one clip each.
    pub fn frames(&self) -> &[Clip<O>] {
        &self.frames
    }

    /// Records that `x` followed the cached frames: keeps the last [`CACHE_T`] frames of both.
    pub fn push(&mut self, ops: &O, x: &Clip<O>) -> Result<()> {
        if self.frames.first().is_some_and(|f| (f.c, f.h, f.w) != (x.c, x.h, x.w)) {
            self.frames.clear();
        }
        let p = x.plane();
        for f in x.t.saturating_sub(CACHE_T)..x.t {
            let mut slot = if self.frames.len() == CACHE_T { self.frames.remove(0) } else { Clip::zeros(ops, [x.c, 1, x.h, x.w])? };
            if x.len() > 0 {
                ops.copy_rows(at(&x.buf, f * p), x.t * p, at_mut(&mut slot.buf, 0), p, p, x.c)?;
            }
            self.frames.push(slot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::backend::CpuOps;

    fn ramp(shape: [usize; 4]) -> Clip<CpuOps> {
        Clip::upload(&CpuOps, shape, (0..shape.iter().product::<usize>()).map(|i| i as f32).collect()).unwrap()
    }

    fn frames(x: &Clip<CpuOps>, a: usize, b: usize) -> Vec<f32> {
        x.frames(&CpuOps, a, b).unwrap().buf
    }

    /// The cached frames' values, oldest first.
    fn cached(cache: &FrameCache<CpuOps>) -> Option<Vec<f32>> {
        let f = cache.frames();
        (!f.is_empty()).then(|| Clip::concat_time(&CpuOps, &f.iter().collect::<Vec<_>>()).unwrap().buf)
    }

    #[test]
    fn frames_and_concat_are_inverse() {
        let ops = CpuOps;
        let x = ramp([3, 5, 2, 2]);
        let (a, b, c) = (x.frames(&ops, 0, 1).unwrap(), x.frames(&ops, 1, 4).unwrap(), x.frames(&ops, 4, 5).unwrap());
        assert_eq!(b.shape(), [3, 3, 2, 2]);
        assert_eq!(b.buf[..4], [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(Clip::concat_time(&ops, &[&a, &b, &c]).unwrap().buf, x.buf);
    }

    #[test]
    fn rows_and_concat_rows_are_inverse() {
        let ops = CpuOps;
        let x = ramp([2, 3, 5, 4]);
        let (a, b, c) = (x.rows(&ops, 0, 2).unwrap(), x.rows(&ops, 2, 3).unwrap(), x.rows(&ops, 3, 5).unwrap());
        assert_eq!(b.shape(), [2, 3, 1, 4]);
        // row 2 of channel 0, frame 1: elements 20 + 8 .. 20 + 12
        assert_eq!(b.buf[4..8], [28.0, 29.0, 30.0, 31.0]);
        assert_eq!(Clip::concat_rows(&ops, &[&a, &b, &c]).unwrap().buf, x.buf);
        assert!(x.rows(&ops, 4, 6).is_err());
    }

    #[test]
    fn cache_keeps_the_last_two_frames_across_chunks() {
        let ops = CpuOps;
        let x = ramp([2, 7, 1, 3]);
        let mut cache = FrameCache::default();
        assert!(cache.frames().is_empty());
        let mut push = |a, b| {
            cache.push(&ops, &x.frames(&ops, a, b).unwrap()).unwrap();
            cached(&cache)
        };
        assert_eq!(push(0, 1), Some(frames(&x, 0, 1)));
        assert_eq!(push(1, 2), Some(frames(&x, 0, 2)));
        assert_eq!(push(2, 3), Some(frames(&x, 1, 3)));
        assert_eq!(push(3, 6), Some(frames(&x, 4, 6)));
        assert_eq!(push(6, 6), Some(frames(&x, 4, 6)));
        assert_eq!(push(6, 7), Some(frames(&x, 5, 7)));
    }
}
