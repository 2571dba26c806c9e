//! The CUDA C kernel sources (embedded from `kernels/cuda/`) and their compilation by NVRTC for one
//! architecture (machine code, or PTX), cached per (kernel source, architecture) for the process.

use super::arch::{Arch, CudaMissing};
use crate::{KernelError, Result};
use cudarc::nvrtc::result as nvrtc;
use cudarc::nvrtc::sys as nvrtc_sys;
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::{Mutex, OnceLock};

/// Helpers every kernel source starts with (bf16 conversions, reductions, fast exp2).
const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One CUDA C source file of `kernels/cuda/`: a module of related kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// `flash_attention.cu`: attention forward with log-sum-exp.
    FlashAttention,
    /// `flash_attention_sm90.cu`: the same attention on Hopper's warpgroup MMAs (sm_90a only).
    FlashAttentionSm90,
    /// `lse_merge.cu`: merging two partial attention results.
    LseMerge,
    /// `adaln_norm.cu`: LayerNorm with affine and adaLN modulation.
    AdalnNorm,
    /// `qk_norm_rope.cu`: q/k RMSNorm fused with 3-D RoPE.
    QkNormRope,
    /// `residual.cu`: gated residual add.
    Residual,
    /// `gelu.cu`: GELU (tanh approximation), the elementwise product of gated feed-forwards and
    /// the elementwise sum.
    Gelu,
    /// `convert.cu`: f32 <-> bf16.
    Convert,
    /// `sampler.cu`: classifier-free guidance, the Euler and UniPC steps.
    Sampler,
    /// `patch.cu`: patchify / unpatchify.
    Patch,
    /// `biased_attention.cu`: attention with a bias by query-key distance (T5).
    BiasedAttention,
    /// `attention_wide.cu`: attention for heads wider than 128 channels (the VAE's).
    WideAttention,
    /// `video.cu`: the VAE's channel norm, upsampling, transpose and convolution halves.
    Video,
}

impl KernelSource {
    /// Every source, in a fixed order.
    pub const ALL: [KernelSource; 13] = [
        Self::FlashAttention,
        Self::FlashAttentionSm90,
        Self::LseMerge,
        Self::AdalnNorm,
        Self::QkNormRope,
        Self::Residual,
        Self::Gelu,
        Self::Convert,
        Self::Sampler,
        Self::Patch,
        Self::BiasedAttention,
        Self::WideAttention,
        Self::Video,
    ];

    /// The file name under `kernels/cuda/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::FlashAttention => "flash_attention.cu",
            Self::FlashAttentionSm90 => "flash_attention_sm90.cu",
            Self::LseMerge => "lse_merge.cu",
            Self::AdalnNorm => "adaln_norm.cu",
            Self::QkNormRope => "qk_norm_rope.cu",
            Self::Residual => "residual.cu",
            Self::Gelu => "gelu.cu",
            Self::Convert => "convert.cu",
            Self::Sampler => "sampler.cu",
            Self::Patch => "patch.cu",
            Self::BiasedAttention => "biased_attention.cu",
            Self::WideAttention => "attention_wide.cu",
            Self::Video => "video.cu",
        }
    }

    /// The file's text, as embedded at build time.
    pub fn body(self) -> &'static str {
        match self {
            Self::FlashAttention => include_str!("../../cuda/flash_attention.cu"),
            Self::FlashAttentionSm90 => include_str!("../../cuda/flash_attention_sm90.cu"),
            Self::LseMerge => include_str!("../../cuda/lse_merge.cu"),
            Self::AdalnNorm => include_str!("../../cuda/adaln_norm.cu"),
            Self::QkNormRope => include_str!("../../cuda/qk_norm_rope.cu"),
            Self::Residual => include_str!("../../cuda/residual.cu"),
            Self::Gelu => include_str!("../../cuda/gelu.cu"),
            Self::Convert => include_str!("../../cuda/convert.cu"),
            Self::Sampler => include_str!("../../cuda/sampler.cu"),
            Self::Patch => include_str!("../../cuda/patch.cu"),
            Self::BiasedAttention => include_str!("../../cuda/biased_attention.cu"),
            Self::WideAttention => include_str!("../../cuda/attention_wide.cu"),
            Self::Video => include_str!("../../cuda/video.cu"),
        }
    }

    /// The kernels (`extern "C"` entry points) the file defines.
    pub fn entry_points(self) -> &'static [&'static str] {
        match self {
            Self::FlashAttention => &["flash_attention_d64_bf16", "flash_attention_d64_f32", "flash_attention_d128_bf16", "flash_attention_d128_f32"],
            Self::FlashAttentionSm90 => &[
                "flash_attention_sm90_d64_bf16",
                "flash_attention_sm90_d64_f32",
                "flash_attention_sm90_d128_bf16",
                "flash_attention_sm90_d128_f32",
                "flash_attention_sm90_overlap_d64_bf16",
                "flash_attention_sm90_overlap_d64_f32",
                "flash_attention_sm90_overlap_d128_bf16",
                "flash_attention_sm90_overlap_d128_f32",
            ],
            Self::LseMerge => &["lse_merge_f32"],
            Self::AdalnNorm => &["layer_norm_modulated_bf16"],
            Self::QkNormRope => &["qk_norm_rope_bf16"],
            Self::Residual => &["gated_residual_add_bf16", "gated_residual_add_f32"],
            Self::Gelu => &["gelu_tanh_bf16", "gelu_tanh_f32", "gelu_erf_bf16", "gelu_erf_f32", "mul_bf16", "mul_f32", "add_bf16", "add_f32"],
            Self::Convert => &["f32_to_bf16_kernel", "bf16_to_f32_kernel"],
            Self::Sampler => &["guide_f32", "euler_step_f32", "unipc_step_f32"],
            Self::Patch => &["patchify_bf16", "unpatchify_f32"],
            Self::BiasedAttention => &["biased_attention_bf16"],
            Self::WideAttention => &["wide_attention_bf16", "wide_attention_f32"],
            Self::Video => &["channel_rms_norm_bf16", "upsample_nearest2x_bf16", "transpose_bf16", "im2col_conv3d_bf16", "conv_bias_store_bf16"],
        }
    }

    /// The architecture NVRTC compiles this source for on a device of `arch` (its
    /// `--gpu-architecture`), or `None` when the source does not run there: the warpgroup-MMA
    /// attention is built for `sm_90a`, whose instructions only compute capability 9.0 has.
    pub fn target(self, arch: Arch) -> Option<String> {
        match self {
            Self::FlashAttentionSm90 => (arch == Arch { major: 9, minor: 0 }).then(|| "sm_90a".to_string()),
            _ => Some(arch.to_string()),
        }
    }

    /// The target for `arch`, or the error saying this source does not run there.
    fn target_or_err(self, arch: Arch) -> Result<String> {
        self.target(arch).ok_or_else(|| KernelError::KernelCompile {
            kernel: self.file_name(),
            arch: arch.to_string(),
            log: "built for sm_90a only (compute capability 9.0)".into(),
        })
    }

    /// What NVRTC compiles: the common helpers, then the file (with `#line` so that compiler
    /// messages name the file and its own line numbers).
    pub fn full_source(self) -> String {
        format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}", self.file_name(), self.body())
    }
}

/// NVRTC options for the target `target` (`sm_90`, `sm_90a`, ...; see [`KernelSource::target`]).
/// The sources include no header, so no include path is needed; one given in
/// `TESSERA_CUDA_INCLUDE` (the CUDA headers) is passed on for kernels that may want one.
pub fn compile_options(target: &str) -> CompileOptions {
    let include_paths = std::env::var("TESSERA_CUDA_INCLUDE").ok().filter(|p| !p.is_empty()).into_iter().collect();
    CompileOptions { include_paths, options: vec![format!("--gpu-architecture={target}"), "--std=c++17".into()], ..Default::default() }
}

/// True when the NVRTC library can be loaded (from the library path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library under its known names; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `source` to PTX for `arch` with NVRTC (no GPU needed). Fails with
/// [`KernelError::KernelCompile`] carrying the compiler log, or `CudaUnavailable` without NVRTC.
pub fn compile_ptx(source: KernelSource, arch: Arch) -> Result<Ptx> {
    let target = source.target_or_err(arch)?;
    if !nvrtc_available() {
        return Err(KernelError::CudaUnavailable(CudaMissing::Nvrtc));
    }
    cudarc::nvrtc::compile_ptx_with_opts(source.full_source(), compile_options(&target)).map_err(|e| {
        let log = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        };
        KernelError::KernelCompile { kernel: source.file_name(), arch: arch.to_string(), log }
    })
}

/// An NVRTC program, destroyed on drop.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program`, destroyed once, here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Compiles `source` to machine code (cubin) for `arch` with NVRTC. Machine code built by a newer
/// CUDA 13.x NVRTC loads on an older 13.x driver, where PTX from it would not JIT.
pub fn compile_cubin(source: KernelSource, arch: Arch) -> Result<Vec<u8>> {
    if !nvrtc_available() {
        return Err(KernelError::CudaUnavailable(CudaMissing::Nvrtc));
    }
    let fail = |e: &dyn std::fmt::Display| KernelError::KernelCompile { kernel: source.file_name(), arch: arch.to_string(), log: e.to_string() };
    let text = CString::new(source.full_source()).map_err(|e| fail(&e))?;
    let name = CString::new(source.file_name()).map_err(|e| fail(&e))?;
    let prog = Program(nvrtc::create_program(&text, Some(&name)).map_err(|e| fail(&format!("{e:?}")))?);
    let o = compile_options(&source.target_or_err(arch)?);
    let opts: Vec<String> = o.include_paths.iter().map(|p| format!("--include-path={p}")).chain(o.options).collect();
    // SAFETY: `prog` is a live program (destroyed only when the guard drops, after these calls);
    // the size query precedes the copy into a buffer of that size.
    unsafe {
        if let Err(e) = nvrtc::compile_program(prog.0, &opts) {
            let log = nvrtc::get_program_log(prog.0).map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
            return Err(fail(&format!("{e:?}: {log}")));
        }
        let mut size = 0usize;
        nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size).result().map_err(|e| fail(&format!("nvrtcGetCUBINSize: {e:?}")))?;
        let mut cubin = vec![0u8; size];
        nvrtc_sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()).result().map_err(|e| fail(&format!("nvrtcGetCUBIN: {e:?}")))?;
        if cubin.is_empty() {
            return Err(fail(&"NVRTC produced no machine code"));
        }
        Ok(cubin)
    }
}

/// The loadable image of `source` for a device of architecture `arch`, compiled once per
/// (source, arch) for the whole process: machine code for `arch`, or, when this NVRTC does not
/// know `arch` (a device newer than the compiler), PTX for the newest architecture the kernels
/// are tuned for, which the driver compiles when it loads it.
pub fn cached_image(source: KernelSource, arch: Arch) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<(KernelSource, Arch), Ptx>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(image) = cache.lock().expect("kernel image cache lock").get(&(source, arch)) {
        return Ok(image.clone());
    }
    // Compiled outside the lock: two threads may both compile a source once; both results are equal.
    let image = match compile_cubin(source, arch) {
        Ok(cubin) => Ptx::from_binary(cubin),
        Err(KernelError::KernelCompile { log, .. }) if log.contains("INVALID_OPTION") && arch > PTX_FALLBACK => {
            tracing::warn!(%arch, kernel = source.file_name(), "NVRTC does not know this architecture; loading {PTX_FALLBACK} PTX instead");
            compile_ptx(source, PTX_FALLBACK)?
        }
        Err(e) => return Err(e),
    };
    cache.lock().expect("kernel image cache lock").insert((source, arch), image.clone());
    Ok(image)
}

/// The architecture of the PTX loaded on devices newer than NVRTC knows.
const PTX_FALLBACK: Arch = Arch { major: 9, minor: 0 };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_in_its_source() {
        for src in KernelSource::ALL {
            assert!(src.body().starts_with("//"), "{} starts with a comment saying what it holds", src.file_name());
            for name in src.entry_points() {
                let defined = src.body().contains(&format!("void {name}(")) || src.body().contains(&format!("({name},"));
                assert!(defined, "{name} is not defined in {}", src.file_name());
            }
        }
    }

    #[test]
    fn the_warpgroup_attention_targets_compute_capability_9_0_alone() {
        let arch = |major, minor| Arch { major, minor };
        assert_eq!(KernelSource::FlashAttentionSm90.target(arch(9, 0)).as_deref(), Some("sm_90a"));
        for other in [arch(8, 0), arch(8, 9), arch(10, 0), arch(12, 0)] {
            assert_eq!(KernelSource::FlashAttentionSm90.target(other), None, "{other}");
            assert_eq!(KernelSource::FlashAttention.target(other), Some(other.to_string()));
        }
        let err = compile_ptx(KernelSource::FlashAttentionSm90, arch(8, 0)).unwrap_err().to_string();
        // refused for the architecture before NVRTC is looked for: the same error with or without it
        assert!(err.contains("flash_attention_sm90.cu") && err.contains("sm_90a only"), "{err}");
    }

    #[test]
    fn options_name_the_architecture() {
        let o = compile_options("sm_90");
        assert!(o.options.iter().any(|s| s == "--gpu-architecture=sm_90"));
    }
}
