//! What the two host backends (`cpu` and `bf16-host`) share: their buffers are `Vec`s, and the
//! operations below do not depend on the activation type. Each backend's `impl Ops` takes the
//! buffer plumbing from [`vec_buffers!`] and calls these helpers, so the code exists once.

use super::{contract, region, shape_err, At, AtMut, Elem};
use crate::cpu::{self, PatchGeometry};
use crate::Result;
use rayon::prelude::*;
use std::ops::Range;

/// Elements from which a host copy is split among the threads.
const PARALLEL_COPY: usize = 1 << 16;

/// The `Ops` methods of a backend whose buffers are `Vec`s and whose RoPE tables are host
/// `RopeTable`s: length, allocation, uploads (taking a vector without copying it), in-place
/// host views, downloads, 2-D copies, the log-sum-exp merge, unpatchify and the sampler's f32
/// updates (guidance and the step).
macro_rules! vec_buffers {
    () => {
        fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
            buf.len()
        }

        fn zeros<T: Elem>(&self, n: usize) -> Result<Vec<T>> {
            Ok(vec![T::default(); n])
        }

        fn upload<T: Elem>(&self, host: &[T]) -> Result<Vec<T>> {
            Ok(host.to_vec())
        }

        fn upload_vec<T: Elem>(&self, host: Vec<T>) -> Result<Vec<T>> {
            Ok(host)
        }

        fn host_view<'b, T: Elem>(&self, buf: &'b Vec<T>) -> Option<&'b [T]> {
            Some(buf)
        }

        fn download<T: Elem>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
            Ok(buf.clone())
        }

        fn upload_rope(&self, table: &RopeTable) -> Result<RopeTable> {
            Ok(table.clone())
        }

        fn copy_rows<T: Elem>(&self, src: At<'_, Vec<T>>, src_pitch: usize, dst: AtMut<'_, Vec<T>>, dst_pitch: usize, width: usize, rows: usize) -> Result<()> {
            super::host_vec::copy_rows(src, src_pitch, dst, dst_pitch, width, rows)
        }

        fn merge_partials(
            &self,
            out_a: &mut Vec<f32>,
            lse_a: &mut Vec<f32>,
            out_b: &Vec<f32>,
            lse_b: &Vec<f32>,
            q_len: usize,
            heads: usize,
            head_dim: usize,
        ) -> Result<()> {
            super::contract::merge_partials((out_a.len(), lse_a.len()), (out_b.len(), lse_b.len()), q_len, heads, head_dim)?;
            crate::cpu::merge_partials(out_a, lse_a, out_b, lse_b, heads, head_dim)
        }

        fn unpatchify(&self, rows: &Vec<f32>, g: &PatchGeometry, latent: &mut Vec<f32>) -> Result<()> {
            super::host_vec::unpatchify(rows, g, latent)
        }

        fn guide(&self, cond: &mut Vec<f32>, uncond: &Vec<f32>, g: f32) -> Result<()> {
            crate::cpu::guide(cond, uncond, g)
        }

        fn sampler_step(&self, update: &crate::cpu::SamplerUpdate, v: &Vec<f32>, x: &mut Vec<f32>, history: &mut [Vec<f32>]) -> Result<()> {
            let mut history: Vec<&mut [f32]> = history.iter_mut().map(Vec::as_mut_slice).collect();
            crate::cpu::sampler_step(update, v, x, &mut history)
        }
    };
}
pub(super) use vec_buffers;

/// Copies `rows` runs of `width` elements, `src_pitch` apart, to runs `dst_pitch` apart.
pub(super) fn copy_rows<T: Elem>(src: At<'_, Vec<T>>, src_pitch: usize, dst: AtMut<'_, Vec<T>>, dst_pitch: usize, width: usize, rows: usize) -> Result<()> {
    let (sr, dr) = contract::copy_rows((src.buf.len(), src.offset), src_pitch, (dst.buf.len(), dst.offset), dst_pitch, width, rows)?;
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let (src, dst) = (&src.buf[sr], &mut dst.buf[dr]);
    if rows * width < PARALLEL_COPY {
        for r in 0..rows {
            dst[r * dst_pitch..r * dst_pitch + width].copy_from_slice(&src[r * src_pitch..r * src_pitch + width]);
        }
    } else if rows == 1 {
        dst.par_chunks_mut(PARALLEL_COPY).zip(src.par_chunks(PARALLEL_COPY)).for_each(|(d, s)| d.copy_from_slice(s));
    } else {
        // Row r of dst starts chunk r (the last chunk may be only `width` long: the span).
        dst.par_chunks_mut(dst_pitch).enumerate().for_each(|(r, d)| d[..width].copy_from_slice(&src[r * src_pitch..r * src_pitch + width]));
    }
    Ok(())
}

/// Stores packed f32 rows of `width` values into `dst` rows `stride` apart, as `T` (rounded to
/// nearest even for bf16).
pub(super) fn store_rows<T: Elem>(dst: &mut [T], rows: &[f32], width: usize, stride: usize) {
    for (i, row) in rows.chunks_exact(width).enumerate() {
        dst[i * stride..i * stride + width].iter_mut().zip(row).for_each(|(d, &s)| *d = T::from_f32(s));
    }
}

/// The patches of `tokens` of the latent, stored as `T` at the start of `out`.
pub(super) fn patchify<T: Elem>(latent: &[f32], g: &PatchGeometry, tokens: Range<usize>, out: &mut [T]) -> Result<()> {
    if latent.len() < g.latent_len() {
        return Err(shape_err("patchify", format!("latent has {} elements, needs {}", latent.len(), g.latent_len())));
    }
    let r = region("patchify", "out", out.len(), 0, tokens.len() * g.features())?;
    let rows = cpu::patchify(&latent[..g.latent_len()], g, tokens)?;
    out[r].iter_mut().zip(&rows).for_each(|(d, &s)| *d = T::from_f32(s));
    Ok(())
}

/// The latent `[C, F, H, W]` from all tokens' f32 rows.
pub(super) fn unpatchify(rows: &[f32], g: &PatchGeometry, latent: &mut [f32]) -> Result<()> {
    let r = region("unpatchify", "rows", rows.len(), 0, g.tokens() * g.features())?;
    let lr = region("unpatchify", "latent", latent.len(), 0, g.latent_len())?;
    let out = cpu::unpatchify(&rows[r], g)?;
    latent[lr].copy_from_slice(&out);
    Ok(())
}
