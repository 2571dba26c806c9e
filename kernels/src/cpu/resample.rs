//! PIL's `Image.resize` on 8-bit images, bit for bit (Pillow's `libImaging/Resample.c`): the
//! preprocessing of upstream's image paths runs through it (transformers' `CLIPImageProcessor`
//! resizes with bicubic, diffusers' `VaeImageProcessor` with Lanczos), and their outputs move
//! steeply with a single 8-bit level, so the resize is integer arithmetic exactly as PIL's:
//!
//! - each output position's taps come from the filter, its support widened by the reduction
//!   factor when downscaling (antialiasing), evaluated in f64 and normalised to sum 1;
//! - the taps become fixed point with 22 fractional bits, rounded half away from zero;
//! - the horizontal pass runs first; each pass adds half a unit, shifts, and clips to 0..=255,
//!   so the intermediate image is 8-bit too.

/// A resampling filter of PIL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BICUBIC` (3): the cubic convolution with a = −0.5, support 2.
    Bicubic,
    /// `Image.LANCZOS` (1): `sinc(x)·sinc(x/3)`, support 3.
    Lanczos,
}

impl Filter {
    /// PIL's resample code (`resample` in transformers' and diffusers' configs): 1 Lanczos, 3
    /// bicubic; the others (nearest, bilinear, box, hamming) are not served.
    pub fn from_pil_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Lanczos),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of the fixed-point taps (PIL's `PRECISION_BITS`, 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// The taps of one axis: output `i` reads inputs `first[i]..first[i] + count[i]` with the weights
/// `weights[i·width..][..count[i]]`.
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    width: usize,
    weights: Vec<i32>,
}

impl Taps {
    /// PIL's `precompute_coeffs` (the whole input as the box) then `normalize_coeffs_8bpc`.
    fn new(in_len: usize, out_len: usize, filter: Filter) -> Self {
        let scale = in_len as f64 / out_len as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        let width = support.ceil() as usize * 2 + 1;
        let (mut first, mut count, mut weights) = (Vec::with_capacity(out_len), Vec::with_capacity(out_len), vec![0i32; out_len * width]);
        let mut taps = vec![0f64; width];
        for i in 0..out_len {
            let center = (i as f64 + 0.5) * scale;
            // PIL truncates toward zero (a C cast), then clamps to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_len as i64).max(lo as i64) as usize;
            let n = hi - lo;
            let mut sum = 0.0;
            for (x, t) in taps[..n].iter_mut().enumerate() {
                *t = filter.weight((x as f64 + lo as f64 - center + 0.5) / filter_scale);
                sum += *t;
            }
            let unit = f64::from(1u32 << PRECISION_BITS);
            for (w, &t) in weights[i * width..][..n].iter_mut().zip(&taps[..n]) {
                let t = if sum != 0.0 { t / sum } else { t };
                *w = if t < 0.0 { (-0.5 + t * unit) as i32 } else { (0.5 + t * unit) as i32 };
            }
            first.push(lo);
            count.push(n);
        }
        Self { first, count, width, weights }
    }

    /// Output `i`'s first input and weights.
    fn of(&self, i: usize) -> (usize, &[i32]) {
        (self.first[i], &self.weights[i * self.width..][..self.count[i]])
    }
}

/// A weighted sum in fixed point, rounded and clipped to 8 bits as PIL's `clip8`.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved 8-bit image `[in_h, in_w, channels]` to `[out_h, out_w, channels]` as
/// `PIL.Image.resize((out_w, out_h), filter)` does (no reducing gap). An axis whose size does
/// not change is not resampled (PIL skips that pass), so a same-size resize is a copy.
pub fn resize_u8(image: &[u8], [in_h, in_w]: [usize; 2], channels: usize, [out_h, out_w]: [usize; 2], filter: Filter) -> Vec<u8> {
    assert_eq!(image.len(), in_h * in_w * channels, "resize_u8: the image is not {in_h}×{in_w}×{channels}");
    let half = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if out_w != in_w {
        let taps = Taps::new(in_w, out_w, filter);
        let mut out = vec![0u8; in_h * out_w * channels];
        for (src, dst) in image.chunks_exact(in_w * channels).zip(out.chunks_exact_mut(out_w * channels)) {
            for x in 0..out_w {
                let (lo, w) = taps.of(x);
                for c in 0..channels {
                    let acc = w.iter().enumerate().fold(half, |acc, (j, &k)| acc + i64::from(src[(lo + j) * channels + c]) * i64::from(k));
                    dst[x * channels + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        image.to_vec()
    };
    if out_h == in_h {
        return horizontal;
    }
    let taps = Taps::new(in_h, out_h, filter);
    let row = out_w * channels;
    let mut out = vec![0u8; out_h * row];
    for (y, dst) in out.chunks_exact_mut(row).enumerate() {
        let (lo, w) = taps.of(y);
        for (i, v) in dst.iter_mut().enumerate() {
            let acc = w.iter().enumerate().fold(half, |acc, (j, &k)| acc + i64::from(horizontal[(lo + j) * row + i]) * i64::from(k));
            *v = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_images_stay_flat_and_same_size_is_a_copy() {
        let flat = vec![77u8; 9 * 13 * 3];
        for filter in [Filter::Bicubic, Filter::Lanczos] {
            for out in [[4, 5], [20, 31], [9, 13]] {
                assert!(resize_u8(&flat, [9, 13], 3, out, filter).iter().all(|&v| v == 77), "{filter:?} {out:?}");
            }
        }
        let ramp: Vec<u8> = (0..9 * 13 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_u8(&ramp, [9, 13], 3, [9, 13], Filter::Bicubic), ramp);
    }

    /// PIL's taps for 50 → 37 bicubic (the CLIP case's long side), checked by hand at one output:
    /// they sum to one unit within rounding and reach exactly `ceil(2·50/37)·2 + 1` wide.
    #[test]
    fn taps_are_normalised_fixed_point() {
        let t = Taps::new(50, 37, Filter::Bicubic);
        assert_eq!(t.width, 7);
        for i in 0..37 {
            let (lo, w) = t.of(i);
            let sum: i64 = w.iter().map(|&k| i64::from(k)).sum();
            assert!((sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64, "output {i}: {sum}");
            assert!(lo + w.len() <= 50);
        }
        // Upscaling keeps the filter's own support: 4 taps inside the image.
        let up = Taps::new(32, 42, Filter::Bicubic);
        assert_eq!(up.width, 5);
        assert!((0..42).all(|i| up.of(i).1.len() <= 5));
    }

    #[test]
    fn overshoot_is_clipped() {
        // A hard edge overshoots with bicubic's negative lobes: the result is clipped, not wrapped.
        let edge: Vec<u8> = (0..16).map(|x| if x < 8 { 0 } else { 255 }).collect();
        let up = resize_u8(&edge, [1, 16], 1, [1, 40], Filter::Bicubic);
        assert_eq!((up[0], up[39]), (0, 255));
        assert!(up.windows(2).all(|w| w[0] <= w[1]), "{up:?}");
    }
}
