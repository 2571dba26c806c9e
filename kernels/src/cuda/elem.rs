//! Element types of device buffers that kernels and matrix products write: bf16 or f32.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::bf16;

/// An output element type: bf16 (operands of the next matrix product) or f32 (the residual
/// stream, partial attention results that are merged later, latents).
pub trait OutputElem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// Suffix of the kernel variant writing this type (`bf16`, `f32`).
    const NAME: &'static str;
    /// Size in bytes.
    const BYTES: u64;
    /// Widens to f32 (host side, for checks and tests).
    fn to_f32(self) -> f32;
}

impl OutputElem for bf16 {
    const NAME: &'static str = "bf16";
    const BYTES: u64 = 2;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl OutputElem for f32 {
    const NAME: &'static str = "f32";
    const BYTES: u64 = 4;
    fn to_f32(self) -> f32 {
        self
    }
}
