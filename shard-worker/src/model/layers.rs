//! Host-side f32 layers (PyTorch `nn.Linear` layout): the time and image embedders' small host
//! parts and the UMT5 text encoder.

use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::cpu::{self, Activation};

/// `y = x·Wᵀ + b` with `W` stored `[out, in]`.
pub struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
    pub fn load(src: &dyn WeightSource, prefix: &str, in_features: usize, out_features: usize) -> Result<Self> {
        let weight = src.tensor(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = Some(src.tensor(&format!("{prefix}.bias"), &[out_features])?);
        Ok(Self { weight, bias, in_features, out_features })
    }

    /// A layer from an already-loaded weight `[out, in]` (row-major) and bias `[out]`.
    pub fn from_parts(weight: Vec<f32>, bias: Option<Vec<f32>>, in_features: usize, out_features: usize) -> Self {
        debug_assert_eq!(weight.len(), in_features * out_features);
        Self { weight, bias, in_features, out_features }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Applies the layer to `rows` rows of `x` (`[rows, in]`), then `act`.
    pub fn forward(&self, x: &[f32], rows: usize, act: Activation) -> Result<Vec<f32>> {
        Ok(cpu::linear(x, rows, self.in_features, &self.weight, self.out_features, self.bias.as_deref(), act)?)
    }
}

/// LayerNorm with an elementwise affine (weight and bias).
pub struct AffineLayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl AffineLayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self { weight: src.tensor(&format!("{prefix}.weight"), &[dim])?, bias: src.tensor(&format!("{prefix}.bias"), &[dim])?, eps })
    }

    /// Normalises every row of `x`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let p = cpu::LayerNormParams { eps: self.eps, weight: Some(&self.weight), bias: Some(&self.bias), ..Default::default() };
        Ok(cpu::layer_norm(x, self.weight.len(), &p)?)
    }
}
