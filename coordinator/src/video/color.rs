//! RGB → Y′CbCr 4:2:0 (I420) for the H.264 encoder: BT.709 or BT.601 matrix, limited ("TV")
//! range, chroma as the mean of each 2×2 block; odd sizes padded to even by repeating the last
//! column/row (4:2:0 H.264 cannot code or crop odd sizes).

use super::{check_frame, VideoSpec};
use crate::Result;

/// The Y′CbCr matrix (and the colour description written into the H.264 stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ColorMatrix {
    /// ITU-R BT.709 (Kr = 0.2126, Kb = 0.0722): HD video, what players assume for ≥ 720p.
    #[default]
    Bt709,
    /// ITU-R BT.601 / SMPTE 170M (Kr = 0.299, Kb = 0.114): SD video.
    Bt601,
}

impl ColorMatrix {
    /// (Kr, Kb).
    fn weights(self) -> (f32, f32) {
        match self {
            Self::Bt709 => (0.2126, 0.0722),
            Self::Bt601 => (0.299, 0.114),
        }
    }
}

/// One frame in I420: full-size luma, half-size chroma planes.
#[derive(Clone, Debug, PartialEq)]
pub struct Yuv420 {
    /// Coded width (the frame's, rounded up to even).
    pub width: usize,
    /// Coded height (rounded up to even).
    pub height: usize,
    /// Luma, `width × height`.
    pub y: Vec<u8>,
    /// Cb, `width/2 × height/2`.
    pub u: Vec<u8>,
    /// Cr, `width/2 × height/2`.
    pub v: Vec<u8>,
}

/// Converts a planar RGB frame `[3, H, W]` in [0, 1] to limited-range I420 with `matrix`.
pub fn rgb_to_yuv420(spec: &VideoSpec, frame: &[f32], matrix: ColorMatrix) -> Result<Yuv420> {
    check_frame(spec, frame)?;
    let (w, h) = (spec.width as usize, spec.height as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let (kr, kb) = matrix.weights();
    let kg = 1.0 - kr - kb;
    let n = w * h;
    // Samples are first rounded to 8-bit RGB, as every output format stores them: a video encodes
    // the same whether its frames arrive as floats (in-process decode) or as bytes (from a worker).
    let at = |plane: usize, x: usize, y: usize| (frame[plane * n + y.min(h - 1) * w + x.min(w - 1)].clamp(0.0, 1.0) * 255.0).round() / 255.0;
    let luma = |r: f32, g: f32, b: f32| kr * r + kg * g + kb * b;
    let byte = |x: f32| x.round().clamp(0.0, 255.0) as u8;

    let (pw, ph) = (2 * cw, 2 * ch);
    let mut y_plane = vec![0u8; pw * ph];
    for y in 0..ph {
        for x in 0..pw {
            y_plane[y * pw + x] = byte(16.0 + 219.0 * luma(at(0, x, y), at(1, x, y), at(2, x, y)));
        }
    }
    let mut u_plane = vec![0u8; cw * ch];
    let mut v_plane = vec![0u8; cw * ch];
    for cy in 0..ch {
        for cx in 0..cw {
            let mean = |p: usize| {
                let (x, y) = (2 * cx, 2 * cy);
                0.25 * (at(p, x, y) + at(p, x + 1, y) + at(p, x, y + 1) + at(p, x + 1, y + 1))
            };
            let (r, g, b) = (mean(0), mean(1), mean(2));
            let l = luma(r, g, b);
            u_plane[cy * cw + cx] = byte(128.0 + 224.0 * (b - l) / (2.0 * (1.0 - kb)));
            v_plane[cy * cw + cx] = byte(128.0 + 224.0 * (r - l) / (2.0 * (1.0 - kr)));
        }
    }
    Ok(Yuv420 { width: pw, height: ph, y: y_plane, u: u_plane, v: v_plane })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(spec: &VideoSpec, rgb: [f32; 3]) -> Vec<f32> {
        rgb.iter().flat_map(|&c| std::iter::repeat_n(c, spec.pixels())).collect()
    }

    #[test]
    fn reference_colours_map_to_the_standard_code_values() {
        let spec = VideoSpec::new(4, 2, 16.0).unwrap();
        let cases = [
            ([0.0, 0.0, 0.0], ColorMatrix::Bt709, (16, 128, 128)),
            ([1.0, 1.0, 1.0], ColorMatrix::Bt709, (235, 128, 128)),
            // BT.709 red: Y = 16 + 219·0.2126 = 62.6, Cr = 240.
            ([1.0, 0.0, 0.0], ColorMatrix::Bt709, (63, 102, 240)),
            // BT.601 red: Y = 16 + 219·0.299 = 81.5, Cb = 90, Cr = 240.
            ([1.0, 0.0, 0.0], ColorMatrix::Bt601, (81, 90, 240)),
            ([0.0, 0.0, 1.0], ColorMatrix::Bt601, (41, 240, 110)),
        ];
        for (rgb, m, (y, u, v)) in cases {
            let f = rgb_to_yuv420(&spec, &solid(&spec, rgb), m).unwrap();
            assert_eq!((f.y[0], f.u[0], f.v[0]), (y, u, v), "{rgb:?} {m:?}");
            assert_eq!((f.y.len(), f.u.len(), f.v.len()), (8, 2, 2));
        }
    }

    #[test]
    fn odd_sizes_are_padded_by_repeating_the_edge() {
        let spec = VideoSpec::new(3, 3, 16.0).unwrap();
        let mut f = vec![0.0f32; 27];
        f[2] = 1.0; // red at (x = 2, y = 0), the last column
        f[9 + 2] = 1.0;
        f[18 + 2] = 1.0; // so: white
        let yuv = rgb_to_yuv420(&spec, &f, ColorMatrix::Bt709).unwrap();
        assert_eq!((yuv.width, yuv.height), (4, 4));
        assert_eq!(yuv.y[2], 235);
        assert_eq!(yuv.y[3], 235, "padding repeats the last column");
        assert_eq!(yuv.y[3 * 4], 16, "padding repeats the last row");
        assert_eq!(yuv.u.len(), 4);
    }

    #[test]
    fn chroma_is_the_mean_of_each_block() {
        let spec = VideoSpec::new(2, 2, 16.0).unwrap();
        // Two red and two blue pixels: chroma of magenta at half strength.
        let f = vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        let yuv = rgb_to_yuv420(&spec, &f, ColorMatrix::Bt709).unwrap();
        let mean = rgb_to_yuv420(&spec, &solid(&spec, [0.5, 0.0, 0.5]), ColorMatrix::Bt709).unwrap();
        assert_eq!((yuv.u[0], yuv.v[0]), (mean.u[0], mean.v[0]));
    }
}
