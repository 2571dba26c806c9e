//! One sample's activations inside the VAE, `[C, T, H, W]` row-major (PyTorch's layout with the
//! batch dimension taken off), and the frame operations the causal blocks need.

use crate::{Result, WorkerError};
use rayon::prelude::*;
use tessera_kernels::Tensor;

/// A `[C, T, H, W]` block of frames.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Clip {
    pub c: usize,
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Clip {
    /// Wraps `data`, which must hold `c·t·h·w` elements.
    pub fn new(shape: [usize; 4], data: Vec<f32>) -> Self {
        let [c, t, h, w] = shape;
        debug_assert_eq!(data.len(), c * t * h * w, "clip {shape:?}");
        Self { c, t, h, w, data }
    }

    /// A clip of zeros.
    pub fn zeros(shape: [usize; 4]) -> Self {
        Self::new(shape, vec![0.0; shape.iter().product()])
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

    /// Frames `start .. end` (copied).
    pub fn frames(&self, start: usize, end: usize) -> Clip {
        debug_assert!(start <= end && end <= self.t);
        let (p, n) = (self.plane(), end - start);
        let mut out = Clip::zeros([self.c, n, self.h, self.w]);
        if n > 0 {
            out.data.par_chunks_mut(n * p).zip(self.data.par_chunks(self.positions())).for_each(|(dst, src)| {
                dst.copy_from_slice(&src[start * p..end * p]);
            });
        }
        out
    }

    /// The clips one after the other in time (same channels and frame size).
    pub fn concat_time(parts: &[&Clip]) -> Clip {
        let first = parts[0];
        let (c, h, w) = (first.c, first.h, first.w);
        debug_assert!(parts.iter().all(|p| p.c == c && p.h == h && p.w == w));
        let t: usize = parts.iter().map(|p| p.t).sum();
        let mut out = Clip::zeros([c, t, h, w]);
        if t == 0 {
            return out;
        }
        let plane = h * w;
        out.data.par_chunks_mut(t * plane).enumerate().for_each(|(ch, dst)| {
            let mut off = 0;
            for p in parts {
                let n = p.t * plane;
                dst[off..off + n].copy_from_slice(&p.data[ch * n..(ch + 1) * n]);
                off += n;
            }
        });
        out
    }

    /// Sample `b` of a `[B, C, T, H, W]` tensor, frames `start .. end`.
    pub fn from_batch(x: &Tensor, b: usize, start: usize, end: usize) -> Clip {
        let s = x.shape();
        let (c, t, h, w) = (s[1], s[2], s[3], s[4]);
        let (p, n) = (h * w, end - start);
        let sample = &x.data()[b * c * t * p..(b + 1) * c * t * p];
        let mut data = Vec::with_capacity(c * n * p);
        for ch in 0..c {
            data.extend_from_slice(&sample[(ch * t + start) * p..(ch * t + end) * p]);
        }
        Clip::new([c, n, h, w], data)
    }

    /// Stacks one clip per sample into a `[B, C, T, H, W]` tensor.
    pub fn stack(clips: Vec<Clip>) -> Result<Tensor> {
        let first = clips.first().ok_or_else(|| WorkerError::input("batch", "no samples"))?;
        let shape = [clips.len(), first.c, first.t, first.h, first.w];
        let mut data = Vec::with_capacity(shape.iter().product());
        for c in clips {
            data.extend_from_slice(&c.data);
        }
        Ok(Tensor::new(shape, data)?)
    }

    /// `self += other`, element by element (same shape).
    pub fn add_assign(&mut self, other: &Clip) {
        debug_assert_eq!(self.shape(), other.shape());
        self.data.par_chunks_mut(1 << 14).zip(other.data.par_chunks(1 << 14)).for_each(|(a, b)| {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        });
    }
}

/// The last input frames a causal convolution has seen (at most [`CACHE_T`]), read before the
/// next chunk so that chunked processing equals one pass over the whole sequence.
#[derive(Clone, Debug, Default)]
pub(crate) struct FrameCache {
    frames: Option<Clip>,
}

/// Frames kept per causal convolution (upstream's `CACHE_T`).
pub(crate) const CACHE_T: usize = 2;

impl FrameCache {
    /// The cached frames, oldest first.
    pub fn frames(&self) -> Option<&Clip> {
        self.frames.as_ref()
    }

    /// Records that `x` followed the cached frames: keeps the last [`CACHE_T`] frames of both,
    /// in place once the cache is full (no allocation in the steady state).
    pub fn push(&mut self, x: &Clip) {
        if x.t == 0 {
            return;
        }
        let p = x.plane();
        match &mut self.frames {
            Some(f) if f.t == CACHE_T && (f.c, f.h, f.w) == (x.c, x.h, x.w) => {
                let keep = CACHE_T.saturating_sub(x.t); // cached frames that stay, moved to the front
                let take = CACHE_T - keep; // newest frames of x
                f.data.par_chunks_mut(CACHE_T * p).zip(x.data.par_chunks(x.t * p)).for_each(|(dst, src)| {
                    dst.copy_within((CACHE_T - keep) * p..CACHE_T * p, 0);
                    dst[keep * p..].copy_from_slice(&src[(x.t - take) * p..]);
                });
            }
            cached => {
                let joined = match cached.as_ref() {
                    Some(f) => Clip::concat_time(&[f, x]),
                    None => x.clone(),
                };
                *cached = Some(joined.frames(joined.t.saturating_sub(CACHE_T), joined.t));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(shape: [usize; 4]) -> Clip {
        Clip::new(shape, (0..shape.iter().product::<usize>()).map(|i| i as f32).collect())
    }

    #[test]
    fn frames_and_concat_are_inverse() {
        let x = ramp([3, 5, 2, 2]);
        let (a, b, c) = (x.frames(0, 1), x.frames(1, 4), x.frames(4, 5));
        assert_eq!(b.shape(), [3, 3, 2, 2]);
        assert_eq!(b.data[..4], [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(Clip::concat_time(&[&a, &b, &c]), x);
    }

    #[test]
    fn cache_keeps_the_last_two_frames_across_chunks() {
        let x = ramp([2, 7, 1, 3]);
        let mut cache = FrameCache::default();
        assert!(cache.frames().is_none());
        cache.push(&x.frames(0, 1));
        assert_eq!(cache.frames(), Some(&x.frames(0, 1)));
        cache.push(&x.frames(1, 2));
        assert_eq!(cache.frames(), Some(&x.frames(0, 2)));
        cache.push(&x.frames(2, 3)); // in place: one new frame
        assert_eq!(cache.frames(), Some(&x.frames(1, 3)));
        cache.push(&x.frames(3, 6)); // in place: several new frames
        assert_eq!(cache.frames(), Some(&x.frames(4, 6)));
        cache.push(&x.frames(6, 6));
        assert_eq!(cache.frames(), Some(&x.frames(4, 6)));
        cache.push(&x.frames(6, 7));
        assert_eq!(cache.frames(), Some(&x.frames(5, 7)));
    }
}
