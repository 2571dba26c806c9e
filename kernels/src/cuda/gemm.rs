//! Matrix products on the GPU through cuBLASLt: `nn.Linear` with bf16 operands, f32 accumulation,
//! bf16 or f32 output, and the bias (and GELU-tanh) fused into the epilogue.
//! Twin: [`crate::cpu::linear`] (same weight layout `[out, in]`).

use super::elem::OutputElem;
use super::launch::{check_len, opt_ptr, ptr, ptr_mut};
use super::CudaDevice;
use crate::cpu::Activation;
use crate::{KernelError, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// `cublasOperation_t` values (cuBLAS's header; the descriptor attribute is an `int32_t`).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// Workspace cuBLASLt may use (32 MiB, what it asks for on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Shape, output type, epilogue and operand alignments of a product: what the algorithm choice
/// depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GemmKey {
    m: usize,
    n: usize,
    k: usize,
    out: &'static str,
    epilogue: u32,
    align: [u32; 3],
}

/// A cuBLASLt handle with its workspace and the algorithms chosen so far. Used under the device's
/// mutex, on the device's stream.
pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    algos: HashMap<GemmKey, sys::cublasLtMatmulHeuristicResult_t>,
}

// SAFETY: a cuBLASLt handle may be used from any thread as long as calls do not overlap; the
// device keeps it behind a mutex.
unsafe impl Send for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once, here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl BlasLt {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only tries to dlopen the library under its known names.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::CudaUnavailable(super::CudaMissing::CublasLt));
        }
        let handle = lt::create_handle().map_err(|e| KernelError::cuda("cublasLtCreate", e))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| KernelError::cuda("cuBLASLt workspace", e))?;
        Ok(Self { handle, workspace, stream, algos: HashMap::new() })
    }
}

/// Owns a cuBLASLt matrix layout descriptor.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Layout {
    fn new(ty: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map(Self).map_err(|e| KernelError::cuda("cublasLtMatrixLayoutCreate", e))
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `Layout::new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// Owns a cuBLASLt operation descriptor.
struct Desc(sys::cublasLtMatmulDesc_t);
impl Desc {
    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
        // SAFETY: `value` is a live, correctly sized value of the type cuBLASLt documents for `attr`.
        unsafe { lt::set_matmul_desc_attribute(self.0, attr, value as *const T as *const c_void, std::mem::size_of::<T>()) }
            .map_err(|e| KernelError::cuda("cublasLtMatmulDescSetAttribute", e))
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `linear`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// Owns a cuBLASLt preference descriptor.
struct Pref(sys::cublasLtMatmulPreference_t);
impl Pref {
    fn set<T>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &T) -> Result<()> {
        // SAFETY: as for `Desc::set`.
        unsafe { lt::set_matmul_pref_attribute(self.0, attr, value as *const T as *const c_void, std::mem::size_of::<T>()) }
            .map_err(|e| KernelError::cuda("cublasLtMatmulPreferenceSetAttribute", e))
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `linear`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn data_type<O: OutputElem>() -> sys::cudaDataType {
    if O::NAME == "bf16" {
        sys::cudaDataType::CUDA_R_16BF
    } else {
        sys::cudaDataType::CUDA_R_32F
    }
}

/// The largest power of two (at most 256) dividing a device address: what cuBLASLt may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// `nn.Linear`: `y[m, n] = act(x[m, k] · w[n, k]ᵀ + bias[n])`, row-major, bf16 `x` and `w`, f32
/// accumulation, `y` (and `bias`) bf16 or f32. `act` `None` and `GeluTanh` are fused in cuBLASLt's
/// epilogue (which computes GELU with the tanh approximation); exact `Gelu` runs after the product
/// on the stored `y` ([`super::elementwise::gelu_erf`]), so a bf16 `y` is rounded before and after
/// it, as PyTorch's `nn.Linear` then `nn.GELU` on bf16 tensors.
#[allow(clippy::too_many_arguments)]
pub fn linear<O: OutputElem>(
    dev: &CudaDevice,
    x: &impl DevicePtr<bf16>,
    m: usize,
    k: usize,
    w: &impl DevicePtr<bf16>,
    n: usize,
    bias: Option<&impl DevicePtr<O>>,
    act: Activation,
    y: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    if act != Activation::Gelu {
        return fused_linear(dev, x, m, k, w, n, bias, act, y);
    }
    fused_linear(dev, x, m, k, w, n, bias, Activation::None, y)?;
    super::elementwise::gelu_erf(dev, y, m * n)
}

/// [`linear`] with `act` fused in the epilogue (`None` or `GeluTanh`).
#[allow(clippy::too_many_arguments)]
fn fused_linear<O: OutputElem>(
    dev: &CudaDevice,
    x: &impl DevicePtr<bf16>,
    m: usize,
    k: usize,
    w: &impl DevicePtr<bf16>,
    n: usize,
    bias: Option<&impl DevicePtr<O>>,
    act: Activation,
    y: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    const OP: &str = "cuda::linear";
    check_len(OP, "x", x.len(), m * k)?;
    check_len(OP, "w", w.len(), n * k)?;
    check_len(OP, "y", y.len(), m * n)?;
    if let Some(b) = bias {
        if b.len() != n {
            return Err(KernelError::shape(OP, format!("bias has {} elements, out features {n}", b.len())));
        }
    }
    use sys::cublasLtEpilogue_t as E;
    let epilogue = match (act, bias.is_some()) {
        (Activation::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
        (Activation::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
        (Activation::GeluTanh, false) => E::CUBLASLT_EPILOGUE_GELU,
        (Activation::GeluTanh, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        (other, _) => return Err(KernelError::invalid(OP, format!("activation {other:?} is not fused on the GPU (None and GeluTanh are)"))),
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(KernelError::invalid(OP, "k = 0"));
    }
    dev.context().bind_to_thread().map_err(|e| KernelError::cuda(OP, e))?;
    let mut blas = dev.blas()?.lock().map_err(|_| KernelError::cuda(OP, "cuBLASLt handle lock poisoned"))?;
    let blas = &mut *blas;
    let s = blas.stream.clone();
    let (xp, _gx) = ptr(x, &s);
    let (wp, _gw) = ptr(w, &s);
    let (yp, _gy) = ptr_mut(y, &s);
    let (bp, _gb) = opt_ptr(bias, &s);

    // Column-major view: yᵀ[n, m] = (wᵀ)ᵀ[n, k] · xᵀ[k, m], w stored as a k×n column-major matrix.
    let bf = sys::cudaDataType::CUDA_R_16BF;
    let a_layout = Layout::new(bf, k, n, k)?;
    let b_layout = Layout::new(bf, k, m, k)?;
    let c_layout = Layout::new(data_type::<O>(), n, m, n)?;
    let desc = Desc(
        lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| KernelError::cuda("cublasLtMatmulDescCreate", e))?,
    );
    desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &CUBLAS_OP_T)?;
    desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
    desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
    if bias.is_some() {
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
    }

    let align = [alignment(wp), alignment(xp), alignment(yp)];
    let key = GemmKey { m, n, k, out: O::NAME, epilogue: epilogue as u32, align };
    let heuristic = match blas.algos.get(&key) {
        Some(h) => *h,
        None => {
            let pref = Pref(lt::create_matmul_pref().map_err(|e| KernelError::cuda("cublasLtMatmulPreferenceCreate", e))?);
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            pref.set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &WORKSPACE_BYTES)?;
            pref.set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0])?;
            pref.set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1])?;
            pref.set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2])?;
            pref.set(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2])?;
            // SAFETY: every descriptor is live (owned above) and describes these operands.
            let h = unsafe { lt::get_matmul_algo_heuristic(blas.handle, desc.0, a_layout.0, b_layout.0, c_layout.0, c_layout.0, pref.0) }
                .map_err(|e| KernelError::cuda("cublasLtMatmulAlgoGetHeuristic", format!("{m}x{k} · ({n}x{k})ᵀ -> {}: {e}", O::NAME)))?;
            blas.algos.insert(key, h);
            h
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (ws, _gws) = ptr(&blas.workspace, &s);
    // SAFETY: the operand lengths were checked against (m, n, k) above; the pointers stay valid
    // until the guards drop after the call is queued; the algorithm was chosen for exactly these
    // descriptors and alignments; the workspace holds WORKSPACE_BYTES.
    unsafe {
        lt::matmul(
            blas.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            wp as *const c_void,
            a_layout.0,
            xp as *const c_void,
            b_layout.0,
            yp as *const c_void,
            c_layout.0,
            yp as *mut c_void,
            c_layout.0,
            &heuristic.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            s.cu_stream() as *mut _,
        )
    }
    .map_err(|e| KernelError::cuda("cublasLtMatmul", format!("{m}x{k} · ({n}x{k})ᵀ -> {}: {e}", O::NAME)))
}
