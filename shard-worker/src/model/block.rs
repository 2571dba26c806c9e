//! One transformer block (diffusers `WanTransformerBlock`): adaLN-modulated self-attention with
//! 3-D RoPE, cross-attention to the text (and image) context, and a gated GELU feed-forward.

use super::attention::SelfAttention;
use super::layers::{AffineLayerNorm, Linear, RmsNorm};
use crate::config::TransformerConfig;
use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::cpu::{self, Activation, AttentionShape, LayerNormParams, RopeTable};

/// The q/k/v/out projections and q/k norms of one attention layer.
struct AttentionLayer {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl AttentionLayer {
    fn load(src: &dyn WeightSource, prefix: &str, d: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(src, &format!("{prefix}.to_q"), d, d)?,
            to_k: Linear::load(src, &format!("{prefix}.to_k"), d, d)?,
            to_v: Linear::load(src, &format!("{prefix}.to_v"), d, d)?,
            to_out: Linear::load(src, &format!("{prefix}.to_out.0"), d, d)?,
            norm_q: RmsNorm::load(src, &format!("{prefix}.norm_q"), d, eps)?,
            norm_k: RmsNorm::load(src, &format!("{prefix}.norm_k"), d, eps)?,
        })
    }
}

/// Image key/value projections of image-to-video cross-attention.
struct ImageKv {
    add_k: Linear,
    add_v: Linear,
    norm_added_k: RmsNorm,
}

/// A transformer block's parameters.
pub struct Block {
    scale_shift_table: Vec<f32>,
    attn1: AttentionLayer,
    norm2: Option<AffineLayerNorm>,
    attn2: AttentionLayer,
    image_kv: Option<ImageKv>,
    ffn1: Linear,
    ffn2: Linear,
    heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Block {
    /// Loads `blocks.{index}.*`.
    pub fn load(src: &dyn WeightSource, cfg: &TransformerConfig, index: usize) -> Result<Self> {
        let d = cfg.inner_dim();
        let eps = cfg.eps as f32;
        let p = format!("blocks.{index}");
        let image_kv = match cfg.added_kv_proj_dim {
            None => None,
            Some(kv) => Some(ImageKv {
                add_k: Linear::load(src, &format!("{p}.attn2.add_k_proj"), kv, d)?,
                add_v: Linear::load(src, &format!("{p}.attn2.add_v_proj"), kv, d)?,
                norm_added_k: RmsNorm::load(src, &format!("{p}.attn2.norm_added_k"), d, eps)?,
            }),
        };
        Ok(Self {
            scale_shift_table: src.tensor(&format!("{p}.scale_shift_table"), &[1, 6, d])?,
            attn1: AttentionLayer::load(src, &format!("{p}.attn1"), d, eps)?,
            norm2: if cfg.cross_attn_norm { Some(AffineLayerNorm::load(src, &format!("{p}.norm2"), d, eps)?) } else { None },
            attn2: AttentionLayer::load(src, &format!("{p}.attn2"), d, eps)?,
            image_kv,
            ffn1: Linear::load(src, &format!("{p}.ffn.net.0.proj"), d, cfg.ffn_dim)?,
            ffn2: Linear::load(src, &format!("{p}.ffn.net.2"), cfg.ffn_dim, d)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            eps,
        })
    }

    /// Runs the block on this shard's `n` token rows `x` (`[n, D]`, updated in place).
    /// `timestep_proj` is the sample's `[6·D]` time projection, `text` its `[L, D]` context,
    /// `image` its `[L_img, D]` image context, `rope` the rotations of these rows.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &mut [f32],
        n: usize,
        timestep_proj: &[f32],
        text: &[f32],
        image: Option<&[f32]>,
        rope: &RopeTable,
        attn: &dyn SelfAttention,
    ) -> Result<()> {
        let d = self.heads * self.head_dim;
        let m: Vec<f32> = self.scale_shift_table.iter().zip(timestep_proj).map(|(a, b)| a + b).collect();
        let chunk = |i: usize| &m[i * d..(i + 1) * d];
        let (shift_msa, scale_msa, gate_msa) = (chunk(0), chunk(1), chunk(2));
        let (c_shift, c_scale, c_gate) = (chunk(3), chunk(4), chunk(5));

        // 1. Self-attention on the modulated, normalised tokens.
        let h = cpu::layer_norm(x, d, &LayerNormParams { eps: self.eps, scale: Some(scale_msa), shift: Some(shift_msa), ..Default::default() })?;
        let a = &self.attn1;
        let mut q = a.to_q.forward(&h, n, Activation::None)?;
        let mut k = a.to_k.forward(&h, n, Activation::None)?;
        let v = a.to_v.forward(&h, n, Activation::None)?;
        drop(h);
        a.norm_q.forward(&mut q)?;
        a.norm_k.forward(&mut k)?;
        rope.apply(&mut q, self.heads, d)?;
        rope.apply(&mut k, self.heads, d)?;
        let o = attn.attend(&q, &k, &v, self.heads, self.head_dim)?;
        drop((q, k, v));
        let o = a.to_out.forward(&o, n, Activation::None)?;
        cpu::gated_residual_add(x, &o, gate_msa)?;

        // 2. Cross-attention to the text (and image) context: no modulation, no gate.
        let h = match &self.norm2 {
            Some(norm) => norm.forward(x)?,
            None => x.to_vec(),
        };
        let o = self.cross_attention(&h, n, text, image)?;
        cpu::residual_add(x, &o)?;

        // 3. Feed-forward on the modulated, normalised tokens, gated.
        let h = cpu::layer_norm(x, d, &LayerNormParams { eps: self.eps, scale: Some(c_scale), shift: Some(c_shift), ..Default::default() })?;
        let f = self.ffn1.forward(&h, n, Activation::GeluTanh)?;
        drop(h);
        let f = self.ffn2.forward(&f, n, Activation::None)?;
        cpu::gated_residual_add(x, &f, c_gate)?;
        Ok(())
    }

    fn cross_attention(&self, h: &[f32], n: usize, text: &[f32], image: Option<&[f32]>) -> Result<Vec<f32>> {
        let d = self.heads * self.head_dim;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let a = &self.attn2;
        let mut q = a.to_q.forward(h, n, Activation::None)?;
        a.norm_q.forward(&mut q)?;
        let l = text.len() / d;
        let mut k = a.to_k.forward(text, l, Activation::None)?;
        a.norm_k.forward(&mut k)?;
        let v = a.to_v.forward(text, l, Activation::None)?;
        let mut o = cpu::attention(&q, &k, &v, AttentionShape::packed(self.heads, self.head_dim, n, l), scale)?.out;
        if let (Some(kv), Some(img)) = (&self.image_kv, image) {
            let li = img.len() / d;
            let mut ki = kv.add_k.forward(img, li, Activation::None)?;
            kv.norm_added_k.forward(&mut ki)?;
            let vi = kv.add_v.forward(img, li, Activation::None)?;
            let oi = cpu::attention(&q, &ki, &vi, AttentionShape::packed(self.heads, self.head_dim, n, li), scale)?.out;
            // diffusers adds the text result to the image result: out = attn_img + attn_txt
            o.iter_mut().zip(&oi).for_each(|(a, b)| *a = b + *a);
        }
        a.to_out.forward(&o, n, Activation::None)
    }
}
