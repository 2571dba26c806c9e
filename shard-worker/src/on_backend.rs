//! A model chosen at run time among the backends: each model is written once, generic over
//! [`Ops`] (`Umt5Encoder<O>`, `Vae<O>`), and [`OnBackend`] holds it on `cpu`, `bf16-host` or
//! `cuda`, with the construction, the backend's name and its memory written here once.

use crate::weights::WeightSource;
use crate::Result;
use tessera_kernels::backend::{Backend, CpuOps, CudaOps, HostOps, Ops};

/// A model written once over [`Ops`], named without its backend.
pub trait ModelFamily {
    /// What builds it (besides the weights).
    type Config;
    /// The model on backend `O`.
    type On<O: Ops>;
    /// Builds the model on `ops` from any weight source.
    fn from_source<O: Ops>(ops: O, cfg: Self::Config, src: &dyn WeightSource) -> Result<Self::On<O>>;
    /// The backend a built model runs on.
    fn ops<O: Ops>(model: &Self::On<O>) -> &O;
}

/// Declares `$family`, the [`ModelFamily`] of `$model<O>`, which is built by
/// `$model::from_source(ops, cfg: $config, src)` and answers `ops()`.
macro_rules! model_family {
    ($(#[$doc:meta])* $family:ident, $model:ident, $config:ty) => {
        $(#[$doc])*
        pub struct $family;

        impl $crate::on_backend::ModelFamily for $family {
            type Config = $config;
            type On<O: tessera_kernels::backend::Ops> = $model<O>;
            fn from_source<O: tessera_kernels::backend::Ops>(ops: O, cfg: $config, src: &dyn $crate::weights::WeightSource) -> $crate::Result<$model<O>> {
                $model::from_source(ops, cfg, src)
            }
            fn ops<O: tessera_kernels::backend::Ops>(model: &$model<O>) -> &O {
                model.ops()
            }
        }
    };
}
pub(crate) use model_family;

/// The model of family `F` on the backend chosen at run time.
pub enum OnBackend<F: ModelFamily> {
    /// f32 on the CPU.
    Cpu(Box<F::On<CpuOps>>),
    /// bf16 under the host twin of the GPU path.
    Bf16Host(Box<F::On<HostOps>>),
    /// bf16 on a CUDA GPU.
    Cuda(Box<F::On<CudaOps>>),
}

/// Runs `$body` with `$m` bound to the model of an [`OnBackend`], whatever its backend.
macro_rules! on_backend {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            $crate::on_backend::OnBackend::Cpu($m) => $body,
            $crate::on_backend::OnBackend::Bf16Host($m) => $body,
            $crate::on_backend::OnBackend::Cuda($m) => $body,
        }
    };
}
pub(crate) use on_backend;

impl<F: ModelFamily> OnBackend<F> {
    /// Builds the model on `backend` (`cuda:N` opens device N once per process).
    pub fn from_source_on(cfg: F::Config, src: &dyn WeightSource, backend: Backend) -> Result<Self> {
        Ok(match backend {
            Backend::Cpu => Self::Cpu(Box::new(F::from_source(CpuOps, cfg, src)?)),
            Backend::Bf16Host => Self::Bf16Host(Box::new(F::from_source(HostOps, cfg, src)?)),
            Backend::Cuda(n) => Self::Cuda(Box::new(F::from_source(CudaOps::open(n)?, cfg, src)?)),
        })
    }

    /// The backend it runs on.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Cpu(_) => Backend::Cpu,
            Self::Bf16Host(_) => Backend::Bf16Host,
            Self::Cuda(m) => Backend::Cuda(F::ops(m.as_ref()).device().ordinal()),
        }
    }

    /// Device memory in use and in total (bytes) where the model runs on a GPU.
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        on_backend!(self, m => F::ops(m.as_ref()).device_memory())
    }
}
