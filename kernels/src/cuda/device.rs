//! Choosing the compute device at run time, and an open CUDA device: its context and stream, its
//! architecture, the compiled-module cache and the cuBLASLt handle.

use super::arch::{Arch, CudaMissing, MIN_ARCH};
use super::attention::AttentionKernel;
use super::gemm::BlasLt;
use super::source::{cached_image, nvrtc_available, KernelSource};
use crate::{Device, KernelError, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{result as drv, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Checks that CUDA device `ordinal` can run Tessera's kernels (driver, device, architecture,
/// NVRTC, cuBLASLt), without creating a context. Returns the device's architecture.
pub fn cuda_status(ordinal: usize) -> std::result::Result<Arch, CudaMissing> {
    // SAFETY: only tries to dlopen the driver library under its known names; nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaMissing::DriverLibrary);
    }
    if let Err(e) = drv::init() {
        if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE {
            return Err(CudaMissing::NoDevice { ordinal, count: 0 });
        }
        return Err(CudaMissing::DriverInit(e.to_string()));
    }
    let count = drv::device::get_count().map_err(|e| CudaMissing::DriverInit(e.to_string()))? as usize;
    if ordinal >= count {
        return Err(CudaMissing::NoDevice { ordinal, count });
    }
    let dev = drv::device::get(ordinal as i32).map_err(|e| CudaMissing::DriverInit(e.to_string()))?;
    let attr = |a| {
        // SAFETY: `dev` is a valid device handle returned by the initialised driver.
        unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| CudaMissing::DriverInit(e.to_string()))
    };
    let arch = Arch {
        major: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
        minor: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
    };
    if arch < MIN_ARCH {
        return Err(CudaMissing::OldDevice { ordinal, arch });
    }
    if !nvrtc_available() {
        return Err(CudaMissing::Nvrtc);
    }
    // SAFETY: only tries to dlopen the library under its known names; nothing is called.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(CudaMissing::CublasLt);
    }
    Ok(arch)
}

/// The device a user asked for: `auto` (a CUDA GPU when one is usable, else the CPU), `cpu`,
/// `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 if it is usable, otherwise the CPU (with a logged message saying why).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// This CUDA device, or an error naming what is missing.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(KernelError::invalid("DeviceChoice", format!("device {s:?}: expected auto, cpu, cuda or cuda:N"))),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Resolves the choice against this machine. `Cuda(n)` fails with
    /// [`KernelError::CudaUnavailable`] naming what is missing; `Auto` falls back to the CPU.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => cuda_status(n).map(|_| Device::Cuda(n)).map_err(KernelError::CudaUnavailable),
            Self::Auto => match cuda_status(0) {
                Ok(arch) => {
                    tracing::info!(device = "cuda:0", %arch, "using CUDA device 0");
                    Ok(Device::Cuda(0))
                }
                Err(why) => {
                    tracing::info!(reason = %why, "no usable CUDA device, running on the CPU");
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

/// Dynamic shared memory a kernel gets without asking for more
/// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

/// An open CUDA device: one context, one stream every kernel of this device runs on (so work is
/// ordered by the stream), compiled modules, and a cuBLASLt handle.
pub struct CudaDevice {
    ordinal: usize,
    arch: Arch,
    name: String,
    multiprocessors: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<KernelSource, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: OnceLock<Mutex<BlasLt>>,
    attention: AttentionKernel,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.ordinal).field("arch", &self.arch).field("name", &self.name).finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal` after checking that everything it needs is there
    /// ([`cuda_status`]); never panics when CUDA is missing.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let arch = cuda_status(ordinal).map_err(KernelError::CudaUnavailable)?;
        let attention = AttentionKernel::from_env(arch)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::cuda("CudaContext::new", e))?;
        // SAFETY: every buffer and kernel of this device is used on its one stream, so stream
        // order already orders all reads and writes; per-buffer events would only add overhead.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| KernelError::cuda("new_stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let multiprocessors =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| KernelError::cuda("device attribute", e))? as usize;
        Ok(Arc::new(Self {
            ordinal,
            arch,
            name,
            multiprocessors,
            ctx,
            stream,
            modules: Default::default(),
            functions: Default::default(),
            blas: OnceLock::new(),
            attention,
        }))
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The architecture kernels are compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The tensor-core attention kernel this device runs ([`AttentionKernel::ENV`] at open).
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream all of this device's work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Number of streaming multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// Device memory in use and in total, in bytes, as the driver reports them (every process's
    /// allocations and this one's memory pools included).
    pub fn memory_in_use(&self) -> Result<(u64, u64)> {
        self.ctx.bind_to_thread().map_err(|e| KernelError::cuda("cuMemGetInfo", e))?;
        let (free, total) = self.ctx.mem_get_info().map_err(|e| KernelError::cuda("cuMemGetInfo", e))?;
        Ok(((total - free) as u64, total as u64))
    }

    /// Waits until all queued work is done (and reports an asynchronous error if one happened).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| KernelError::cuda("synchronize", e))
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| KernelError::cuda("upload", e))
    }

    /// Copies a device buffer back to the host (waits for the copy).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &impl DevicePtr<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(|e| KernelError::cuda("download", e))
    }

    /// A new zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n).map_err(|e| KernelError::cuda("alloc_zeros", e))
    }

    /// The kernel `name` of `source`, compiling and loading the module on first use.
    pub(crate) fn function(&self, source: KernelSource, name: &'static str) -> Result<CudaFunction> {
        self.function_with_shared_memory(source, name, 0)
    }

    /// [`Self::function`] for a kernel launched with `dynamic_smem` bytes of dynamic shared memory
    /// (its own size, the same at every launch): above the 48 KiB a kernel gets without asking, the
    /// function is allowed that much once, when it is loaded.
    pub(crate) fn function_with_shared_memory(&self, source: KernelSource, name: &'static str, dynamic_smem: usize) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("function cache lock").get(name) {
            return Ok(f.clone());
        }
        let module = self.module(source)?;
        let f = module.load_function(name).map_err(|e| KernelError::cuda("load_function", format!("{name}: {e}")))?;
        if dynamic_smem > DEFAULT_DYNAMIC_SMEM {
            // Every GPU the kernels run on (sm_80 and later) offers at least 99 KiB to a block.
            let bytes =
                i32::try_from(dynamic_smem).map_err(|_| KernelError::invalid("load_function", format!("{name}: {dynamic_smem} bytes of shared memory")))?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
                .map_err(|e| KernelError::cuda("load_function", format!("{name}: {dynamic_smem} bytes of dynamic shared memory: {e}")))?;
        }
        self.functions.lock().expect("function cache lock").insert(name, f.clone());
        Ok(f)
    }

    /// Compiles (once per architecture, process-wide) and loads (once per device) a source.
    pub fn module(&self, source: KernelSource) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().expect("module cache lock").get(&source) {
            return Ok(m.clone());
        }
        let image = cached_image(source, self.arch)?;
        let module = self.ctx.load_module(image).map_err(|e| KernelError::cuda("load_module", format!("{}: {e}", source.file_name())))?;
        self.modules.lock().expect("module cache lock").insert(source, module.clone());
        Ok(module)
    }

    /// Compiles and loads every kernel source this device runs now (start-up), instead of on
    /// first use.
    pub fn warm_up(&self) -> Result<()> {
        KernelSource::ALL.iter().filter(|s| s.target(self.arch).is_some()).try_for_each(|&s| self.module(s).map(drop))
    }

    /// This device's cuBLASLt handle (created on first use).
    pub(crate) fn blas(&self) -> Result<&Mutex<BlasLt>> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let b = BlasLt::new(self.stream.clone())?;
        Ok(self.blas.get_or_init(|| Mutex::new(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for (s, c) in [("auto", DeviceChoice::Auto), ("CPU", DeviceChoice::Cpu), ("cuda", DeviceChoice::Cuda(0)), ("cuda:3", DeviceChoice::Cuda(3))] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), c);
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(Arch { major: 8, minor: 6 }.to_string(), "sm_86");
        assert!(Arch { major: 7, minor: 5 } < MIN_ARCH && Arch { major: 9, minor: 0 } > MIN_ARCH);
    }

    #[test]
    fn cpu_always_resolves_and_auto_never_fails() {
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), Device::Cpu);
        // With or without a GPU, `auto` gives a device; `cuda` either gives it or says what is missing.
        let auto = DeviceChoice::Auto.resolve().unwrap();
        match DeviceChoice::Cuda(0).resolve() {
            Ok(d) => assert_eq!(d, Device::Cuda(0)),
            Err(KernelError::CudaUnavailable(why)) => {
                assert_eq!(auto, Device::Cpu);
                assert!(!why.to_string().is_empty());
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn missing_cuda_is_named_and_never_panics() {
        // SAFETY: only tries to dlopen the driver library.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        match DeviceChoice::Cuda(1000).resolve() {
            Err(KernelError::CudaUnavailable(CudaMissing::DriverLibrary)) => assert!(!driver),
            Err(KernelError::CudaUnavailable(CudaMissing::NoDevice { ordinal: 1000, .. } | CudaMissing::DriverInit(_))) => assert!(driver),
            other => panic!("cuda:1000 must be unavailable, got {other:?}"),
        }
        if !driver {
            let err = CudaDevice::open(0).unwrap_err().to_string();
            assert!(err.contains("libcuda.so"), "{err}");
        }
    }
}
