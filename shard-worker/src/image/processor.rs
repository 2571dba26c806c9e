//! transformers' `CLIPImageProcessor` on an 8-bit RGB image, as Wan 2.1 I2V configures it: the
//! short side resized to `shortest_edge` (PIL's bicubic, bit for bit), the long side to
//! `int(shortest_edge · long / short)`, a center crop at `((h − S) // 2, (w − S) // 2)`, then
//! `x · rescale_factor` and `(x − mean) / std` per channel. The output is `pixel_values`
//! `[1, 3, S, S]`.

use super::config::ClipProcessorConfig;
use super::RgbImage;
use crate::Result;
use tessera_kernels::cpu::resample::resize_u8;
use tessera_kernels::Tensor;

/// The size `[h, w]` transformers resizes an `[h, w]` image to so that its short side is `short`
/// (`get_resize_output_image_size` with `default_to_square=False`): the long side is truncated,
/// never rounded.
pub fn shortest_edge_size([h, w]: [usize; 2], short: usize) -> [usize; 2] {
    let (small, large) = if w <= h { (w, h) } else { (h, w) };
    // Python's int(short * large / small): a correctly rounded quotient, truncated.
    let long = ((short as u64 * large as u64) as f64 / small as f64) as usize;
    if w <= h {
        [long, short]
    } else {
        [short, long]
    }
}

/// `CLIPImageProcessor(image).pixel_values`: `[1, 3, crop, crop]` f32.
pub fn clip_pixel_values(cfg: &ClipProcessorConfig, image: &RgbImage) -> Result<Tensor> {
    let size = shortest_edge_size([image.height, image.width], cfg.shortest_edge);
    let resized = resize_u8(&image.data, [image.height, image.width], 3, size, cfg.filter);
    let s = cfg.crop;
    let (top, left) = ((size[0] - s) / 2, (size[1] - s) / 2);
    let mut out = vec![0f32; 3 * s * s];
    for c in 0..3 {
        let (mean, std) = cfg.normalize.map_or((0.0, 1.0), |(m, d)| (f64::from(m[c]), f64::from(d[c])));
        let scale = cfg.rescale_factor.unwrap_or(1.0);
        for y in 0..s {
            let row = &resized[((top + y) * size[1] + left) * 3..][..s * 3];
            for (x, o) in out[(c * s + y) * s..][..s].iter_mut().enumerate() {
                *o = ((f64::from(row[x * 3 + c]) * scale - mean) / std) as f32;
            }
        }
    }
    Ok(Tensor::new([1, 3, s, s], out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_follow_transformers() {
        // The golden cases: 37×50 → short side 28, long int(28·50/37) = 37; 32×48 → 42×63.
        assert_eq!(shortest_edge_size([37, 50], 28), [28, 37]);
        assert_eq!(shortest_edge_size([32, 48], 42), [42, 63]);
        // Portrait, and square.
        assert_eq!(shortest_edge_size([50, 37], 28), [37, 28]);
        assert_eq!(shortest_edge_size([480, 480], 224), [224, 224]);
        // 1280×720 to 224: int(224·1280/720) = int(398.22) = 398.
        assert_eq!(shortest_edge_size([720, 1280], 224), [224, 398]);
    }
}
