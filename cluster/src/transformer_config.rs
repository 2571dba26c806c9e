//! The Wan 2.1 transformer's hyper-parameters as diffusers writes them (`transformer/config.json`),
//! validated, with the released models' values: the workers build the model from it, the planner
//! sizes jobs with it, and worker records carry it to the coordinator. SkyReels-V2 (diffusion
//! forcing) is the same architecture with two more keys, so it is the same configuration.

use serde::{Deserialize, Serialize};

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
    /// diffusers' class: `WanTransformer3DModel` or `SkyReelsV2Transformer3DModel` (absent in
    /// hand-written configurations: Wan).
    #[serde(rename = "_class_name", default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// SkyReels-V2: whether an fps embedding is added to every block's modulation.
    #[serde(default)]
    pub inject_sample_info: bool,
    /// SkyReels-V2: latent frames per block of the causal block mask (1: no mask).
    #[serde(default = "default_frames_per_block")]
    pub num_frame_per_block: usize,
}

/// diffusers' class of the Wan 2.1 transformer.
pub const WAN_CLASS: &str = "WanTransformer3DModel";
/// diffusers' class of the SkyReels-V2 transformer (Wan 2.1 with per-frame timesteps, an fps
/// embedding and a causal block mask).
pub const SKYREELS_V2_CLASS: &str = "SkyReelsV2Transformer3DModel";

fn default_frames_per_block() -> usize {
    1
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
    /// Parses and validates the text of a diffusers `config.json`; the error says what is wrong.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
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
        match self.class_name.as_deref() {
            None | Some(WAN_CLASS) if self.inject_sample_info || self.num_frame_per_block != 1 => {
                return Err(format!("inject_sample_info and num_frame_per_block are {SKYREELS_V2_CLASS} keys; _class_name is {:?}", self.class_name))
            }
            None | Some(WAN_CLASS) | Some(SKYREELS_V2_CLASS) => {}
            Some(other) => return Err(format!("_class_name {other:?} is not a model this implementation computes ({WAN_CLASS} or {SKYREELS_V2_CLASS})")),
        }
        if self.num_frame_per_block == 0 {
            return Err("num_frame_per_block must be positive".into());
        }
        Ok(())
    }

    /// Hidden size D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Multiply-adds per video token per block in the linear layers: self-attention q, k, v and
    /// out, cross-attention q and out (4D² + 2D²), the feed-forward in and out (2·D·F).
    pub fn token_weights(&self) -> u64 {
        let d = self.inner_dim() as u64;
        6 * d * d + 2 * d * self.ffn_dim as u64
    }

    /// Multiply-adds per query per visible key per block in self-attention: q·k and the weighted
    /// sum of v over every head (2·D).
    pub fn key_weights(&self) -> u64 {
        2 * self.inner_dim() as u64
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

    /// Whether this is a SkyReels-V2 model (diffusion forcing: per-frame timesteps, sinusoids
    /// computed in float64, the fps embedding when `inject_sample_info`).
    pub fn is_skyreels_v2(&self) -> bool {
        self.class_name.as_deref() == Some(SKYREELS_V2_CLASS)
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
        if self.inject_sample_info {
            n += 2 * d + lin(d, d) + lin(d, 6 * d);
        }
        n + self.num_layers * block + 2 * d + lin(d, self.patch_out())
    }
}

/// The released Wan 2.1 transformers, as their `config.json` says.
impl TransformerConfig {
    /// Wan 2.1 text-to-video 1.3B: hidden 1536 (12 heads of 128), FFN 8960, 30 layers.
    pub fn wan21_t2v_1_3b() -> Self {
        Self::wan21(12, 8960, 30)
    }

    /// Wan 2.1 text-to-video 14B: hidden 5120 (40 heads of 128), FFN 13824, 40 layers.
    pub fn wan21_t2v_14b() -> Self {
        Self::wan21(40, 13824, 40)
    }

    /// Wan 2.1 image-to-video 14B: the 14B transformer with 36 latent channels in (noise, mask and
    /// the encoded image) and CLIP image tokens (1280 wide) cross-attended.
    pub fn wan21_i2v_14b() -> Self {
        Self { in_channels: 36, image_dim: Some(1280), added_kv_proj_dim: Some(5120), ..Self::wan21_t2v_14b() }
    }

    /// A Wan 2.1 transformer of `heads` heads of 128, FFN width `ffn` and `layers` blocks.
    pub fn wan21(heads: usize, ffn: usize, layers: usize) -> Self {
        Self {
            patch_size: default_patch(),
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
            eps: default_eps(),
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: default_rope_len(),
            pos_embed_seq_len: None,
            class_name: None,
            inject_sample_info: false,
            num_frame_per_block: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_of_real_models() {
        // Figures from the reference (wan2.1.md §1.1).
        assert_eq!(TransformerConfig::wan21_t2v_1_3b().parameter_count(), 1_418_996_800);
        assert_eq!(TransformerConfig::wan21_t2v_14b().parameter_count(), 14_288_491_584);
        assert_eq!(TransformerConfig::wan21_i2v_14b().parameter_count(), 16_394_878_784);
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TransformerConfig::wan21_t2v_1_3b();
        assert!(c.validate().is_ok());
        c.qk_norm = Some("layer_norm".into());
        assert!(c.validate().unwrap_err().contains("qk_norm"));
        let mut c = TransformerConfig::wan21_t2v_1_3b();
        c.image_dim = Some(8);
        assert!(c.validate().unwrap_err().contains("added_kv_proj_dim"));
        assert!(TransformerConfig::from_json("{}").is_err());
        let json = serde_json::to_string(&TransformerConfig::wan21_i2v_14b()).unwrap();
        assert_eq!(TransformerConfig::from_json(&json).unwrap(), TransformerConfig::wan21_i2v_14b());
    }

    #[test]
    fn skyreels_keys_belong_to_skyreels() {
        let df = TransformerConfig {
            class_name: Some(SKYREELS_V2_CLASS.into()),
            inject_sample_info: true,
            num_frame_per_block: 2,
            ..TransformerConfig::wan21_t2v_1_3b()
        };
        assert!(df.validate().is_ok() && df.is_skyreels_v2());
        let json = serde_json::to_string(&df).unwrap();
        assert!(json.contains("\"_class_name\":\"SkyReelsV2Transformer3DModel\""), "{json}");
        assert_eq!(TransformerConfig::from_json(&json).unwrap(), df);
        // The fps embedding and projection: 2·D + (D² + D) + (6D² + 6D).
        let d = df.inner_dim();
        assert_eq!(df.parameter_count() - TransformerConfig::wan21_t2v_1_3b().parameter_count(), 2 * d + d * d + d + 6 * d * d + 6 * d);
        let wan_with_mask = TransformerConfig { num_frame_per_block: 2, ..TransformerConfig::wan21_t2v_1_3b() };
        assert!(wan_with_mask.validate().unwrap_err().contains("num_frame_per_block"));
        let other = TransformerConfig { class_name: Some("HunyuanVideoTransformer3DModel".into()), ..TransformerConfig::wan21_t2v_1_3b() };
        assert!(other.validate().unwrap_err().contains("_class_name"));
    }
}
