//! The whole transformer: patch embedding, condition embedding, the blocks, the output head and
//! unpatchify. `forward` runs one device; `forward_tokens` runs one shard of the token sequence.

use super::attention::{LocalAttention, SelfAttention};
use super::block::Block;
use super::embedding::{ConditionEmbedder, Conditions};
use super::layers::Linear;
use super::patch::{patchify, unpatchify, PatchGrid};
use crate::config::{TransformerConfig, TransformerPreset};
use crate::weights::{RandomWeights, WeightSource, WeightStore};
use crate::{Result, WorkerError};
use std::ops::Range;
use std::path::Path;
use tessera_kernels::cpu::{self, Activation, LayerNormParams, Rope3d};
use tessera_kernels::Tensor;

/// Inputs of a forward pass, as diffusers names them.
#[derive(Clone, Copy)]
pub struct DitInputs<'a> {
    /// Noisy latents `[B, C_in, F, H, W]`.
    pub hidden_states: &'a Tensor,
    /// One timestep per sample (the scheduler's integer timesteps, as f32).
    pub timesteps: &'a [f32],
    /// Text encoder states `[B, L, text_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Image encoder tokens `[B, L_img, image_dim]` (image-to-video only).
    pub encoder_hidden_states_image: Option<&'a Tensor>,
}

/// A loaded Wan 2.1 transformer.
pub struct WanTransformer {
    cfg: TransformerConfig,
    patch_embedding: Linear,
    condition_embedder: ConditionEmbedder,
    blocks: Vec<Block>,
    scale_shift_table: Vec<f32>,
    proj_out: Linear,
    rope: Rope3d,
}

impl WanTransformer {
    /// Loads a diffusers `transformer/` folder (`config.json` and safetensors weights).
    pub fn load(dir: &Path) -> Result<Self> {
        let (cfg, store) = open_transformer_dir(dir)?;
        Self::from_source(cfg, &store)
    }

    /// A built-in configuration with deterministic random weights.
    pub fn preset(preset: TransformerPreset, seed: u64) -> Result<Self> {
        Self::from_source(preset.config(), &RandomWeights::new(seed))
    }

    /// Builds the model from any weight source; every parameter is checked by name and shape,
    /// and tensors the model does not use are an error.
    pub fn from_source(cfg: TransformerConfig, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "transformer config".into(), detail })?;
        let d = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let pe_w = src.tensor("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw])?;
        let pe_b = src.tensor("patch_embedding.bias", &[d])?;
        let model = Self {
            patch_embedding: Linear::from_parts(pe_w, Some(pe_b), cfg.patch_in(), d),
            condition_embedder: ConditionEmbedder::load(src, &cfg)?,
            blocks: (0..cfg.num_layers).map(|i| Block::load(src, &cfg, i)).collect::<Result<_>>()?,
            scale_shift_table: src.tensor("scale_shift_table", &[1, 2, d])?,
            proj_out: Linear::load(src, "proj_out", d, cfg.patch_out())?,
            rope: Rope3d::wan(cfg.attention_head_dim, cfg.rope_max_seq_len, 10000.0)?,
            cfg,
        };
        src.finish()?;
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Checks the inputs against the model and returns (batch, patch grid).
    pub fn check_inputs(&self, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
        check_dit_inputs(&self.cfg, x)
    }

    /// Time, text and image embeddings of the whole batch (replicated on every shard).
    pub fn embed_conditions(&self, x: &DitInputs<'_>) -> Result<Conditions> {
        let text_len = x.encoder_hidden_states.dim(1);
        let image = x.encoder_hidden_states_image.map(|t| (t.data(), t.dim(1)));
        self.condition_embedder.forward(x.timesteps, x.encoder_hidden_states.data(), text_len, image)
    }

    /// Runs tokens `tokens` (global indices into the flattened (frame, row, column) grid) of
    /// sample `b` through the model, with `attn` joining them to the rest of the sequence.
    /// Returns the head's output `[tokens.len(), p_t·p_h·p_w·C_out]` for those tokens.
    pub fn forward_tokens(
        &self,
        x: &DitInputs<'_>,
        cond: &Conditions,
        b: usize,
        grid: &PatchGrid,
        tokens: Range<usize>,
        attn: &dyn SelfAttention,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let d = c.inner_dim();
        let n = tokens.len();
        let per_sample = c.in_channels * grid.latent().iter().product::<usize>();
        let latent = &x.hidden_states.data()[b * per_sample..(b + 1) * per_sample];
        let patches = patchify(latent, c.in_channels, grid, tokens.clone());
        let mut h = self.patch_embedding.forward(&patches, n, Activation::None)?;
        drop(patches);
        let rope = self.rope.table(grid.dims, tokens)?;
        let tproj = &cond.timestep_proj[b * 6 * d..(b + 1) * 6 * d];
        let image = cond.image.as_ref().map(|v| v[b].as_slice());
        for block in &self.blocks {
            block.forward(&mut h, n, tproj, &cond.text[b], image, &rope, attn)?;
        }
        // Output head: LN without affine, modulated by the raw time embedding.
        let temb = &cond.temb[b * d..(b + 1) * d];
        let shift: Vec<f32> = self.scale_shift_table[..d].iter().zip(temb).map(|(a, t)| a + t).collect();
        let scale: Vec<f32> = self.scale_shift_table[d..].iter().zip(temb).map(|(a, t)| a + t).collect();
        let y = cpu::layer_norm(&h, d, &LayerNormParams { eps: c.eps as f32, scale: Some(&scale), shift: Some(&shift), ..Default::default() })?;
        self.proj_out.forward(&y, n, Activation::None)
    }

    /// The velocity `[B, C_out, F, H, W]` for `x`, all tokens on this device.
    pub fn forward(&self, x: &DitInputs<'_>) -> Result<Tensor> {
        self.forward_with(x, &LocalAttention)
    }

    /// As [`forward`](Self::forward), with a chosen self-attention strategy over the full sequence.
    pub fn forward_with(&self, x: &DitInputs<'_>, attn: &dyn SelfAttention) -> Result<Tensor> {
        let (b, grid) = self.check_inputs(x)?;
        let cond = self.embed_conditions(x)?;
        let mut out = Vec::with_capacity(b * self.cfg.out_channels * grid.latent().iter().product::<usize>());
        for i in 0..b {
            let tokens = self.forward_tokens(x, &cond, i, &grid, 0..grid.tokens(), attn)?;
            out.extend(unpatchify(&tokens, self.cfg.out_channels, &grid));
        }
        let [f, h, w] = grid.latent();
        Ok(Tensor::new([b, self.cfg.out_channels, f, h, w], out)?)
    }
}

/// A diffusers `transformer/` folder: its `config.json` and its weights (single or sharded).
pub(crate) fn open_transformer_dir(dir: &Path) -> Result<(TransformerConfig, WeightStore)> {
    let cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
    // Early diffusers versions wrote an unused `norm_added_q` for image-to-video models.
    let store = WeightStore::open_dir(dir)?.ignore_unused(&["attn2.norm_added_q.weight"]);
    Ok((cfg, store))
}

/// Checks forward inputs against a transformer configuration; returns (batch, patch grid).
pub(crate) fn check_dit_inputs(c: &TransformerConfig, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
    let hs = x.hidden_states.shape();
    if hs.len() != 5 || hs[1] != c.in_channels || hs[0] == 0 {
        return Err(WorkerError::input("hidden_states", format!("expected [B, {}, F, H, W], got {hs:?}", c.in_channels)));
    }
    let b = hs[0];
    let grid = PatchGrid::new([hs[2], hs[3], hs[4]], c.patch_size)?;
    if x.timesteps.len() != b {
        return Err(WorkerError::input("timestep", format!("{} values for a batch of {b}", x.timesteps.len())));
    }
    if let Some(t) = x.timesteps.iter().find(|t| !t.is_finite()) {
        return Err(WorkerError::input("timestep", format!("{t} is not finite")));
    }
    let es = x.encoder_hidden_states.shape();
    if es.len() != 3 || es[0] != b || es[2] != c.text_dim || es[1] == 0 {
        return Err(WorkerError::input("encoder_hidden_states", format!("expected [{b}, L, {}], got {es:?}", c.text_dim)));
    }
    match (c.image_dim, x.encoder_hidden_states_image) {
        (Some(dim), Some(img)) => {
            let is = img.shape();
            if is.len() != 3 || is[0] != b || is[2] != dim || is[1] == 0 {
                return Err(WorkerError::input("encoder_hidden_states_image", format!("expected [{b}, L_img, {dim}], got {is:?}")));
            }
        }
        (Some(_), None) => return Err(WorkerError::input("encoder_hidden_states_image", "required by an image-to-video model")),
        (None, Some(_)) => return Err(WorkerError::input("encoder_hidden_states_image", "given to a text-to-video model")),
        (None, None) => {}
    }
    Ok((b, grid))
}
