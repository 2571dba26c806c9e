//! The transformer's configuration: diffusers' `WanTransformer3DModel` `config.json`, validated,
//! plus built-in presets (real Wan 2.1 widths, tiny test sizes) used with random weights.

use crate::{Result, WorkerError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters of a Wan 2.1 diffusion transformer (field names as in diffusers' `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerConfig {
    /// Patch size over (frames, rows, columns).
    #[serde(default = "default_patch")]
    pub patch_size: [usize; 3],
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Channels per head.
    pub attention_head_dim: usize,
    /// Latent channels in (16 for text-to-video, 36 for image-to-video).
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Width of the text encoder states.
    pub text_dim: usize,
    /// Width of the sinusoidal timestep embedding.
    pub freq_dim: usize,
    /// Hidden width of the feed-forward layers.
    pub ffn_dim: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Whether cross-attention has an affine LayerNorm before it.
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    /// Query/key norm kind; only `rms_norm_across_heads` exists in Wan 2.1.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    /// Epsilon of every norm in the blocks.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Width of the image-encoder tokens (image-to-video only).
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// Input width of the image key/value projections (image-to-video only).
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    /// Number of positions per axis the RoPE tables cover.
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    /// Length of the learned image position embedding (first-last-frame models only).
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}

impl TransformerConfig {
    /// Reads and validates a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
        cfg.validate().map_err(|detail| WorkerError::Config { path: path.display().to_string(), detail })?;
        Ok(cfg)
    }

    /// Checks that the configuration describes a model this implementation computes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.patch_size.contains(&0) {
            return Err(format!("patch_size {:?} must be positive", self.patch_size));
        }
        if !self.freq_dim.is_multiple_of(2) {
            return Err(format!("freq_dim {} must be even", self.freq_dim));
        }
        if !self.attention_head_dim.is_multiple_of(2) || self.attention_head_dim < 6 {
            return Err(format!("attention_head_dim {} must be even and at least 6 (3-D RoPE)", self.attention_head_dim));
        }
        match self.qk_norm.as_deref() {
            Some("rms_norm_across_heads") => {}
            other => return Err(format!("qk_norm {other:?} is not supported (Wan 2.1 uses \"rms_norm_across_heads\")")),
        }
        match (self.image_dim, self.added_kv_proj_dim) {
            (None, None) => {}
            (Some(_), Some(kv)) if kv == self.inner_dim() => {}
            (Some(_), Some(kv)) => return Err(format!("added_kv_proj_dim {kv} must equal the hidden size {}", self.inner_dim())),
            _ => return Err("image_dim and added_kv_proj_dim must be set together (image-to-video)".into()),
        }
        if self.pos_embed_seq_len.is_some() && self.image_dim.is_none() {
            return Err("pos_embed_seq_len needs image_dim".into());
        }
        Ok(())
    }

    /// Hidden size D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Inputs per patch: `in_channels · p_t · p_h · p_w`.
    pub fn patch_in(&self) -> usize {
        self.in_channels * self.patch_size.iter().product::<usize>()
    }

    /// Outputs per patch: `out_channels · p_t · p_h · p_w`.
    pub fn patch_out(&self) -> usize {
        self.out_channels * self.patch_size.iter().product::<usize>()
    }

    /// Whether this is an image-to-video model.
    pub fn is_i2v(&self) -> bool {
        self.image_dim.is_some()
    }

    /// Floating-point operations (multiply and add counted separately) of one forward pass of
    /// one sample with `tokens` video tokens, `text_len` text rows and `image_len` image tokens.
    pub fn forward_flops(&self, tokens: usize, text_len: usize, image_len: usize) -> f64 {
        let (s, l, li, d, f) = (tokens as f64, text_len as f64, image_len as f64, self.inner_dim() as f64, self.ffn_dim as f64);
        let lin = |rows: f64, i: f64, o: f64| 2.0 * rows * i * o;
        let mut block = 4.0 * lin(s, d, d) // self-attention q, k, v, out
            + 4.0 * s * s * d // q·kᵀ and p·v
            + 2.0 * lin(s, d, d) + 2.0 * lin(l, d, d) // cross-attention q, out; k, v of the text
            + 4.0 * s * l * d
            + lin(s, d, f) + lin(s, f, d); // feed-forward
        if self.is_i2v() {
            block += 2.0 * lin(li, d, d) + 4.0 * s * li * d;
        }
        let embed = lin(s, self.patch_in() as f64, d) + lin(l, self.text_dim as f64, d) + lin(l, d, d) + lin(s, d, self.patch_out() as f64);
        embed + self.num_layers as f64 * block
    }

    /// Number of parameters the weights hold.
    pub fn parameter_count(&self) -> usize {
        let (d, f) = (self.inner_dim(), self.ffn_dim);
        let lin = |i: usize, o: usize| i * o + o;
        let mut n = lin(self.patch_in(), d) + lin(self.freq_dim, d) + lin(d, d) + lin(d, 6 * d) + lin(self.text_dim, d) + lin(d, d);
        let mut block = 6 * d + 4 * lin(d, d) + 2 * d + 2 * d + 4 * lin(d, d) + 2 * d + lin(d, f) + lin(f, d);
        if !self.cross_attn_norm {
            block -= 2 * d;
        }
        if let Some(img) = self.image_dim {
            n += 2 * img + lin(img, img) + lin(img, d) + 2 * d + self.pos_embed_seq_len.map_or(0, |s| s * img);
            block += 2 * lin(d, d) + d;
        }
        n + self.num_layers * block + 2 * d + lin(d, self.patch_out())
    }
}

/// Looks `name` up in a table of built-in presets; the error lists the known names.
pub(crate) fn preset_by_name<T: Copy>(table: &[(&'static str, T)], name: &str, what: &str) -> Result<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, p)| *p).ok_or_else(|| WorkerError::Config {
        path: name.into(),
        detail: format!("unknown {what}; known: {}", table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
    })
}

/// The name of `value` in a table of built-in presets.
pub(crate) fn preset_name<T: Copy + PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table.iter().find(|(_, p)| *p == value).map(|(n, _)| *n).unwrap_or("?")
}

/// Built-in configurations, used with deterministic random weights for tests, benchmarks and
/// the embedded default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformerPreset {
    /// 2 heads of 16, 2 layers: fast enough for unit tests and the laptop demo.
    Tiny,
    /// Wan 2.1-1.3B width (hidden 1536, 12 heads, FFN 8960) with 2 of its 30 layers.
    Wan13bTwoLayers,
    /// Wan 2.1-1.3B, all 30 layers.
    Wan13b,
    /// Wan 2.1-14B width (hidden 5120, 40 heads, FFN 13824) with 2 of its 40 layers.
    Wan14bTwoLayers,
}

impl TransformerPreset {
    /// Every preset, with its name.
    pub const ALL: [(&'static str, TransformerPreset); 4] =
        [("tiny", Self::Tiny), ("wan-1.3b-2l", Self::Wan13bTwoLayers), ("wan-1.3b", Self::Wan13b), ("wan-14b-2l", Self::Wan14bTwoLayers)];

    /// Looks a preset up by name.
    pub fn from_name(name: &str) -> Result<Self> {
        preset_by_name(&Self::ALL, name, "preset")
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        preset_name(&Self::ALL, self)
    }

    /// The configuration.
    pub fn config(self) -> TransformerConfig {
        let wan = |heads: usize, ffn: usize, layers: usize| TransformerConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: heads,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: ffn,
            num_layers: layers,
            cross_attn_norm: true,
            qk_norm: default_qk_norm(),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        };
        match self {
            Self::Tiny => TransformerConfig {
                num_attention_heads: 2,
                attention_head_dim: 16,
                text_dim: 32,
                freq_dim: 32,
                ffn_dim: 64,
                in_channels: 16,
                out_channels: 16,
                ..wan(2, 64, 2)
            },
            Self::Wan13bTwoLayers => wan(12, 8960, 2),
            Self::Wan13b => wan(12, 8960, 30),
            Self::Wan14bTwoLayers => wan(40, 13824, 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_of_real_models() {
        // Figures from the reference (wan2.1.md §1.1).
        assert_eq!(TransformerPreset::Wan13b.config().parameter_count(), 1_418_996_800);
        let t2v14 = TransformerConfig { num_layers: 40, ..TransformerPreset::Wan14bTwoLayers.config() };
        assert_eq!(t2v14.parameter_count(), 14_288_491_584);
        let i2v14 = TransformerConfig { in_channels: 36, image_dim: Some(1280), added_kv_proj_dim: Some(5120), ..t2v14 };
        assert_eq!(i2v14.parameter_count(), 16_394_878_784);
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TransformerPreset::Tiny.config();
        assert!(c.validate().is_ok());
        c.qk_norm = Some("layer_norm".into());
        assert!(c.validate().unwrap_err().contains("qk_norm"));
        let mut c = TransformerPreset::Tiny.config();
        c.image_dim = Some(8);
        assert!(c.validate().unwrap_err().contains("added_kv_proj_dim"));
        assert!(TransformerPreset::from_name("huge").is_err());
        assert_eq!(TransformerPreset::from_name("wan-1.3b-2l").unwrap().config().inner_dim(), 1536);
    }
}
