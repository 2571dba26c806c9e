//! The transformer's configuration: diffusers' `WanTransformer3DModel` `config.json`, validated,
//! plus built-in presets (real Wan 2.1 widths, tiny test sizes) used with random weights.

use crate::{Result, WorkerError};
use std::path::Path;

pub use tessera_cluster::transformer_config::TransformerConfig;

/// Reads and validates a diffusers `config.json`.
pub fn read_config(path: &Path) -> Result<TransformerConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
    TransformerConfig::from_json(&text).map_err(|detail| WorkerError::Config { path: path.display().to_string(), detail })
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
    /// [`Self::Tiny`] as SkyReels-V2's diffusion-forcing transformer (fps embedding, causal
    /// blocks of one frame).
    TinyDf,
    /// [`Self::Tiny`] as Wan 2.1 I2V's transformer: 36 channels in (noise, mask, image latents)
    /// and the image cross-attention over a 32-wide image encoder's tokens.
    TinyI2v,
}

impl TransformerPreset {
    /// Every preset, with its name.
    pub const ALL: [(&'static str, TransformerPreset); 6] = [
        ("tiny", Self::Tiny),
        ("wan-1.3b-2l", Self::Wan13bTwoLayers),
        ("wan-1.3b", Self::Wan13b),
        ("wan-14b-2l", Self::Wan14bTwoLayers),
        ("tiny-df", Self::TinyDf),
        ("tiny-i2v", Self::TinyI2v),
    ];

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
        let wan = TransformerConfig::wan21;
        match self {
            Self::Tiny => TransformerConfig { num_attention_heads: 2, attention_head_dim: 16, text_dim: 32, freq_dim: 32, ..wan(2, 64, 2) },
            Self::Wan13bTwoLayers => wan(12, 8960, 2),
            Self::Wan13b => TransformerConfig::wan21_t2v_1_3b(),
            Self::Wan14bTwoLayers => wan(40, 13824, 2),
            Self::TinyDf => TransformerConfig {
                class_name: Some(tessera_cluster::transformer_config::SKYREELS_V2_CLASS.into()),
                inject_sample_info: true,
                num_frame_per_block: 1,
                ..Self::Tiny.config()
            },
            Self::TinyI2v => {
                let tiny = Self::Tiny.config();
                TransformerConfig { in_channels: 2 * tiny.out_channels + 4, image_dim: Some(32), added_kv_proj_dim: Some(tiny.inner_dim()), ..tiny }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_wan_shapes() {
        assert_eq!(TransformerPreset::Wan13b.config(), TransformerConfig::wan21_t2v_1_3b());
        assert!(TransformerPreset::ALL.iter().all(|(_, p)| p.config().validate().is_ok()));
    }

    #[test]
    fn presets_by_name() {
        assert!(TransformerPreset::from_name("huge").is_err());
        assert_eq!(TransformerPreset::from_name("wan-1.3b-2l").unwrap().config().inner_dim(), 1536);
    }
}
