//! Y′CbCr 4:2:0 → planar RGB in [0, 1] for decoded H.264 pictures: the stream's matrix (BT.709,
//! BT.601 or BT.2020) and range (limited or full), chroma upsampled bilinearly with each chroma
//! sample at the centre of its 2×2 luma block (as the project's MP4 writer makes it).

use rayon::prelude::*;

/// How a picture's Y′CbCr relates to R′G′B′.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct YuvColour {
    /// Red weight of luma.
    pub kr: f32,
    /// Blue weight of luma.
    pub kb: f32,
    /// Full range (0–255) rather than limited (16–235 luma, 16–240 chroma).
    pub full_range: bool,
}

impl YuvColour {
    const BT709: (f32, f32) = (0.2126, 0.0722);
    const BT601: (f32, f32) = (0.299, 0.114);
    const BT2020: (f32, f32) = (0.2627, 0.0593);

    /// No colour description: limited range, BT.709 for HD (coded height ≥ 720), else BT.601
    /// (what players assume).
    pub fn unspecified(coded_height: u32) -> Self {
        let (kr, kb) = if coded_height >= 720 { Self::BT709 } else { Self::BT601 };
        Self { kr, kb, full_range: false }
    }

    /// From ITU-T H.273 `matrix_coefficients`: 1 BT.709, 5 and 6 BT.601, 9 and 10 BT.2020;
    /// any other value as [`Self::unspecified`].
    pub fn from_matrix_coefficients(matrix: u32, coded_height: u32, full_range: bool) -> Self {
        let (kr, kb) = match matrix {
            1 => Self::BT709,
            5 | 6 => Self::BT601,
            9 | 10 => Self::BT2020,
            _ => {
                let u = Self::unspecified(coded_height);
                (u.kr, u.kb)
            }
        };
        Self { kr, kb, full_range }
    }
}

/// Bilinear taps of a 2:1 upsampling with centred samples: output `i` reads input
/// `(i0, i1)` with weight `1 − f` and `f`, indices clamped to `0..n`.
fn taps(out_len: usize, n: usize) -> Vec<(usize, usize, f32)> {
    (0..out_len)
        .map(|i| {
            let pos = (i as f32 + 0.5) / 2.0 - 0.5;
            let i0 = pos.floor();
            let f = pos - i0;
            let clamp = |k: f32| (k.max(0.0) as usize).min(n - 1);
            (clamp(i0), clamp(i0 + 1.0), f)
        })
        .collect()
}

/// Converts one I420 picture of `w`×`h` to planar RGB `[3, h, w]` in `out`: `y` is the luma plane
/// with its stride, `u` the Cb plane with the chroma stride, `v` the Cr plane (same stride). The
/// plane lengths are checked; a mismatch is an error message, never a panic.
pub(super) fn yuv420_to_rgb(y: (&[u8], usize), u: (&[u8], usize), v: &[u8], (w, h): (usize, usize), colour: YuvColour, out: &mut [f32]) -> Result<(), String> {
    let ((y, ys), (u, cs)) = (y, u);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    if w == 0 || h == 0 || out.len() != 3 * w * h {
        return Err(format!("a {w}x{h} picture into {} values", out.len()));
    }
    if ys < w || cs < cw || y.len() < (h - 1) * ys + w || u.len() < (ch - 1) * cs + cw || v.len() < (ch - 1) * cs + cw {
        return Err(format!("the decoder's planes ({}, {}, {} bytes, strides {ys}, {cs}) do not hold a {w}x{h} picture", y.len(), u.len(), v.len()));
    }
    let (y_off, y_scale, c_scale) = if colour.full_range { (0.0, 1.0 / 255.0, 1.0 / 255.0) } else { (16.0, 1.0 / 219.0, 1.0 / 224.0) };
    let (kr, kb) = (colour.kr, colour.kb);
    let kg = 1.0 - kr - kb;
    let (cr_r, cb_b) = (2.0 * (1.0 - kr), 2.0 * (1.0 - kb));
    let cols = taps(w, cw);
    let rows = taps(h, ch);
    let (r_plane, rest) = out.split_at_mut(w * h);
    let (g_plane, b_plane) = rest.split_at_mut(w * h);
    r_plane.par_chunks_mut(w).zip(g_plane.par_chunks_mut(w)).zip(b_plane.par_chunks_mut(w)).enumerate().for_each(|(row, ((r_out, g_out), b_out))| {
        let (r0, r1, fy) = rows[row];
        let luma = &y[row * ys..row * ys + w];
        let (u0, u1) = (&u[r0 * cs..r0 * cs + cw], &u[r1 * cs..r1 * cs + cw]);
        let (v0, v1) = (&v[r0 * cs..r0 * cs + cw], &v[r1 * cs..r1 * cs + cw]);
        for x in 0..w {
            let (c0, c1, fx) = cols[x];
            let bilinear = |p0: &[u8], p1: &[u8]| {
                let top = p0[c0] as f32 * (1.0 - fx) + p0[c1] as f32 * fx;
                let bottom = p1[c0] as f32 * (1.0 - fx) + p1[c1] as f32 * fx;
                top * (1.0 - fy) + bottom * fy
            };
            let yv = (luma[x] as f32 - y_off) * y_scale;
            let cb = (bilinear(u0, u1) - 128.0) * c_scale;
            let cr = (bilinear(v0, v1) - 128.0) * c_scale;
            let r = yv + cr_r * cr;
            let b = yv + cb_b * cb;
            let g = (yv - kr * r - kb * b) / kg;
            r_out[x] = r.clamp(0.0, 1.0);
            g_out[x] = g.clamp(0.0, 1.0);
            b_out[x] = b.clamp(0.0, 1.0);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::{rgb_to_yuv420, ColorMatrix, VideoSpec};

    #[test]
    fn inverts_the_writers_conversion_of_flat_colours() {
        let spec = VideoSpec::new(6, 4, 16.0).unwrap();
        for (matrix, mc) in [(ColorMatrix::Bt709, 1), (ColorMatrix::Bt601, 6)] {
            for rgb in [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.8, 0.3, 0.1], [0.1, 0.5, 0.9]] {
                let frame: Vec<f32> = rgb.iter().flat_map(|&c| std::iter::repeat_n(c, 24)).collect();
                let yuv = rgb_to_yuv420(&spec, &frame, matrix).unwrap();
                let mut out = vec![0.0; 72];
                let colour = YuvColour::from_matrix_coefficients(mc, 4, false);
                yuv420_to_rgb((&yuv.y, 6), (&yuv.u, 3), &yuv.v, (6, 4), colour, &mut out).unwrap();
                for (a, b) in frame.iter().zip(&out) {
                    // 8-bit quantisation of Y′CbCr: at most ~1.5 code values of R′G′B′.
                    assert!((a - b).abs() < 1.6 / 255.0, "{matrix:?} {rgb:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn full_range_and_matrices() {
        let mut out = vec![0.0; 3];
        // Full-range BT.601 pure red: Y = 76.2, Cb = 85.0, Cr = 255.5 (clipped to 255).
        let c = YuvColour::from_matrix_coefficients(5, 480, true);
        yuv420_to_rgb((&[76], 1), (&[85], 1), &[255], (1, 1), c, &mut out).unwrap();
        assert!((out[0] - 1.0).abs() < 0.01 && out[1] < 0.01 && out[2] < 0.01, "{out:?}");
        assert_eq!(YuvColour::unspecified(1080).kr, 0.2126);
        assert_eq!(YuvColour::unspecified(480).kr, 0.299);
        assert_eq!(YuvColour::from_matrix_coefficients(9, 480, false).kr, 0.2627);
        assert_eq!(YuvColour::from_matrix_coefficients(2, 480, true), YuvColour { full_range: true, ..YuvColour::unspecified(480) });
    }

    #[test]
    fn chroma_is_upsampled_between_block_centres() {
        // 4×2 picture, two chroma samples across: 0 on the left block, 224 steps on the right.
        assert_eq!(taps(4, 2), vec![(0, 0, 0.75), (0, 1, 0.25), (0, 1, 0.75), (1, 1, 0.25)]);
        let mut out = vec![0.0; 24];
        let colour = YuvColour::from_matrix_coefficients(1, 2, false);
        yuv420_to_rgb((&[126; 8], 4), (&[128, 128], 2), &[16, 240], (4, 2), colour, &mut out).unwrap();
        let red = &out[..4];
        assert!(red[0] < red[1] && red[1] < red[2] && red[2] < red[3], "{red:?}");
        assert_eq!(&out[4..8], red, "both rows read the same chroma row");
    }

    #[test]
    fn short_planes_are_errors() {
        let mut out = vec![0.0; 12];
        let c = YuvColour::unspecified(2);
        assert!(yuv420_to_rgb((&[0; 3], 2), (&[0; 1], 1), &[0; 1], (2, 2), c, &mut out).is_err());
        assert!(yuv420_to_rgb((&[0; 4], 2), (&[0; 1], 1), &[], (2, 2), c, &mut out).is_err());
        assert!(yuv420_to_rgb((&[0; 4], 1), (&[0; 1], 1), &[0], (2, 2), c, &mut out).is_err(), "stride below width");
        assert!(yuv420_to_rgb((&[0; 4], 2), (&[0; 1], 1), &[0], (2, 2), c, &mut out[..11]).is_err());
        assert!(yuv420_to_rgb((&[0; 4], 2), (&[0; 1], 1), &[0], (2, 2), c, &mut out).is_ok());
    }
}
