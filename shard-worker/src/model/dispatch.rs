//! One transformer type for callers that pick the backend at run time: the one model
//! ([`WanTransformer`]) as a [`ModelFamily`](crate::on_backend::ModelFamily), held by
//! [`OnBackend`] (the choice the text encoder and the VAE use too), loaded from the same files and
//! presets, with one `forward`.

use super::patch::PatchGrid;
use super::transformer::{open_transformer_dir, DitInputs, WanTransformer};
use crate::on_backend::{model_family, on_backend, OnBackend};
use crate::transformer_config::{TransformerConfig, TransformerPreset};
use crate::weights::{RandomWeights, WeightSource};
use crate::Result;
use std::path::Path;
use tessera_kernels::backend::{Backend, Ops};
use tessera_kernels::cuda::DeviceChoice;
use tessera_kernels::{Device, Tensor};

model_family!(
    /// The Wan transformer as a [`ModelFamily`](crate::on_backend::ModelFamily): what [`DitModel`] chooses among.
    DitFamily,
    WanTransformer,
    TransformerConfig
);

/// A Wan 2.1 transformer on the backend chosen at run time: `Cpu` (f32, the reference), `Cuda`
/// (bf16 on a GPU), or `Bf16Host`: the CUDA model's bf16 data flow run on the host with emulated
/// kernels, slow, for checking on machines without a GPU that code driving the CUDA model (the
/// pipeline, the golden runners) gives what the CPU model gives, within bf16 tolerance.
/// (`from_source_on`, `backend` and `device_memory` come with [`OnBackend`].)
pub type DitModel = OnBackend<DitFamily>;

impl OnBackend<DitFamily> {
    /// Builds the model on `device` (resolve a user's choice first with [`DeviceChoice::resolve`]).
    pub fn from_source(cfg: TransformerConfig, src: &dyn WeightSource, device: Device) -> Result<Self> {
        Self::from_source_on(cfg, src, device.into())
    }

    /// Loads a diffusers `transformer/` folder onto `backend`.
    pub fn load_backend(dir: &Path, backend: Backend) -> Result<Self> {
        let (cfg, store) = open_transformer_dir(dir)?;
        Self::from_source_on(cfg, &store, backend)
    }

    /// The emulated CUDA model (`bf16-host`) of a built-in configuration.
    pub fn emulated_preset(preset: TransformerPreset, seed: u64) -> Result<Self> {
        Self::from_source_on(preset.config(), &RandomWeights::new(seed), Backend::Bf16Host)
    }

    /// Loads a diffusers `transformer/` folder onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_backend(dir, device.into())
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
        self.backend().device()
    }

    /// A line saying where and in which precision the model runs.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu(m) => m.ops().describe(),
            Self::Cuda(m) => format!("{} (bf16)", m.ops().describe()),
            Self::Bf16Host(_) => "cpu emulating the CUDA model (bf16)".into(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        on_backend!(self, m => m.config())
    }

    /// Checks the inputs against the model and returns (batch, patch grid).
    pub fn check_inputs(&self, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
        on_backend!(self, m => m.check_inputs(x))
    }

    /// The velocity `[B, C_out, F, H, W]` (f32, on the host) for `x`, all tokens on this device.
    pub fn forward(&self, x: &DitInputs<'_>) -> Result<Tensor> {
        on_backend!(self, m => m.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::super::transformer::CpuWanTransformer;
    use super::*;
    use tessera_kernels::backend::CpuOps;
    use tessera_kernels::cuda::cuda_status;
    use tessera_kernels::random::fill_normal;

    fn random(shape: &[usize], stream: u64) -> Tensor {
        let mut d = vec![0.0; shape.iter().product()];
        fill_normal(9, stream, 0, &mut d);
        Tensor::new(shape.to_vec(), d).unwrap()
    }

    #[test]
    fn cpu_dispatch_is_the_cpu_model() {
        let model = DitModel::preset(TransformerPreset::Tiny, 4, Device::Cpu).unwrap();
        assert_eq!((model.device(), model.describe().as_str()), (Device::Cpu, "cpu (f32)"));
        let (hidden, text) = (random(&[1, 16, 2, 4, 6], 1), random(&[1, 5, 32], 2));
        let x = DitInputs {
            hidden_states: &hidden,
            timesteps: &[321.0],
            encoder_hidden_states: &text,
            encoder_hidden_states_image: None,
            options: Default::default(),
        };
        let want = CpuWanTransformer::preset(CpuOps, TransformerPreset::Tiny, 4).unwrap().forward(&x).unwrap();
        assert_eq!(model.forward(&x).unwrap(), want);
    }

    #[test]
    fn cuda_without_a_gpu_names_what_is_missing() {
        let Err(why) = cuda_status(0) else {
            eprintln!("a usable GPU is present: this check is for machines without one");
            return;
        };
        let err = DitModel::preset(TransformerPreset::Tiny, 0, Device::Cuda(0)).err().expect("no GPU").to_string();
        assert!(err.contains(&why.to_string()), "{err}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit/t2v-a");
        assert!(matches!(DitModel::load_on(&dir, DeviceChoice::Auto).unwrap(), DitModel::Cpu(_)));
        assert!(DitModel::load_on(&dir, DeviceChoice::Cuda(0)).is_err());
    }
}
