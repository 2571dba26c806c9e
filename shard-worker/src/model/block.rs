//! One transformer block (diffusers `WanTransformerBlock`, wan2.1.md §1.3f) over any backend: f32
//! LayerNorms with f32 modulation written as `Act`, matrix products (q, k, v fused into one),
//! fused q/k RMSNorm + RoPE, flash attention, f32 gated residual adds. In bf16 this is diffusers
//! with the model in bf16 (§1.4), the residual stream rounded to bf16 after every add as diffusers
//! stores it; in f32 nothing is rounded. The modulation is per run of token rows: one run for
//! Wan, one per frame for diffusion forcing ([`Modulation`]).

use super::attention::{QkvRows, SelfAttention, Visibility};
use super::weights::{load_f32, load_rounded, DeviceLinear};
use crate::transformer_config::TransformerConfig;
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use std::ops::Range;
use tessera_kernels::backend::{at, at_mut, flash, stores_f32, NormArgs, Ops};
use tessera_kernels::cpu::{Activation, AttentionShape};

/// Sizes every block shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Hidden size D.
    pub d: usize,
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Epsilon of every norm in the blocks.
    pub eps: f32,
}

impl Dims {
    pub(crate) fn of(cfg: &TransformerConfig) -> Self {
        Self { d: cfg.inner_dim(), heads: cfg.num_attention_heads, head_dim: cfg.attention_head_dim, ffn: cfg.ffn_dim, eps: cfg.eps as f32 }
    }
}

/// Device buffers of one forward over `rows` token rows, reused by every block.
pub(crate) struct Workspace<O: Ops> {
    /// Token rows.
    pub rows: usize,
    /// The residual stream `[rows, D]`, f32 (holding `Act` values).
    pub x: O::Buf<f32>,
    /// Normalised input of the next matrix product `[rows, D]`; also the rounding scratch.
    pub h: O::Buf<O::Act>,
    /// Wide rows `[rows, max(3D, F, patch features)]`: fused q|k|v, cross-attention q, FFN hidden.
    pub wide: O::Buf<O::Act>,
    /// Attention output `[rows, D]`.
    pub attn: O::Buf<O::Act>,
    /// Output projection `[rows, D]`.
    pub out: O::Buf<O::Act>,
    /// Log-sum-exps `[heads, rows]`.
    pub lse: O::Buf<f32>,
    /// Cross-attention keys and values `[context rows, 2·D]`.
    pub kv: O::Buf<O::Act>,
    /// Image-to-video: the text attention in f32 `[rows, D]`, before the image attention is added.
    pub attn_sum: Option<O::Buf<f32>>,
}

impl<O: Ops> Workspace<O> {
    /// Buffers for `rows` rows, a context of up to `context` rows, `wide` channels of wide rows.
    pub(crate) fn new(ops: &O, dims: &Dims, rows: usize, context: usize, wide: usize, image: bool) -> Result<Self> {
        let d = dims.d;
        Ok(Self {
            rows,
            x: ops.zeros(rows * d)?,
            h: ops.zeros(rows * d)?,
            wide: ops.zeros(rows * wide.max(3 * d).max(dims.ffn))?,
            attn: ops.zeros(rows * d)?,
            out: ops.zeros(rows * d)?,
            lse: ops.zeros(dims.heads * rows)?,
            kv: ops.zeros(context * 2 * d)?,
            attn_sum: if image { Some(ops.zeros(rows * d)?) } else { None },
        })
    }

    /// Rounds the residual stream to `Act` in place (diffusers' `.type_as(hidden_states)`; nothing
    /// to do in f32).
    fn round_residual(&mut self, ops: &O, n: usize) -> Result<()> {
        if stores_f32::<O>() {
            return Ok(());
        }
        ops.narrow(at(&self.x, 0), at_mut(&mut self.h, 0), n)?;
        Ok(ops.widen(at(&self.h, 0), at_mut(&mut self.x, 0), n)?)
    }
}

/// The modulation of a forward's token rows: runs of rows, each with its modulation row, whose
/// vectors (`D` wide chunks: a block's shift, scale, gate of attention, then of the FFN; the head's
/// shift, scale) start at `row · pitch + offset` in `buf`.
pub(crate) struct Modulation<'a, B> {
    /// The modulation table (`Conditions::block_mods` or `head_mods`).
    pub buf: &'a B,
    /// (local rows, modulation row), covering the rows in order.
    pub runs: &'a [(Range<usize>, usize)],
    /// Elements per modulation row of `buf`.
    pub pitch: usize,
    /// Where this layer's vectors start within a row.
    pub offset: usize,
}

impl<B> Modulation<'_, B> {
    /// The runs with the offset of their vectors.
    fn offsets(&self) -> impl Iterator<Item = (&Range<usize>, usize)> + '_ {
        self.runs.iter().map(|(rows, row)| (rows, row * self.pitch + self.offset))
    }

    /// `y = LayerNorm(x)·(1 + scale) + shift` of every run, with chunks `scale` and `shift`.
    pub(crate) fn norm<O: Ops<Buf<f32> = B>>(&self, ops: &O, dims: &Dims, ws: &mut Workspace<O>, scale: usize, shift: usize) -> Result<()> {
        let d = dims.d;
        for (rows, off) in self.offsets() {
            let args =
                NormArgs { eps: dims.eps, weight: None, bias: None, scale: Some(at(self.buf, off + scale * d)), shift: Some(at(self.buf, off + shift * d)) };
            ops.layer_norm(at(&ws.x, rows.start * d), rows.len(), d, &args, at_mut(&mut ws.h, rows.start * d))?;
        }
        Ok(())
    }

    /// `x += out·gate` of every run, with chunk `gate`.
    fn gated_add<O: Ops<Buf<f32> = B>>(&self, ops: &O, d: usize, ws: &mut Workspace<O>, gate: usize) -> Result<()> {
        for (rows, off) in self.offsets() {
            ops.add::<O::Act>(at_mut(&mut ws.x, rows.start * d), at(&ws.out, rows.start * d), Some(at(self.buf, off + gate * d)), rows.len() * d, d)?;
        }
        Ok(())
    }
}

/// Image-to-video key/value projections of cross-attention (fused `add_k_proj | add_v_proj`).
struct ImageKv<O: Ops> {
    kv: DeviceLinear<O>,
    norm_k: O::Buf<f32>,
}

/// A block's parameters on the device.
pub(crate) struct Block<O: Ops> {
    /// `scale_shift_table` `[6·D]`, f32.
    pub(crate) table: O::Buf<f32>,
    qkv: DeviceLinear<O>,
    norm_q: O::Buf<f32>,
    norm_k: O::Buf<f32>,
    out1: DeviceLinear<O>,
    norm2: Option<(O::Buf<f32>, O::Buf<f32>)>,
    q2: DeviceLinear<O>,
    kv2: DeviceLinear<O>,
    norm_q2: O::Buf<f32>,
    norm_k2: O::Buf<f32>,
    out2: DeviceLinear<O>,
    image: Option<ImageKv<O>>,
    ffn1: DeviceLinear<O>,
    ffn2: DeviceLinear<O>,
}

impl<O: Ops> Block<O> {
    /// Loads `blocks.{index}.*`: the same tensors, names and shapes as the CPU block.
    pub(crate) fn load(ops: &O, src: &dyn WeightSource, cfg: &TransformerConfig, index: usize) -> Result<Self> {
        let d = cfg.inner_dim();
        let p = format!("blocks.{index}");
        let image = match cfg.added_kv_proj_dim {
            None => None,
            Some(kv) if kv != d => {
                return Err(WorkerError::Config {
                    path: "transformer config".into(),
                    detail: format!("added_kv_proj_dim {kv} differs from the hidden size {d}: the image context the block projects has width {d}"),
                })
            }
            Some(kv) => Some(ImageKv {
                kv: DeviceLinear::load_stacked(ops, src, &[&format!("{p}.attn2.add_k_proj"), &format!("{p}.attn2.add_v_proj")], kv, d)?,
                norm_k: load_rounded(ops, src, &format!("{p}.attn2.norm_added_k.weight"), &[d])?,
            }),
        };
        let a1 = format!("{p}.attn1");
        let a2 = format!("{p}.attn2");
        Ok(Self {
            table: load_f32(ops, src, &format!("{p}.scale_shift_table"), &[1, 6, d])?,
            qkv: DeviceLinear::load_stacked(ops, src, &[&format!("{a1}.to_q"), &format!("{a1}.to_k"), &format!("{a1}.to_v")], d, d)?,
            norm_q: load_rounded(ops, src, &format!("{a1}.norm_q.weight"), &[d])?,
            norm_k: load_rounded(ops, src, &format!("{a1}.norm_k.weight"), &[d])?,
            out1: DeviceLinear::load(ops, src, &format!("{a1}.to_out.0"), d, d)?,
            norm2: if cfg.cross_attn_norm {
                Some((load_f32(ops, src, &format!("{p}.norm2.weight"), &[d])?, load_f32(ops, src, &format!("{p}.norm2.bias"), &[d])?))
            } else {
                None
            },
            q2: DeviceLinear::load(ops, src, &format!("{a2}.to_q"), d, d)?,
            kv2: DeviceLinear::load_stacked(ops, src, &[&format!("{a2}.to_k"), &format!("{a2}.to_v")], d, d)?,
            norm_q2: load_rounded(ops, src, &format!("{a2}.norm_q.weight"), &[d])?,
            norm_k2: load_rounded(ops, src, &format!("{a2}.norm_k.weight"), &[d])?,
            out2: DeviceLinear::load(ops, src, &format!("{a2}.to_out.0"), d, d)?,
            image,
            ffn1: DeviceLinear::load(ops, src, &format!("{p}.ffn.net.0.proj"), d, cfg.ffn_dim)?,
            ffn2: DeviceLinear::load(ops, src, &format!("{p}.ffn.net.2"), cfg.ffn_dim, d)?,
        })
    }

    /// Runs the block on the workspace's residual stream. `mods` is this block's modulation of
    /// the rows; `text` the sample's `[text_len, D]` context; `image` its image context and length
    /// (image-to-video); `visibility` which keys each token's self-attention sees.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        ops: &O,
        dims: &Dims,
        ws: &mut Workspace<O>,
        mods: &Modulation<'_, O::Buf<f32>>,
        text: (&O::Buf<O::Act>, usize),
        image: Option<(&O::Buf<O::Act>, usize)>,
        rope: &O::Rope,
        visibility: Visibility,
        attn: &dyn SelfAttention<O>,
    ) -> Result<()> {
        let Dims { d, heads, head_dim, eps, .. } = *dims;
        let n = ws.rows;

        // 1. Self-attention on the modulated, normalised tokens; gated residual.
        mods.norm(ops, dims, ws, 1, 0)?;
        self.qkv.forward(ops, at(&ws.h, 0), n, Activation::None, at_mut(&mut ws.wide, 0))?;
        ops.qk_norm_rope(at_mut(&mut ws.wide, 0), n, 3 * d, heads, head_dim, &self.norm_q, eps, Some(rope))?;
        ops.qk_norm_rope(at_mut(&mut ws.wide, d), n, 3 * d, heads, head_dim, &self.norm_k, eps, Some(rope))?;
        attn.attend(ops, QkvRows { buf: &ws.wide, rows: n, stride: 3 * d, heads, head_dim, visibility }, &mut ws.attn, &mut ws.lse)?;
        self.out1.forward(ops, at(&ws.attn, 0), n, Activation::None, at_mut(&mut ws.out, 0))?;
        mods.gated_add(ops, d, ws, 2)?;
        ws.round_residual(ops, n * d)?;

        // 2. Cross-attention to the text (and image) context: no modulation, plain residual.
        match &self.norm2 {
            Some((w, b)) => {
                let args = NormArgs { eps, weight: Some(at(w, 0)), bias: Some(at(b, 0)), scale: None, shift: None };
                ops.layer_norm(at(&ws.x, 0), n, d, &args, at_mut(&mut ws.h, 0))?
            }
            None => ops.narrow(at(&ws.x, 0), at_mut(&mut ws.h, 0), n * d)?,
        }
        self.cross_attention(ops, dims, ws, text, image)?;
        self.out2.forward(ops, at(&ws.attn, 0), n, Activation::None, at_mut(&mut ws.out, 0))?;
        ops.add(at_mut(&mut ws.x, 0), at(&ws.out, 0), None, n * d, d)?;
        ws.round_residual(ops, n * d)?;

        // 3. Feed-forward on the modulated, normalised tokens (GELU-tanh fused); gated residual.
        mods.norm(ops, dims, ws, 4, 3)?;
        self.ffn1.forward(ops, at(&ws.h, 0), n, Activation::GeluTanh, at_mut(&mut ws.wide, 0))?;
        self.ffn2.forward(ops, at(&ws.wide, 0), n, Activation::None, at_mut(&mut ws.out, 0))?;
        mods.gated_add(ops, d, ws, 5)?;
        ws.round_residual(ops, n * d)
    }

    /// Queries from `ws.h`; writes the attention output (before `to_out`) to `ws.attn`. For
    /// image-to-video, diffusers' `attn(q, text) + attn(q, image)` (the same queries).
    fn cross_attention(
        &self,
        ops: &O,
        dims: &Dims,
        ws: &mut Workspace<O>,
        text: (&O::Buf<O::Act>, usize),
        image: Option<(&O::Buf<O::Act>, usize)>,
    ) -> Result<()> {
        let Dims { d, heads, head_dim, eps, .. } = *dims;
        let n = ws.rows;
        let scale = 1.0 / (head_dim as f32).sqrt();
        self.q2.forward(ops, at(&ws.h, 0), n, Activation::None, at_mut(&mut ws.wide, 0))?;
        ops.qk_norm_rope(at_mut(&mut ws.wide, 0), n, d, heads, head_dim, &self.norm_q2, eps, None)?;
        // Keys and values of a context: fused projection [k | v], RMSNorm on k; no RoPE.
        let project = |ws: &mut Workspace<O>, proj: &DeviceLinear<O>, norm: &O::Buf<f32>, ctx: &O::Buf<O::Act>, len: usize| -> Result<AttentionShape> {
            proj.forward(ops, at(ctx, 0), len, Activation::None, at_mut(&mut ws.kv, 0))?;
            ops.qk_norm_rope(at_mut(&mut ws.kv, 0), len, 2 * d, heads, head_dim, norm, eps, None)?;
            Ok(AttentionShape { heads, head_dim, q_len: n, kv_len: len, q_stride: d, kv_stride: 2 * d })
        };
        let shape = project(ws, &self.kv2, &self.norm_k2, text.0, text.1)?;
        match (image, &self.image) {
            (None, _) => Ok(flash(ops, at(&ws.wide, 0), at(&ws.kv, 0), at(&ws.kv, d), shape, scale, at_mut(&mut ws.attn, 0), d, &mut ws.lse)?),
            (Some((img, len)), Some(ik)) => {
                let Some(mut sum) = ws.attn_sum.take() else {
                    return Err(WorkerError::input("encoder_hidden_states_image", "the workspace has no buffer for the image attention"));
                };
                let result = (|| -> Result<()> {
                    flash(ops, at(&ws.wide, 0), at(&ws.kv, 0), at(&ws.kv, d), shape, scale, at_mut(&mut sum, 0), d, &mut ws.lse)?;
                    let shape = project(ws, &ik.kv, &ik.norm_k, img, len)?;
                    flash(ops, at(&ws.wide, 0), at(&ws.kv, 0), at(&ws.kv, d), shape, scale, at_mut(&mut ws.attn, 0), d, &mut ws.lse)?;
                    ops.add(at_mut(&mut sum, 0), at(&ws.attn, 0), None, n * d, d)?;
                    Ok(ops.narrow(at(&sum, 0), at_mut(&mut ws.attn, 0), n * d)?)
                })();
                ws.attn_sum = Some(sum);
                result
            }
            (Some(_), None) => Err(WorkerError::input("encoder_hidden_states_image", "given to a text-to-video model")),
        }
    }
}
