//! [`Ops`] on a CUDA device: each operation checks its kernel's contract on (length, offset)
//! pairs ([`super::contract`]), cuts the views the contract names, and calls the launch wrapper of
//! `crate::cuda`. Everything is queued on the device's one stream. The only code of the
//! bf16 transformer that needs a GPU to run.

use super::contract;
use super::{shape_err, At, AtMut, ConvShape, Elem, NormArgs, Ops, Piece};
use crate::cpu::{Activation, AttentionShape, Conv3dParams, PatchGeometry, RopeTable};
use crate::cuda::norm::{DeviceRopeTable, LayerNormDevParams};
use crate::cuda::video::DeviceConv;
use crate::cuda::{self, CudaDevice, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use crate::KernelError;
use crate::Result;
use cudarc::driver::sys;
use half::bf16;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// The CUDA kernels as [`Ops`], on one open device.
#[derive(Clone, Debug)]
pub struct CudaOps {
    dev: Arc<CudaDevice>,
}

/// Devices opened so far in this process, by ordinal: one context, stream, module cache and
/// cuBLASLt handle per GPU, however many models and golden cases use it.
fn shared_devices() -> &'static Mutex<HashMap<usize, Arc<CudaDevice>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

impl CudaOps {
    /// Runs on `dev`.
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        Self { dev }
    }

    /// Opens CUDA device `ordinal` (once per process; later calls share it). Fails with
    /// [`KernelError::CudaUnavailable`] naming what is missing when there is no usable GPU.
    pub fn open(ordinal: usize) -> Result<Self> {
        let mut devices = shared_devices().lock().map_err(|_| KernelError::Cuda { op: "CudaOps::open", detail: "device table lock poisoned".into() })?;
        if let Some(d) = devices.get(&ordinal) {
            return Ok(Self::new(d.clone()));
        }
        let d = CudaDevice::open(ordinal)?;
        devices.insert(ordinal, d.clone());
        Ok(Self::new(d))
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

fn view<'a, T>(op: &'static str, buf: &'a CudaSlice<T>, r: Range<usize>) -> Result<CudaView<'a, T>> {
    let len = buf.len();
    buf.try_slice(r.clone()).ok_or_else(|| shape_err(op, format!("view {r:?} of a buffer of {len}")))
}

fn view_mut<'a, T>(op: &'static str, buf: &'a mut CudaSlice<T>, r: Range<usize>) -> Result<CudaViewMut<'a, T>> {
    let len = buf.len();
    buf.try_slice_mut(r.clone()).ok_or_else(|| shape_err(op, format!("view {r:?} of a buffer of {len}")))
}

impl Ops for CudaOps {
    type Buf<T: Elem> = CudaSlice<T>;
    type Rope = DeviceRopeTable;
    type Act = bf16;

    fn describe(&self) -> String {
        format!("cuda:{} ({}, {})", self.dev.ordinal(), self.dev.name(), self.dev.arch())
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.dev.memory_in_use().ok()
    }

    fn len<T: Elem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.dev.zeros(n)
    }

    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.dev.upload(host)
    }

    fn download<T: Elem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.dev.download(buf)
    }

    fn upload_rope(&self, table: &RopeTable) -> Result<DeviceRopeTable> {
        DeviceRopeTable::upload(&self.dev, table)
    }

    fn copy_rows<T: Elem>(
        &self,
        src: At<'_, CudaSlice<T>>,
        src_pitch: usize,
        dst: AtMut<'_, CudaSlice<T>>,
        dst_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        const OP: &str = "copy_rows";
        let (sr, dr) = contract::copy_rows((src.buf.len(), src.offset), src_pitch, (dst.buf.len(), dst.offset), dst_pitch, width, rows)?;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let sv = view(OP, src.buf, sr)?;
        let mut dv = view_mut(OP, dst.buf, dr)?;
        let (sp, _gs) = sv.device_ptr(s);
        let (dp, _gd) = dv.device_ptr_mut(s);
        let b = T::BYTES as usize;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: sp,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch * b,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dp,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch * b,
            WidthInBytes: width * b,
            Height: rows,
        };
        self.dev.context().bind_to_thread().map_err(|e| KernelError::Cuda { op: OP, detail: e.to_string() })?;
        // SAFETY: both regions were checked by `contract::copy_rows` to hold `rows` runs of `width`
        // elements at their pitches, and their views stay borrowed (alive) until the copy is
        // queued; the copy runs on the device's stream, which orders it with every kernel.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, s.cu_stream()) }.result().map_err(|e| KernelError::Cuda { op: "cuMemcpy2DAsync", detail: e.to_string() })?;
        Ok(())
    }

    fn linear(
        &self,
        x: At<'_, CudaSlice<bf16>>,
        m: usize,
        k: usize,
        w: &CudaSlice<bf16>,
        n: usize,
        bias: Option<&CudaSlice<bf16>>,
        act: Activation,
        y: AtMut<'_, CudaSlice<bf16>>,
    ) -> Result<()> {
        const OP: &str = "linear";
        let (xr, yr) = contract::linear((x.buf.len(), x.offset), m, k, w.len(), n, bias.map(|b| b.len()), act, (y.buf.len(), y.offset))?;
        if m == 0 {
            return Ok(());
        }
        let xv = view(OP, x.buf, xr)?;
        let mut yv = view_mut(OP, y.buf, yr)?;
        cuda::gemm::linear(&self.dev, &xv, m, k, w, n, bias, act, &mut yv)
    }

    fn layer_norm(&self, x: At<'_, CudaSlice<f32>>, rows: usize, dim: usize, p: &NormArgs<'_, CudaSlice<f32>>, y: AtMut<'_, CudaSlice<bf16>>) -> Result<()> {
        const OP: &str = "layer_norm";
        let parts = [p.weight, p.bias, p.scale, p.shift];
        let (xr, yr, ranges) =
            contract::layer_norm((x.buf.len(), x.offset), rows, dim, parts.map(|a| a.map(|a| (a.buf.len(), a.offset))), (y.buf.len(), y.offset))?;
        let part = |i: usize| -> Result<Option<CudaView<'_, f32>>> {
            match (parts[i], ranges[i].clone()) {
                (Some(a), Some(r)) => Ok(Some(view(OP, a.buf, r)?)),
                _ => Ok(None),
            }
        };
        let params = LayerNormDevParams { eps: p.eps, weight: part(0)?, bias: part(1)?, scale: part(2)?, shift: part(3)? };
        let xv = view(OP, x.buf, xr)?;
        let mut yv = view_mut(OP, y.buf, yr)?;
        cuda::norm::layer_norm_modulated(&self.dev, &xv, rows, dim, &params, &mut yv)
    }

    fn qk_norm_rope(
        &self,
        x: AtMut<'_, CudaSlice<bf16>>,
        rows: usize,
        stride: usize,
        heads: usize,
        head_dim: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
        rope: Option<&DeviceRopeTable>,
    ) -> Result<()> {
        const OP: &str = "qk_norm_rope";
        // The device table does not expose its width; the wrapper checks it against head_dim.
        let r = contract::qk_norm_rope((x.buf.len(), x.offset), rows, stride, heads, head_dim, weight.len(), rope.map(|t| (t.tokens(), head_dim / 2)))?;
        if rows == 0 {
            return Ok(());
        }
        let mut xv = view_mut(OP, x.buf, r)?;
        cuda::norm::qk_norm_rope(&self.dev, &mut xv, rows, stride, heads, head_dim, weight, eps, rope)
    }

    fn attention<O: Elem>(
        &self,
        q: At<'_, CudaSlice<bf16>>,
        k: At<'_, CudaSlice<bf16>>,
        v: At<'_, CudaSlice<bf16>>,
        shape: AttentionShape,
        scale: f32,
        out: AtMut<'_, CudaSlice<O>>,
        out_stride: usize,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "flash_attention";
        let len_off = |a: &At<'_, CudaSlice<bf16>>| (a.buf.len(), a.offset);
        let [qr, kr, vr, or] = contract::attention::<O>(len_off(&q), len_off(&k), len_off(&v), &shape, (out.buf.len(), out.offset), out_stride, lse.len())?;
        if shape.q_len == 0 {
            return Ok(());
        }
        let (qv, kv, vv) = (view(OP, q.buf, qr)?, view(OP, k.buf, kr)?, view(OP, v.buf, vr)?);
        let mut ov = view_mut(OP, out.buf, or)?;
        cuda::attention::flash_attention::<O>(&self.dev, &qv, &kv, &vv, shape, scale, &mut ov, out_stride, lse)
    }

    fn add<Y: Elem>(&self, x: AtMut<'_, CudaSlice<f32>>, y: At<'_, CudaSlice<Y>>, gate: Option<At<'_, CudaSlice<f32>>>, n: usize, dim: usize) -> Result<()> {
        const OP: &str = "gated_residual_add";
        let (xr, yr, gr) = contract::add((x.buf.len(), x.offset), (y.buf.len(), y.offset), gate.map(|g| (g.buf.len(), g.offset)), n, dim)?;
        if n == 0 {
            return Ok(());
        }
        let yv = view(OP, y.buf, yr)?;
        let gv = match gate.zip(gr) {
            Some((g, r)) => Some(view(OP, g.buf, r)?),
            None => None,
        };
        let mut xv = view_mut(OP, x.buf, xr)?;
        cuda::elementwise::gated_residual_add::<Y>(&self.dev, &mut xv, &yv, gv.as_ref(), n, dim)
    }

    fn narrow(&self, x: At<'_, CudaSlice<f32>>, out: AtMut<'_, CudaSlice<bf16>>, n: usize) -> Result<()> {
        const OP: &str = "f32_to_bf16";
        let xv = view(OP, x.buf, super::region(OP, "input", x.buf.len(), x.offset, n)?)?;
        let r = super::region(OP, "output", out.buf.len(), out.offset, n)?;
        let mut ov = view_mut(OP, out.buf, r)?;
        cuda::elementwise::f32_to_bf16(&self.dev, &xv, &mut ov, n)
    }

    fn widen(&self, x: At<'_, CudaSlice<bf16>>, out: AtMut<'_, CudaSlice<f32>>, n: usize) -> Result<()> {
        const OP: &str = "bf16_to_f32";
        let xv = view(OP, x.buf, super::region(OP, "input", x.buf.len(), x.offset, n)?)?;
        let r = super::region(OP, "output", out.buf.len(), out.offset, n)?;
        let mut ov = view_mut(OP, out.buf, r)?;
        cuda::elementwise::bf16_to_f32(&self.dev, &xv, &mut ov, n)
    }

    fn patchify(&self, latent: &CudaSlice<f32>, g: &PatchGeometry, tokens: Range<usize>, out: &mut CudaSlice<bf16>) -> Result<()> {
        cuda::patch::patchify(&self.dev, latent, g, tokens, out)
    }

    fn biased_attention(
        &self,
        q: At<'_, CudaSlice<bf16>>,
        k: At<'_, CudaSlice<bf16>>,
        v: At<'_, CudaSlice<bf16>>,
        shape: AttentionShape,
        scale: f32,
        rel: At<'_, CudaSlice<f32>>,
        pitch: usize,
        key_add: Option<At<'_, CudaSlice<f32>>>,
        out: AtMut<'_, CudaSlice<bf16>>,
        out_stride: usize,
    ) -> Result<()> {
        const OP: &str = "biased_attention";
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
        let (qv, kv, vv) = (view(OP, q.buf, qr)?, view(OP, k.buf, kr)?, view(OP, v.buf, vr)?);
        let rv = view(OP, rel.buf, r.rel)?;
        let mv = match key_add.zip(r.key_add) {
            Some((m, range)) => Some(view(OP, m.buf, range)?),
            None => None,
        };
        let mut ov = view_mut(OP, out.buf, or)?;
        cuda::biased_attention::biased_attention(&self.dev, &qv, &kv, &vv, shape, scale, &rv, pitch, mv.as_ref(), &mut ov, out_stride)
    }

    fn mul(&self, x: AtMut<'_, CudaSlice<bf16>>, y: At<'_, CudaSlice<bf16>>, n: usize) -> Result<()> {
        const OP: &str = "mul";
        let (xr, yr) = (super::region(OP, "x", x.buf.len(), x.offset, n)?, super::region(OP, "y", y.buf.len(), y.offset, n)?);
        let yv = view(OP, y.buf, yr)?;
        let mut xv = view_mut(OP, x.buf, xr)?;
        cuda::elementwise::mul(&self.dev, &mut xv, &yv, n)
    }

    fn merge_partials(
        &self,
        out_a: &mut CudaSlice<f32>,
        lse_a: &mut CudaSlice<f32>,
        out_b: &CudaSlice<f32>,
        lse_b: &CudaSlice<f32>,
        q_len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        contract::merge_partials((out_a.len(), lse_a.len()), (out_b.len(), lse_b.len()), q_len, heads, head_dim)?;
        cuda::attention::merge_partials(&self.dev, out_a, lse_a, out_b, lse_b, q_len, heads, head_dim)
    }

    fn unpatchify(&self, rows: &CudaSlice<f32>, g: &PatchGeometry, latent: &mut CudaSlice<f32>) -> Result<()> {
        cuda::patch::unpatchify(&self.dev, rows, g, latent)
    }

    // The VAE's operations.
    type ConvWeight = cuda::video::DeviceConv;

    /// The weight rounded to bf16 and zero-padded to rows of a multiple of 8 elements, the bias
    /// kept in f32 (as `HostOps` keeps them).
    fn conv_weight(&self, shape: ConvShape, weight: Vec<f32>, bias: Vec<f32>) -> Result<DeviceConv> {
        DeviceConv::new(&self.dev, shape, &weight, &bias)
    }

    fn conv3d(&self, input: &[Piece<'_, CudaSlice<bf16>>], chw: [usize; 3], w: &DeviceConv, p: &Conv3dParams) -> Result<(CudaSlice<bf16>, [usize; 4])> {
        let want = contract::conv3d(&input.iter().map(|x| (x.buf.len(), x.frames)).collect::<Vec<_>>(), chw, w.shape(), p)?;
        // The im2col kernel reads two pieces: more are joined first (a device copy of the
        // cached frames, small beside the convolution).
        let (c, hw) = (chw[0], chw[1] * chw[2]);
        let joined_frames: usize = input.iter().take(input.len().saturating_sub(1)).map(|x| x.frames).sum();
        let joined = match input.len() {
            3 => {
                let mut j = self.zeros::<bf16>(c * joined_frames * hw)?;
                let mut off = 0;
                for x in &input[..2] {
                    if x.frames > 0 {
                        self.copy_rows(super::at(x.buf, 0), x.frames * hw, super::at_mut(&mut j, off * hw), joined_frames * hw, x.frames * hw, c)?;
                    }
                    off += x.frames;
                }
                Some(j)
            }
            _ => None,
        };
        let pieces: Vec<(&CudaSlice<bf16>, usize)> = match &joined {
            Some(j) => vec![(j, joined_frames), (input[2].buf, input[2].frames)],
            None => input.iter().map(|x| (x.buf, x.frames)).collect(),
        };
        let (y, shape) = cuda::video::conv3d(&self.dev, &pieces, chw, w, p)?;
        debug_assert_eq!(shape, want, "the wrapper's output shape is the contract's");
        Ok((y, shape))
    }

    fn channel_norm(&self, x: &mut CudaSlice<bf16>, channels: usize, positions: usize, gamma: &CudaSlice<f32>, silu: bool) -> Result<()> {
        const OP: &str = "channel_rms_norm";
        let r = contract::channel_norm(x.len(), channels, positions, gamma.len())?;
        if positions == 0 {
            return Ok(());
        }
        let mut xv = view_mut(OP, x, r)?;
        cuda::video::channel_rms_norm(&self.dev, &mut xv, channels, positions, gamma, silu)
    }

    fn upsample_nearest2x(&self, x: &CudaSlice<bf16>, planes: usize, h: usize, w: usize, out: &mut CudaSlice<bf16>) -> Result<()> {
        const OP: &str = "upsample_nearest2x";
        let (xr, or) = contract::upsample(x.len(), planes, h, w, out.len())?;
        if xr.is_empty() {
            return Ok(());
        }
        let xv = view(OP, x, xr)?;
        let mut ov = view_mut(OP, out, or)?;
        cuda::video::upsample_nearest2x(&self.dev, &xv, planes, h, w, &mut ov)
    }

    fn guide(&self, cond: &mut CudaSlice<f32>, uncond: &CudaSlice<f32>, g: f32) -> Result<()> {
        let n = cond.len();
        cuda::sampler::guide(&self.dev, cond, uncond, g, n)
    }

    fn sampler_step(&self, update: &crate::cpu::SamplerUpdate, v: &CudaSlice<f32>, x: &mut CudaSlice<f32>, history: &mut [CudaSlice<f32>]) -> Result<()> {
        let n = x.len();
        cuda::sampler::sampler_step(&self.dev, update, v, x, history, n)
    }

    fn accumulate(&self, x: AtMut<'_, CudaSlice<bf16>>, y: At<'_, CudaSlice<bf16>>, n: usize) -> Result<()> {
        const OP: &str = "accumulate";
        let (xr, yr) = (super::region(OP, "x", x.buf.len(), x.offset, n)?, super::region(OP, "y", y.buf.len(), y.offset, n)?);
        if n == 0 {
            return Ok(());
        }
        let yv = view(OP, y.buf, yr)?;
        let mut xv = view_mut(OP, x.buf, xr)?;
        cuda::elementwise::add(&self.dev, &mut xv, &yv, n)
    }

    fn transpose(&self, x: At<'_, CudaSlice<bf16>>, rows: usize, cols: usize, out: AtMut<'_, CudaSlice<bf16>>) -> Result<()> {
        const OP: &str = "transpose";
        let (xr, or) = contract::transpose((x.buf.len(), x.offset), rows, cols, (out.buf.len(), out.offset))?;
        if xr.is_empty() {
            return Ok(());
        }
        let xv = view(OP, x.buf, xr)?;
        let mut ov = view_mut(OP, out.buf, or)?;
        cuda::video::transpose(&self.dev, &xv, rows, cols, &mut ov)
    }
}
