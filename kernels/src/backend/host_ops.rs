//! [`Ops`] emulated on the host: buffers are `Vec`s, every operation checks the CUDA kernel's
//! contract ([`super::contract`]) and computes with the kernel's CPU twin on widened inputs, then
//! rounds what it stores exactly where the kernel stores bf16. It runs the bf16 transformer's
//! orchestration on any machine (the golden cases prove layouts and data flow without a GPU), and
//! is the yardstick the CUDA forward is compared with on a GPU. Not fast: a test tool.

use super::contract;
use super::{At, AtMut, ConvShape, Elem, HostConv, NormArgs, Ops, Piece};
use crate::cpu::{self, Activation, AttentionShape, Conv3dParams, LayerNormParams, PatchGeometry, RopeTable};
use crate::Result;
use half::bf16;
use std::ops::Range;

/// The host emulation of the CUDA operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOps;

fn widen<T: Elem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn store<T: Elem>(dst: &mut [T], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f32(s));
}

impl Ops for HostOps {
    type Buf<T: Elem> = Vec<T>;
    type Rope = RopeTable;
    type Act = bf16;

    super::host_vec::vec_buffers!();

    fn describe(&self) -> String {
        "host emulation of the CUDA kernels (bf16)".into()
    }

    // `upload_into` is the trait's staging upload + device copy, as on the GPU.

    fn linear(
        &self,
        x: At<'_, Vec<bf16>>,
        m: usize,
        k: usize,
        w: &Vec<bf16>,
        n: usize,
        bias: Option<&Vec<bf16>>,
        act: Activation,
        y: AtMut<'_, Vec<bf16>>,
    ) -> Result<()> {
        let (xr, yr) = contract::linear((x.buf.len(), x.offset), m, k, w.len(), n, bias.map(|b| b.len()), act, (y.buf.len(), y.offset))?;
        if m == 0 {
            return Ok(());
        }
        let bias = bias.map(|b| widen(b));
        // Exact GELU is not fused on the GPU: the product is stored (rounded), then activated.
        let fused = if act == Activation::Gelu { Activation::None } else { act };
        let mut out = cpu::linear(&widen(&x.buf[xr]), m, k, &widen(w), n, bias.as_deref(), fused)?;
        if act == Activation::Gelu {
            out.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
            cpu::apply_activation(&mut out, act);
        }
        store(&mut y.buf[yr], &out);
        Ok(())
    }

    fn layer_norm(&self, x: At<'_, Vec<f32>>, rows: usize, dim: usize, p: &NormArgs<'_, Vec<f32>>, y: AtMut<'_, Vec<bf16>>) -> Result<()> {
        let parts = [p.weight, p.bias, p.scale, p.shift];
        let (xr, yr, ranges) =
            contract::layer_norm((x.buf.len(), x.offset), rows, dim, parts.map(|a| a.map(|a| (a.buf.len(), a.offset))), (y.buf.len(), y.offset))?;
        let slice = |i: usize| -> Option<&[f32]> { parts[i].zip(ranges[i].clone()).map(|(a, r)| &a.buf[r]) };
        let params = LayerNormParams { eps: p.eps, weight: slice(0), bias: slice(1), scale: slice(2), shift: slice(3) };
        let out = cpu::layer_norm(&x.buf[xr], dim, &params)?;
        store(&mut y.buf[yr], &out);
        Ok(())
    }

    fn qk_norm_rope(
        &self,
        x: AtMut<'_, Vec<bf16>>,
        rows: usize,
        stride: usize,
        heads: usize,
        head_dim: usize,
        weight: &Vec<f32>,
        eps: f32,
        rope: Option<&RopeTable>,
    ) -> Result<()> {
        let r = contract::qk_norm_rope((x.buf.len(), x.offset), rows, stride, heads, head_dim, weight.len(), rope.map(|t| (t.tokens(), t.pairs())))?;
        let mut wide = widen(&x.buf[r.clone()]);
        cpu::qk_norm_rope(&mut wide, rows, stride, weight, eps, heads, rope)?;
        // Channels between rows (the rest of a fused projection) come back unchanged: a bf16
        // value widened and rounded again is itself.
        store(&mut x.buf[r], &wide);
        Ok(())
    }

    fn attention<O: Elem>(
        &self,
        q: At<'_, Vec<bf16>>,
        k: At<'_, Vec<bf16>>,
        v: At<'_, Vec<bf16>>,
        shape: AttentionShape,
        scale: f32,
        out: AtMut<'_, Vec<O>>,
        out_stride: usize,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let len_off = |a: &At<'_, Vec<bf16>>| (a.buf.len(), a.offset);
        let [qr, kr, vr, or] = contract::attention::<O>(len_off(&q), len_off(&k), len_off(&v), &shape, (out.buf.len(), out.offset), out_stride, lse.len())?;
        if shape.q_len == 0 {
            return Ok(());
        }
        let res = cpu::attention(&widen(&q.buf[qr]), &widen(&k.buf[kr]), &widen(&v.buf[vr]), shape, scale)?;
        super::host_vec::store_rows(&mut out.buf[or], &res.out, shape.heads * shape.head_dim, out_stride);
        lse[..res.lse.len()].copy_from_slice(&res.lse);
        Ok(())
    }

    fn biased_attention(
        &self,
        q: At<'_, Vec<bf16>>,
        k: At<'_, Vec<bf16>>,
        v: At<'_, Vec<bf16>>,
        shape: AttentionShape,
        scale: f32,
        rel: At<'_, Vec<f32>>,
        pitch: usize,
        key_add: Option<At<'_, Vec<f32>>>,
        out: AtMut<'_, Vec<bf16>>,
        out_stride: usize,
    ) -> Result<()> {
        let r = contract::biased_attention(
            (q.buf.len(), q.offset),
            (k.buf.len(), k.offset),
            (v.buf.len(), v.offset),
            &shape,
            (out.buf.len(), out.offset),
            out_stride,
            (rel.buf.len(), rel.offset),
            pitch,
            key_add.as_ref().map(|m| (m.buf.len(), m.offset)),
            true,
        )?;
        let [qr, kr, vr, or] = r.qkvo;
        let bias = cpu::RelativeBias { table: &rel.buf[r.rel], pitch };
        let mask = key_add.zip(r.key_add).map(|(m, range)| &m.buf[range]);
        let res = cpu::biased_attention(&widen(&q.buf[qr]), &widen(&k.buf[kr]), &widen(&v.buf[vr]), shape, scale, bias, mask)?;
        super::host_vec::store_rows(&mut out.buf[or], &res, shape.heads * shape.head_dim, out_stride);
        Ok(())
    }

    fn mul(&self, x: AtMut<'_, Vec<bf16>>, y: At<'_, Vec<bf16>>, n: usize) -> Result<()> {
        let (xr, yr) = (range("mul", "x", x.buf.len(), x.offset, n)?, range("mul", "y", y.buf.len(), y.offset, n)?);
        let mut xw = widen(&x.buf[xr.clone()]);
        cpu::mul_in_place(&mut xw, &widen(&y.buf[yr]))?;
        store(&mut x.buf[xr], &xw);
        Ok(())
    }

    fn add<Y: Elem>(&self, x: AtMut<'_, Vec<f32>>, y: At<'_, Vec<Y>>, gate: Option<At<'_, Vec<f32>>>, n: usize, dim: usize) -> Result<()> {
        let (xr, yr, gr) = contract::add((x.buf.len(), x.offset), (y.buf.len(), y.offset), gate.map(|g| (g.buf.len(), g.offset)), n, dim)?;
        let yw = widen(&y.buf[yr]);
        match gate.zip(gr) {
            Some((g, r)) => cpu::gated_residual_add(&mut x.buf[xr], &yw, &g.buf[r])?,
            None => cpu::residual_add(&mut x.buf[xr], &yw)?,
        }
        Ok(())
    }

    fn narrow(&self, x: At<'_, Vec<f32>>, out: AtMut<'_, Vec<bf16>>, n: usize) -> Result<()> {
        let (xr, or) = (range("f32_to_bf16", "input", x.buf.len(), x.offset, n)?, range("f32_to_bf16", "output", out.buf.len(), out.offset, n)?);
        store(&mut out.buf[or], &x.buf[xr]);
        Ok(())
    }

    fn widen(&self, x: At<'_, Vec<bf16>>, out: AtMut<'_, Vec<f32>>, n: usize) -> Result<()> {
        let (xr, or) = (range("bf16_to_f32", "input", x.buf.len(), x.offset, n)?, range("bf16_to_f32", "output", out.buf.len(), out.offset, n)?);
        out.buf[or].iter_mut().zip(&x.buf[xr]).for_each(|(o, v)| *o = v.to_f32());
        Ok(())
    }

    fn patchify(&self, latent: &Vec<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut Vec<bf16>) -> Result<()> {
        super::host_vec::patchify(latent, g, tokens, out)
    }

    type ConvWeight = HostConv;

    /// The weight rounded to bf16 (what the GPU stores), the bias kept in f32 (the GPU adds it
    /// in f32 before its one rounding).
    fn conv_weight(&self, shape: ConvShape, weight: Vec<f32>, bias: Vec<f32>) -> Result<HostConv> {
        HostConv::new(shape, weight.into_iter().map(<bf16 as Elem>::round).collect(), bias)
    }

    fn conv3d(&self, input: &[Piece<'_, Vec<bf16>>], chw: [usize; 3], w: &HostConv, p: &Conv3dParams) -> Result<(Vec<bf16>, [usize; 4])> {
        contract::conv3d(&input.iter().map(|x| (x.buf.len(), x.frames)).collect::<Vec<_>>(), chw, &w.shape, p)?;
        let plane = chw.iter().product::<usize>();
        let wide: Vec<Vec<f32>> = input.iter().map(|x| widen(&x.buf[..x.frames * plane])).collect();
        let (y, shape) = w.run(&wide.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), chw, p)?;
        Ok((<bf16 as Elem>::vec_from_f32(y), shape))
    }

    fn channel_norm(&self, x: &mut Vec<bf16>, channels: usize, positions: usize, gamma: &Vec<f32>, silu: bool) -> Result<()> {
        let r = contract::channel_norm(x.len(), channels, positions, gamma.len())?;
        let mut wide = widen(&x[r.clone()]);
        cpu::channel_rms_norm(&mut wide, positions, gamma, silu)?;
        store(&mut x[r], &wide);
        Ok(())
    }

    fn upsample_nearest2x(&self, x: &Vec<bf16>, planes: usize, h: usize, w: usize, out: &mut Vec<bf16>) -> Result<()> {
        let (xr, or) = contract::upsample(x.len(), planes, h, w, out.len())?;
        cpu::upsample_nearest2x(&x[xr], planes, h, w, &mut out[or])
    }

    fn accumulate(&self, x: AtMut<'_, Vec<bf16>>, y: At<'_, Vec<bf16>>, n: usize) -> Result<()> {
        let (xr, yr) = (range("accumulate", "x", x.buf.len(), x.offset, n)?, range("accumulate", "y", y.buf.len(), y.offset, n)?);
        x.buf[xr].iter_mut().zip(&y.buf[yr]).for_each(|(a, b)| *a = bf16::from_f32(a.to_f32() + b.to_f32()));
        Ok(())
    }

    fn transpose(&self, x: At<'_, Vec<bf16>>, rows: usize, cols: usize, out: AtMut<'_, Vec<bf16>>) -> Result<()> {
        let (xr, or) = contract::transpose((x.buf.len(), x.offset), rows, cols, (out.buf.len(), out.offset))?;
        cpu::transpose(&x.buf[xr], rows, cols, &mut out.buf[or])
    }
}

fn range(op: &'static str, what: &str, have: usize, offset: usize, len: usize) -> Result<Range<usize>> {
    super::region(op, what, have, offset, len)
}

#[cfg(test)]
mod tests {
    use super::super::{at, at_mut};
    use super::*;

    #[test]
    fn linear_rounds_its_output_to_bf16() {
        let ops = HostOps;
        let x: Vec<bf16> = [1.0f32, 2.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let w: Vec<bf16> = [1.0f32 / 3.0, 1.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let mut y = vec![bf16::ZERO; 3];
        ops.linear(at(&x, 0), 1, 2, &w, 1, None, Activation::None, at_mut(&mut y, 1)).unwrap();
        let exact = bf16::from_f32(1.0 / 3.0).to_f32() + 2.0;
        assert_eq!(y[1], bf16::from_f32(exact));
        assert_eq!((y[0], y[2]), (bf16::ZERO, bf16::ZERO), "only the region is written");
    }

    #[test]
    fn copy_rows_moves_runs_between_pitches() {
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut dst = vec![0.0f32; 20];
        HostOps.copy_rows(at(&src, 1), 4, at_mut(&mut dst, 2), 8, 2, 3).unwrap();
        assert_eq!(&dst[2..4], &[1.0, 2.0]);
        assert_eq!(&dst[10..12], &[5.0, 6.0]);
        assert_eq!(dst.iter().filter(|&&v| v != 0.0).count(), 6);
    }
}
