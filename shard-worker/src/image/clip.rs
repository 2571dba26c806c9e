//! transformers' `CLIPVisionModel`, the image encoder of Wan 2.1 image-to-video: a patch
//! embedding (a stride-`P` convolution without bias, run as one product over unfolded patches),
//! the class token first, learned positions, `pre_layrnorm`, then encoder layers of LayerNorm →
//! attention → residual → LayerNorm → MLP with exact GELU → residual. Written once over the
//! backend seam ([`Ops`]): f32 on the CPU, bf16 under the GPU path and its host twin, the residual
//! stream stored as `Act` after every addition (as transformers runs a bf16 model).
//!
//! Wan hands its transformer `hidden_states[-2]`, the penultimate layer's output without
//! `post_layernorm`, so [`ClipVisionEncoder::image_embeds`] stops there; the last layer and the
//! post-norm are loaded (the checkpoint holds them) but only [`ClipVisionEncoder::hidden_states`]
//! runs the last layer.

use super::config::ClipVisionConfig;
use crate::model::{load_rounded, DeviceLinear};
use crate::on_backend::{model_family, on_backend, OnBackend};
use crate::weights::{WeightSource, WeightStore};
use crate::{Result, WorkerError};
use std::path::Path;
use tessera_kernels::backend::{at, at_mut, flash, ActBuf, Backend, Elem, NormArgs, Ops};
use tessera_kernels::cpu::{Activation, AttentionShape};
use tessera_kernels::Tensor;

/// The prefix of every weight in published checkpoints (Wan2.1-I2V's `image_encoder/` included).
const PREFIX: &str = "vision_model";

/// A LayerNorm's affine parameters (f32, holding `Act` values).
struct Norm<O: Ops> {
    weight: O::Buf<f32>,
    bias: O::Buf<f32>,
}

impl<O: Ops> Norm<O> {
    fn load(ops: &O, src: &dyn WeightSource, prefix: &str, d: usize) -> Result<Self> {
        Ok(Self { weight: load_rounded(ops, src, &format!("{prefix}.weight"), &[d])?, bias: load_rounded(ops, src, &format!("{prefix}.bias"), &[d])? })
    }

    /// `y = LayerNorm(x)` over `rows` rows of `d`.
    fn run(&self, ops: &O, eps: f32, x: &O::Buf<f32>, rows: usize, d: usize, y: &mut ActBuf<O>) -> Result<()> {
        let args = NormArgs { eps, weight: Some(at(&self.weight, 0)), bias: Some(at(&self.bias, 0)), scale: None, shift: None };
        Ok(ops.layer_norm(at(x, 0), rows, d, &args, at_mut(y, 0))?)
    }
}

/// One encoder layer (`vision_model.encoder.layers.{i}`).
struct ClipLayer<O: Ops> {
    norm1: Norm<O>,
    /// q, k and v stacked: `[3·d, d]`, with biases.
    qkv: DeviceLinear<O>,
    out: DeviceLinear<O>,
    norm2: Norm<O>,
    fc1: DeviceLinear<O>,
    fc2: DeviceLinear<O>,
}

impl<O: Ops> ClipLayer<O> {
    fn load(ops: &O, src: &dyn WeightSource, cfg: &ClipVisionConfig, i: usize) -> Result<Self> {
        let (d, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let p = format!("{PREFIX}.encoder.layers.{i}");
        let proj = ["q", "k", "v"].map(|n| format!("{p}.self_attn.{n}_proj"));
        Ok(Self {
            norm1: Norm::load(ops, src, &format!("{p}.layer_norm1"), d)?,
            qkv: DeviceLinear::load_stacked(ops, src, &proj.each_ref().map(String::as_str), d, d)?,
            out: DeviceLinear::load(ops, src, &format!("{p}.self_attn.out_proj"), d, d)?,
            norm2: Norm::load(ops, src, &format!("{p}.layer_norm2"), d)?,
            fc1: DeviceLinear::load(ops, src, &format!("{p}.mlp.fc1"), d, inner)?,
            fc2: DeviceLinear::load(ops, src, &format!("{p}.mlp.fc2"), inner, d)?,
        })
    }

    /// `x ← x + out(attn(norm1(x)))`, then `x ← x + fc2(gelu(fc1(norm2(x))))`, one image's
    /// `ws.rows` tokens.
    fn forward(&self, ops: &O, cfg: &ClipVisionConfig, ws: &mut Workspace<O>) -> Result<()> {
        let (d, rows, eps) = (cfg.hidden_size, ws.rows, cfg.layer_norm_eps as f32);
        self.norm1.run(ops, eps, &ws.x, rows, d, &mut ws.h)?;
        self.qkv.forward(ops, at(&ws.h, 0), rows, Activation::None, at_mut(&mut ws.wide, 0))?;
        let (heads, head_dim) = (cfg.num_attention_heads, cfg.head_dim());
        let shape = AttentionShape { heads, head_dim, q_len: rows, kv_len: rows, q_stride: 3 * d, kv_stride: 3 * d };
        let scale = (head_dim as f32).powf(-0.5);
        let (q, k, v) = (at(&ws.wide, 0), at(&ws.wide, d), at(&ws.wide, 2 * d));
        flash(ops, q, k, v, shape, scale, at_mut(&mut ws.attn, 0), d, &mut ws.lse)?;
        self.out.forward(ops, at(&ws.attn, 0), rows, Activation::None, at_mut(&mut ws.h, 0))?;
        ws.add_residual(ops, rows * d)?;
        self.norm2.run(ops, eps, &ws.x, rows, d, &mut ws.h)?;
        self.fc1.forward(ops, at(&ws.h, 0), rows, Activation::Gelu, at_mut(&mut ws.wide, 0))?;
        self.fc2.forward(ops, at(&ws.wide, 0), rows, Activation::None, at_mut(&mut ws.h, 0))?;
        ws.add_residual(ops, rows * d)
    }
}

/// Buffers of one image's forward pass, reused by every layer.
struct Workspace<O: Ops> {
    rows: usize,
    /// The residual stream `[rows, d]`, f32 holding `Act` values.
    x: O::Buf<f32>,
    /// Normalised rows, then each branch's output `[rows, d]`.
    h: ActBuf<O>,
    /// q|k|v `[rows, 3·d]`, then the MLP's hidden layer `[rows, intermediate]`.
    wide: ActBuf<O>,
    /// The attention output `[rows, d]`.
    attn: ActBuf<O>,
    /// The attention's log-sum-exp `[heads, rows]`.
    lse: O::Buf<f32>,
}

impl<O: Ops> Workspace<O> {
    fn new(ops: &O, cfg: &ClipVisionConfig) -> Result<Self> {
        let (rows, d) = (cfg.tokens(), cfg.hidden_size);
        Ok(Self {
            rows,
            x: ops.zeros(rows * d)?,
            h: ops.zeros(rows * d)?,
            wide: ops.zeros(rows * (3 * d).max(cfg.intermediate_size))?,
            attn: ops.zeros(rows * d)?,
            lse: ops.zeros(cfg.num_attention_heads * rows)?,
        })
    }

    /// `x ← Act(x + h)` over `n` values (transformers adds in the model's dtype).
    fn add_residual(&mut self, ops: &O, n: usize) -> Result<()> {
        ops.add(at_mut(&mut self.x, 0), at(&self.h, 0), None, n, n)?;
        self.round_stream(ops, n)
    }

    /// Rounds the residual stream to `Act` (nothing for f32).
    fn round_stream(&mut self, ops: &O, n: usize) -> Result<()> {
        crate::model::round_stream(ops, &mut self.x, &mut self.h, n)
    }
}

/// The CLIP vision tower on the backend `O` (transformers `CLIPVisionModel`).
pub struct ClipVisionEncoder<O: Ops> {
    ops: O,
    cfg: ClipVisionConfig,
    /// The patch convolution as a product: `[d, 3·P·P]`, no bias.
    patch: DeviceLinear<O>,
    /// The class token `[d]` then the position table `[tokens, d]`, host values rounded to `Act`.
    class_token: Vec<f32>,
    positions: O::Buf<f32>,
    pre_norm: Norm<O>,
    layers: Vec<ClipLayer<O>>,
}

impl<O: Ops> ClipVisionEncoder<O> {
    /// Builds the encoder on `ops` from any weight source, then checks that the source holds
    /// nothing else (`post_layernorm`, which Wan does not use, is read and dropped).
    pub fn from_source(ops: O, cfg: ClipVisionConfig, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "CLIP vision config".into(), detail })?;
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let e = format!("{PREFIX}.embeddings");
        let conv = src.tensor(&format!("{e}.patch_embedding.weight"), &[d, 3, p, p])?;
        let patch = DeviceLinear::from_host(&ops, &conv, None, 3 * p * p, d)?;
        let mut class_token = src.tensor(&format!("{e}.class_embedding"), &[d])?;
        crate::model::round_to::<O::Act>(&mut class_token);
        let positions = load_rounded(&ops, src, &format!("{e}.position_embedding.weight"), &[cfg.tokens(), d])?;
        // Older checkpoints store the position ids buffer (0..tokens); nothing reads it.
        if src.contains(&format!("{e}.position_ids")) {
            let _ = src.tensor(&format!("{e}.position_ids"), &[1, cfg.tokens()])?;
        }
        let pre_norm = Norm::load(&ops, src, &format!("{PREFIX}.pre_layrnorm"), d)?;
        let layers = (0..cfg.num_hidden_layers).map(|i| ClipLayer::load(&ops, src, &cfg, i)).collect::<Result<Vec<_>>>()?;
        for part in ["weight", "bias"] {
            let _ = src.tensor(&format!("{PREFIX}.post_layernorm.{part}"), &[d])?;
        }
        src.finish()?;
        Ok(Self { ops, cfg, patch, class_token, positions, pre_norm, layers })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The backend.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// `hidden_states` of transformers' forward with `output_hidden_states`: for `pixel_values`
    /// `[B, 3, S, S]`, `[layers + 1, B, tokens, d]`: `[0]` is `pre_layrnorm(embeddings)`, `[i]`
    /// the output of layer `i`.
    pub fn hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let layers = self.cfg.num_hidden_layers;
        let (b, t, d) = (self.batch(pixel_values)?, self.cfg.tokens(), self.cfg.hidden_size);
        let mut out = vec![0f32; (layers + 1) * b * t * d];
        for image in 0..b {
            self.run(pixel_values, image, layers, &mut |i, x| {
                out[(i * b + image) * t * d..][..t * d].copy_from_slice(x);
            })?;
        }
        Ok(Tensor::new([layers + 1, b, t, d], out)?)
    }

    /// What `WanImageToVideoPipeline.encode_image` hands the transformer: `hidden_states[-2]`,
    /// `[B, tokens, d]` (the last layer is not run).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, t, d) = (self.batch(pixel_values)?, self.cfg.tokens(), self.cfg.hidden_size);
        let stop = self.cfg.num_hidden_layers - 1;
        let mut out = vec![0f32; b * t * d];
        for image in 0..b {
            self.run(pixel_values, image, stop, &mut |i, x| {
                if i == stop {
                    out[image * t * d..][..t * d].copy_from_slice(x);
                }
            })?;
        }
        Ok(Tensor::new([b, t, d], out)?)
    }

    /// Images in `pixel_values`, whose shape must be `[B, 3, S, S]`.
    fn batch(&self, pixel_values: &Tensor) -> Result<usize> {
        let (s, shape) = (self.cfg.image_size, pixel_values.shape());
        match shape {
            [b, 3, h, w] if *h == s && *w == s && *b > 0 => Ok(*b),
            _ => Err(WorkerError::input("pixel_values", format!("expected [B, 3, {s}, {s}], got {shape:?}"))),
        }
    }

    /// Runs image `image` of the batch through layers `0..layers`, handing `each` the states
    /// after the embedding (index 0) and after every layer (index `i`), `[tokens, d]`.
    fn run(&self, pixel_values: &Tensor, image: usize, layers: usize, each: &mut dyn FnMut(usize, &[f32])) -> Result<()> {
        let (ops, cfg) = (&self.ops, &self.cfg);
        let (d, t, p, side) = (cfg.hidden_size, cfg.tokens(), cfg.patch_size, cfg.patches_per_side());
        let s = cfg.image_size;
        let pixels = &pixel_values.data()[image * 3 * s * s..][..3 * s * s];
        // Unfold the patches: row (py, px), features (c, ky, kx), the convolution's order.
        let k = 3 * p * p;
        let mut unfolded = vec![0f32; (t - 1) * k];
        for (n, row) in unfolded.chunks_exact_mut(k).enumerate() {
            let (py, px) = (n / side, n % side);
            for c in 0..3 {
                for ky in 0..p {
                    let src = &pixels[(c * s + py * p + ky) * s + px * p..][..p];
                    row[(c * p + ky) * p..][..p].copy_from_slice(src);
                }
            }
        }
        let mut ws = Workspace::new(ops, cfg)?;
        let unfolded = ops.upload_vec(O::Act::vec_from_f32(unfolded))?;
        // Token 0 is the class token, then the patches; positions are added to all.
        ops.upload_into(&O::Act::vec_from_f32(self.class_token.clone()), at_mut(&mut ws.h, 0))?;
        self.patch.forward(ops, at(&unfolded, 0), t - 1, Activation::None, at_mut(&mut ws.h, d))?;
        ops.widen(at(&ws.h, 0), at_mut(&mut ws.x, 0), t * d)?;
        ops.add(at_mut(&mut ws.x, 0), at(&self.positions, 0), None, t * d, t * d)?;
        ws.round_stream(ops, t * d)?;
        self.pre_norm.run(ops, cfg.layer_norm_eps as f32, &ws.x, t, d, &mut ws.h)?;
        ops.widen(at(&ws.h, 0), at_mut(&mut ws.x, 0), t * d)?;
        each(0, &ops.download(&ws.x)?);
        for (i, layer) in self.layers[..layers].iter().enumerate() {
            layer.forward(ops, cfg, &mut ws)?;
            each(i + 1, &ops.download(&ws.x)?);
        }
        Ok(())
    }
}

model_family!(
    /// The CLIP vision tower as a [`ModelFamily`](crate::on_backend::ModelFamily): what [`ClipVisionModel`] chooses among.
    ClipFamily,
    ClipVisionEncoder,
    ClipVisionConfig
);

/// The CLIP vision tower on the backend chosen at run time.
pub type ClipVisionModel = OnBackend<ClipFamily>;

impl OnBackend<ClipFamily> {
    /// Loads a transformers folder (`config.json` and `model.safetensors`, or shards) onto
    /// `backend`. Every tensor in the files must be used.
    pub fn load_on(dir: &Path, backend: Backend) -> Result<Self> {
        let cfg = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir)?;
        Self::from_source_on(cfg, &store, backend)
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        on_backend!(self, m => m.config())
    }

    /// See [`ClipVisionEncoder::hidden_states`].
    pub fn hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        on_backend!(self, m => m.hidden_states(pixel_values))
    }

    /// See [`ClipVisionEncoder::image_embeds`].
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        on_backend!(self, m => m.image_embeds(pixel_values))
    }
}
