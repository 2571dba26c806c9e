//! A validated public request (defaults applied by the coordinator) as the pipeline's parameters.

use crate::pipeline::GenerationParams;
use crate::sampler::SamplerKind;
use crate::{Result, WorkerError};
use tessera_proto::v1::{GenerateRequest, Sampler};

/// The generation a request asks for, with `seed`. Sizes must already be set (the coordinator's
/// validation applies the defaults); zero sizes are refused here, naming the field.
pub fn params_from_request(req: &GenerateRequest, seed: u64) -> Result<GenerationParams> {
    let need = |field: &'static str, v: u32| {
        if v == 0 {
            Err(WorkerError::input(field, "must be set (defaults are applied by the coordinator)"))
        } else {
            Ok(v as usize)
        }
    };
    let sampler = match Sampler::try_from(req.sampler) {
        Ok(Sampler::Unspecified) => None,
        Ok(Sampler::Unipc) => Some(SamplerKind::UniPc),
        Ok(Sampler::Euler) => Some(SamplerKind::Euler),
        Err(_) => return Err(WorkerError::input("sampler", format!("{} is not a known sampler", req.sampler))),
    };
    Ok(GenerationParams {
        negative_prompt: req.negative_prompt.clone(),
        height: need("height", req.height)?,
        width: need("width", req.width)?,
        num_frames: need("num_frames", req.num_frames)?,
        num_inference_steps: need("steps", req.steps)?,
        guidance_scale: req.guidance_scale.unwrap_or(5.0),
        flow_shift: req.flow_shift.map(f64::from),
        sampler,
        seed,
        ..GenerationParams::new(req.prompt.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_map_and_missing_sizes_are_named() {
        let req = GenerateRequest {
            prompt: "a".into(),
            width: 64,
            height: 32,
            num_frames: 9,
            steps: 4,
            guidance_scale: Some(3.0),
            flow_shift: Some(5.0),
            sampler: Sampler::Euler as i32,
            ..Default::default()
        };
        let p = params_from_request(&req, 7).unwrap();
        assert_eq!((p.width, p.height, p.num_frames, p.num_inference_steps, p.seed), (64, 32, 9, 4, 7));
        assert_eq!((p.guidance_scale, p.flow_shift, p.sampler), (3.0, Some(5.0), Some(SamplerKind::Euler)));
        let err = params_from_request(&GenerateRequest { steps: 0, ..req }, 7).unwrap_err();
        assert!(matches!(err, WorkerError::InvalidInput { field: "steps", .. }), "{err}");
    }
}
