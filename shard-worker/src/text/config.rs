//! The UMT5 encoder's configuration: transformers' `UMT5Config` `config.json`, validated.

use crate::{Result, WorkerError};
use serde::Deserialize;
use std::path::Path;

/// Hyper-parameters of a UMT5 encoder (field names as in transformers' `config.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Umt5Config {
    /// Hidden width.
    pub d_model: usize,
    /// Channels per attention head.
    pub d_kv: usize,
    /// Hidden width of the gated feed-forward layers.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets (both directions together).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance from which all relative positions share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Feed-forward kind: only `gated-gelu` (GELU with the tanh approximation) is supported.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// `umt5` when present (T5 proper shares one position bias across layers).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Must be false: only the encoder stack exists here.
    #[serde(default)]
    pub is_decoder: bool,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "gated-gelu".into()
}

impl Umt5Config {
    /// Parameters of the encoder: per layer the attention's q, k, v, out, its relative position
    /// bias, the gated feed-forward (two inputs, one output) and two norms; the embedding and the
    /// final norm (UMT5-XXL: 5.68 B).
    pub fn encoder_parameter_count(&self) -> usize {
        let (d, inner) = (self.d_model, self.num_heads * self.d_kv);
        let layer = 4 * d * inner + self.relative_attention_num_buckets * self.num_heads + 3 * d * self.d_ff + 2 * d;
        self.num_layers * layer + self.vocab_size * d + d
    }

    /// Reads and validates a transformers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            WorkerError::Config { detail, .. } => WorkerError::Config { path: path.display().to_string(), detail },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let config_error = |detail: String| WorkerError::Config { path: "UMT5 config.json".into(), detail };
        let cfg: Self = serde_json::from_str(text).map_err(|e| config_error(e.to_string()))?;
        cfg.validate().map_err(config_error)?;
        Ok(cfg)
    }

    /// Checks that the configuration describes a model this implementation computes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            ("vocab_size", self.vocab_size),
            ("relative_attention_max_distance", self.relative_attention_max_distance),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if let Some(kind) = self.model_type.as_deref() {
            if kind != "umt5" {
                return Err(format!("model_type {kind:?} is not supported (only \"umt5\": one relative position bias per layer)"));
            }
        }
        if self.is_decoder {
            return Err("is_decoder is true; only the UMT5 encoder is implemented".into());
        }
        if !matches!(self.feed_forward_proj.as_str(), "gated-gelu" | "gated-gelu_new") {
            return Err(format!("feed_forward_proj {:?} is not supported (only \"gated-gelu\", GELU with the tanh approximation)", self.feed_forward_proj));
        }
        // Bidirectional buckets: half per direction, and half of those exact.
        if self.relative_attention_num_buckets < 4 || self.relative_attention_num_buckets.checked_rem(4) != Some(0) {
            return Err(format!("relative_attention_num_buckets {} must be a positive multiple of 4", self.relative_attention_num_buckets));
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err(format!(
                "relative_attention_max_distance {} must exceed the exact range {} of the buckets",
                self.relative_attention_max_distance,
                self.relative_attention_num_buckets / 4
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(format!("layer_norm_epsilon {} must be finite and non-negative", self.layer_norm_epsilon));
        }
        Ok(())
    }

    /// Width of the attention projections: heads × d_kv.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// `google/umt5-xxl` as used by every Wan 2.1 model (for benchmarks with random weights).
    pub fn umt5_xxl() -> Self {
        Self {
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            vocab_size: 256_384,
            model_type: Some("umt5".into()),
            is_decoder: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "vocab_size": 200,
        "model_type": "umt5", "dense_act_fn": "gelu_new", "is_encoder_decoder": true}"#;

    fn with(key: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    fn error_of(text: &str) -> String {
        Umt5Config::from_json(text).expect_err("must be rejected").to_string()
    }

    #[test]
    fn reads_a_transformers_config() {
        let c = Umt5Config::from_json(TINY).unwrap();
        assert_eq!((c.d_model, c.inner_dim(), c.d_ff, c.num_layers, c.vocab_size), (32, 32, 64, 2, 200));
        assert!(Umt5Config::umt5_xxl().validate().is_ok());
    }

    #[test]
    fn rejects_unsupported_settings_with_the_reason() {
        assert!(error_of(&with("feed_forward_proj", r#""relu""#)).contains("feed_forward_proj \"relu\""));
        assert!(error_of(&with("feed_forward_proj", r#""gated-silu""#)).contains("gated-silu"));
        assert!(error_of(&with("model_type", r#""t5""#)).contains("model_type \"t5\""));
        assert!(error_of(&with("is_decoder", "true")).contains("is_decoder"));
        assert!(error_of(&with("num_heads", "0")).contains("num_heads must be positive"));
        assert!(error_of(&with("relative_attention_num_buckets", "30")).contains("multiple of 4"));
        assert!(error_of(&with("relative_attention_max_distance", "8")).contains("relative_attention_max_distance 8"));
        let mut missing: serde_json::Value = serde_json::from_str(TINY).unwrap();
        missing.as_object_mut().unwrap().remove("d_model");
        assert!(error_of(&missing.to_string()).contains("d_model"));
    }

    #[test]
    fn file_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        std::fs::write(&path, with("feed_forward_proj", r#""gated-relu""#)).unwrap();
        let err = Umt5Config::from_file(&path).err().unwrap().to_string();
        assert!(err.contains("config.json") && err.contains("gated-relu"), "{err}");
        assert!(Umt5Config::from_file(&tmp.path().join("absent.json")).is_err());
    }
}
