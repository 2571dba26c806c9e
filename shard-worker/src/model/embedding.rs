//! The conditions of the forward (diffusers `WanTimeTextImageEmbedding`; in bf16 as it runs with
//! the transformer in bf16, wan2.1.md §1.4): the time embedder in f32, its output rounded to
//! `Act`, `time_proj` and the text embedder as matrix products on the device, the modulation
//! `scale_shift_table + timestep_proj` in f32; the image embedder (exact-erf GELU, which the device
//! does not fuse) on the host with diffusers' roundings to `Act`.
//!
//! Host-side parts and why: the time embedder runs B rows (B·F with per-frame timesteps) through
//! two f32 layers (the device's matrix products take `Act` operands; diffusers keeps this module
//! in f32), the image embedder runs once per forward on 257 rows, and SkyReels-V2's fps projection
//! on one row. None touches the token sequence.

use super::layers::{AffineLayerNorm, Linear};
use super::weights::{convert, round_to, DeviceLinear};
use crate::transformer_config::TransformerConfig;
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use std::marker::PhantomData;
use tessera_kernels::backend::{at, at_mut, ActBuf, Elem, Ops};
use tessera_kernels::cpu::{self, Activation};

/// Everything a block needs besides the tokens, for the whole batch, on the device.
pub struct Conditions<O: Ops> {
    /// Timesteps per sample M: 1, or the latent frames F (diffusion forcing: frame f's tokens
    /// are modulated by timestep f).
    pub(crate) rows_per_sample: usize,
    /// For each (sample, m), `[B, M]`, its row of the modulation tables: one row per distinct
    /// timestep, so equal timesteps share their vectors (and their bits).
    pub(crate) row_of: Vec<usize>,
    /// `scale_shift_table + timestep_proj` of every block, per distinct timestep
    /// `[rows, blocks, 6·D]` f32.
    pub(crate) block_mods: O::Buf<f32>,
    /// The output head's `[shift | scale]` = its table + the `Act` time embedding, per distinct
    /// timestep `[rows, 2·D]` f32.
    pub(crate) head_mods: O::Buf<f32>,
    /// Projected text, per sample `[text_len, D]` (`Act`).
    pub(crate) text: Vec<O::Buf<O::Act>>,
    /// Rows of text context.
    pub(crate) text_len: usize,
    /// Projected image tokens, per sample `[image_len, D]` (`Act`), and their count (image-to-video).
    pub(crate) image: Option<(Vec<ActBuf<O>>, usize)>,
}

/// `time_embedder` (f32, on the host): sinusoid → Linear → SiLU → Linear.
pub(crate) struct HostTimeEmbedder {
    linear_1: Linear,
    linear_2: Linear,
    freq_dim: usize,
    /// SkyReels-V2 computes the sinusoid in float64 (Wan in float32).
    float64: bool,
}

impl HostTimeEmbedder {
    /// Loads `condition_embedder.time_embedder.*` in f32.
    pub(crate) fn load(src: &dyn WeightSource, cfg: &TransformerConfig) -> Result<Self> {
        let (p, d) = ("condition_embedder.time_embedder", cfg.inner_dim());
        Ok(Self {
            linear_1: Linear::load(src, &format!("{p}.linear_1"), cfg.freq_dim, d)?,
            linear_2: Linear::load(src, &format!("{p}.linear_2"), d, d)?,
            freq_dim: cfg.freq_dim,
            float64: cfg.is_skyreels_v2(),
        })
    }

    /// The raw time embedding `[B, D]` in f32 (one row per timestep).
    pub(crate) fn forward(&self, timesteps: &[f32]) -> Result<Vec<f32>> {
        let b = timesteps.len();
        let sinus = if self.float64 {
            cpu::timestep_embedding_f64(timesteps, self.freq_dim, 10000.0)?
        } else {
            cpu::timestep_embedding(timesteps, self.freq_dim, 0.0, 10000.0)?
        };
        let h = self.linear_1.forward(&sinus, b, Activation::Silu)?;
        self.linear_2.forward(&h, b, Activation::None)
    }
}

/// `image_embedder` on the host, rounding to `A` where diffusers stores a tensor of the model's
/// type: its matrices and `pos_embed` are `A`, its two LayerNorms f32 (`norm1`/`norm2` are kept in
/// f32).
pub(crate) struct HostImageEmbedder<A: Elem> {
    pos_embed: Option<Vec<f32>>,
    norm1: AffineLayerNorm,
    ff1: Linear,
    ff2: Linear,
    norm2: AffineLayerNorm,
    image_dim: usize,
    elem: PhantomData<A>,
}

/// An `nn.Linear` of element type `A` emulated on the host: parameters rounded to `A`, f32 arithmetic.
fn rounded_linear<A: Elem>(src: &dyn WeightSource, prefix: &str, in_f: usize, out_f: usize) -> Result<Linear> {
    let mut w = src.tensor(&format!("{prefix}.weight"), &[out_f, in_f])?;
    let mut b = src.tensor(&format!("{prefix}.bias"), &[out_f])?;
    round_to::<A>(&mut w);
    round_to::<A>(&mut b);
    Ok(Linear::from_parts(w, Some(b), in_f, out_f))
}

impl<A: Elem> HostImageEmbedder<A> {
    /// Loads `condition_embedder.image_embedder.*` (image-to-video configurations).
    pub(crate) fn load(src: &dyn WeightSource, cfg: &TransformerConfig, image_dim: usize) -> Result<Self> {
        let (p, d) = ("condition_embedder.image_embedder", cfg.inner_dim());
        let pos_embed = match cfg.pos_embed_seq_len {
            Some(n) => {
                let mut v = src.tensor(&format!("{p}.pos_embed"), &[1, n, image_dim])?;
                round_to::<A>(&mut v);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            pos_embed,
            norm1: AffineLayerNorm::load(src, &format!("{p}.norm1"), image_dim, 1e-5)?,
            ff1: rounded_linear::<A>(src, &format!("{p}.ff.net.0.proj"), image_dim, image_dim)?,
            ff2: rounded_linear::<A>(src, &format!("{p}.ff.net.2"), image_dim, d)?,
            norm2: AffineLayerNorm::load(src, &format!("{p}.norm2"), d, 1e-5)?,
            image_dim,
            elem: PhantomData,
        })
    }

    /// The image context `[n, D]` of one sample's `n` image tokens, as `A`.
    pub(crate) fn forward(&self, img: &[f32], n: usize) -> Result<Vec<A>> {
        let mut x = img.to_vec();
        round_to::<A>(&mut x);
        if let Some(pos) = &self.pos_embed {
            if pos.len() != x.len() {
                return Err(WorkerError::input(
                    "encoder_hidden_states_image",
                    format!("{n} tokens, the model's position embedding has {}", pos.len() / self.image_dim),
                ));
            }
            x.iter_mut().zip(pos).for_each(|(a, b)| *a += b);
            round_to::<A>(&mut x);
        }
        let mut h = self.norm1.forward(&x)?;
        round_to::<A>(&mut h);
        let mut h = self.ff1.forward(&h, n, Activation::None)?;
        round_to::<A>(&mut h);
        cpu::apply_activation(&mut h, Activation::Gelu);
        round_to::<A>(&mut h);
        let mut h = self.ff2.forward(&h, n, Activation::None)?;
        round_to::<A>(&mut h);
        Ok(convert::<A>(&self.norm2.forward(&h)?))
    }
}

/// SkyReels-V2's fps embedding (`inject_sample_info`), on the host: `fps_embedding.weight[index]`
/// → Linear → SiLU → Linear, `[6·D]`, added to every row of `timestep_proj`. Its parameters and
/// each layer's output are rounded to `A`, as a model of that type stores them. There are two
/// indices, so both terms are computed once, at load.
pub(crate) struct HostFpsProjection<A: Elem> {
    /// The `[6·D]` term of each fps index.
    terms: [Vec<f32>; 2],
    elem: PhantomData<A>,
}

impl<A: Elem> HostFpsProjection<A> {
    /// Loads `fps_embedding.weight` `[2, D]` and `fps_projection.net.{0.proj,2}`, and computes the
    /// term of each index.
    pub(crate) fn load(src: &dyn WeightSource, d: usize) -> Result<Self> {
        let mut table = src.tensor("fps_embedding.weight", &[2, d])?;
        round_to::<A>(&mut table);
        let linear_1 = rounded_linear::<A>(src, "fps_projection.net.0.proj", d, d)?;
        let linear_2 = rounded_linear::<A>(src, "fps_projection.net.2", d, 6 * d)?;
        let term = |e: &[f32]| -> Result<Vec<f32>> {
            let mut h = linear_1.forward(e, 1, Activation::None)?;
            round_to::<A>(&mut h);
            cpu::apply_activation(&mut h, Activation::Silu);
            round_to::<A>(&mut h);
            let mut out = linear_2.forward(&h, 1, Activation::None)?;
            round_to::<A>(&mut out);
            Ok(out)
        };
        Ok(Self { terms: [term(&table[..d])?, term(&table[d..])?], elem: PhantomData })
    }

    /// The `[6·D]` term of fps index `index` (0: 16 fps, 1: any other rate).
    pub(crate) fn term(&self, index: usize) -> Result<&[f32]> {
        self.terms.get(index).map(Vec::as_slice).ok_or_else(|| WorkerError::input("fps", format!("index {index}; the model has 2 (0: 16 fps, 1: other)")))
    }
}

/// The device parts of the condition embedder: `time_proj` and the text embedder.
pub(crate) struct Embedders<O: Ops> {
    pub(crate) time: HostTimeEmbedder,
    pub(crate) time_proj: DeviceLinear<O>,
    pub(crate) text_1: DeviceLinear<O>,
    pub(crate) text_2: DeviceLinear<O>,
    pub(crate) image: Option<HostImageEmbedder<O::Act>>,
    /// SkyReels-V2 with `inject_sample_info`.
    pub(crate) fps: Option<HostFpsProjection<O::Act>>,
}

impl<O: Ops> Embedders<O> {
    /// Loads every `condition_embedder.*` parameter.
    pub(crate) fn load(ops: &O, src: &dyn WeightSource, cfg: &TransformerConfig) -> Result<Self> {
        let (p, d) = ("condition_embedder", cfg.inner_dim());
        let image = match cfg.image_dim {
            Some(img) => Some(HostImageEmbedder::load(src, cfg, img)?),
            None => None,
        };
        Ok(Self {
            time: HostTimeEmbedder::load(src, cfg)?,
            time_proj: DeviceLinear::load(ops, src, &format!("{p}.time_proj"), d, 6 * d)?,
            text_1: DeviceLinear::load(ops, src, &format!("{p}.text_embedder.linear_1"), cfg.text_dim, d)?,
            text_2: DeviceLinear::load(ops, src, &format!("{p}.text_embedder.linear_2"), d, d)?,
            image,
            fps: if cfg.inject_sample_info { Some(HostFpsProjection::load(src, d)?) } else { None },
        })
    }

    /// The projected time embedding `[B, 6·D]` (f32 holding diffusers' `Act` values) and the raw
    /// time embedding rounded to `Act` `[B, D]` (host): `time_proj(SiLU(Act(temb)))` in `Act`.
    pub(crate) fn time(&self, ops: &O, timesteps: &[f32]) -> Result<(O::Buf<f32>, Vec<f32>)> {
        let b = timesteps.len();
        let mut temb = self.time.forward(timesteps)?;
        round_to::<O::Act>(&mut temb);
        // SiLU of an `Act` tensor: f32 arithmetic, an `Act` result.
        let mut act = temb.clone();
        cpu::apply_activation(&mut act, Activation::Silu);
        let act = ops.upload(&convert::<O::Act>(&act))?;
        let proj = self.time_proj.forward_new(ops, at(&act, 0), b, Activation::None)?;
        let n = b * self.time_proj.out_features();
        let mut out = ops.zeros::<f32>(n)?;
        ops.widen(at(&proj, 0), at_mut(&mut out, 0), n)?;
        Ok((out, temb))
    }

    /// One sample's text context `[len, D]`: `Linear → GELU(tanh) → Linear` in `Act`.
    pub(crate) fn text(&self, ops: &O, text: &[f32], len: usize) -> Result<O::Buf<O::Act>> {
        let x = ops.upload(&convert::<O::Act>(text))?;
        let h = self.text_1.forward_new(ops, at(&x, 0), len, Activation::GeluTanh)?;
        self.text_2.forward_new(ops, at(&h, 0), len, Activation::None)
    }
}
