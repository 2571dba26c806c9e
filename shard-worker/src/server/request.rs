//! A job spec (validated by the coordinator, checked again by this worker) as the pipeline's
//! parameters: no defaults are applied here, the spec carries every setting; the frame size is
//! the generated one.

use crate::pipeline::forcing::ForcingParams;
use crate::pipeline::GenerationParams;
use crate::sampler::SamplerKind;
use tessera_cluster::JobSpec;
use tessera_proto::v1::Sampler;

/// The generation `spec` asks for (without the input video, which travels beside it).
pub fn params_from_spec(spec: &JobSpec) -> GenerationParams {
    let r = spec.request();
    // The model generates at the spec's generated size (the coordinator crops the frames back).
    let (height, width) = spec.generated_size();
    let sampler = match r.sampler {
        Sampler::Unspecified => None,
        Sampler::Unipc => Some(SamplerKind::UniPc),
        Sampler::Euler => Some(SamplerKind::Euler),
    };
    GenerationParams {
        negative_prompt: r.negative_prompt.clone(),
        height: height as usize,
        width: width as usize,
        num_frames: r.num_frames as usize,
        num_inference_steps: r.steps as usize,
        guidance_scale: r.guidance_scale,
        flow_shift: r.flow_shift.map(f64::from),
        sampler,
        seed: r.seed,
        forcing: r.forcing.map(|f| ForcingParams {
            base_num_frames: f.base_num_frames as usize,
            overlap_history: Some(f.overlap_history as usize),
            ar_step: f.ar_step as usize,
            causal_block_size: Some(f.causal_block_size as usize),
            addnoise_condition: f.addnoise_condition,
            fps: f.fps,
        }),
        ..GenerationParams::new(r.prompt.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_cluster::limits::{Limits, ModelFactors};
    use tessera_cluster::JobRequest;

    fn spec_request() -> JobRequest {
        JobRequest {
            prompt: "a".into(),
            negative_prompt: "b".into(),
            width: 64,
            height: 32,
            num_frames: 9,
            steps: 4,
            guidance_scale: 3.0,
            flow_shift: Some(2.5),
            sampler: Sampler::Euler,
            seed: 7,
            strength: None,
            extend: false,
            forcing: None,
            image: None,
        }
    }

    #[test]
    fn every_setting_of_the_spec_reaches_the_parameters() {
        let p = params_from_spec(&JobSpec::new(spec_request(), ModelFactors::WAN, &Limits::default()).unwrap());
        assert_eq!((p.prompt.as_str(), p.negative_prompt.as_str(), p.width, p.height, p.num_frames), ("a", "b", 64, 32, 9));
        let odd = JobRequest { width: 60, height: 30, ..spec_request() };
        let p = params_from_spec(&JobSpec::new(odd, ModelFactors::WAN, &Limits::default()).unwrap());
        assert_eq!((p.width, p.height), (64, 32), "generated at the next multiple of 16");
        assert_eq!((p.num_inference_steps, p.guidance_scale, p.flow_shift, p.sampler, p.seed), (4, 3.0, Some(2.5), Some(SamplerKind::Euler), 7));
    }
}
