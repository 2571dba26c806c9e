//! RMSNorm of attention queries or keys over the full hidden size, then (self-attention) 3-D RoPE:
//! the two steps Wan applies to q and k, as one call (the CPU twin of the fused CUDA kernel).

use super::norm::rms_norm_row;
use super::rope::RopeTable;
use crate::{KernelError, Result};
use rayon::prelude::*;

/// For each of `rows` rows of `x` (`stride` apart, the first `weight.len()` channels = `heads`
/// heads): `x ← x / sqrt(mean(x²) + eps) · weight`, then the rotations of `rope` (one table row
/// per row of `x`) when given. In place.
pub fn qk_norm_rope(x: &mut [f32], rows: usize, stride: usize, weight: &[f32], eps: f32, heads: usize, rope: Option<&RopeTable>) -> Result<()> {
    let dim = weight.len();
    if dim == 0 || heads == 0 || !dim.is_multiple_of(heads) || stride < dim {
        return Err(KernelError::shape("qk_norm_rope", format!("dim {dim}, heads {heads}, stride {stride}")));
    }
    if rows > 0 && x.len() < (rows - 1) * stride + dim {
        return Err(KernelError::shape(
            "qk_norm_rope",
            format!("x has {} elements, {rows} rows of stride {stride} need {}", x.len(), (rows - 1) * stride + dim),
        ));
    }
    if let Some(t) = rope {
        if t.tokens() != rows || 2 * t.pairs() * heads != dim {
            return Err(KernelError::shape(
                "qk_norm_rope",
                format!("rope table of {} tokens x {} pairs for {rows} rows of {heads} heads x {}", t.tokens(), t.pairs(), dim / heads),
            ));
        }
    }
    x.par_chunks_mut(stride).take(rows).with_min_len(16).for_each(|row| rms_norm_row(&mut row[..dim], eps, weight));
    if let Some(t) = rope {
        t.apply(x, heads, stride)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{rms_norm, Rope3d};

    #[test]
    fn equals_rms_norm_then_rope_on_strided_rows() {
        let (heads, hd, rows, stride) = (2, 12, 5, 30);
        let dim = heads * hd;
        let x: Vec<f32> = (0..rows * stride).map(|i| ((i * 7919) % 97) as f32 / 20.0 - 2.4).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / 40.0).collect();
        let table = Rope3d::wan(hd, 64, 10000.0).unwrap().table([2, 3, 4], 7..7 + rows).unwrap();
        let mut got = x.clone();
        qk_norm_rope(&mut got, rows, stride, &w, 1e-6, heads, Some(&table)).unwrap();
        let mut packed: Vec<f32> = x.chunks(stride).flat_map(|r| r[..dim].to_vec()).collect();
        rms_norm(&mut packed, &w, 1e-6).unwrap();
        table.apply(&mut packed, heads, dim).unwrap();
        for r in 0..rows {
            assert_eq!(&got[r * stride..r * stride + dim], &packed[r * dim..(r + 1) * dim]);
            assert_eq!(&got[r * stride + dim..(r + 1) * stride], &x[r * stride + dim..(r + 1) * stride], "channels past dim are untouched");
        }
        let mut plain = x.clone();
        qk_norm_rope(&mut plain, rows, stride, &w, 1e-6, heads, None).unwrap();
        assert_ne!(plain, got);
        assert!(qk_norm_rope(&mut plain, rows + 1, stride, &w, 1e-6, heads, Some(&table)).is_err());
    }
}
