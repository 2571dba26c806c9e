//! Device-resident parameters of the transformer, read from a [`WeightSource`] (every name and
//! shape is checked by the source) and stored as diffusers keeps them (wan2.1.md §1.4): matrices
//! and biases as the backend's `Act` (bf16 when diffusers loads the transformer in bf16), and f32
//! for what `_keep_in_fp32_modules` keeps (modulation tables, the affine cross-attention norm).

use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::backend::{at, at_mut, ActBuf, At, AtMut, Elem, Ops};
use tessera_kernels::cpu::Activation;

/// Each value as `T` holds it (rounded to nearest even for bf16), returning the `T` values.
pub(crate) fn convert<T: Elem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// Rounds each value to what `T` holds, keeping f32 storage (host-side emulation of a `T` tensor;
/// nothing changes for f32).
pub(crate) fn round_to<T: Elem>(x: &mut [f32]) {
    if T::BYTES != 4 {
        x.iter_mut().for_each(|v| *v = T::round(*v));
    }
}

/// Rounds the first `n` values of the f32 buffer `x` to what `Act` holds (through `scratch`), as
/// a model run in bf16 stores its residual stream after every addition; nothing for f32.
pub(crate) fn round_stream<O: Ops>(ops: &O, x: &mut O::Buf<f32>, scratch: &mut ActBuf<O>, n: usize) -> Result<()> {
    if !tessera_kernels::backend::stores_f32::<O>() {
        ops.narrow(at(x, 0), at_mut(scratch, 0), n)?;
        ops.widen(at(scratch, 0), at_mut(x, 0), n)?;
    }
    Ok(())
}

/// `nn.Linear` on the device: weight `[out, in]` and bias `[out]` (if the layer has one), both `Act`.
pub(crate) struct DeviceLinear<O: Ops> {
    weight: O::Buf<O::Act>,
    bias: Option<O::Buf<O::Act>>,
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
        let weights: Vec<String> = prefixes.iter().map(|p| format!("{p}.weight")).collect();
        let biases: Vec<String> = prefixes.iter().map(|p| format!("{p}.bias")).collect();
        let weight = stacked::<O>(ops, src, &weights, &[out_features, in_features])?;
        let bias = stacked::<O>(ops, src, &biases, &[out_features])?;
        Ok(Self { weight, bias: Some(bias), in_features, out_features: prefixes.len() * out_features })
    }

    /// Loads bias-free layers (`nn.Linear(bias=False)`) that read the same input, stacked as
    /// [`load_stacked`](Self::load_stacked) stacks them; `weights` are the tensors' full names.
    pub(crate) fn load_unbiased(ops: &O, src: &dyn WeightSource, weights: &[&str], in_features: usize, out_features: usize) -> Result<Self> {
        let weight = stacked::<O>(ops, src, weights, &[out_features, in_features])?;
        Ok(Self { weight, bias: None, in_features, out_features: weights.len() * out_features })
    }

    /// A layer from host parameters `[out, in]` and, if it has one, `[out]` (stored as `Act`).
    pub(crate) fn from_host(ops: &O, weight: &[f32], bias: Option<&[f32]>, in_features: usize, out_features: usize) -> Result<Self> {
        let bias = bias.map(|b| ops.upload(&convert::<O::Act>(b))).transpose()?;
        Ok(Self { weight: ops.upload(&convert::<O::Act>(weight))?, bias, in_features, out_features })
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    /// `y = act(x·Wᵀ + b)` for `rows` packed rows of `x` (from its offset) into packed rows of `y`.
    pub(crate) fn forward(&self, ops: &O, x: At<'_, O::Buf<O::Act>>, rows: usize, act: Activation, y: AtMut<'_, O::Buf<O::Act>>) -> Result<()> {
        Ok(ops.linear(x, rows, self.in_features, &self.weight, self.out_features, self.bias.as_ref(), act, y)?)
    }

    /// As [`forward`](Self::forward), into a new buffer `[rows, out]`.
    pub(crate) fn forward_new(&self, ops: &O, x: At<'_, O::Buf<O::Act>>, rows: usize, act: Activation) -> Result<O::Buf<O::Act>> {
        let mut y = ops.zeros::<O::Act>(rows * self.out_features)?;
        self.forward(ops, x, rows, act, at_mut(&mut y, 0))?;
        Ok(y)
    }
}

/// Tensors `names` (each of `shape`) one after the other, stored as `Act` on the device. A single
/// tensor is moved, not copied, into a host backend's storage (weights as large as UMT5's 4 GB
/// embedding are held once).
fn stacked<O: Ops>(ops: &O, src: &dyn WeightSource, names: &[impl AsRef<str>], shape: &[usize]) -> Result<ActBuf<O>> {
    let values = match names {
        [one] => src.tensor(one.as_ref(), shape)?,
        _ => {
            let mut all = Vec::with_capacity(names.len() * shape.iter().product::<usize>());
            for name in names {
                all.extend(src.tensor(name.as_ref(), shape)?);
            }
            all
        }
    };
    Ok(ops.upload_vec(O::Act::vec_from_f32(values))?)
}

/// An f32 parameter uploaded as is (`_keep_in_fp32_modules`: modulation tables, `norm2`).
pub(crate) fn load_f32<O: Ops>(ops: &O, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<O::Buf<f32>> {
    Ok(ops.upload_vec(src.tensor(name, shape)?)?)
}

/// A parameter diffusers holds as `Act` that a kernel reads as f32 (the q/k RMSNorm weights):
/// uploaded as f32 holding the values rounded to `Act`.
pub(crate) fn load_rounded<O: Ops>(ops: &O, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<O::Buf<f32>> {
    let mut v = src.tensor(name, shape)?;
    round_to::<O::Act>(&mut v);
    Ok(ops.upload_vec(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::RandomWeights;
    use tessera_kernels::backend::HostOps;

    #[test]
    fn stacked_layers_equal_separate_ones() {
        let (ops, src) = (HostOps, RandomWeights::new(3));
        let fused = DeviceLinear::load_stacked(&ops, &src, &["a", "b"], 8, 4).unwrap();
        let (a, b) = (DeviceLinear::load(&ops, &src, "a", 8, 4).unwrap(), DeviceLinear::load(&ops, &src, "b", 8, 4).unwrap());
        let x = convert::<half::bf16>(&(0..24).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>());
        let y = fused.forward_new(&ops, tessera_kernels::backend::at(&x, 0), 3, Activation::None).unwrap();
        let ya = a.forward_new(&ops, tessera_kernels::backend::at(&x, 0), 3, Activation::None).unwrap();
        let yb = b.forward_new(&ops, tessera_kernels::backend::at(&x, 0), 3, Activation::None).unwrap();
        for r in 0..3 {
            assert_eq!(&y[r * 8..r * 8 + 4], &ya[r * 4..r * 4 + 4]);
            assert_eq!(&y[r * 8 + 4..r * 8 + 8], &yb[r * 4..r * 4 + 4]);
        }
        assert_eq!(fused.out_features(), 8);
    }
}
