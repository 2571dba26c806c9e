//! Device-resident parameters of the bf16 transformer, read from the same [`WeightSource`] as the
//! CPU model (every name and shape is checked by the source) and stored as diffusers keeps them
//! when it loads the transformer in bf16 (wan2.1.md §1.4): matrices and biases in bf16, and f32
//! for what `_keep_in_fp32_modules` keeps (modulation tables, the affine cross-attention norm).

use super::ops::{at_mut, At, AtMut, Ops};
use crate::weights::WeightSource;
use crate::Result;
use half::bf16;
use tessera_kernels::cpu::Activation;

/// Rounds each value to bf16 (to nearest even), returning the bf16 values.
pub(crate) fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Rounds each value to the nearest bf16, keeping f32 storage (host-side emulation of a bf16 tensor).
pub(crate) fn round_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

/// `nn.Linear` on the device: weight `[out, in]` and bias `[out]`, both bf16.
pub(crate) struct DeviceLinear<O: Ops> {
    weight: O::Buf<bf16>,
    bias: O::Buf<bf16>,
    in_features: usize,
    out_features: usize,
}

impl<O: Ops> DeviceLinear<O> {
    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
    pub(crate) fn load(ops: &O, src: &dyn WeightSource, prefix: &str, in_features: usize, out_features: usize) -> Result<Self> {
        Self::load_stacked(ops, src, &[prefix], in_features, out_features)
    }

    /// Loads layers that read the same input (each `[out, in]`) as one layer whose output row is
    /// their outputs side by side, in the order given: `to_q`, `to_k`, `to_v` become one fused
    /// projection writing `[q | k | v]` rows.
    pub(crate) fn load_stacked(ops: &O, src: &dyn WeightSource, prefixes: &[&str], in_features: usize, out_features: usize) -> Result<Self> {
        let mut weight = Vec::with_capacity(prefixes.len() * out_features * in_features);
        let mut bias = Vec::with_capacity(prefixes.len() * out_features);
        for p in prefixes {
            weight.extend(to_bf16(&src.tensor(&format!("{p}.weight"), &[out_features, in_features])?));
            bias.extend(to_bf16(&src.tensor(&format!("{p}.bias"), &[out_features])?));
        }
        Ok(Self { weight: ops.upload(&weight)?, bias: ops.upload(&bias)?, in_features, out_features: prefixes.len() * out_features })
    }

    /// A layer from host parameters `[out, in]` and `[out]` (rounded to bf16).
    pub(crate) fn from_host(ops: &O, weight: &[f32], bias: &[f32], in_features: usize, out_features: usize) -> Result<Self> {
        Ok(Self { weight: ops.upload(&to_bf16(weight))?, bias: ops.upload(&to_bf16(bias))?, in_features, out_features })
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// `y = act(x·Wᵀ + b)` for `rows` packed rows of `x` (from its offset) into packed rows of `y`.
    pub(crate) fn forward(&self, ops: &O, x: At<'_, O::Buf<bf16>>, rows: usize, act: Activation, y: AtMut<'_, O::Buf<bf16>>) -> Result<()> {
        ops.linear(x, rows, self.in_features, &self.weight, self.out_features, Some(&self.bias), act, y)
    }

    /// As [`forward`](Self::forward), into a new buffer `[rows, out]`.
    pub(crate) fn forward_new(&self, ops: &O, x: At<'_, O::Buf<bf16>>, rows: usize, act: Activation) -> Result<O::Buf<bf16>> {
        let mut y = ops.zeros::<bf16>(rows * self.out_features)?;
        self.forward(ops, x, rows, act, at_mut(&mut y, 0))?;
        Ok(y)
    }
}

/// An f32 parameter uploaded as is (`_keep_in_fp32_modules`: modulation tables, `norm2`).
pub(crate) fn load_f32<O: Ops>(ops: &O, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<O::Buf<f32>> {
    ops.upload(&src.tensor(name, shape)?)
}

/// A parameter diffusers holds in bf16 that a kernel reads as f32 (the q/k RMSNorm weights):
/// uploaded as f32 holding the bf16-rounded values.
pub(crate) fn load_bf16_as_f32<O: Ops>(ops: &O, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<O::Buf<f32>> {
    let mut v = src.tensor(name, shape)?;
    round_bf16(&mut v);
    ops.upload(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cuda::HostOps;
    use crate::weights::RandomWeights;

    #[test]
    fn stacked_layers_equal_separate_ones() {
        let (ops, src) = (HostOps, RandomWeights::new(3));
        let fused = DeviceLinear::load_stacked(&ops, &src, &["a", "b"], 8, 4).unwrap();
        let (a, b) = (DeviceLinear::load(&ops, &src, "a", 8, 4).unwrap(), DeviceLinear::load(&ops, &src, "b", 8, 4).unwrap());
        let x = to_bf16(&(0..24).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>());
        let y = fused.forward_new(&ops, super::super::ops::at(&x, 0), 3, Activation::None).unwrap();
        let ya = a.forward_new(&ops, super::super::ops::at(&x, 0), 3, Activation::None).unwrap();
        let yb = b.forward_new(&ops, super::super::ops::at(&x, 0), 3, Activation::None).unwrap();
        for r in 0..3 {
            assert_eq!(&y[r * 8..r * 8 + 4], &ya[r * 4..r * 4 + 4]);
            assert_eq!(&y[r * 8 + 4..r * 8 + 8], &yb[r * 4..r * 4 + 4]);
        }
        assert_eq!(fused.out_features(), 8);
    }
}
