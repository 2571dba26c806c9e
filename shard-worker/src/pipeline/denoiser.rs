//! A denoising run that advances one step at a time: the latent, the sampler's history, the
//! schedule and the text conditions — what a shard worker keeps between two of the coordinator's
//! step commands, and what a checkpoint copies out.

use super::{Forward, TextConditions, WanPipeline};
use crate::sampler::{SamplerHistory, SamplerState, Schedule};
use crate::{Result, WorkerError};
use tessera_kernels::Tensor;

/// One run of the denoising loop, step by step.
pub struct Denoiser {
    latents: Tensor,
    state: SamplerState,
    schedule: Schedule,
    text: TextConditions,
    guidance_scale: f32,
    done: usize,
}

impl Denoiser {
    /// A run from the starting `latents` over every step of `schedule`.
    pub fn new(latents: Tensor, text: TextConditions, guidance_scale: f32, schedule: Schedule) -> Self {
        let state = SamplerState::new(schedule.config().kind, latents.len());
        Self { latents, state, schedule, text, guidance_scale, done: 0 }
    }

    /// Resumes a run from a checkpoint: the latent after `steps_done` steps and the sampler
    /// history at that point.
    pub fn resume(latents: Tensor, history: SamplerHistory, steps_done: usize, text: TextConditions, guidance_scale: f32, schedule: Schedule) -> Result<Self> {
        let state = SamplerState::from_history(history)?;
        let total = schedule.num_steps() - schedule.first_step();
        if steps_done > total || state.len() != latents.len() {
            return Err(WorkerError::input(
                "checkpoint",
                format!("{steps_done} steps done of {total}, history of {} values for a latent of {}", state.len(), latents.len()),
            ));
        }
        Ok(Self { latents, state, schedule, text, guidance_scale, done: steps_done })
    }

    /// Steps in the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.num_steps() - self.schedule.first_step()
    }

    /// Steps completed.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// True when every step has run.
    pub fn is_finished(&self) -> bool {
        self.done == self.total_steps()
    }

    /// The latent now.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// The sampler history now (for a checkpoint).
    pub fn history(&self) -> &SamplerHistory {
        self.state.history()
    }

    /// The final latent.
    pub fn into_latents(self) -> Tensor {
        self.latents
    }

    /// Runs the next step with the transformer run by `forward`.
    pub fn step(&mut self, pipe: &WanPipeline, forward: Forward<'_>) -> Result<()> {
        if self.is_finished() {
            return Err(WorkerError::input("step", format!("all {} steps have run", self.total_steps())));
        }
        let i = self.schedule.first_step() + self.done;
        let t = self.schedule.timesteps().get(i).ok_or_else(|| WorkerError::input("step", format!("{i} is past the schedule")))?;
        let v = pipe.velocity_with(&self.latents, t, &self.text, self.guidance_scale, forward)?;
        self.state.step(&self.schedule, i, v.data(), self.latents.data_mut())?;
        self.done += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{GenerationParams, NoObserver, PipelinePreset};

    #[test]
    fn stepping_equals_the_loop_and_resumes_from_a_checkpoint() {
        let pipe = PipelinePreset::Tiny.build(3).unwrap();
        let params = GenerationParams { height: 32, width: 32, num_frames: 5, num_inference_steps: 4, seed: 9, ..GenerationParams::new("a boat") };
        let text = pipe.encode_text(&params.prompt, &params.negative_prompt, params.guidance_scale).unwrap();
        let schedule = pipe.schedule_for(&params).unwrap();
        let start = pipe.initial_latents(&params, &schedule).unwrap();
        let mut looped = start.clone();
        pipe.denoise(&mut looped, &text, params.guidance_scale, &schedule, &mut NoObserver).unwrap();

        let mut d = Denoiser::new(start, text.clone(), params.guidance_scale, schedule.clone());
        let fwd = pipe.local_forward();
        d.step(&pipe, &fwd).unwrap();
        d.step(&pipe, &fwd).unwrap();
        let mut resumed = Denoiser::resume(d.latents().clone(), d.history().clone(), d.steps_done(), text, params.guidance_scale, schedule).unwrap();
        while !resumed.is_finished() {
            resumed.step(&pipe, &fwd).unwrap();
        }
        assert_eq!(resumed.latents().data(), looped.data(), "stepping and resuming must give the loop's latent bit for bit");
        assert!(resumed.step(&pipe, &fwd).is_err());
    }
}
