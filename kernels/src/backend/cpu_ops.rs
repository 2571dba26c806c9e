//! [`Ops`] on the CPU in f32: the `cpu` backend, fast and exact. Buffers are `Vec`s, activations
//! are f32 (`Act = f32`, so nothing is rounded), and every operation runs the multi-threaded
//! kernels of [`crate::cpu`] in place on the buffers' regions. Each call checks the regions it
//! touches (an error naming the operand, never a panic), but none of the CUDA kernels' layout
//! restrictions: any head width, any stride at least as wide as the rows.

use super::contract;
use super::{region, shape_err, At, AtMut, ConvShape, Elem, HostConv, NormArgs, Ops, Piece};
use crate::cpu::{self, Activation, AttentionShape, Conv3dParams, LayerNormParams, PatchGeometry, RopeTable};
use crate::Result;
use std::ops::Range;

/// The f32 CPU kernels as [`Ops`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOps;

/// `x` as f32 values: borrowed when `T` is f32, widened otherwise.
fn as_f32<T: Elem>(x: &[T]) -> std::borrow::Cow<'_, [f32]> {
    match T::as_f32s(x) {
        Some(f) => std::borrow::Cow::Borrowed(f),
        None => std::borrow::Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
    }
}

impl Ops for CpuOps {
    type Buf<T: Elem> = Vec<T>;
    type Rope = RopeTable;
    type Act = f32;

    super::host_vec::vec_buffers!();

    fn describe(&self) -> String {
        "cpu (f32)".into()
    }

    fn upload_into<T: Elem>(&self, host: &[T], dst: AtMut<'_, Vec<T>>) -> Result<()> {
        let r = super::region("upload_into", "dst", dst.buf.len(), dst.offset, host.len())?;
        dst.buf[r].copy_from_slice(host);
        Ok(())
    }

    fn attention_width(&self, head_dim: usize) -> Option<usize> {
        Some(head_dim).filter(|&h| h > 0 && h.is_multiple_of(2))
    }

    fn linear(
        &self,
        x: At<'_, Vec<f32>>,
        m: usize,
        k: usize,
        w: &Vec<f32>,
        n: usize,
        bias: Option<&Vec<f32>>,
        act: Activation,
        y: AtMut<'_, Vec<f32>>,
    ) -> Result<()> {
        let (xr, yr) = contract::linear((x.buf.len(), x.offset), m, k, w.len(), n, bias.map(|b| b.len()), act, (y.buf.len(), y.offset))?;
        cpu::linear_into(&x.buf[xr], m, k, w, n, bias.map(|b| b.as_slice()), act, &mut y.buf[yr])
    }

    fn layer_norm(&self, x: At<'_, Vec<f32>>, rows: usize, dim: usize, p: &NormArgs<'_, Vec<f32>>, y: AtMut<'_, Vec<f32>>) -> Result<()> {
        let parts = [p.weight, p.bias, p.scale, p.shift];
        let (xr, yr, ranges) =
            contract::layer_norm((x.buf.len(), x.offset), rows, dim, parts.map(|a| a.map(|a| (a.buf.len(), a.offset))), (y.buf.len(), y.offset))?;
        let slice = |i: usize| -> Option<&[f32]> { parts[i].zip(ranges[i].clone()).map(|(a, r)| &a.buf[r]) };
        let params = LayerNormParams { eps: p.eps, weight: slice(0), bias: slice(1), scale: slice(2), shift: slice(3) };
        cpu::layer_norm_into(&x.buf[xr], dim, &params, &mut y.buf[yr])
    }

    fn qk_norm_rope(
        &self,
        x: AtMut<'_, Vec<f32>>,
        rows: usize,
        stride: usize,
        heads: usize,
        head_dim: usize,
        weight: &Vec<f32>,
        eps: f32,
        rope: Option<&RopeTable>,
    ) -> Result<()> {
        let dim = heads * head_dim;
        if weight.len() != dim {
            return Err(shape_err("qk_norm_rope", format!("weight has {} elements, rows have {dim}", weight.len())));
        }
        let r = region("qk_norm_rope", "x", x.buf.len(), x.offset, super::span(rows, stride, dim))?;
        cpu::qk_norm_rope(&mut x.buf[r], rows, stride, weight, eps, heads, rope)
    }

    fn attention<O: Elem>(
        &self,
        q: At<'_, Vec<f32>>,
        k: At<'_, Vec<f32>>,
        v: At<'_, Vec<f32>>,
        shape: AttentionShape,
        scale: f32,
        out: AtMut<'_, Vec<O>>,
        out_stride: usize,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let lo = |a: &At<'_, Vec<f32>>| (a.buf.len(), a.offset);
        let [qr, kr, vr, or] = contract::attention_regions(lo(&q), lo(&k), lo(&v), &shape, (out.buf.len(), out.offset), out_stride, lse.len())?;
        if shape.q_len == 0 {
            return Ok(());
        }
        let res = cpu::attention(&q.buf[qr], &k.buf[kr], &v.buf[vr], shape, scale)?;
        super::host_vec::store_rows(&mut out.buf[or], &res.out, shape.heads * shape.head_dim, out_stride);
        lse[..res.lse.len()].copy_from_slice(&res.lse);
        Ok(())
    }

    fn biased_attention(
        &self,
        q: At<'_, Vec<f32>>,
        k: At<'_, Vec<f32>>,
        v: At<'_, Vec<f32>>,
        shape: AttentionShape,
        scale: f32,
        rel: At<'_, Vec<f32>>,
        pitch: usize,
        key_add: Option<At<'_, Vec<f32>>>,
        out: AtMut<'_, Vec<f32>>,
        out_stride: usize,
    ) -> Result<()> {
        let lo = |a: &At<'_, Vec<f32>>| (a.buf.len(), a.offset);
        let r = contract::biased_attention(
            lo(&q),
            lo(&k),
            lo(&v),
            &shape,
            (out.buf.len(), out.offset),
            out_stride,
            lo(&rel),
            pitch,
            key_add.as_ref().map(lo),
            false,
        )?;
        let [qr, kr, vr, or] = r.qkvo;
        let bias = cpu::RelativeBias { table: &rel.buf[r.rel], pitch };
        let mask = key_add.zip(r.key_add).map(|(m, range)| &m.buf[range]);
        let res = cpu::biased_attention(&q.buf[qr], &k.buf[kr], &v.buf[vr], shape, scale, bias, mask)?;
        super::host_vec::store_rows(&mut out.buf[or], &res, shape.heads * shape.head_dim, out_stride);
        Ok(())
    }

    fn mul(&self, x: AtMut<'_, Vec<f32>>, y: At<'_, Vec<f32>>, n: usize) -> Result<()> {
        let (xr, yr) = (region("mul", "x", x.buf.len(), x.offset, n)?, region("mul", "y", y.buf.len(), y.offset, n)?);
        cpu::mul_in_place(&mut x.buf[xr], &y.buf[yr])
    }

    fn add<Y: Elem>(&self, x: AtMut<'_, Vec<f32>>, y: At<'_, Vec<Y>>, gate: Option<At<'_, Vec<f32>>>, n: usize, dim: usize) -> Result<()> {
        let (xr, yr, gr) = contract::add((x.buf.len(), x.offset), (y.buf.len(), y.offset), gate.map(|g| (g.buf.len(), g.offset)), n, dim)?;
        let yv = as_f32(&y.buf[yr]);
        match gate.zip(gr) {
            Some((g, r)) => cpu::gated_residual_add(&mut x.buf[xr], &yv, &g.buf[r]),
            None => cpu::residual_add(&mut x.buf[xr], &yv),
        }
    }

    fn narrow(&self, x: At<'_, Vec<f32>>, out: AtMut<'_, Vec<f32>>, n: usize) -> Result<()> {
        copy("narrow", x, out, n)
    }

    fn widen(&self, x: At<'_, Vec<f32>>, out: AtMut<'_, Vec<f32>>, n: usize) -> Result<()> {
        copy("widen", x, out, n)
    }

    fn patchify(&self, latent: &Vec<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut Vec<f32>) -> Result<()> {
        super::host_vec::patchify(latent, g, tokens, out)
    }

    type ConvWeight = HostConv;

    fn conv_weight(&self, shape: ConvShape, weight: Vec<f32>, bias: Vec<f32>) -> Result<HostConv> {
        HostConv::new(shape, weight, bias)
    }

    fn conv3d(&self, input: &[Piece<'_, Vec<f32>>], chw: [usize; 3], w: &HostConv, p: &Conv3dParams) -> Result<(Vec<f32>, [usize; 4])> {
        contract::conv3d(&input.iter().map(|x| (x.buf.len(), x.frames)).collect::<Vec<_>>(), chw, &w.shape, p)?;
        let plane = chw.iter().product::<usize>();
        let pieces: Vec<&[f32]> = input.iter().map(|x| &x.buf[..x.frames * plane]).collect();
        w.run(&pieces, chw, p)
    }

    fn channel_norm(&self, x: &mut Vec<f32>, channels: usize, positions: usize, gamma: &Vec<f32>, silu: bool) -> Result<()> {
        let r = contract::channel_norm(x.len(), channels, positions, gamma.len())?;
        cpu::channel_rms_norm(&mut x[r], positions, gamma, silu)
    }

    fn upsample_nearest2x(&self, x: &Vec<f32>, planes: usize, h: usize, w: usize, out: &mut Vec<f32>) -> Result<()> {
        let (xr, or) = contract::upsample(x.len(), planes, h, w, out.len())?;
        cpu::upsample_nearest2x(&x[xr], planes, h, w, &mut out[or])
    }

    fn accumulate(&self, x: AtMut<'_, Vec<f32>>, y: At<'_, Vec<f32>>, n: usize) -> Result<()> {
        let (xr, yr) = (region("accumulate", "x", x.buf.len(), x.offset, n)?, region("accumulate", "y", y.buf.len(), y.offset, n)?);
        cpu::residual_add(&mut x.buf[xr], &y.buf[yr])
    }

    fn transpose(&self, x: At<'_, Vec<f32>>, rows: usize, cols: usize, out: AtMut<'_, Vec<f32>>) -> Result<()> {
        let (xr, or) = contract::transpose((x.buf.len(), x.offset), rows, cols, (out.buf.len(), out.offset))?;
        cpu::transpose(&x.buf[xr], rows, cols, &mut out.buf[or])
    }
}

/// `out[..n] = x[..n]` from their offsets.
fn copy(op: &'static str, x: At<'_, Vec<f32>>, out: AtMut<'_, Vec<f32>>, n: usize) -> Result<()> {
    let (xr, or) = (region(op, "input", x.buf.len(), x.offset, n)?, region(op, "output", out.buf.len(), out.offset, n)?);
    out.buf[or].copy_from_slice(&x.buf[xr]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{at, at_mut, flash};
    use super::*;

    /// Heads of any even width run unpadded, and a region past the buffer is an error, not a panic.
    #[test]
    fn attention_takes_any_even_head_and_checks_regions() {
        let (heads, hd, n) = (3, 6, 5);
        let d = heads * hd;
        let qkv: Vec<f32> = (0..n * 3 * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let shape = AttentionShape { heads, head_dim: hd, q_len: n, kv_len: n, q_stride: 3 * d, kv_stride: 3 * d };
        let want = cpu::attention(&qkv, &qkv[d..], &qkv[2 * d..], shape, 0.4).unwrap();
        let (mut out, mut lse) = (vec![0.0f32; 1 + n * d], vec![0.0f32; heads * n]);
        flash(&CpuOps, at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), shape, 0.4, at_mut(&mut out, 1), d, &mut lse).unwrap();
        assert_eq!(&out[1..], &want.out[..], "bit-identical to the kernel");
        assert_eq!(lse, want.lse);
        let err = CpuOps.attention(at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), shape, 0.4, at_mut(&mut out, 2), d, &mut lse).unwrap_err();
        assert!(err.to_string().contains("out"), "{err}");
    }

    #[test]
    fn linear_writes_its_region_only() {
        let x = vec![1.0f32, 2.0, 3.0, 4.0];
        let (w, b) = (vec![1.0f32, -1.0], vec![0.5f32]);
        let mut y = vec![9.0f32; 4];
        CpuOps.linear(at(&x, 0), 2, 2, &w, 1, Some(&b), Activation::None, at_mut(&mut y, 1)).unwrap();
        assert_eq!(y, vec![9.0, -0.5, -0.5, 9.0]);
        assert!(CpuOps.linear(at(&x, 0), 2, 2, &w, 1, Some(&b), Activation::None, at_mut(&mut y, 3)).is_err());
    }

    /// The provided `rms_norm` (stored, then normalised as one head) is T5's layer norm.
    #[test]
    fn rms_norm_is_the_kernel_on_stored_rows() {
        let (rows, dim) = (3, 10);
        let x: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut want = x.clone();
        cpu::rms_norm(&mut want, &w, 1e-6).unwrap();
        let mut y = vec![0.0f32; rows * dim];
        CpuOps.rms_norm(&x, rows, dim, &w, 1e-6, &mut y).unwrap();
        assert_eq!(y, want);
    }

    /// Biased attention through the seam: the f32 backend is the kernel; the bf16 twin rounds its
    /// inputs and outputs to bf16 (2⁻⁹ relative each) and nothing else.
    #[test]
    fn biased_attention_on_both_host_backends() {
        use half::bf16;
        let (heads, dk, n) = (2, 8, 6);
        let hd = heads * dk;
        let qkv: Vec<f32> = (0..n * 3 * hd).map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 / 500.0) - 1.0).to_f32()).collect();
        let shape = AttentionShape { heads, head_dim: dk, q_len: n, kv_len: n, q_stride: 3 * hd, kv_stride: 3 * hd };
        let rel: Vec<f32> = (0..2 + heads * 13).map(|i| (i as f32 * 0.11).cos()).collect();
        let mask: Vec<f32> = (0..n).map(|j| if j == 4 { f32::MIN } else { 0.0 }).collect();
        let want = cpu::biased_attention(&qkv, &qkv[hd..], &qkv[2 * hd..], shape, 1.0, cpu::RelativeBias { table: &rel[2..], pitch: 13 }, Some(&mask)).unwrap();
        let mut out = vec![0.0f32; n * hd];
        CpuOps.biased_attention(at(&qkv, 0), at(&qkv, hd), at(&qkv, 2 * hd), shape, 1.0, at(&rel, 2), 13, Some(at(&mask, 0)), at_mut(&mut out, 0), hd).unwrap();
        assert_eq!(out, want);
        let qb: Vec<bf16> = qkv.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut ob = vec![bf16::ZERO; n * hd];
        super::super::HostOps
            .biased_attention(at(&qb, 0), at(&qb, hd), at(&qb, 2 * hd), shape, 1.0, at(&rel, 2), 13, Some(at(&mask, 0)), at_mut(&mut ob, 0), hd)
            .unwrap();
        for (g, w) in ob.iter().zip(&want) {
            assert_eq!(*g, bf16::from_f32(*w), "one rounding of the f32 result");
        }
        let err =
            CpuOps.biased_attention(at(&qkv, 0), at(&qkv, hd), at(&qkv, 2 * hd), shape, 1.0, at(&rel, 20), 13, None, at_mut(&mut out, 0), hd).unwrap_err();
        assert!(err.to_string().contains("rel"), "{err}");
    }
}
