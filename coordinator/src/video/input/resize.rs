//! Frame resizing as upstream does it: diffusers' `VideoProcessor.preprocess_video` resizes each
//! frame with PIL `Image.resize((W, H), Image.LANCZOS)`, stretching to the requested size (no
//! crop). This is the same filter: separable Lanczos-3 (`sinc(x)·sinc(x/3)`, |x| < 3), its
//! support widened by the reduction factor when downscaling (so it antialiases), taps
//! normalised to sum 1, the horizontal pass first, results clipped to [0, 1] after each pass as
//! PIL clips to 8 bits. Values stay float32 (PIL rounds to 8 bits after each pass), so results
//! match PIL's to within about one 8-bit step.

use crate::{CoordinatorError, Result};
use rayon::prelude::*;

/// The taps of a 1-D resampling: output `i` reads `weights[i·width..][..count[i]]` from inputs
/// `start[i]..`.
#[derive(Clone, Debug)]
struct Taps {
    start: Vec<usize>,
    count: Vec<usize>,
    width: usize,
    weights: Vec<f32>,
}

fn lanczos3(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x) };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

impl Taps {
    /// PIL's `precompute_coeffs` for `in_len` → `out_len` with the Lanczos filter.
    fn new(in_len: usize, out_len: usize) -> Self {
        let scale = in_len as f64 / out_len as f64;
        let filter_scale = scale.max(1.0);
        let support = 3.0 * filter_scale;
        let width = support.ceil() as usize * 2 + 1;
        let (mut start, mut count, mut weights) = (Vec::with_capacity(out_len), Vec::with_capacity(out_len), vec![0.0f32; out_len * width]);
        for i in 0..out_len {
            let center = (i as f64 + 0.5) * scale;
            // PIL truncates toward zero after adding 0.5 (C `(int)`), as `as` does.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).clamp(0, in_len as i64) as usize;
            let n = hi.saturating_sub(lo).min(width);
            let w: Vec<f64> = (0..n).map(|k| lanczos3((k as f64 + lo as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = w.iter().sum();
            for (k, &wk) in w.iter().enumerate() {
                weights[i * width + k] = if total != 0.0 { (wk / total) as f32 } else { wk as f32 };
            }
            start.push(lo);
            count.push(n);
        }
        Self { start, count, width, weights }
    }

    /// Output `i`'s input start and weights.
    fn of(&self, i: usize) -> (usize, &[f32]) {
        (self.start[i], &self.weights[i * self.width..][..self.count[i]])
    }
}

/// Resizes planar RGB frames `[3, in_h, in_w]` to `[3, out_h, out_w]` (Lanczos-3 as PIL);
/// built once per size pair and reused for every frame.
#[derive(Clone, Debug)]
pub struct Resizer {
    in_size: (usize, usize),
    out_size: (usize, usize),
    horizontal: Option<Taps>,
    vertical: Option<Taps>,
}

impl Resizer {
    /// A resizer from `in_w`×`in_h` to `out_w`×`out_h` (all sides at least 1; a side that does
    /// not change is copied, not filtered).
    pub fn new(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> Result<Self> {
        if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
            return Err(CoordinatorError::invalid_video("size", format!("cannot resize {in_w}x{in_h} to {out_w}x{out_h}")));
        }
        Ok(Self {
            in_size: (in_w, in_h),
            out_size: (out_w, out_h),
            horizontal: (in_w != out_w).then(|| Taps::new(in_w, out_w)),
            vertical: (in_h != out_h).then(|| Taps::new(in_h, out_h)),
        })
    }

    /// Resizes one planar frame (`3·in_h·in_w` values) into `3·out_h·out_w` values.
    pub fn resize(&self, frame: &[f32]) -> Result<Vec<f32>> {
        let ((iw, ih), (ow, oh)) = (self.in_size, self.out_size);
        if frame.len() != 3 * iw * ih {
            return Err(CoordinatorError::invalid_video("frame", format!("{} values, expected 3×{ih}×{iw}", frame.len())));
        }
        let wide: Vec<f32> = match &self.horizontal {
            None => frame.to_vec(),
            Some(taps) => {
                let mut out = vec![0.0f32; 3 * ih * ow];
                out.par_chunks_mut(ow).zip(frame.par_chunks(iw)).for_each(|(dst, src)| {
                    for (x, d) in dst.iter_mut().enumerate() {
                        let (s, w) = taps.of(x);
                        *d = src[s..s + w.len()].iter().zip(w).map(|(a, b)| a * b).sum::<f32>().clamp(0.0, 1.0);
                    }
                });
                out
            }
        };
        Ok(match &self.vertical {
            None => wide,
            Some(taps) => {
                let mut out = vec![0.0f32; 3 * oh * ow];
                out.par_chunks_mut(ow).enumerate().for_each(|(row, dst)| {
                    let (c, y) = (row / oh, row % oh);
                    let (s, w) = taps.of(y);
                    let plane = &wide[c * ih * ow..(c + 1) * ih * ow];
                    for (k, &wk) in w.iter().enumerate() {
                        let src = &plane[(s + k) * ow..(s + k + 1) * ow];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += wk * v);
                    }
                    dst.iter_mut().for_each(|d| *d = d.clamp(0.0, 1.0));
                });
                out
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test image of `testdata/pil_lanczos.bin`: 8-bit, `[3, 23, 37]`.
    fn pattern(w: usize, h: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let smooth = 128.0 + 100.0 * ((x as f64 * 0.31 + c as f64).sin() * (y as f64 * 0.23).cos());
                    let edge = if (x / 5 + y / 4 + c) % 2 == 0 { 60.0 } else { -60.0 };
                    out.push((smooth + edge).clamp(0.0, 255.0).round() as u8);
                }
            }
        }
        out
    }

    /// Pillow 13 `Image.resize(size, Image.LANCZOS)` of [`pattern`] (37×23) to 16×10 and 53×31,
    /// planar, made by `testdata/pil_lanczos.py`.
    const PIL: &[u8] = include_bytes!("testdata/pil_lanczos.bin");

    #[test]
    fn matches_pil_lanczos_down_and_up() {
        let src: Vec<f32> = pattern(37, 23).iter().map(|&v| v as f32 / 255.0).collect();
        let mut offset = 0;
        for (w, h) in [(16, 10), (53, 31)] {
            let want = &PIL[offset..offset + 3 * w * h];
            offset += 3 * w * h;
            let got = Resizer::new(37, 23, w, h).unwrap().resize(&src).unwrap();
            let diffs: Vec<f32> = got.iter().zip(want).map(|(&g, &p)| (g * 255.0 - p as f32).abs()).collect();
            let max = diffs.iter().cloned().fold(0.0, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            // PIL rounds to 8 bits after each pass; we do not.
            eprintln!("{w}x{h}: largest difference from PIL {max:.3}, mean {mean:.3} (8-bit steps)");
            assert!(max <= 1.5 && mean < 0.5, "{w}x{h}: max {max}, mean {mean} (8-bit steps)");
        }
        assert_eq!(offset, PIL.len());
    }

    #[test]
    fn flat_frames_stay_flat_and_same_size_is_a_copy() {
        let flat = vec![0.25f32; 3 * 7 * 5];
        for (w, h) in [(3, 2), (20, 11), (7, 9)] {
            let out = Resizer::new(7, 5, w, h).unwrap().resize(&flat).unwrap();
            assert_eq!(out.len(), 3 * w * h);
            assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6), "{w}x{h}");
        }
        let src: Vec<f32> = (0..3 * 4 * 3).map(|i| i as f32 / 36.0).collect();
        assert_eq!(Resizer::new(4, 3, 4, 3).unwrap().resize(&src).unwrap(), src);
        assert!(Resizer::new(0, 3, 4, 3).is_err());
        assert!(Resizer::new(4, 3, 2, 2).unwrap().resize(&src[1..]).is_err());
    }

    #[test]
    fn downscaling_antialiases() {
        // A one-pixel checkerboard averages to grey when shrunk 4×, instead of aliasing.
        let (w, h) = (32, 32);
        let board: Vec<f32> = (0..3).flat_map(|_| (0..w * h).map(|i| ((i % w + i / w) % 2) as f32)).collect();
        let out = Resizer::new(w, h, 8, 8).unwrap().resize(&board).unwrap();
        assert!(out.iter().all(|&v| (v - 0.5).abs() < 0.02), "{:?}", &out[..8]);
    }
}
