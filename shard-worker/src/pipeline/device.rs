//! The device a pipeline runs on, from a `--device` choice (auto, cpu, cuda, cuda:N). In this
//! version the whole pipeline runs on the CPU: `auto` picks it (noting a GPU it leaves unused) and
//! an explicit CUDA choice is refused with a clear reason, GPU or not.

use tessera_kernels::cuda::DeviceChoice;
use tessera_kernels::Device;

/// Resolves `choice` for the pipeline: `Ok(note)` runs on the CPU (with a note to print when a
/// GPU is present but unused); `Err` says why the choice cannot run (no driver, no GPU, or the
/// pipeline not on CUDA yet), without the flag's name.
pub fn resolve_pipeline_device(choice: &str) -> Result<Option<String>, String> {
    let parsed: DeviceChoice = choice.parse().map_err(|e| format!("{e}"))?;
    match parsed.resolve().map_err(|e| e.to_string())? {
        Device::Cpu => Ok(None),
        Device::Cuda(n) if parsed == DeviceChoice::Auto => Ok(Some(format!("CUDA device {n} found, but the pipeline runs on the CPU in this version"))),
        Device::Cuda(n) => Err(format!("cuda:{n}: the CUDA kernels are built but the pipeline does not run on CUDA yet; use cpu or auto")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_run_and_nonsense_is_refused() {
        assert_eq!(resolve_pipeline_device("cpu"), Ok(None));
        assert!(resolve_pipeline_device("auto").is_ok());
        assert!(resolve_pipeline_device("tpu").is_err());
        // Without a GPU (or with one: the pipeline is CPU-only) an explicit CUDA choice fails.
        assert!(resolve_pipeline_device("cuda").is_err());
    }
}
