//! The image encoder's two configurations, validated: transformers' `CLIPVisionConfig`
//! (`image_encoder/config.json`) and `CLIPImageProcessor` (`image_processor/preprocessor_config.json`).

use crate::{Result, WorkerError};
use serde::Deserialize;
use std::path::Path;
use tessera_kernels::cpu::resample::Filter;

/// Hyper-parameters of a CLIP vision tower (field names as in transformers' `config.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of each MLP's hidden layer.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Side of the square input, in pixels.
    pub image_size: usize,
    /// Side of a square patch, in pixels.
    pub patch_size: usize,
    /// Input channels (RGB).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The MLP's activation: only `gelu` (exact, as Wan 2.1's ViT-H/14 uses) is served;
    /// transformers' default, OpenAI's `quick_gelu`, is refused by [`validate`](Self::validate).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}

impl ClipVisionConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.to_path_buf(), source })?;
        let bad = |detail: String| WorkerError::Config { path: path.display().to_string(), detail };
        let cfg: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks that the sizes make a model this crate runs, naming the key that does not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} must be positive"));
        }
        if self.num_channels != 3 {
            return Err(format!("num_channels is {}; the image encoder takes RGB (3)", self.num_channels));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        if self.hidden_act != "gelu" {
            return Err(format!("hidden_act {:?} is not served (Wan 2.1's image encoder uses exact \"gelu\")", self.hidden_act));
        }
        // The position table and every activation are sized from these; keep them sane.
        if self.image_size > 4096 || self.hidden_size > 16384 || self.intermediate_size > 65536 || self.num_hidden_layers > 256 {
            return Err("sizes past any CLIP vision tower (image_size ≤ 4096, hidden_size ≤ 16384, intermediate_size ≤ 65536, ≤ 256 layers)".into());
        }
        Ok(())
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches along a side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens of one image: the class token, then every patch (ViT-H/14 at 224: 257).
    pub fn tokens(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    /// Parameters of the vision tower (ViT-H/14: 631 M).
    pub fn parameter_count(&self) -> usize {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d;
        let embeddings = d * self.num_channels * self.patch_size * self.patch_size + d + self.tokens() * d;
        embeddings + 4 * d + self.num_hidden_layers * layer
    }
}

/// `size` of a `CLIPImageProcessor`: the short side after resizing.
#[derive(Clone, Debug, PartialEq, Deserialize)]
struct ShortestEdge {
    shortest_edge: usize,
}

/// `crop_size` of a `CLIPImageProcessor`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
struct CropSize {
    height: usize,
    width: usize,
}

/// The fields of `preprocessor_config.json` that a `CLIPImageProcessor` reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
struct RawProcessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: ShortestEdge,
    #[serde(default = "default_resample")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: CropSize,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "default_rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: [f32; 3],
    image_std: [f32; 3],
}

fn yes() -> bool {
    true
}
fn default_resample() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}

/// A `CLIPImageProcessor` as Wan 2.1 I2V's snapshot configures it: resize so the short side is
/// `shortest_edge`, center crop `crop` × `crop`, rescale by `rescale_factor`, normalise per
/// channel. Resizing and cropping are always on (the encoder takes one size); rescaling and
/// normalising follow the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipProcessorConfig {
    /// The short side after resizing.
    pub shortest_edge: usize,
    /// The resize filter (PIL's, from `resample`).
    pub filter: Filter,
    /// Side of the square crop.
    pub crop: usize,
    /// What 8-bit values are multiplied by (`None`: `do_rescale` off).
    pub rescale_factor: Option<f64>,
    /// Per-channel mean and std (`None`: `do_normalize` off).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ClipProcessorConfig {
    /// Reads and validates a `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.to_path_buf(), source })?;
        let bad = |detail: String| WorkerError::Config { path: path.display().to_string(), detail };
        let raw: RawProcessorConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !raw.do_resize || !raw.do_center_crop {
            return Err(bad("do_resize and do_center_crop must be on: the encoder takes one square size".into()));
        }
        let filter = Filter::from_pil_code(raw.resample).ok_or_else(|| bad(format!("resample {} is not served (3 bicubic, 1 Lanczos)", raw.resample)))?;
        if raw.crop_size.height != raw.crop_size.width || raw.crop_size.height == 0 {
            return Err(bad(format!("crop_size {}x{} is not a positive square", raw.crop_size.height, raw.crop_size.width)));
        }
        if raw.size.shortest_edge < raw.crop_size.height || raw.size.shortest_edge > 4096 {
            return Err(bad(format!("size.shortest_edge {} must be at least the crop ({}) and at most 4096", raw.size.shortest_edge, raw.crop_size.height)));
        }
        if raw.do_normalize && raw.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(format!("image_std {:?} must be positive", raw.image_std)));
        }
        Ok(Self {
            shortest_edge: raw.size.shortest_edge,
            filter,
            crop: raw.crop_size.height,
            rescale_factor: raw.do_rescale.then_some(raw.rescale_factor),
            normalize: raw.do_normalize.then_some((raw.image_mean, raw.image_std)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(path)
    }

    #[test]
    fn golden_configs_read_and_bad_ones_are_named() {
        let cfg = ClipVisionConfig::from_file(&golden("clip/enc-a/config.json")).unwrap();
        assert_eq!((cfg.tokens(), cfg.head_dim()), (5, 8));
        let proc = ClipProcessorConfig::from_file(&golden("clip/enc-a/preprocessor_config.json")).unwrap();
        assert_eq!((proc.shortest_edge, proc.crop, proc.filter), (28, 28, Filter::Bicubic));
        let quick = ClipVisionConfig { hidden_act: "quick_gelu".into(), ..cfg.clone() };
        assert!(quick.validate().unwrap_err().contains("hidden_act"));
        let odd = ClipVisionConfig { image_size: 30, ..cfg.clone() };
        assert!(odd.validate().unwrap_err().contains("patch_size"));
        // ViT-H/14 at 224, as Wan2.1-I2V-14B's image_encoder: 631 M parameters.
        let h14 = ClipVisionConfig { hidden_size: 1280, intermediate_size: 5120, num_hidden_layers: 32, num_attention_heads: 16, image_size: 224, ..cfg };
        assert_eq!(h14.tokens(), 257);
        assert_eq!(h14.parameter_count(), 630_766_080);
    }
}
