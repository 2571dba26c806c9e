//! Published figures, and the planner's predictions beside them. Each GPU kind's efficiency
//! factor is fitted to its one single-GPU figure; every multi-GPU figure is then predicted from
//! datasheet bandwidths and the model's shape, never fitted.

use super::cost::{evaluate, JobShape, Layout};
use super::gpu::{gpu_kind, EfficiencySource, GpuKind};
use super::model::{preset, ModelShape};
use tessera_cluster::limits::{grid_tokens, latent_grid};

/// One published latency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Published {
    /// The system measured.
    pub system: &'static str,
    /// The model, as a planner preset.
    pub model: &'static str,
    /// Frame width.
    pub width: u64,
    /// Frame height.
    pub height: u64,
    /// Frames.
    pub frames: u64,
    /// Denoising steps.
    pub steps: u64,
    /// Whether classifier-free guidance was on.
    pub guidance: bool,
    /// GPU kind (a `--gpu` name).
    pub gpu: &'static str,
    /// GPUs (Ulysses degree: the published runs use Ulysses only).
    pub gpus: u32,
    /// Seconds.
    pub seconds: f64,
    /// Whether the figure covers the transformer's steps only (else the whole pipeline, with the
    /// VAE decoded on one GPU as those systems do).
    pub dit_only: bool,
    /// Where it was published.
    pub source: &'static str,
}

const XDIT: &str = "xDiT docs/performance/hunyuanvideo.md (HunyuanVideo repository, Ulysses)";

/// An xDiT HunyuanVideo figure. The runs are the HunyuanVideo repository's `sample_video.py` with
/// its defaults: the guidance-distilled model with `--cfg-scale 1.0` (no classifier-free guidance;
/// the guidance is embedded), the VAE tiled in fp16, and the time it logs covering the text
/// encoders, the steps and the VAE decode, not the model loads.
const fn xdit(gpu: &'static str, gpus: u32, seconds: f64) -> Published {
    Published {
        system: "xDiT",
        model: "hunyuanvideo",
        width: 1280,
        height: 720,
        frames: 129,
        steps: 50,
        guidance: false,
        gpu,
        gpus,
        seconds,
        dit_only: false,
        source: XDIT,
    }
}

/// The published figures (`../shared/reference/parallelism.md`; the 2- and 4-GPU figures are
/// from the same xDiT table).
pub const PUBLISHED: [Published; 9] = [
    xdit("h100-80gb", 1, 1904.08),
    xdit("h100-80gb", 2, 925.04),
    xdit("h100-80gb", 4, 514.08),
    xdit("h100-80gb", 8, 337.58),
    xdit("h20", 1, 6639.17),
    xdit("h20", 2, 3400.55),
    xdit("h20", 4, 1762.86),
    xdit("h20", 8, 940.97),
    Published {
        system: "FastVideo",
        model: "wan2.1-t2v-14b",
        width: 1280,
        height: 720,
        frames: 81,
        steps: 50,
        guidance: true,
        gpu: "h200",
        gpus: 1,
        seconds: 1746.5,
        dit_only: true,
        source: "hao-ai-lab FastVideo blog (FlashAttention-2, DiT only)",
    },
];

impl Published {
    /// The job's shape.
    pub fn job(&self, model: &ModelShape) -> JobShape {
        let grid = latent_grid(self.frames, self.height, self.width, model.factors);
        JobShape {
            tokens: grid_tokens(grid, model.factors).unwrap_or(0),
            latent_fhw: grid,
            frames: self.frames,
            height: self.height,
            width: self.width,
            steps: self.steps,
            guidance: self.guidance,
            causal_blocks: 1,
            whole_output: false,
        }
    }

    /// The planner's seconds for this run at `efficiency`: Ulysses over all GPUs, the VAE on one.
    pub fn predict(&self, efficiency: f64) -> f64 {
        let (model, gpu) = (self.model_shape(), self.gpu_kind());
        let layout = Layout { gpus: self.gpus, ulysses: self.gpus, ring: 1, cfg_parallel: false, vae_ranks: 1 };
        let t = evaluate(&model, &self.job(&model), &gpu, layout, efficiency).timing;
        if self.dit_only {
            t.denoise
        } else {
            t.total
        }
    }

    fn model_shape(&self) -> ModelShape {
        preset(self.model).expect("published figures name planner presets")
    }

    fn gpu_kind(&self) -> GpuKind {
        gpu_kind(self.gpu).expect("published figures name known GPU kinds")
    }
}

/// The achieved-efficiency factor of `gpu`: the one that makes the prediction of its published
/// single-GPU run equal the published time. The prediction is `a / efficiency + b` (`b`: what
/// does not run at the device's rates, such as loading the text encoder over PCIe), so two
/// evaluations give `a` and `b`, and the factor is `a / (published − b)`.
pub fn efficiency(gpu: &GpuKind) -> f64 {
    match gpu.efficiency {
        EfficiencySource::Published(i) => {
            let p = &PUBLISHED[i];
            let (at_1, at_half) = (p.predict(1.0), p.predict(0.5));
            let (a, b) = (at_half - at_1, 2.0 * at_1 - at_half);
            a / (p.seconds - b)
        }
        EfficiencySource::SameAs(kind) => gpu_kind(kind).map_or(1.0, |g| efficiency(&g)),
        EfficiencySource::Measured => 1.0,
    }
}

/// One published figure against the prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The figure.
    pub published: Published,
    /// The efficiency factor used (fitted on the kind's single-GPU figure).
    pub efficiency: f64,
    /// Predicted seconds.
    pub predicted_seconds: f64,
    /// Published speedup over one GPU of the same kind (`None` for single-GPU figures, which are
    /// what the factor is fitted to).
    pub published_speedup: Option<f64>,
    /// Predicted speedup.
    pub predicted_speedup: Option<f64>,
    /// `predicted / published − 1` of the speedup (of the seconds for single-GPU figures, zero by
    /// construction when the factor was fitted to it).
    pub error: f64,
    /// Seconds that did not shrink with the GPUs in the published runs, by Amdahl's law from the
    /// one- and this many-GPU figures: `(n·T_n − T_1) / (n − 1)`.
    pub published_serial_seconds: Option<f64>,
}

/// Every published figure beside the planner's prediction.
pub fn compare() -> Vec<Comparison> {
    PUBLISHED
        .iter()
        .map(|p| {
            let eff = efficiency(&p.gpu_kind());
            let predicted = p.predict(eff);
            let one = PUBLISHED.iter().find(|q| q.system == p.system && q.gpu == p.gpu && q.model == p.model && q.gpus == 1);
            match one {
                Some(one) if p.gpus > 1 => {
                    let published = one.seconds / p.seconds;
                    let predicted_speedup = one.predict(eff) / predicted;
                    let n = f64::from(p.gpus);
                    Comparison {
                        published: *p,
                        efficiency: eff,
                        predicted_seconds: predicted,
                        published_speedup: Some(published),
                        predicted_speedup: Some(predicted_speedup),
                        error: predicted_speedup / published - 1.0,
                        published_serial_seconds: Some((n * p.seconds - one.seconds) / (n - 1.0)),
                    }
                }
                _ => Comparison {
                    published: *p,
                    efficiency: eff,
                    predicted_seconds: predicted,
                    published_speedup: None,
                    predicted_speedup: None,
                    error: predicted / p.seconds - 1.0,
                    published_serial_seconds: None,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_are_fitted_to_the_single_gpu_figures_and_plausible() {
        for c in compare().iter().filter(|c| c.published.gpus == 1) {
            assert!(c.error.abs() < 1e-9, "the fit is exact: {c:?}");
            // achieved fractions of peak that published video DiT runs imply: 30-75 %
            assert!(c.efficiency > 0.25 && c.efficiency < 0.8, "{c:?}");
        }
        // HunyuanVideo 720p x 129 frames: 118,800 tokens
        let p = PUBLISHED[0];
        assert_eq!(p.job(&p.model_shape()).tokens, 118_800);
    }

    #[test]
    fn multi_gpu_speedups_are_predicted_not_fitted() {
        let rows = compare();
        assert_eq!(rows.iter().filter(|c| c.published_speedup.is_some()).count(), 6);
        for c in rows.iter().filter(|c| c.published_speedup.is_some()) {
            let s = c.predicted_speedup.unwrap();
            // more GPUs never predicted slower, never faster than linear
            assert!(s > 1.0 && s <= f64::from(c.published.gpus) + 1e-9, "{c:?}");
            // within 20 % of the published speedup, but for xDiT on 8 H100s: there the published
            // runs keep ~114 s that do not shrink with the GPUs (Amdahl, from their own 1- and
            // 8-GPU figures; ~127 s on H20, so not bound by FLOP/s), which datasheet figures do
            // not predict; the model then over-predicts the speedup by about a third. Pinned
            // here so that a change to the model that explains it updates this note.
            let outlier = c.published.gpu == "h100-80gb" && c.published.gpus == 8;
            if outlier {
                assert!(c.error > 0.2 && c.error < 0.45, "{c:?}");
                assert!((c.published_serial_seconds.unwrap() - 114.0).abs() < 1.0, "{c:?}");
            } else {
                assert!(c.error.abs() <= 0.2, "{c:?}");
            }
        }
    }
}
