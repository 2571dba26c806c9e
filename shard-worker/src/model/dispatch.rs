//! One transformer type for callers that pick the device at run time: the f32 CPU model or the
//! bf16 CUDA model behind one enum, loaded from the same files and presets, with one `forward`.

use super::cuda::{CudaOps, CudaWanTransformer, Ops};
use super::patch::PatchGrid;
use super::transformer::{open_transformer_dir, DitInputs, WanTransformer};
use crate::config::{TransformerConfig, TransformerPreset};
use crate::weights::{RandomWeights, WeightSource};
use crate::Result;
use std::path::Path;
use tessera_kernels::cuda::DeviceChoice;
use tessera_kernels::{Device, Tensor};

/// A Wan 2.1 transformer on the device chosen at run time.
pub enum DitModel {
    /// f32 on the CPU (the reference).
    Cpu(WanTransformer),
    /// bf16 on a CUDA GPU.
    Cuda(Box<CudaWanTransformer>),
}

impl DitModel {
    /// Builds the model on `device` (resolve a user's choice first with [`DeviceChoice::resolve`]).
    pub fn from_source(cfg: TransformerConfig, src: &dyn WeightSource, device: Device) -> Result<Self> {
        Ok(match device {
            Device::Cpu => Self::Cpu(WanTransformer::from_source(cfg, src)?),
            Device::Cuda(n) => Self::Cuda(Box::new(CudaWanTransformer::from_source(CudaOps::open(n)?, cfg, src)?)),
        })
    }

    /// Loads a diffusers `transformer/` folder onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let (cfg, store) = open_transformer_dir(dir)?;
        Self::from_source(cfg, &store, device)
    }

    /// A built-in configuration with deterministic random weights (the same on every device).
    pub fn preset(preset: TransformerPreset, seed: u64, device: Device) -> Result<Self> {
        Self::from_source(preset.config(), &RandomWeights::new(seed), device)
    }

    /// Resolves `choice` on this machine (`auto`: a usable GPU, else the CPU; `cuda` without one:
    /// the error naming what is missing) and loads `dir` there.
    pub fn load_on(dir: &Path, choice: DeviceChoice) -> Result<Self> {
        Self::load(dir, choice.resolve()?)
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        match self {
            Self::Cpu(_) => Device::Cpu,
            Self::Cuda(m) => Device::Cuda(m.ops().device().ordinal()),
        }
    }

    /// A line saying where and in which precision the model runs.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu(_) => "cpu (f32)".into(),
            Self::Cuda(m) => format!("{} (bf16)", m.ops().describe()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        match self {
            Self::Cpu(m) => m.config(),
            Self::Cuda(m) => m.config(),
        }
    }

    /// The CPU model, when that is where it runs (sequence-parallel runs use it today).
    pub fn as_cpu(&self) -> Option<&WanTransformer> {
        match self {
            Self::Cpu(m) => Some(m),
            Self::Cuda(_) => None,
        }
    }

    /// Checks the inputs against the model and returns (batch, patch grid).
    pub fn check_inputs(&self, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
        match self {
            Self::Cpu(m) => m.check_inputs(x),
            Self::Cuda(m) => m.check_inputs(x),
        }
    }

    /// The velocity `[B, C_out, F, H, W]` (f32, on the host) for `x`, all tokens on this device.
    pub fn forward(&self, x: &DitInputs<'_>) -> Result<Tensor> {
        match self {
            Self::Cpu(m) => m.forward(x),
            Self::Cuda(m) => m.forward(x),
        }
    }
}
