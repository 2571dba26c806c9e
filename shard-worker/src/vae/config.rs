//! The VAE's configuration: diffusers' `AutoencoderKLWan` `vae/config.json`, validated (the Wan 2.1
//! structure only), plus built-in presets used with random weights.

use crate::{Result, WorkerError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters of a Wan 2.1 VAE (field names as in diffusers' `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Width of the first encoder stage and of the last decoder stage (96 in Wan 2.1).
    pub base_dim: usize,
    /// Latent channels (16 in Wan 2.1).
    pub z_dim: usize,
    /// Width multipliers of the stages (`[1, 2, 4, 4]`); one spatial ×2 between consecutive stages.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder stage (the decoder has one more per stage).
    pub num_res_blocks: usize,
    /// Scales with attention inside the stages; Wan 2.1 has none, and none are supported.
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// Which encoder downsamples also halve time (`[false, true, true]`); the decoder uses the reverse.
    pub temperal_downsample: Vec<bool>,
    /// Video channels into the encoder.
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    /// Video channels out of the decoder.
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    /// Per-channel latent mean (normalisation: `z_norm = (μ − mean) / std`).
    pub latents_mean: Vec<f64>,
    /// Per-channel latent standard deviation.
    pub latents_std: Vec<f64>,
    /// Wan 2.2's residual up/down blocks: only `false` is supported.
    #[serde(default)]
    pub is_residual: bool,
    /// Wan 2.2's pixel patching: only `null` is supported.
    #[serde(default)]
    pub patch_size: Option<serde_json::Value>,
    /// A decoder width other than `base_dim` (Wan 2.2): only `null` or `base_dim` is supported.
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    /// Informational: must equal 2^(number of temporal downsamples) when given.
    #[serde(default)]
    pub scale_factor_temporal: Option<usize>,
    /// Informational: must equal 2^(number of stages − 1) when given.
    #[serde(default)]
    pub scale_factor_spatial: Option<usize>,
    /// Dropout of the residual blocks (inactive at inference).
    #[serde(default)]
    pub dropout: f64,
}

fn default_rgb() -> usize {
    3
}

impl VaeConfig {
    /// Reads and validates a diffusers `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
        let bad = |detail: String| WorkerError::Config { path: path.display().to_string(), detail };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) {
            if class != "AutoencoderKLWan" {
                return Err(bad(format!("_class_name {class:?}: only AutoencoderKLWan is supported")));
            }
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks that the configuration describes a VAE this implementation computes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [("base_dim", self.base_dim), ("z_dim", self.z_dim), ("in_channels", self.in_channels), ("out_channels", self.out_channels)];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.dim_mult.len() < 2 || self.dim_mult.contains(&0) {
            return Err(format!("dim_mult {:?} must have at least two positive entries", self.dim_mult));
        }
        if self.temperal_downsample.len() != self.dim_mult.len() - 1 {
            return Err(format!(
                "temperal_downsample has {} entries, dim_mult {:?} needs {}",
                self.temperal_downsample.len(),
                self.dim_mult,
                self.dim_mult.len() - 1
            ));
        }
        if self.temporal_downsamples() > 2 {
            return Err(format!("temperal_downsample {:?}: at most two temporal downsamples are supported (chunks of 4 frames)", self.temperal_downsample));
        }
        if !self.attn_scales.is_empty() {
            return Err(format!("attn_scales {:?}: attention inside the stages is not supported (Wan 2.1 has none)", self.attn_scales));
        }
        if self.is_residual {
            return Err("is_residual = true (Wan 2.2 VAE) is not supported".into());
        }
        if self.patch_size.as_ref().is_some_and(|p| !p.is_null()) {
            return Err("patch_size (Wan 2.2 VAE) is not supported; it must be null".into());
        }
        if self.decoder_base_dim.is_some_and(|d| d != self.base_dim) {
            return Err(format!("decoder_base_dim {:?} different from base_dim {} is not supported", self.decoder_base_dim, self.base_dim));
        }
        // Upsampling halves the width of each stage's output; the next stage must have an even width.
        let dec = self.decoder_dims();
        if dec[1..dec.len() - 1].iter().any(|d| !d.is_multiple_of(2)) {
            return Err(format!("base_dim {} and dim_mult {:?} give an odd decoder width, which cannot be halved", self.base_dim, self.dim_mult));
        }
        for (name, v) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if v.len() != self.z_dim {
                return Err(format!("{name} has {} entries, z_dim is {}", v.len(), self.z_dim));
            }
        }
        if let Some(s) = self.latents_std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!("latents_std holds {s}, every entry must be positive"));
        }
        if self.latents_mean.iter().any(|m| !m.is_finite()) {
            return Err("latents_mean must be finite".into());
        }
        if let Some(t) = self.scale_factor_temporal.filter(|&t| t != self.temporal_factor()) {
            return Err(format!(
                "scale_factor_temporal {t} disagrees with temperal_downsample {:?} (factor {})",
                self.temperal_downsample,
                self.temporal_factor()
            ));
        }
        if let Some(s) = self.scale_factor_spatial.filter(|&s| s != self.spatial_factor()) {
            return Err(format!("scale_factor_spatial {s} disagrees with dim_mult {:?} (factor {})", self.dim_mult, self.spatial_factor()));
        }
        Ok(())
    }

    /// Number of encoder stages that also halve time.
    pub fn temporal_downsamples(&self) -> usize {
        self.temperal_downsample.iter().filter(|&&d| d).count()
    }

    /// Frames per latent frame (after the first): 4 in Wan 2.1.
    pub fn temporal_factor(&self) -> usize {
        1 << self.temporal_downsamples()
    }

    /// Pixels per latent pixel along each spatial axis: 8 in Wan 2.1.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Encoder stage widths: `base_dim · [1, dim_mult…]`.
    pub fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1).chain(self.dim_mult.iter().copied()).map(|m| m * self.base_dim).collect()
    }

    /// Decoder stage widths: `base_dim · [dim_mult[-1], reversed dim_mult…]`.
    pub fn decoder_dims(&self) -> Vec<usize> {
        let last = *self.dim_mult.last().unwrap_or(&1);
        std::iter::once(last).chain(self.dim_mult.iter().rev().copied()).map(|m| m * self.base_dim).collect()
    }

    /// Video frames decoded from `latent_frames` latent frames: `1 + factor·(T − 1)`.
    pub fn video_frames(&self, latent_frames: usize) -> usize {
        if latent_frames == 0 {
            0
        } else {
            1 + self.temporal_factor() * (latent_frames - 1)
        }
    }

    /// Number of parameters of encoder plus decoder (and the two 1×1×1 quant convs).
    pub fn parameter_count(&self) -> usize {
        let conv = |i: usize, o: usize, k: usize| i * o * k + o;
        let res = |i: usize, o: usize| i + o + conv(i, o, 27) + conv(o, o, 27) + if i != o { conv(i, o, 1) } else { 0 };
        let attn = |c: usize| c + conv(c, 3 * c, 1) + conv(c, c, 1);
        let mid = |c: usize| 2 * res(c, c) + attn(c);
        let (enc, dec) = (self.encoder_dims(), self.decoder_dims());
        let mut n = conv(self.in_channels, enc[0], 27);
        for i in 0..self.dim_mult.len() {
            let (mut cin, cout) = (enc[i], enc[i + 1]);
            for _ in 0..self.num_res_blocks {
                n += res(cin, cout);
                cin = cout;
            }
            if i + 1 < self.dim_mult.len() {
                n += conv(cout, cout, 9) + if self.temperal_downsample[i] { conv(cout, cout, 3) } else { 0 };
            }
        }
        let top = *enc.last().unwrap_or(&0);
        n += mid(top) + top + conv(top, 2 * self.z_dim, 27) + conv(2 * self.z_dim, 2 * self.z_dim, 1);
        n += conv(self.z_dim, self.z_dim, 1) + conv(self.z_dim, dec[0], 27) + mid(dec[0]);
        let upsample = self.decoder_temporal_upsample();
        for i in 0..self.dim_mult.len() {
            let (mut cin, cout) = (if i > 0 { dec[i] / 2 } else { dec[i] }, dec[i + 1]);
            for _ in 0..=self.num_res_blocks {
                n += res(cin, cout);
                cin = cout;
            }
            if i + 1 < self.dim_mult.len() {
                n += conv(cout, cout / 2, 9) + if upsample[i] { conv(cout, 2 * cout, 3) } else { 0 };
            }
        }
        let last = *dec.last().unwrap_or(&0);
        n + last + conv(last, self.out_channels, 27)
    }

    /// Which decoder stages also double time: `temperal_downsample` reversed.
    pub fn decoder_temporal_upsample(&self) -> Vec<bool> {
        self.temperal_downsample.iter().rev().copied().collect()
    }
}

/// Built-in configurations, used with deterministic random weights for tests and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaePreset {
    /// Base width 4, 4 latent channels: the Wan 2.1 structure, small enough for unit tests.
    Tiny,
    /// The real Wan 2.1 VAE (base width 96, 16 latent channels, ≈127 M parameters).
    Wan21,
}

impl VaePreset {
    /// Every preset, with its name.
    pub const ALL: [(&'static str, VaePreset); 2] = [("tiny", Self::Tiny), ("wan2.1-vae", Self::Wan21)];

    /// Looks a preset up by name.
    pub fn from_name(name: &str) -> Result<Self> {
        crate::transformer_config::preset_by_name(&Self::ALL, name, "VAE preset")
    }

    /// The preset's name.
    pub fn name(self) -> &'static str {
        crate::transformer_config::preset_name(&Self::ALL, self)
    }

    /// The configuration.
    pub fn config(self) -> VaeConfig {
        let wan = VaeConfig {
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            in_channels: 3,
            out_channels: 3,
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
            is_residual: false,
            patch_size: None,
            decoder_base_dim: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
            dropout: 0.0,
        };
        match self {
            Self::Wan21 => wan,
            Self::Tiny => VaeConfig { base_dim: 4, z_dim: 4, latents_mean: wan.latents_mean[..4].to_vec(), latents_std: wan.latents_std[..4].to_vec(), ..wan },
        }
    }
}

/// Wan 2.1's per-channel latent mean (reference §4.1).
pub const WAN21_LATENTS_MEAN: [f64; 16] =
    [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921];
/// Wan 2.1's per-channel latent standard deviation (reference §4.1).
pub const WAN21_LATENTS_STD: [f64; 16] =
    [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan21_structure() {
        let c = VaePreset::Wan21.config();
        assert!(c.validate().is_ok());
        assert_eq!(c.encoder_dims(), vec![96, 96, 192, 384, 384]);
        assert_eq!(c.decoder_dims(), vec![384, 384, 384, 192, 96]);
        assert_eq!(c.decoder_temporal_upsample(), vec![true, true, false]);
        assert_eq!((c.temporal_factor(), c.spatial_factor()), (4, 8));
        assert_eq!(c.video_frames(3), 9);
        // reference §4.1: about 126.9 M parameters in total
        let n = c.parameter_count();
        assert!((126_000_000..127_500_000).contains(&n), "{n}");
    }

    #[test]
    fn unsupported_configurations_are_named() {
        let ok = VaePreset::Tiny.config();
        assert!(ok.validate().is_ok());
        let cases: Vec<(VaeConfig, &str)> = vec![
            (VaeConfig { is_residual: true, ..ok.clone() }, "is_residual"),
            (VaeConfig { patch_size: Some(serde_json::json!(2)), ..ok.clone() }, "patch_size"),
            (VaeConfig { attn_scales: vec![0.5], ..ok.clone() }, "attn_scales"),
            (VaeConfig { decoder_base_dim: Some(8), ..ok.clone() }, "decoder_base_dim"),
            (VaeConfig { temperal_downsample: vec![false, true], ..ok.clone() }, "temperal_downsample"),
            (VaeConfig { temperal_downsample: vec![true, true, true], scale_factor_temporal: None, ..ok.clone() }, "at most two"),
            (VaeConfig { latents_std: vec![1.0; 3], ..ok.clone() }, "latents_std"),
            (VaeConfig { latents_std: vec![1.0, 0.0, 1.0, 1.0], ..ok.clone() }, "latents_std"),
            (VaeConfig { scale_factor_spatial: Some(16), ..ok.clone() }, "scale_factor_spatial"),
            (VaeConfig { z_dim: 0, ..ok.clone() }, "z_dim"),
            (VaeConfig { base_dim: 3, dim_mult: vec![1, 1, 1, 1], ..ok.clone() }, "odd"),
        ];
        for (cfg, word) in cases {
            let err = cfg.validate().expect_err(word);
            assert!(err.contains(word), "{word}: {err}");
        }
        assert!(VaePreset::from_name("huge").is_err());
        assert_eq!(VaePreset::from_name("wan2.1-vae").unwrap(), VaePreset::Wan21);
    }

    #[test]
    fn reads_a_diffusers_config_and_rejects_other_classes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        let mut v = serde_json::to_value(VaePreset::Wan21.config()).unwrap();
        v["_class_name"] = "AutoencoderKLWan".into();
        v["_diffusers_version"] = "0.42.1".into();
        v["patch_size"] = serde_json::Value::Null;
        std::fs::write(&path, v.to_string()).unwrap();
        assert_eq!(VaeConfig::from_file(&path).unwrap(), VaePreset::Wan21.config());
        v["_class_name"] = "AutoencoderKL".into();
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(VaeConfig::from_file(&path).unwrap_err().to_string().contains("AutoencoderKLWan"));
        v["_class_name"] = "AutoencoderKLWan".into();
        v["is_residual"] = true.into();
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(VaeConfig::from_file(&path).unwrap_err().to_string().contains("is_residual"));
    }
}
