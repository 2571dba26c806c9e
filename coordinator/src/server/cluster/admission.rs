//! Admission: every job is planned before it is accepted, from the workers that serve its model:
//! their device kind (a GPU by name, a CPU by its measured rates), memory, and the model's shape.
//! The group is every worker the job may use; the planner picks its layout (Ulysses × ring),
//! checks that the busiest rank's peak memory fits, and predicts the duration. A job that fits no
//! group of those workers is refused with the numbers. Workers that do not describe their model
//! or device are not planned: their jobs run as before, under the token budget.

use super::table::{group_limit, ulysses_degree};
use crate::plan::{self, Capabilities, Evaluation, GpuKind, JobShape, ModelShape};
use crate::CoordinatorError;
use tessera_cluster::limits::DEFAULT_MAX_TOKENS;
use tessera_cluster::membership::WorkerRecord;
use tessera_cluster::JobSpec;

/// How a job will run.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    /// Ranks of its group.
    pub ranks: usize,
    /// Ulysses degree (the rest of a sequence-parallel group forms rings).
    pub ulysses: usize,
    /// Whether the guidance passes run on two halves of the group.
    pub cfg_parallel: bool,
    /// The planner's evaluation of that layout (`None` when the workers could not be planned).
    pub evaluation: Option<Evaluation>,
}

/// The device kind a group of `workers` (one kind, as the table groups them) runs on, with the
/// memory they offer; `None` when the planner has no figures for it.
pub fn device_kind(workers: &[&WorkerRecord]) -> Option<GpuKind> {
    let first = workers.first()?;
    let device = first.devices.first()?;
    if device.starts_with("cpu") {
        let c = first.compute?;
        // memory: the least any of them offers (0: not said, then not limiting)
        let memory = workers.iter().map(|w| w.memory_bytes).filter(|m| *m > 0).min().unwrap_or(u64::MAX / 2);
        // workers on one host exchange through its memory
        let host = |w: &WorkerRecord| w.address.rsplit_once(':').map_or(w.address.clone(), |(h, _)| h.to_string());
        let same_host = workers.iter().filter(|w| host(w) == host(first)).count() as u32;
        Some(GpuKind { per_node: same_host.max(1), ..GpuKind::cpu(c.flops, c.bytes_per_s, memory) })
    } else {
        GpuKind::from_device(device)
    }
}

/// The planner's shape of the model a worker describes: its transformer, text encoder and VAE
/// (Wan's where it does not say), with the job's factors.
fn model_shape(model: &str, spec: &JobSpec, w: &WorkerRecord) -> Option<ModelShape> {
    let info = &w.model_info;
    let mut shape = ModelShape { factors: spec.factors(), ..ModelShape::wan(model, info.transformer.as_ref()?) };
    if info.image_encoder_params > 0 {
        shape.image_encoder_params = info.image_encoder_params;
    }
    if info.text_encoder_params > 0 {
        shape.text_encoder_params = info.text_encoder_params;
    }
    if info.vae_base_dim > 0 {
        shape.vae.base = info.vae_base_dim.into();
    }
    if info.vae_params > 0 {
        shape.vae.params = info.vae_params;
    }
    Some(shape)
}

/// Plans a job of `spec` for `model` on `workers` (the live workers of its model, of the kind the
/// group would run on), using at most `max_ranks` of them (0: all). `max_tokens` is the
/// operator's token budget (0: none, the plan decides); workers that cannot be planned get
/// [`DEFAULT_MAX_TOKENS`] as their budget.
pub fn admit(model: &str, spec: &JobSpec, workers: &[&WorkerRecord], max_ranks: usize, max_tokens: usize) -> Result<Admitted, CoordinatorError> {
    let ranks = workers.len().min(group_limit(max_ranks, spec.tokens())).max(1);
    let heads = workers.iter().map(|w| w.model_info.attention_heads as usize).min().unwrap_or(0);
    let shape = workers.first().and_then(|w| model_shape(model, spec, w));
    let (Some(shape), Some(gpu)) = (shape, device_kind(workers)) else {
        let budget = if max_tokens == 0 { DEFAULT_MAX_TOKENS as usize } else { max_tokens };
        if spec.tokens() > budget {
            let detail = format!(
                "{}x{} with {} frames is {} tokens; at most {budget} are accepted (the workers serving {model:?} do not describe their model and device for planning)",
                spec.request().width,
                spec.request().height,
                spec.request().num_frames,
                spec.tokens()
            );
            return Err(CoordinatorError::invalid_argument("num_frames", detail));
        }
        return Ok(Admitted { ranks, ulysses: ulysses_degree(ranks, heads), cfg_parallel: false, evaluation: None });
    };
    let job = JobShape::of(spec);
    let e = plan::best(&shape, &job, &gpu, ranks as u32, plan::efficiency(&gpu), Capabilities::TESSERA);
    let e = whole_job(&shape, spec, &gpu, e);
    if let Some(why) = &e.infeasible {
        return Err(CoordinatorError::DoesNotFit(format!(
            "{}x{} with {} frames is {} tokens; on all {ranks} worker(s) serving {model:?} ({}, {}) {why}",
            spec.request().width,
            spec.request().height,
            spec.request().num_frames,
            spec.tokens(),
            gpu.name,
            e.layout.describe()
        )));
    }
    Ok(Admitted { ranks, ulysses: e.layout.ulysses as usize, cfg_parallel: e.layout.cfg_parallel, evaluation: Some(e) })
}

/// The planner's evaluation of the group that actually runs a job: `workers` with Ulysses degree
/// `ulysses`, in CFG halves when `cfg_parallel` (`None` when they cannot be planned).
pub fn evaluate_group(model: &str, spec: &JobSpec, workers: &[&WorkerRecord], ulysses: usize, cfg_parallel: bool) -> Option<Evaluation> {
    let shape = model_shape(model, spec, workers.first()?)?;
    let gpu = device_kind(workers)?;
    let layout = Capabilities::TESSERA.layout(workers.len() as u32, (ulysses as u32).max(1), cfg_parallel);
    Some(whole_job(&shape, spec, &gpu, plan::evaluate(&shape, &JobShape::of(spec), &gpu, layout, plan::efficiency(&gpu))))
}

/// `e` (of a job's shape: a diffusion-forcing job's largest chunk) for the whole job: a
/// diffusion-forcing job's duration is every chunk's on `e`'s layout, and a chunk that does not
/// fit makes it infeasible.
fn whole_job(shape: &ModelShape, spec: &JobSpec, gpu: &GpuKind, mut e: Evaluation) -> Evaluation {
    if let Some(job) = plan::ForcingJob::of(spec) {
        let f = plan::evaluate_forcing(shape, &job, gpu, e.layout, plan::efficiency(gpu));
        e.timing.total = f.total;
        e.infeasible = e.infeasible.or(f.infeasible);
    }
    e
}

/// The plan message's predicted fields from an evaluation: the duration and the busiest rank's
/// peak bytes.
pub fn predicted_fields(e: Option<&Evaluation>) -> (Option<prost_types::Duration>, u64) {
    let duration = e.map(|e| crate::server::jobs::pb_duration(std::time::Duration::from_secs_f64(e.timing.total.clamp(0.0, 1e12))));
    (duration, e.map_or(0, |e| e.memory.peak))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_cluster::limits::{Limits, ModelFactors};
    use tessera_cluster::membership::{ComputeFigures, ModelInfo, WorkerState};
    use tessera_cluster::{JobRequest, TransformerConfig};
    use tessera_proto::v1::Sampler;

    fn worker(id: &str, device: &str, memory: u64, config: Option<TransformerConfig>) -> WorkerRecord {
        let mut w = WorkerRecord::starting(id, format!("{id}.hosts:1"), "x:2", "wan", vec![device.into()], memory);
        w.state = WorkerState::Idle;
        w.model_info = ModelInfo { attention_heads: 12, transformer: config, ..Default::default() };
        w.compute = Some(ComputeFigures { flops: 1e11, bytes_per_s: 2e10 });
        w
    }

    fn spec(width: u32, height: u32, frames: u32) -> JobSpec {
        let r = JobRequest {
            prompt: "a".into(),
            negative_prompt: String::new(),
            width,
            height,
            num_frames: frames,
            steps: 50,
            guidance_scale: 5.0,
            flow_shift: None,
            sampler: Sampler::Unspecified,
            seed: 0,
            strength: None,
            extend: false,
            forcing: None,
            image: None,
        };
        JobSpec::new(r, ModelFactors::WAN, &Limits { max_tokens: u64::MAX, ..Limits::default() }).unwrap()
    }

    #[test]
    fn a_job_larger_than_every_group_is_refused_with_the_numbers() {
        let wan = Some(TransformerConfig::wan21_t2v_14b());
        let ws = [worker("a", "cuda:0 NVIDIA H100 80GB HBM3", 0, wan.clone()), worker("b", "cuda:1 NVIDIA H100 80GB HBM3", 0, wan)];
        let refs: Vec<&WorkerRecord> = ws.iter().collect();
        // a minute of 1080p with the 14B on two H100s
        let err = admit("wan", &spec(1920, 1080, 961), &refs, 0, 0).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CoordinatorError::DoesNotFit(_)), "{err}");
        assert!(text.contains("1966560 tokens") && text.contains("GiB") && text.contains("all 2 worker(s)") && text.contains("h100-80gb"), "{text}");
        // 480p x 81 fits one of them, with a predicted duration
        let ok = admit("wan", &spec(832, 480, 81), &refs, 0, 0).unwrap();
        assert_eq!(ok.ranks, 2);
        let e = ok.evaluation.unwrap();
        assert!(e.timing.total > 0.0 && e.memory.peak < 80 << 30);
        // the static budget no longer refuses what the plan admits: a 720p clip of 121 frames
        // (111,600 tokens, past the old 75,600) is admitted
        assert!(admit("wan", &spec(1280, 720, 121), &refs, 0, 0).is_ok());
    }

    #[test]
    fn workers_that_cannot_be_planned_keep_the_token_budget() {
        let ws = [worker("a", "cuda:0 Some Future GPU", 0, Some(TransformerConfig::wan21_t2v_1_3b())), worker("b", "cpu", 0, None)];
        for w in &ws {
            let err = admit("wan", &spec(1280, 720, 121), &[w], 0, 0).unwrap_err().to_string();
            assert!(err.contains("at most 75600") && err.contains("for planning"), "{err}");
            assert!(admit("wan", &spec(832, 480, 81), &[w], 0, 0).unwrap().evaluation.is_none());
        }
    }

    #[test]
    fn cpu_workers_are_planned_with_their_measured_rates_and_memory() {
        let tiny = TransformerConfig { num_attention_heads: 2, attention_head_dim: 16, text_dim: 32, freq_dim: 32, ..TransformerConfig::wan21(2, 64, 2) };
        let ws = [worker("a", "cpu", 64 << 30, Some(tiny.clone())), worker("b", "cpu", 64 << 30, Some(tiny))];
        let refs: Vec<&WorkerRecord> = ws.iter().collect();
        let g = device_kind(&refs).unwrap();
        assert_eq!((g.name.as_str(), g.per_node, g.memory_bytes), ("cpu", 1, 64 << 30), "different hosts");
        let ok = admit("wan", &spec(64, 48, 5), &refs, 0, 0).unwrap();
        // two hosts, a guided job: the halves run one guidance pass each and swap only the
        // velocity (a ring would pass keys and values over the network every layer)
        assert_eq!((ok.ranks, ok.cfg_parallel, ok.evaluation.unwrap().layout.sp()), (2, true, 1));
        // 1 of the 2 when the operator says so
        assert_eq!(admit("wan", &spec(64, 48, 5), &refs, 1, 0).unwrap().ranks, 1);
    }
}
