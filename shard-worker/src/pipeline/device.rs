//! The device a pipeline's transformer runs on, from a `--device` choice (auto, cpu, cuda,
//! cuda:N): `auto` takes a usable GPU and otherwise the CPU; an explicit CUDA choice without a
//! usable GPU is refused with what is missing. The text encoder and the VAE run on the CPU.

use tessera_kernels::cuda::DeviceChoice;
use tessera_kernels::Device;

/// Resolves `choice` on this machine; the error (without the flag's name) says why the choice
/// cannot run.
pub fn resolve_pipeline_device(choice: &str) -> Result<Device, String> {
    let parsed: DeviceChoice = choice.parse().map_err(|e| format!("{e}"))?;
    parsed.resolve().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_resolve_and_nonsense_is_refused() {
        assert_eq!(resolve_pipeline_device("cpu"), Ok(Device::Cpu));
        assert!(resolve_pipeline_device("auto").is_ok());
        assert!(resolve_pipeline_device("tpu").is_err());
        if tessera_kernels::cuda::cuda_status(0).is_err() {
            let err = resolve_pipeline_device("cuda").unwrap_err();
            assert!(err.contains("CUDA"), "{err}");
        }
    }
}
